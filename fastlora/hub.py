"""Where adapter files come from and go to: a local directory, or a Hugging Face Hub repository.

A name that is an existing directory is read from disk; anything else is taken as a Hub repository id
and resolved through ``huggingface_hub`` (its cache, ``revision``, ``token``, ``cache_dir``,
``local_files_only`` and the ``HF_HUB_OFFLINE`` setting apply as for PEFT).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["HUB_KWARGS", "resolve_file", "split_hub_kwargs", "upload_folder"]

# The keyword arguments of ``from_pretrained`` that are passed on to huggingface_hub.
HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "proxies", "subfolder")


def split_hub_kwargs(kwargs: dict) -> tuple[dict, dict]:
    """(the Hub keyword arguments, the rest)."""
    hub = {k: v for k, v in kwargs.items() if k in HUB_KWARGS}
    return hub, {k: v for k, v in kwargs.items() if k not in HUB_KWARGS}


def resolve_file(model_id: str | os.PathLike, filename: str, *, subfolder: str | None = None,
                 revision: str | None = None, token=None, cache_dir=None, local_files_only: bool = False,
                 force_download: bool = False, proxies=None, missing_ok: bool = False) -> Path | None:
    """The local path of ``filename`` in ``model_id`` (a directory, or a Hub repository id), or None when the
    directory or repository exists but holds no such file (with ``missing_ok``, also when the file is not in
    the local cache while offline).  Anything else raises ValueError naming it."""
    local = Path(model_id)
    if subfolder:
        if local.is_dir() and not (local / subfolder).is_dir():
            raise ValueError(f"adapter directory {str(model_id)!r} has no sub-folder {subfolder!r}")
        local = local / subfolder
    if local.is_dir():
        path = local / filename
        return path if path.is_file() else None
    if Path(model_id).exists():
        raise ValueError(f"adapter location {str(model_id)!r} is a file, not a directory or a Hub repository id")
    repo_id = os.fspath(model_id)
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise ValueError(
            f"adapter location {repo_id!r} is not a local directory, and huggingface_hub (needed to read it "
            f"from the Hub) is not installed"
        ) from None
    try:
        return Path(huggingface_hub.hf_hub_download(
            repo_id, filename, subfolder=subfolder or None, revision=revision, token=token, cache_dir=cache_dir,
            local_files_only=local_files_only, force_download=force_download, library_name="fastlora",
        ))
    except errors.LocalEntryNotFoundError:  # before EntryNotFoundError: in some versions a subclass of it
        if missing_ok:
            return None
        raise ValueError(
            f"adapter location {repo_id!r} is not a local directory, and {filename} of that Hub repository is not "
            f"in the local cache (offline, or local_files_only=True)"
        ) from None
    except errors.EntryNotFoundError:  # the repository is there, the file is not
        return None
    except errors.HFValidationError:
        raise ValueError(f"adapter location {repo_id!r} is neither a local directory nor a valid Hub repository id") from None
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as err:
        raise ValueError(f"adapter location {repo_id!r}: {type(err).__name__} on the Hub ({err})") from None


def upload_folder(folder: str | os.PathLike, repo_id: str, *, commit_message: str, commit_description: str | None = None,
                  private: bool | None = None, token=None, revision: str | None = None, create_pr: bool = False) -> object:
    """Create ``repo_id`` if needed and upload ``folder`` to it in one commit; returns the commit info."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                             commit_description=commit_description, revision=revision, create_pr=create_pr)

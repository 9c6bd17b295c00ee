"""Adapters from the Hugging Face Hub without a network: a prepared local cache (revisions, local_files_only),
and push_to_hub with the upload intercepted."""

import shutil

import pytest
import torch
from huggingface_hub import HfApi

from fastlora import LoraConfig, LoraModel, get_peft_model
from fastlora.peft_format import CONFIG_NAME
from tests.models import assert_unchanged, clone, snapshot, tiny_llama, tokens


def _adapter(tmp_path, base, name, scale):
    fm = get_peft_model(clone(base), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4))
    with torch.no_grad():
        for _, layer in fm.lora_layers():
            layer.lora_B.fill_(scale)
    fm.save_pretrained(tmp_path / name)
    return fm.eval()


def _cache(cache_dir, repo_id, revisions: dict):
    """huggingface_hub's cache layout: refs/<revision> holds a commit hash, snapshots/<hash>/ the files."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    for i, (revision, folder) in enumerate(revisions.items()):
        commit = f"{i + 1:040x}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
        shutil.copytree(folder, repo / "snapshots" / commit)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=tokens()).logits


def test_from_pretrained_resolves_a_hub_id_from_the_cache_with_revisions(tmp_path):
    base = tiny_llama()
    main, v2 = _adapter(tmp_path, base, "main", 0.01), _adapter(tmp_path, base, "v2", -0.02)
    cache = tmp_path / "cache"
    _cache(cache, "someone/tiny-adapter", {"main": tmp_path / "main", "v2": tmp_path / "v2"})
    kwargs = dict(cache_dir=cache, local_files_only=True)
    loaded = LoraModel.from_pretrained(clone(base), "someone/tiny-adapter", **kwargs)
    torch.testing.assert_close(_logits(loaded), _logits(main))
    loaded_v2 = LoraModel.from_pretrained(clone(base), "someone/tiny-adapter", revision="v2", token=None, **kwargs)
    torch.testing.assert_close(_logits(loaded_v2), _logits(v2))
    config = LoraConfig.from_pretrained("someone/tiny-adapter", revision="v2", **kwargs)
    assert config.r == 4 and config.inference_mode


def test_missing_hub_adapter_is_a_clear_error_and_changes_nothing(tmp_path):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="not in the local cache"):
        LoraModel.from_pretrained(model, "someone/absent", cache_dir=tmp_path, local_files_only=True)
    with pytest.raises(ValueError, match="neither a local directory nor a valid Hub repository id"):
        LoraModel.from_pretrained(model, "not//a valid id", cache_dir=tmp_path, local_files_only=True)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        LoraModel.from_pretrained(model, tmp_path / "a-file")
    assert_unchanged(model, before)


def test_push_to_hub_uploads_the_adapter_folder(tmp_path, monkeypatch):
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = sorted(p.relative_to(folder_path).as_posix() for p in __import__("pathlib").Path(folder_path).rglob("*"))
        card = (__import__("pathlib").Path(folder_path) / "README.md").read_text()
        calls.append(("upload_folder", repo_id, files, card, kwargs))
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    fm = _adapter(tmp_path, tiny_llama(), "local", 0.01)
    fm.add_adapter("other", LoraConfig(target_modules=["q_proj"], r=2))
    assert fm.push_to_hub("me/my-adapter", commit_message="first", private=True, tags=["mine"]) == "commit-info"
    (_, repo, create_kwargs), (_, repo2, files, card, upload_kwargs) = calls
    assert repo == repo2 == "me/my-adapter" and create_kwargs["private"] is True
    assert files == ["README.md", CONFIG_NAME, "adapter_model.safetensors", "other", f"other/{CONFIG_NAME}",
                     "other/adapter_model.safetensors"]
    assert upload_kwargs["commit_message"] == "first" and "- mine" in card and "library_name: peft" in card

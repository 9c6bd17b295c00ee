"""The one way fastlora writes a file: atomically, with the mode a plain ``open()`` would give."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write", "atomic_write_text", "save_tensors", "saved_tensors"]


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (changing it is process-wide)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``path``: readers see the old file or the new one, and a
    crash leaves no half-written file.  The temporary file's private mode would survive the rename, so the file
    gets the mode ``open(path, "w")`` gives under the process's umask instead."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write` of ``text`` (UTF-8)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_tensors(path: str | os.PathLike, tensors: dict) -> None:
    """:func:`atomic_write` of ``torch.save(tensors)`` (a dict of tensors), its folder made where missing."""
    import torch

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(tensors, tmp))


def saved_tensors(path: str | os.PathLike | None, device) -> dict | None:
    """What :func:`save_tensors` (or PEFT's ``torch.save`` of a dict of tensors) wrote at ``path``, on ``device``;
    None where ``path`` is None, missing or empty.  Read with ``weights_only``: plain tensors, never code."""
    if path is None or not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    import torch

    return torch.load(path, map_location=device, weights_only=True)

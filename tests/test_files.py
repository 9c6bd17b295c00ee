"""fastlora.files: every file fastlora saves is written whole or not at all, with the mode open() would give."""

from __future__ import annotations

import os
import stat

import pytest

from fastlora import LoraConfig
from fastlora.files import atomic_write, atomic_write_text


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_files_get_the_mode_open_would_give(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        LoraConfig(target_modules=["q_proj"]).save_pretrained(tmp_path / "adapter")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    for path in (tmp_path / "a.txt", tmp_path / "adapter" / "adapter_config.json", tmp_path / "plain.txt"):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text("old")

    def half_then_crash(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_crash)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["adapter_config.json"]


def test_config_save_goes_through_the_atomic_writer(tmp_path, monkeypatch):
    (tmp_path / "adapter_config.json").write_text("old")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        LoraConfig(target_modules=["q_proj"]).save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").read_text() == "old" and len(os.listdir(tmp_path)) == 1


def test_a_save_refused_for_a_second_adapter_s_folder_writes_nothing(tmp_path):
    """The folder of a second adapter taken by a file, or an adapter file's name taken by a folder: refused before
    any adapter is written, so that an earlier save in that folder stays whole."""
    from fastlora import get_peft_model
    from tests.models import tiny_llama

    get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], r=4)).save_pretrained(tmp_path)
    (tmp_path / "other").write_text("notes")
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    model = get_peft_model(tiny_llama(seed=1), LoraConfig(target_modules=["q_proj"], r=8, init_lora_weights=False))
    model.add_adapter("other", LoraConfig(target_modules=["q_proj"], r=8))
    with pytest.raises(ValueError, match="which is a file; nothing was written"):
        model.save_pretrained(tmp_path)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    (tmp_path / "other").unlink()
    (tmp_path / "other" / "adapter_config.json").mkdir(parents=True)  # a folder where the second config goes
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}
    with pytest.raises(ValueError, match="is a folder where an adapter file goes; nothing was written"):
        model.save_pretrained(tmp_path)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == before


"""Faults lose nothing: a save killed part way leaves the previous adapter intact and loadable; a load that
fails part way leaves every layer as it was."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import fastlora.model_files
from fastlora import LoraConfig, LoraModel, get_peft_model
from fastlora.peft_format import CONFIG_NAME, WEIGHTS_NAME
from tests.models import assert_unchanged, clone, snapshot, tiny_llama, tokens

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["q_proj", "v_proj", "up_proj"]

_CHILD = textwrap.dedent('''
    import sys, time
    sys.path.insert(0, {root!r})
    import safetensors.torch
    import torch
    from fastlora import LoraConfig, get_peft_model
    from tests.models import tiny_llama

    real_save = safetensors.torch.save_file

    def slow_save(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:   # half of the new file on disk, then hang until killed
            f.truncate(f.seek(0, 2) // 2)
        open({ready!r}, "w").close()
        time.sleep(600)

    safetensors.torch.save_file = slow_save
    model = get_peft_model(tiny_llama(seed=7), LoraConfig(target_modules={targets!r}, r=4, init_lora_weights=False))
    model.save_pretrained({directory!r})
''')


def _trained(seed=0):
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS, r=4))
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.lora_layers():
            layer.lora_B.normal_(0, 0.05)
    return model.eval()


def test_killed_save_leaves_the_previous_adapter(tmp_path):
    first = _trained()
    first.save_pretrained(tmp_path)
    good = {name: (tmp_path / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME, "README.md")}
    ready = tmp_path.parent / f"{tmp_path.name}-ready"
    script = _CHILD.format(root=str(ROOT), ready=str(ready), targets=TARGETS, directory=str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the child never reached the middle of its save"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=30)
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    for name, content in good.items():
        assert (tmp_path / name).read_bytes() == content, name
    leftovers = [n for n in os.listdir(tmp_path) if n not in good]
    assert all(n.startswith(f".{WEIGHTS_NAME}.") and n.endswith(".tmp") for n in leftovers), leftovers
    loaded = LoraModel.from_pretrained(clone(tiny_llama()), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens()).logits, first(input_ids=tokens()).logits)


def _fail_on_nth_copy(monkeypatch, n):
    real, calls = fastlora.model_files._copy_one, []

    def copy(param, value):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("disk read error (simulated)")
        real(param, value)

    monkeypatch.setattr(fastlora.model_files, "_copy_one", copy)


def test_failed_from_pretrained_leaves_the_model_as_it_was(tmp_path, monkeypatch):
    _trained().save_pretrained(tmp_path)
    model = tiny_llama()
    modules = dict(model.named_modules())
    before = snapshot(model)
    _fail_on_nth_copy(monkeypatch, 5)
    with pytest.raises(RuntimeError, match="simulated"):
        LoraModel.from_pretrained(model, tmp_path)
    assert_unchanged(model, before)
    assert all(module is modules[name] for name, module in model.named_modules())  # the same objects


def test_failed_load_into_an_existing_adapter_restores_its_values(tmp_path, monkeypatch):
    _trained(seed=1).save_pretrained(tmp_path)
    model = _trained(seed=2)
    before = snapshot(model)
    _fail_on_nth_copy(monkeypatch, 7)
    with pytest.raises(RuntimeError, match="simulated"):
        model.load_adapter(tmp_path, adapter_name="default")
    assert_unchanged(model, before)


def test_failed_load_of_a_new_adapter_removes_it(tmp_path, monkeypatch):
    other = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "k_proj"], r=2))
    other.save_pretrained(tmp_path)
    model = _trained()
    modules = dict(model.named_modules())
    before = snapshot(model)
    _fail_on_nth_copy(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="simulated"):
        model.load_adapter(tmp_path, adapter_name="other")
    assert_unchanged(model, before)
    assert list(model.peft_config) == ["default"]
    assert all(module is modules[name] for name, module in model.named_modules())

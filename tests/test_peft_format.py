"""PEFT-format adapter files: round trips with PEFT both ways, atomic saves, bad files refused before
anything in the model changes."""

import json
import os

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from fastlora import LoraConfig, LoraModel, get_peft_model
from fastlora.peft_format import CONFIG_NAME, WEIGHTS_NAME
from tests.models import SEED_TARGETS, assert_unchanged, clone, snapshot, tiny_llama, tokens
from tests.tolerances import assert_close


def _trained(base, **kwargs):
    """A fastlora model whose adapters hold non-zero values."""
    fm = get_peft_model(clone(base), LoraConfig(task_type="CAUSAL_LM", target_modules=SEED_TARGETS, r=8,
                                                lora_alpha=32, lora_dropout=0.1, **kwargs))
    torch.manual_seed(5)
    with torch.no_grad():
        for _, layer in fm.lora_layers():
            layer.lora_B.normal_(0, 0.05)
    return fm.eval()


def test_fastlora_save_loads_in_peft(tmp_path):
    base = tiny_llama()
    fm = _trained(base)
    fm.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 32
    assert config["inference_mode"] is True and config["task_type"] == "CAUSAL_LM"
    keys = load_file(tmp_path / WEIGHTS_NAME).keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 28
    pm = peft.PeftModel.from_pretrained(clone(base), tmp_path).eval()
    ids = tokens()
    with torch.no_grad():
        assert_close(pm(input_ids=ids).logits, fm(input_ids=ids).logits, kind="same_math")


def test_peft_save_loads_in_fastlora(tmp_path):
    base = tiny_llama()
    pm = peft.get_peft_model(clone(base), peft.LoraConfig(task_type="CAUSAL_LM", target_modules=SEED_TARGETS, r=4,
                                                          lora_alpha=16, lora_dropout=0.1, init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    fm = LoraModel.from_pretrained(clone(base), tmp_path)
    assert fm.get_nb_trainable_parameters()[0] == 0 and not fm.training
    pm.eval()
    ids = tokens()
    with torch.no_grad():
        assert_close(fm(input_ids=ids).logits, pm(input_ids=ids).logits, kind="same_math")
    trainable = LoraModel.from_pretrained(clone(base), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()


def test_round_trip_with_bias_and_modules_to_save(tmp_path):
    base = tiny_llama(attention_bias=True)
    fm = _trained(base, bias="all", modules_to_save=["lm_head"])
    with torch.no_grad():
        fm.model.lm_head.weight.add_(0.01)
        fm.model.model.layers[0].self_attn.q_proj.bias.add_(0.1)
    fm.save_pretrained(tmp_path)
    keys = load_file(tmp_path / WEIGHTS_NAME).keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias" in keys
    assert "base_model.model.lm_head.weight" in keys
    loaded = LoraModel.from_pretrained(clone(base), tmp_path)
    pm = peft.PeftModel.from_pretrained(clone(base), tmp_path).eval()
    ids = tokens()
    with torch.no_grad():
        want = fm(input_ids=ids).logits
        assert_close(loaded(input_ids=ids).logits, want, kind="same_math")
        assert_close(pm(input_ids=ids).logits, want, kind="same_math")


def test_save_is_atomic(tmp_path, monkeypatch):
    base = tiny_llama()
    first = _trained(base)
    first.save_pretrained(tmp_path)
    good = {name: (tmp_path / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt("killed mid-save (simulated)")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    second = _trained(tiny_llama(seed=3))
    with pytest.raises(KeyboardInterrupt):
        second.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]  # no temporary left behind
    for name, content in good.items():
        assert (tmp_path / name).read_bytes() == content


def _saved(tmp_path, base):
    _trained(base).save_pretrained(tmp_path)
    return load_file(tmp_path / WEIGHTS_NAME)


def _assert_refused(tmp_path, base, match, **options):
    model = clone(base)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        LoraModel.from_pretrained(model, tmp_path, **options)
    assert_unchanged(model, before)


@pytest.mark.parametrize("check", [None, "warn", "error", "ignore"])
def test_missing_key_refused(tmp_path, check):
    """Whatever PEFT's strict_adapter_check asks (PEFT: "warn" by default, and load the rest), a file missing a
    tensor is refused: the adapter would start half from the file, half from its initialisation."""
    base = tiny_llama()
    tensors = _saved(tmp_path, base)
    LoraModel.from_pretrained(clone(base), tmp_path, **({} if check is None else {"strict_adapter_check": check}))
    del tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    options = {} if check is None else {"strict_adapter_check": check}
    _assert_refused(tmp_path, base, "missing keys: base_model.model.model.layers.1.mlp.down_proj.lora_B", **options)
    model = get_peft_model(clone(base), LoraConfig(target_modules=["q_proj"]))
    before = snapshot(model)
    with pytest.raises(ValueError, match="missing keys: base_model.model.model.layers.1.mlp.down_proj.lora_B"):
        model.load_adapter(tmp_path, "other", **options)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="strict_adapter_check must be one of 'warn', 'error' or 'ignore', got 'yes'"):
        LoraModel.from_pretrained(clone(base), tmp_path, strict_adapter_check="yes")


def test_wrong_rank_refused(tmp_path):
    base = tiny_llama()
    _saved(tmp_path, base)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "r": 4}))
    _assert_refused(tmp_path, base, r"lora_A.weight has shape \(8, \d+\), the model needs \(4, \d+\)")


def test_other_base_model_refused(tmp_path):
    _saved(tmp_path, tiny_llama(hidden_size=32, intermediate_size=48))
    _assert_refused(tmp_path, tiny_llama(), "shape")


def test_corrupt_or_missing_files_refused(tmp_path):
    base = tiny_llama()
    _saved(tmp_path, base)
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    _assert_refused(tmp_path, base, "not a readable safetensors file")
    (tmp_path / CONFIG_NAME).write_text("{not json")
    _assert_refused(tmp_path, base, "not valid JSON")
    os.unlink(tmp_path / CONFIG_NAME)
    _assert_refused(tmp_path, base, "does not exist")


def test_unexpected_keys_refused(tmp_path):
    base = tiny_llama()
    tensors = _saved(tmp_path, base)
    tensors["base_model.model.model.layers.0.mlp.nope.lora_A.weight"] = torch.zeros(8, 64)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    _assert_refused(tmp_path, base, "no place for")


class _Marker:
    """A pickle that runs code when loaded without weights_only: it creates the file named by ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_bin_file_is_loaded_weights_only_even_when_the_environment_says_otherwise(tmp_path, monkeypatch):
    """torch honours TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 for a torch.load that does not ask for weights_only
    itself: fastlora's loader asks, so a pickle carrying code is refused, never run."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=SEED_TARGETS, r=4))
    model.save_pretrained(tmp_path, safe_serialization=False)
    marker = tmp_path / "code-ran"
    torch.save({"base_model.model.x": _Marker(marker)}, tmp_path / "adapter_model.bin")
    before = snapshot(model)
    with pytest.raises(ValueError, match="not a readable PyTorch weights file"):
        LoraModel.from_pretrained(tiny_llama(), tmp_path)
    with pytest.raises(ValueError, match="not a readable PyTorch weights file"):
        model.load_adapter(tmp_path, adapter_name="other")
    assert not marker.exists()
    assert_unchanged(model, before)

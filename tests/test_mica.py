"""MiCA (init_lora_weights="mica"): B the weight's minor left singular vectors, frozen, A = 0 and trained, compared
with PEFT's from the same seed (factors, requires_grad, trainable counts, layer status, training steps, files both
ways), B frozen through every adapter operation, and the refusals."""

import warnings

import peft
import pytest
import torch

import fastlora
from fastlora import UnsupportedFeatureError
from tests.models import (PEFT_BEFORE_0_22, assert_refused_on_a_4bit_model, assert_unchanged, clone, load_quantized, snapshot,
                          tiny_gpt2, tiny_llama, tokens)
from tests.tolerances import assert_close

LLAMA = dict(target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], r=4, lora_alpha=8)
GPT2 = dict(target_modules=["c_attn", "c_proj"], r=2, lora_alpha=8)


def _pair(base, settings):
    models = []
    for library in (peft, fastlora):
        torch.manual_seed(3)
        models.append(library.get_peft_model(clone(base), library.LoraConfig(**settings, init_lora_weights="mica")))
        models.append(torch.get_rng_state())
    return models


def _their_factors(layer):
    if "default" in layer.lora_A:
        return layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]


@pytest.mark.parametrize("setup", ["llama", "bf16", "gpt2-conv1d"])
def test_mica_starts_and_trains_as_peft_s(setup):
    base, settings, ids = tiny_llama(), LLAMA, tokens()
    if setup == "bf16":
        base = base.to(torch.bfloat16)
    elif setup == "gpt2-conv1d":
        base, settings, ids = tiny_gpt2(), GPT2, tokens(vocab=64)
    theirs, their_generator, ours, our_generator = _pair(base, settings)
    assert torch.equal(our_generator, their_generator)
    layers = dict(ours.lora_layers())
    assert len(layers) > 0
    for name, layer in layers.items():
        A, B = layer.lora_factors("default")
        their_A, their_B = _their_factors(theirs.base_model.model.get_submodule(name))
        assert torch.equal(A, their_A) and torch.equal(B, their_B), name
        assert not A.any() and B.any() and A.requires_grad and not B.requires_grad, name
        # PEFT 0.21's cast of a bf16 base's embedding factors to float32 made new parameters: its B trained there
        assert their_B.requires_grad == (PEFT_BEFORE_0_22 and setup == "bf16" and "embed" in name), name
        weight = layer.base_weight().float()  # B's columns: the left singular vectors of W's r smallest values
        U, _, _ = torch.linalg.svd(weight, full_matrices=False)
        assert_close(B.abs().float(), U[:, -B.shape[1]:].abs(), kind="same_math", dtype=base.dtype)
    if setup == "bf16" and PEFT_BEFORE_0_22:
        return
    trainable = [sum(p.numel() for p in model.parameters() if p.requires_grad) for model in (ours, theirs)]
    assert trainable[0] == trainable[1]
    assert [(s.name, s.requires_grad) for s in fastlora.get_layer_status(ours)] == \
        [(s.name, s.requires_grad) for s in peft.get_layer_status(theirs)]
    frozen = {name: layer.lora_factors("default")[1].clone() for name, layer in layers.items()}
    losses = {}
    for library, model in (("peft", theirs), ("fastlora", ours)):
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses[library] = []
        for _ in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[library].append(loss.item())
    # (a bf16 base's loss is float32 from bf16 logits: bf16's precision)
    assert_close(torch.tensor(losses["fastlora"]), torch.tensor(losses["peft"]), kind="same_math", dtype=base.dtype)
    for name, layer in layers.items():
        A, B = layer.lora_factors("default")
        assert torch.equal(B, frozen[name]) and A.any(), name  # only A trained


def test_b_stays_frozen_through_adapter_operations_and_files(tmp_path):
    base, ids = tiny_llama(), tokens()
    theirs, _, ours, _ = _pair(base, LLAMA)
    ours.add_adapter("other", fastlora.LoraConfig(target_modules=["q_proj"], r=2))
    for operation in (lambda: ours.set_adapter("other"), lambda: ours.set_adapter("default"),
                      lambda: ours.base_model.set_adapter(["default", "other"]), lambda: ours.set_adapter("default"),
                      ours.disable_adapter_layers, ours.enable_adapter_layers,
                      lambda: ours.base_model.set_requires_grad("default", True)):
        operation()
        assert not any(layer.lora_factors("default")[1].requires_grad for _, layer in ours.lora_layers("default"))
    assert all(layer.lora_factors("default")[0].requires_grad for _, layer in ours.lora_layers("default"))
    with torch.no_grad():
        for model in (theirs, ours):
            for name, param in model.named_parameters():
                if "lora_A" in name or "lora_embedding_A" in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
        want = theirs(input_ids=ids).logits
        assert_close(ours(input_ids=ids).logits, want, kind="same_math")
    ours.delete_adapter("other")
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    for library, folder in ((peft, "ours"), (fastlora, "theirs"), (fastlora, "ours")):
        loaded = library.PeftModel.from_pretrained(clone(base), tmp_path / folder, is_trainable=True)
        with torch.no_grad():
            assert_close(loaded(input_ids=ids).logits, want, kind="same_math")
        trainable = {name for name, p in loaded.named_parameters() if p.requires_grad}
        assert trainable and not any("lora_B" in name or "lora_embedding_B" in name for name in trainable)
    merged = ours.merge_and_unload()
    with torch.no_grad():
        assert_close(merged(input_ids=ids).logits, want, kind="same_math_max")


def test_refusals_leave_the_model_unchanged(tmp_path):
    with pytest.raises(UnsupportedFeatureError, match="'mica', use_dora=True"):
        fastlora.LoraConfig(target_modules=["q_proj"], init_lora_weights="mica", use_dora=True)
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="at most 32"):  # v_proj: 64 → 32
        fastlora.get_peft_model(model, fastlora.LoraConfig(target_modules=["v_proj"], r=33, init_lora_weights="mica"))
    assert_unchanged(model, before)
    assert_refused_on_a_4bit_model(tmp_path, lambda quantized: fastlora.get_peft_model(
        quantized, fastlora.LoraConfig(target_modules=["q_proj"], init_lora_weights="mica")),
        TypeError, "Please initialize MiCA under float32")


def test_a_layer_made_with_mica_keeps_its_b():
    layer = fastlora.LoRALinear(16, 12, r=4, init_lora_weights="mica")
    A, B = layer.lora_factors()
    assert not A.any() and not B.requires_grad and A.requires_grad
    assert layer.adapter_parameters() == [A]
    layer.enable_adapters(False)
    layer.enable_adapters(True)
    assert not B.requires_grad and A.requires_grad
    A.data.normal_()
    layer(torch.randn(3, 16)).sum().backward()
    assert A.grad is not None and B.grad is None


def test_turning_adapters_off_freezes_b_too_and_a_plain_adapter_can_become_mica():
    _, _, model, _ = _pair(tiny_llama(), LLAMA)
    layers = dict(model.lora_layers())
    for operation in (lambda: model.base_model.set_requires_grad("default", False), model.disable_adapter_layers):
        for layer in layers.values():  # a B unfrozen on purpose ...
            layer.lora_factors("default")[1].requires_grad_(True)
        operation()  # ... is turned off with the rest, as in PEFT
        assert not any(p.requires_grad for layer in layers.values() for p in layer.adapter_tensors("default"))
    layer = fastlora.LoRALinear(16, 12, r=4)
    layer.reset_lora_parameters("mica")
    assert layer.adapter_parameters() == [layer.lora_factors()[0]] and not layer.lora_factors()[1].requires_grad
    layer.lora_factors()[1].requires_grad_(True)
    layer.enable_adapters(False)
    assert not any(p.requires_grad for p in layer.adapter_tensors())
    for changes in ({"use_dora": True}, {"lora_bias": True}):
        with pytest.raises(ValueError, match="does not go with use_dora or lora_bias"):
            fastlora.LoRALinear(16, 12, r=4, init_lora_weights="mica", **changes)


def test_a_mica_adapter_loads_onto_a_4_bit_base_and_casts_for_mixed_precision(tmp_path):
    base, ids = tiny_llama(), tokens()
    _, _, ours, _ = _pair(base, dict(LLAMA, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, layer in ours.lora_layers():
            layer.lora_factors("default")[0].normal_()
    ours.save_pretrained(tmp_path / "adapter")
    base.save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = {library: library.PeftModel.from_pretrained(
            load_quantized(tmp_path / "base", load_in_4bit=True, bnb_4bit_quant_type="nf4"), tmp_path / "adapter",
            is_trainable=True, **({"low_cpu_mem_usage": True} if library is peft else {}))  # PEFT's skips the SVD
            for library in (peft, fastlora)}
    with torch.no_grad():
        assert_close(loaded[fastlora](input_ids=ids).logits, loaded[peft](input_ids=ids).logits, kind="same_math")
    assert not any(layer.lora_factors("default")[1].requires_grad for _, layer in loaded[fastlora].lora_layers())
    fastlora.cast_mixed_precision_params(ours, torch.bfloat16)  # B follows A's float32, so the forward runs
    assert {layer.lora_factors("default")[1].dtype for _, layer in ours.lora_layers()} == {torch.float32}
    with torch.no_grad():
        ours(input_ids=ids)

"""PEFT's small helpers that scripts import beside the model: get_layer_status / get_model_status (compared field
by field with PEFT's on one model, consistent and "irregular" states), load_peft_weights,
cast_mixed_precision_params, the task classes and PeftType."""

import dataclasses
import warnings

import peft
import pytest
import torch

import fastlora
from tests.models import assert_unchanged, clone, load_quantized, snapshot, tiny_llama, tokens

CONFIG = dict(target_modules=["q_proj", "v_proj"], r=4, modules_to_save=["lm_head"], trainable_token_indices=[1, 2])


def _pair(base, **changes):
    config = {**CONFIG, **changes}
    return (peft.get_peft_model(clone(base), peft.LoraConfig(**config)),
            fastlora.get_peft_model(clone(base), fastlora.LoraConfig(**config)))


def _as_peft(status):
    """A status as a dict, with the LoRA layer's type under PEFT's name."""
    out = dataclasses.asdict(status)
    if "module_type" in out:
        out["module_type"] = {"LoRALinear": "lora.Linear"}.get(out["module_type"], out["module_type"])
    return out


def _same_status(theirs, ours):
    their_layers = sorted((_as_peft(s) for s in theirs.get_layer_status()), key=lambda s: s["name"])
    our_layers = sorted((_as_peft(s) for s in ours.get_layer_status()), key=lambda s: s["name"])
    assert our_layers == their_layers
    their_model, our_model = _as_peft(theirs.get_model_status()), _as_peft(ours.get_model_status())
    their_model.pop("base_model_type"), our_model.pop("base_model_type")
    assert our_model == their_model


def test_layer_and_model_status_are_peft_s_through_adapter_operations():
    theirs, ours = _pair(tiny_llama())
    _same_status(theirs, ours)
    for model in (theirs, ours):
        model.add_adapter("other", type(model.peft_config["default"])(target_modules=["q_proj"], r=2))
    _same_status(theirs, ours)
    for model in (theirs, ours):
        model.base_model.set_adapter(["default", "other"])
    _same_status(theirs, ours)
    for model in (theirs, ours):  # an inconsistent state: one layer disabled by hand (PEFT's layer switch)
        model.base_model.model.model.layers[0].self_attn.q_proj.enable_adapters(False)
    assert ours.get_model_status().enabled == "irregular"
    _same_status(theirs, ours)


def test_merged_and_frozen_states_are_peft_s():
    theirs, ours = _pair(tiny_llama(), modules_to_save=None, trainable_token_indices=None)
    for model in (theirs, ours):
        model.base_model.model.model.layers[0].self_attn.q_proj.merge()
        model.base_model.model.model.layers[1].self_attn.v_proj.lora_A["default"].weight.requires_grad_(False) \
            if model is theirs else model.base_model.model.model.layers[1].self_attn.v_proj.lora_A.requires_grad_(False)
    status = ours.get_model_status()
    assert status.merged_adapters == "irregular" and status.requires_grad == {"default": "irregular"}
    _same_status(theirs, ours)


def test_a_4bit_layer_names_its_quantization_backend(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = fastlora.get_peft_model(load_quantized(tmp_path, load_in_4bit=True),
                                       fastlora.LoraConfig(target_modules=["q_proj"], r=4))
    assert {s.quantization_backend for s in ours.get_layer_status()} == {"bnb 4bit"}
    with pytest.raises(ValueError, match="No adapter layers found"):
        fastlora.get_layer_status(tiny_llama())


def test_load_peft_weights_reads_peft_s_files_as_peft(tmp_path):
    theirs, ours = _pair(tiny_llama())
    theirs.save_pretrained(tmp_path)
    loaded = fastlora.load_peft_weights(tmp_path, device="cpu")
    expected = peft.load_peft_weights(str(tmp_path), device="cpu")
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    result = fastlora.set_peft_model_state_dict(ours, loaded)
    assert not result.unexpected_keys
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    with pytest.raises(ValueError, match="neither a local directory nor a valid Hub repository id"):
        fastlora.load_peft_weights(tmp_path / "nowhere")


def test_cast_mixed_precision_params_is_peft_s_and_leaves_packed_weights(tmp_path):
    theirs, ours = _pair(tiny_llama(), modules_to_save=None, trainable_token_indices=None)
    peft.cast_mixed_precision_params(theirs, torch.bfloat16)
    fastlora.cast_mixed_precision_params(ours, torch.bfloat16)
    def dtypes(model):  # (trained?, dtype) → how many values
        out = {}
        for param in model.parameters():
            out[(param.requires_grad, param.dtype)] = out.get((param.requires_grad, param.dtype), 0) + param.numel()
        return out

    assert dtypes(ours) == dtypes(theirs) == {(True, torch.float32): 1792, (False, torch.bfloat16): 78144}
    tiny_llama().save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = fastlora.get_peft_model(load_quantized(tmp_path, load_in_4bit=True,
                                                           bnb_4bit_quant_storage=torch.float32),
                                            fastlora.LoraConfig(target_modules=["q_proj"], r=4))
    packed = quantized.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    before = packed.data.clone()
    fastlora.cast_mixed_precision_params(quantized, torch.bfloat16)
    assert packed.dtype == torch.float32 and torch.equal(packed.data.view(torch.uint8), before.view(torch.uint8))
    model = fastlora.get_peft_model(tiny_llama(), fastlora.LoraConfig(target_modules=["q_proj"], r=4))
    untouched = snapshot(model)
    for dtype in (torch.int8, torch.bool, "bfloat16"):  # an integer cast would truncate every frozen weight
        with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
            fastlora.cast_mixed_precision_params(model, dtype)
    assert_unchanged(model, untouched)


def test_peft_s_task_classes_and_peft_type(tmp_path):
    theirs, _ = _pair(tiny_llama(), modules_to_save=None, trainable_token_indices=None)
    theirs.save_pretrained(tmp_path)
    loaded = fastlora.PeftModelForCausalLM.from_pretrained(tiny_llama(), tmp_path)
    assert isinstance(loaded, fastlora.PeftModelForCausalLM) and isinstance(loaded, fastlora.PeftModel)
    assert loaded.peft_config["default"].peft_type == fastlora.PeftType.LORA == peft.PeftType.LORA


def test_an_adapter_with_a_saved_module_is_active_beside_others_as_in_peft():
    """set_adapter([...]) where one adapter trains the head whole: the head is its copy, the LoRA terms add up, as
    in PEFT; two adapters with copies of one module are refused, as in PEFT."""
    base = tiny_llama()
    theirs, ours = _pair(base, trainable_token_indices=None)
    for model in (theirs, ours):
        model.add_adapter("other", type(model.peft_config["default"])(target_modules=["q_proj"], r=2,
                                                                      init_lora_weights=False))
    from tests.models import copy_lora_weights
    copy_lora_weights(theirs, ours)
    with torch.no_grad():
        theirs.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.1)
        ours.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.1)
    ids = tokens()
    for names in (["default", "other"], ["other", "default"]):
        for model in (theirs, ours):
            model.base_model.set_adapter(names)
        with torch.no_grad():
            torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
        _same_status(theirs, ours)
    for model in (theirs, ours):
        model.add_adapter("third", type(model.peft_config["default"])(target_modules=["v_proj"],
                                                                      modules_to_save=["lm_head"]))
        with pytest.raises(ValueError, match="Only one adapter can be set at a time"):
            model.base_model.set_adapter(["default", "third"])


def test_a_tied_heads_token_layer_is_listed_as_peft_lists_it():
    theirs, ours = _pair(tiny_llama(tie_word_embeddings=True), modules_to_save=None)
    assert ours.get_model_status().num_adapter_layers == 6  # 4 LoRA layers, the table and its tied head
    _same_status(theirs, ours)


def test_the_active_copy_stays_in_use_when_an_adapter_is_added(tmp_path):
    """set_adapter([a, b]) with b holding the head's copy, then add_adapter / load_adapter: the head is still b's
    copy, as in PEFT (it went back to the original module)."""
    base = tiny_llama()
    theirs, ours = _pair(base, modules_to_save=None, trainable_token_indices=None)
    ids = tokens()
    for model in (theirs, ours):
        config = type(model.peft_config["default"])
        model.add_adapter("b", config(target_modules=["v_proj"], r=2, modules_to_save=["lm_head"]))
        with torch.no_grad():
            model.base_model.model.lm_head.modules_to_save["b"].weight.add_(0.1)
        model.base_model.set_adapter(["default", "b"])
    theirs.save_pretrained(tmp_path)
    for model in (theirs, ours):
        model.add_adapter("c", type(model.peft_config["default"])(target_modules=["q_proj"], r=2))
        model.load_adapter(str(tmp_path), adapter_name="d")
    from tests.models import copy_lora_weights
    copy_lora_weights(theirs, ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    assert [s.active_adapters for s in ours.get_layer_status() if s.name == "model.lm_head"] == [["b"]]


def test_misuses_are_said_clearly(tmp_path):
    with pytest.raises(TypeError, match="adapt it with fastlora.get_peft_model"):
        fastlora.PeftModelForCausalLM(tiny_llama(), fastlora.LoraConfig(target_modules=["q_proj"]))
    _, ours = _pair(tiny_llama(), modules_to_save=None)
    ours.add_adapter("b", fastlora.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[2, 5]))
    with pytest.raises(ValueError, match="Only disjunct token indices are currently supported"):
        ours.base_model.set_adapter(["default", "b"])
    assert ours.active_adapters == ["default"]
    ours.save_pretrained(tmp_path)
    assert fastlora.load_peft_weights(tmp_path, device="cpu", key_mapping=None).keys()

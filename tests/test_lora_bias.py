"""lora_bias=True: a trained bias on B, the update scaling · ((dropout(x) Aᵀ) Bᵀ + b_B), compared with PEFT:
outputs, gradients (the bias's included), merge into the base bias, adapter files both ways."""


import peft
import pytest
import torch
from torch import nn

import fastlora
from fastlora import LoRALinear
from tests.models import SEED_TARGETS, assert_step_as_peft, assert_unchanged, clone, copy_lora_weights, snapshot, tiny_llama, tokens
from tests.tolerances import assert_close

CONFIG = dict(task_type="CAUSAL_LM", target_modules=SEED_TARGETS, r=8, lora_alpha=32, lora_bias=True,
              init_lora_weights=False)


def _pair(model=None, **changes):
    base = model if model is not None else tiny_llama(attention_bias=True, mlp_bias=True)
    theirs = peft.get_peft_model(clone(base), peft.LoraConfig(**{**CONFIG, **changes}))
    ours = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(**{**CONFIG, **changes}))
    copy_lora_weights(theirs, ours)
    return base, theirs, ours


def test_outputs_and_gradients_as_peft():
    _, theirs, ours = _pair()
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_bias() is not None and layer.lora_bias().requires_grad
    assert layer.lora_bias().abs().sum() > 0  # init_lora_weights=False: nn.Linear's bias initialisation, as PEFT's
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert_step_as_peft(theirs, ours, tokens())

def test_merge_unmerge_and_files_as_peft(tmp_path):
    base, theirs, ours = _pair()
    ids = tokens()
    expected = ours(input_ids=ids).logits
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    for model in (peft.PeftModel.from_pretrained(clone(base), tmp_path / "ours"),
                  fastlora.PeftModel.from_pretrained(clone(base), tmp_path / "theirs")):
        assert_close(model(input_ids=ids).logits, expected, kind="same_math")

    layer = ours.base_model.model.model.layers[0].mlp.up_proj
    bias_before = layer.bias.detach().clone()
    ours.merge_adapter()
    assert_close(layer.bias, bias_before + layer.scaling * layer.lora_bias().detach(), kind="roundoff")
    assert_close(ours(input_ids=ids).logits, expected, kind="same_math_cancelling")
    ours.unmerge_adapter()
    assert_close(layer.bias, bias_before, kind="roundoff")
    merged_ours, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    assert_close(merged_ours.model.layers[0].mlp.up_proj.bias, merged_theirs.model.layers[0].mlp.up_proj.bias,
                 kind="roundoff")


def test_a_base_without_bias_warns_and_cannot_merge():
    """As PEFT: a warning when the adapter is created; merging raises before anything changes."""
    with pytest.warns(UserWarning, match="without a bias"):
        model = fastlora.get_peft_model(tiny_llama(), fastlora.LoraConfig(**CONFIG))
    ids = tokens()
    model(input_ids=ids)  # the bias on B works without a base bias
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="the base layer has no bias"):
        model.merge_adapter()
    assert_unchanged(model, before)


def test_a_single_layer_with_dropout_matches_the_formula():
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(nn.Linear(12, 10), r=3, lora_alpha=6, init_lora_weights=False)
    layer.add_adapter("b", fastlora.LoraConfig(r=3, lora_alpha=6, lora_bias=True, target_modules=["x"]).settings,
                      init_lora_weights=False)
    layer.set_adapter("b")
    x = torch.randn(4, 12)
    A, B, b_B = layer.lora_A, layer.lora_B, layer.lora_bias()
    expected = nn.functional.linear(x, layer.weight, layer.bias) + 2.0 * (x @ A.t() @ B.t() + b_B)
    assert_close(layer.eval()(x), expected, kind="same_math")


def test_lora_bias_with_dora_and_on_quantized_bases_is_refused():
    with pytest.raises(NotImplementedError, match="lora_bias"):
        fastlora.LoraConfig(target_modules=["q_proj"], use_dora=True, lora_bias=True)


def test_a_merge_that_fails_in_one_layer_changes_no_layer():
    """A bias on B cannot merge into a layer without a bias: checked in every layer before any merges."""
    holder = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6, bias=False))
    with pytest.warns(UserWarning, match="without a bias"):
        model = fastlora.get_peft_model(holder, fastlora.LoraConfig(target_modules=["0", "1"], lora_bias=True,
                                                                    init_lora_weights=False))
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="into 1: the base layer has no bias; nothing was merged"):
        model.merge_adapter()
    assert_unchanged(model, before)

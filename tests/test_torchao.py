"""LoRA on torchao-quantized bases (transformers' TorchAoConfig: int8, float8 and Intx weights, on the CPU), compared
with PEFT's TorchaoLoraLinear on the same quantized model."""

import copy
import tempfile
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fastlora
from fastlora.torchao_linear import LoRATorchaoLinear
from tests.models import (SEED_TARGETS, assert_all_linear_second_adapter_as_peft, assert_biases_saved_and_loaded_as_peft,
                          assert_dropout_as_peft, assert_unchanged, copy_lora_weights, snapshot, tiny_llama,
                          tokens)
from tests.tolerances import assert_close

torchao = pytest.importorskip("torchao")
transformers = pytest.importorskip("transformers")
from torchao.quantization import (Float8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,  # noqa: E402
                                  Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_)

# the weight layouts compared with PEFT: int8, float8, int4 values held in int8 (Intx), int8 with int8 activations
QUANTS = {"int8": Int8WeightOnlyConfig, "float8": Float8WeightOnlyConfig,
          "intx-int4": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4),
          "int8-dynamic": Int8DynamicActivationInt8WeightConfig}

CONFIG = dict(task_type="CAUSAL_LM", target_modules=SEED_TARGETS, r=8, lora_alpha=32, lora_dropout=0.0,
              init_lora_weights=False)


@pytest.fixture(scope="module")
def checkpoint():
    with tempfile.TemporaryDirectory() as directory:
        tiny_llama().save_pretrained(directory)
        yield directory


def _load(directory, dtype=torch.bfloat16, quant="int8"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, quantization_config=transformers.TorchAoConfig(quant_type=QUANTS[quant]()))


def _pair(directory, dtype=torch.bfloat16, quant="int8", **changes):
    theirs = peft.get_peft_model(_load(directory, dtype, quant), peft.LoraConfig(**{**CONFIG, **changes}))
    ours = fastlora.get_peft_model(_load(directory, dtype, quant), fastlora.LoraConfig(**{**CONFIG, **changes}))
    copy_lora_weights(theirs, ours)
    return theirs, ours


def _trainable(model):
    return {n.replace(".default", "").replace("_default", ".weight"): p for n, p in model.named_parameters()
            if p.requires_grad}


def _quantized_weights(model):
    return {name: module.weight.dequantize() for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and isinstance(module.weight, torchao.utils.TorchAOBaseTensor)}


@pytest.mark.parametrize("dtype, quant", [(torch.bfloat16, "int8"), (torch.float32, "int8"), *(
    (torch.bfloat16, quant) for quant in QUANTS if quant != "int8")])
def test_a_step_matches_peft(checkpoint, dtype, quant):
    """Logits, loss and every LoRA gradient as PEFT's TorchaoLoraLinear computes them: torchao's product, then
    each term in the adapters' float32, the sum rounded once to the output's dtype."""
    theirs, ours = _pair(checkpoint, dtype, quant)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRATorchaoLinear) and isinstance(layer.base_layer.weight, torchao.utils.TorchAOBaseTensor)
    assert layer.lora_A.dtype == torch.float32
    assert _trainable(ours).keys() == _trainable(theirs).keys()
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ids = tokens()
    out_theirs, out_ours = theirs(input_ids=ids, labels=ids), ours(input_ids=ids, labels=ids)
    assert_close(out_ours.logits, out_theirs.logits, kind="same_math", dtype=dtype)
    out_theirs.loss.backward()
    out_ours.loss.backward()
    grads_theirs = {n: p.grad for n, p in _trainable(theirs).items()}
    for name, param in _trainable(ours).items():
        assert param.grad is not None and param.grad.abs().max() > 0, name
        assert_close(param.grad, grads_theirs[name], kind="same_math", dtype=dtype, msg=name)


def test_the_dropout_mask_is_regenerated_and_matches_peft_given_it(checkpoint):
    """With dropout, one layer's output and gradients equal PEFT's layer given fastlora's mask for the same seed."""
    base = _load(checkpoint, torch.float32).model.layers[0].mlp.up_proj
    settings = fastlora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["up_proj"]).settings
    ours = LoRATorchaoLinear.from_quantized(copy.deepcopy(base), "default", settings, False, None).train()
    theirs = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.3, init_lora_weights=False, target_modules=["0"])).base_model.model[0]
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
    assert_dropout_as_peft(ours, theirs, base)


def test_adapter_files_go_both_ways(checkpoint, tmp_path):
    theirs, ours = _pair(checkpoint)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    saved, expected = (load_file(tmp_path / f / "adapter_model.safetensors") for f in ("ours", "peft"))
    assert sorted(saved) == sorted(expected)
    assert all(torch.equal(saved[key], value) for key, value in expected.items())
    ids = tokens()
    with torch.no_grad():
        reference = theirs.eval()(ids).logits
        by_us = fastlora.PeftModel.from_pretrained(_load(checkpoint), tmp_path / "peft").eval()(ids).logits
        by_peft = peft.PeftModel.from_pretrained(_load(checkpoint), tmp_path / "ours").eval()(ids).logits
    assert_close(by_us, reference, kind="same_math", dtype=torch.bfloat16)
    assert_close(by_peft, reference, kind="same_math", dtype=torch.bfloat16)


@pytest.mark.parametrize("quant", list(QUANTS))
def test_two_adapters_merge_unmerge_and_unload_as_peft(checkpoint, quant):
    """Merged one adapter after the other, the weight quantized again after each with the model's torchao
    configuration, as PEFT merges: the quantized weights equal PEFT's; unmerged the same way, last first."""
    theirs, ours = _pair(checkpoint, quant=quant)
    for model, library in ((theirs, peft), (ours, fastlora)):
        model.add_adapter("second", library.LoraConfig(**{**CONFIG, "r": 4, "lora_alpha": 8}))
    copy_lora_weights(theirs, ours)
    before = _quantized_weights(ours.get_base_model())
    ids = tokens()
    with torch.no_grad():
        theirs.base_model.set_adapter(["default", "second"])
        ours.base_model.set_adapter(["default", "second"])
        active = ours.eval()(ids).logits
        assert_close(active, theirs.eval()(ids).logits, kind="same_math", dtype=torch.bfloat16)
        ours.base_model.merge_adapter(["default", "second"])
        for name in ("default", "second"):  # (PEFT 0.21's layer fails to merge two in one call)
            theirs.base_model.merge_adapter([name])
        merged = _quantized_weights(ours.get_base_model())
        assert merged.keys() == before.keys()
        assert any(not torch.equal(merged[n], before[n]) for n in merged)
        for name, weight in _quantized_weights(theirs.get_base_model()).items():
            assert torch.equal(merged[name.replace(".base_layer", "")], weight), name
        assert_close(ours(ids).logits, theirs(ids).logits, kind="same_math", dtype=torch.bfloat16)
        for model in (theirs, ours):
            model.unmerge_adapter()
        for name, weight in _quantized_weights(theirs.get_base_model()).items():
            assert torch.equal(_quantized_weights(ours.get_base_model())[name.replace(".base_layer", "")], weight)
        unloaded = ours.merge_and_unload(adapter_names=["default"])
        expected = theirs.merge_and_unload(adapter_names=["default"])
    assert type(unloaded.model.layers[0].self_attn.q_proj) is nn.Linear
    for name, weight in _quantized_weights(expected).items():
        assert torch.equal(_quantized_weights(unloaded)[name], weight), name


def test_a_mixed_batch_matches_peft(checkpoint):
    theirs, ours = _pair(checkpoint)
    for model, library in ((theirs, peft), (ours, fastlora)):
        model.add_adapter("second", library.LoraConfig(**{**CONFIG, "r": 4, "lora_alpha": 8}))
    copy_lora_weights(theirs, ours)
    ids = tokens(batch=3)
    names = ["default", "__base__", "second"]
    with torch.no_grad():
        assert_close(ours.eval()(ids, adapter_names=names).logits, theirs.eval()(ids, adapter_names=names).logits,
                     kind="same_math", dtype=torch.bfloat16)


def test_a_model_quantized_without_transformers_trains_and_refuses_merges_with_the_reason():
    model = tiny_llama()
    quantize_(model.model, Int8WeightOnlyConfig())
    with pytest.warns(UserWarning, match="does not record its torchao configuration") as caught:
        ours = fastlora.get_peft_model(model, fastlora.LoraConfig(**CONFIG))
    assert {w.filename for w in caught if "torchao configuration" in str(w.message)} == {__file__}  # the caller's
    ids = tokens()
    ours(input_ids=ids, labels=ids).loss.backward()
    assert ours.base_model.model.model.layers[0].self_attn.q_proj.lora_B_default.grad is not None
    before = snapshot(ours)
    with pytest.raises(ValueError, match="was not loaded by transformers with a TorchAoConfig.*nothing was merged"):
        ours.merge_and_unload()
    assert_unchanged(ours, before)


@pytest.mark.parametrize("changes, match", [
    (dict(lora_bias=True), "does not support lora_bias"),
    (dict(use_dora=True), r"DoRA \(use_dora=True\) on a torchao-quantized layer"),
])
def test_refused_settings_name_the_reason_and_change_nothing(checkpoint, changes, match):
    model = _load(checkpoint)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        fastlora.get_peft_model(model, fastlora.LoraConfig(**{**CONFIG, **changes}))
    assert_unchanged(model, before)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear


def test_a_torchao_module_to_save_is_refused(checkpoint):
    model = _load(checkpoint)
    with pytest.raises(TypeError, match=r"modules_to_save module 'model.layers.0.mlp.down_proj' \(Linear\) holds "
                                        r"quantized weights"):
        fastlora.get_peft_model(model, fastlora.LoraConfig(**{**CONFIG, "target_modules": ["q_proj"],
                                                              "modules_to_save": ["layers.0.mlp.down_proj"]}))


def test_all_linear_adapts_the_torchao_layers_as_peft(checkpoint):
    changes = dict(target_modules="all-linear")
    theirs, ours = _pair(checkpoint, **changes)
    adapted = sorted(n for n, m in ours.named_modules() if isinstance(m, LoRATorchaoLinear))
    assert adapted and adapted == sorted(n for n, m in theirs.named_modules()
                                         if isinstance(m, peft.tuners.lora.torchao.TorchaoLoraLinear))
    status = ours.get_layer_status()  # (PEFT's layers report None: a documented difference)
    assert {s.quantization_backend for s in status} == {"torchao"}


def test_prepare_model_for_kbit_training_keeps_the_dtypes_and_checkpoints_as_peft(checkpoint):
    theirs = peft.prepare_model_for_kbit_training(_load(checkpoint))
    ours = fastlora.prepare_model_for_kbit_training(_load(checkpoint))
    assert {n: (type(p), p.dtype, p.requires_grad) for n, p in ours.named_parameters()} == {
        n: (type(p), p.dtype, p.requires_grad) for n, p in theirs.named_parameters()}
    assert ours.model.norm.weight.dtype == torch.bfloat16
    assert ours.is_gradient_checkpointing and theirs.is_gradient_checkpointing
    model = fastlora.get_peft_model(ours, fastlora.LoraConfig(**CONFIG)).train()
    ids = tokens()
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_B_default.grad.abs().max() > 0


def test_patch_peft_leaves_peft_s_torchao_layers_to_peft(checkpoint):
    theirs = peft.get_peft_model(_load(checkpoint), peft.LoraConfig(**CONFIG))
    ids = tokens()
    with torch.no_grad():
        expected = theirs.eval()(ids).logits
    report = fastlora.patch_peft(theirs)
    assert not report.patched and len(report.skipped) == len(SEED_TARGETS) * 2
    assert all("Int8Tensor, a tensor subclass" in reason for reason in report.skipped.values())
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, expected)


@pytest.mark.parametrize("value, match", [(float("nan"), "holds NaN or Inf"),
                                          (1e6, r"beyond torch.float16's range \(6.55e\+04\)")])
def test_a_merge_that_would_damage_the_weight_is_refused_before_any_change(checkpoint, value, match):
    _, ours = _pair(checkpoint, torch.float16)
    with torch.no_grad():
        ours.base_model.model.model.layers[1].mlp.down_proj.lora_B_default.fill_(value)
    before = snapshot(ours)
    with pytest.raises(ValueError, match=match + ".*nothing was merged"):
        ours.merge_and_unload()
    assert_unchanged(ours, before)


def test_loftq_is_refused_by_name(checkpoint):
    model = _load(checkpoint)
    before = snapshot(model)
    with pytest.raises(TypeError, match="init_lora_weights='loftq' .* on a torchao-quantized model"):
        fastlora.get_peft_model(model, fastlora.LoraConfig(**{**CONFIG, "init_lora_weights": "loftq",
                                                              "loftq_config": fastlora.LoftQConfig(loftq_bits=4)}))
    assert_unchanged(model, before)


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_trained_biases_are_saved_and_loaded_as_peft(tmp_path, bias):
    tiny_llama(attention_bias=True).save_pretrained(tmp_path / "base")
    theirs, ours = _pair(tmp_path / "base", bias=bias, target_modules=["q_proj", "v_proj"])
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert_biases_saved_and_loaded_as_peft(theirs, ours, lambda: _load(tmp_path / "base"), tmp_path, torch.bfloat16)


@pytest.mark.parametrize("merged", [False, True])
def test_an_all_linear_second_adapter_adapts_the_layers_not_the_quantized_linears_inside(checkpoint, merged):
    assert_all_linear_second_adapter_as_peft(*_pair(checkpoint, target_modules=["down_proj"], r=2), merged=merged)

"""QLoRA: fastlora on bitsandbytes 4-bit and 8-bit bases (on the CPU, where bitsandbytes >= 0.46 runs them),
compared with PEFT's bitsandbytes LoRA layers on the same quantized model."""

import copy
import re
import tempfile
import warnings

import peft
import peft.tuners.lora.bnb
import pytest
import torch
from torch import nn

import fastlora
from fastlora.quantized import LoRAQuantizedLinear
from tests.models import (SEED_TARGETS, assert_all_linear_second_adapter_as_peft, assert_biases_saved_and_loaded_as_peft,
                          assert_dropout_as_peft, assert_unchanged, copy_lora_weights, load_quantized, same_bytes, snapshot,
                          tiny_llama, tokens)
from tests.tolerances import assert_close

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

QUANT = {
    "nf4-fp32": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "nf4-double-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16),
    "fp4-double-fp16": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.float16),
    "fp4-fp32": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}
# The dtype the activations' gradients flow in: the adapters' gradients are float32 sums over values that reach
# them in this dtype, whose summation order (several projections read one x) is autograd's, not the layers'.
GRAD_DTYPE = {"nf4-fp32": torch.float32, "nf4-double-bf16": torch.bfloat16, "fp4-double-fp16": torch.float16,
              "fp4-fp32": torch.float32, "int8": torch.float32}
CONFIG = dict(task_type="CAUSAL_LM", target_modules=SEED_TARGETS, r=8, lora_alpha=32, lora_dropout=0.0,
              init_lora_weights=False)


@pytest.fixture(scope="module")
def checkpoint():
    with tempfile.TemporaryDirectory() as directory:
        tiny_llama().save_pretrained(directory)
        yield directory


def _load(directory, quant):
    return load_quantized(directory, **QUANT[quant])


def _pair(directory, quant, **changes):
    theirs = peft.get_peft_model(_load(directory, quant), peft.LoraConfig(**{**CONFIG, **changes}))
    ours = fastlora.get_peft_model(_load(directory, quant), fastlora.LoraConfig(**{**CONFIG, **changes}))
    copy_lora_weights(theirs, ours)
    return theirs, ours


def _trainable(model):
    return {n.replace(".default", "").replace("_default", ".weight"): p for n, p in model.named_parameters()
            if p.requires_grad}


def _assert_step_as_peft(theirs, ours, grad_dtype):
    """One step of both models: logits, loss and every LoRA gradient as PEFT's (the gradients at the tolerance of
    ``grad_dtype``, the dtype the activations' gradients flow in)."""
    ids = tokens()
    out_theirs, out_ours = theirs(input_ids=ids, labels=ids), ours(input_ids=ids, labels=ids)
    assert_close(out_ours.logits, out_theirs.logits, kind="same_math", dtype=out_ours.logits.dtype)
    out_theirs.loss.backward()
    out_ours.loss.backward()
    grads_theirs = {n: p.grad for n, p in _trainable(theirs).items()}
    for name, param in _trainable(ours).items():
        assert_close(param.grad, grads_theirs[name], kind="same_math", dtype=grad_dtype, msg=name)


@pytest.mark.parametrize("quant", list(QUANT))
def test_matches_peft(checkpoint, quant):
    """Layer types, trainable parameters, logits, loss and every LoRA gradient as PEFT's, on one quantized model."""
    theirs, ours = _pair(checkpoint, quant)
    q_proj = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoRAQuantizedLinear)
    assert isinstance(q_proj.base_layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    assert q_proj.lora_A.dtype == torch.float32  # PEFT's adapters beside an integer weight
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert set(_trainable(ours)) == set(_trainable(theirs))

    _assert_step_as_peft(theirs, ours, GRAD_DTYPE[quant])


def test_dropout_mask_matches_peft(checkpoint):
    """With dropout, one layer's output and gradients equal PEFT's layer given fastlora's mask for the same seed."""
    base = _load(checkpoint, "nf4-fp32").model.layers[0].mlp.up_proj
    settings = fastlora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["up_proj"]).settings
    ours = LoRAQuantizedLinear.from_quantized(copy.deepcopy(base), "default", settings, False, None).train()
    theirs = peft.tuners.lora.bnb.Linear4bit(copy.deepcopy(base), "default", config=peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.3, init_lora_weights=False), r=4, lora_alpha=8).train()
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
    assert_dropout_as_peft(ours, theirs, base)


@pytest.mark.parametrize("quant, training", [("nf4-fp32", True), ("nf4-double-bf16", True), ("nf4-fp32", False),
                                             ("int8", True), ("int8", False)])
def test_term_added_into_the_base_output_in_place(checkpoint, quant, training):
    """The adapter's term goes into bitsandbytes' output tensor itself (no M × N temporary, no second output),
    with dropout in training; but an 8-bit layer's output in eval mode is a view made inside bitsandbytes'
    autograd Function, which autograd forbids changing in place, so that term is added out of place.  Either way
    the output and gradients are the out-of-place sum's (test_matches_peft and test_dropout_mask_matches_peft
    compare that with PEFT)."""
    base = _load(checkpoint, quant).model.layers[0].mlp.up_proj
    settings = fastlora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["up_proj"]).settings
    layer = LoRAQuantizedLinear.from_quantized(base, "default", settings, False, None).train(training)
    outputs = []
    handle = layer.base_layer.register_forward_hook(lambda module, args, out: outputs.append(out))
    x = torch.randn(2, 5, base.in_features, requires_grad=True)
    torch.manual_seed(3)
    y = layer(x)
    handle.remove()
    assert (y is outputs[0]) == (quant != "int8" or training)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), dy)
    torch.manual_seed(3)
    expected = layer.base_layer(x) + layer.low_rank_term(x, "default").to(y.dtype)  # draws the same seed
    assert_close(y, expected, kind="same_math", dtype=y.dtype)
    wanted = torch.autograd.grad(expected, (x, layer.lora_A, layer.lora_B), dy)
    for got, want, dtype in zip(grads, wanted, (GRAD_DTYPE[quant], torch.float32, torch.float32)):
        assert_close(got, want, kind="same_math", dtype=dtype)


def test_two_active_adapters_each_added_in_place(checkpoint):
    """Two active adapters on a 4-bit layer: each term goes into the output in turn, with its own mask; the output
    and every gradient are those of the out-of-place sums, as PEFT adds them."""
    from fastlora.adapter_settings import AdapterSettings

    base = _load(checkpoint, "nf4-fp32").model.layers[0].mlp.up_proj
    settings = fastlora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["up_proj"]).settings
    layer = LoRAQuantizedLinear.from_quantized(base, "a", settings, False, None).train()
    layer.add_adapter("b", AdapterSettings(2, 3, 0.1), init_lora_weights=False)
    layer.set_adapter(["a", "b"])
    x = torch.randn(2, 5, base.in_features, requires_grad=True)
    params = [x, *layer.lora_factors("a"), *layer.lora_factors("b")]
    torch.manual_seed(1)
    y = layer(x)
    grads = torch.autograd.grad(y.square().sum(), params)
    torch.manual_seed(1)
    expected = layer.base_layer(x)
    for name in ("a", "b"):
        expected = expected + layer.low_rank_term(x, name).to(expected.dtype)
    assert_close(y, expected, kind="same_math", dtype=torch.float32)
    for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), params)):
        assert_close(got, want, kind="same_math", dtype=torch.float32)


@pytest.mark.parametrize("quant", ["nf4-double-bf16", "int8"])
def test_adapter_files_both_ways(checkpoint, quant):
    """fastlora's adapter file has PEFT's keys and shapes; PEFT's from_pretrained and its state-dict loader take it
    onto a fresh quantized model and fastlora's from_pretrained takes PEFT's, logits equal."""
    from safetensors.torch import load_file

    theirs, ours = _pair(checkpoint, quant)
    ids = tokens()
    with tempfile.TemporaryDirectory() as ours_dir, tempfile.TemporaryDirectory() as theirs_dir:
        ours.save_pretrained(ours_dir)
        theirs.save_pretrained(theirs_dir)
        ours_file = load_file(f"{ours_dir}/adapter_model.safetensors")
        theirs_file = load_file(f"{theirs_dir}/adapter_model.safetensors")
        assert {k: v.shape for k, v in ours_file.items()} == {k: v.shape for k, v in theirs_file.items()}
        loaded_by_peft = peft.get_peft_model(_load(checkpoint, quant), peft.LoraConfig(**CONFIG))
        peft.set_peft_model_state_dict(loaded_by_peft, ours_file)
        loaded_by_us = fastlora.PeftModel.from_pretrained(_load(checkpoint, quant), theirs_dir)
        opened_by_peft = peft.PeftModel.from_pretrained(_load(checkpoint, quant), ours_dir)
        expected = ours.eval()(input_ids=ids).logits
        for model in (loaded_by_peft.eval(), loaded_by_us, opened_by_peft.eval()):
            assert_close(model(input_ids=ids).logits, expected, kind="same_math", dtype=expected.dtype)


@pytest.mark.parametrize("quant", ["nf4-fp32", "fp4-double-fp16", "int8"])
def test_merge_and_unload_equals_peft(checkpoint, quant):
    """Merging dequantizes, adds scaling · B A and quantizes again, with PEFT's warning: the quantized weights
    equal PEFT's merge of the same adapter, bit for bit, and the unloaded layers are bitsandbytes' own."""
    theirs, ours = _pair(checkpoint, quant)
    with pytest.warns(UserWarning, match="rounding errors"):
        merged_ours = ours.merge_and_unload()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_theirs = theirs.merge_and_unload()
    for name in SEED_TARGETS:
        mine = dict(merged_ours.named_modules())[f"model.layers.1.{'mlp' if 'proj' in name and name[0] in 'gud' else 'self_attn'}.{name}"]
        peers = dict(merged_theirs.named_modules())[f"model.layers.1.{'mlp' if name[0] in 'gud' else 'self_attn'}.{name}"]
        assert type(mine) is type(peers)
        assert torch.equal(mine.weight.data, peers.weight.data), name


@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_dequantizes_each_weight_twice(checkpoint, monkeypatch, safe_merge):
    """A model's merge dequantizes each quantized weight twice, whatever safe_merge says: once to check every
    layer before any changes (overflow, and NaN/Inf with safe_merge), once to merge it; a layer's own merge once."""
    _, ours = _pair(checkpoint, "nf4-fp32")
    reads = {}
    dequantize = LoRAQuantizedLinear._dequantize

    def counted(self, weight):
        reads[id(self)] = reads.get(id(self), 0) + 1
        return dequantize(self, weight)

    monkeypatch.setattr(LoRAQuantizedLinear, "_dequantize", counted)
    layers = [m for m in ours.modules() if isinstance(m, LoRAQuantizedLinear)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.merge_adapter(safe_merge=safe_merge)
        assert sorted(reads.values()) == [2] * len(layers) and len(reads) == len(layers)
        ours.unmerge_adapter()
        reads.clear()
        layers[0].merge(safe_merge=safe_merge)
    assert reads == {id(layers[0]): 1} and layers[0].merged


def test_merge_unmerge_equals_peft(checkpoint):
    """merge_adapter then unmerge_adapter: each quantized weight equals PEFT's after the same two steps, bit for
    bit (two quantizations away from the original: the rounding PEFT warns about), and the output is the adapted
    model's again, computed from those weights."""
    theirs, ours = _pair(checkpoint, "nf4-fp32")
    ids = tokens()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model in (theirs, ours):
            model.merge_adapter()
            model.unmerge_adapter()
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert not layer.merged
    peers = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.base_layer.weight.data, peers.base_layer.weight.data)
    assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, kind="same_math", dtype=torch.float32)


@pytest.mark.parametrize("quant", ["nf4-double-bf16", "int8"])
def test_several_adapters_merge_and_unmerge_as_peft(checkpoint, quant):
    """Two adapters merged at once, as PEFT's bitsandbytes layers merge them: one by one, the weight requantized
    after each (each rounding PEFT warns about), so the quantized weights equal PEFT's bit for bit; unmerged the
    same way, last adapter first; and merged for good by merge_and_unload."""
    theirs, ours = _pair(checkpoint, quant)
    for model, library in ((theirs, peft), (ours, fastlora)):
        model.add_adapter("second", library.LoraConfig(**{**CONFIG, "r": 4, "lora_alpha": 8}))
    copy_lora_weights(theirs, ours)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    peers = theirs.base_model.model.model.layers[0].self_attn.q_proj
    both = ["default", "second"]
    state = getattr(layer.base_layer, "quant_state", None)  # a 4-bit layer's own copy of its weight's state
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert layer.merge_problem(both) is None
        assert getattr(layer.base_layer, "quant_state", None) is state  # the check's requantizations left it alone
        for model in (theirs, ours):
            model.base_model.merge_adapter(both)
        assert layer.merged_adapters == both
        if state is not None:
            assert layer.base_layer.quant_state is layer.base_layer.weight.quant_state is not state
        assert torch.equal(layer.base_layer.weight.data, peers.base_layer.weight.data)
        for model in (theirs, ours):
            model.unmerge_adapter()
        assert torch.equal(layer.base_layer.weight.data, peers.base_layer.weight.data)
        merged_ours = ours.merge_and_unload(adapter_names=both)
        merged_theirs = theirs.merge_and_unload(adapter_names=both)
    for name, module in merged_ours.named_modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            assert torch.equal(module.weight.data, dict(merged_theirs.named_modules())[name].weight.data), name


@pytest.mark.parametrize("how", ["add_adapter", "load_adapter"])
def test_a_new_adapter_unmerges_a_merged_model_as_peft(checkpoint, how, tmp_path):
    """add_adapter, or load_adapter of a new adapter, on a merged model: unmerged with PEFT's warning (PEFT sets the
    active adapters again, which unmerges), the quantized weights then PEFT's bit for bit, the outputs alike."""
    theirs, ours = _pair(checkpoint, "nf4-fp32")
    peft.get_peft_model(_load(checkpoint, "nf4-fp32"), peft.LoraConfig(r=2, target_modules=["k_proj"])) \
        .save_pretrained(tmp_path)
    for model, library in ((theirs, peft), (ours, fastlora)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.merge_adapter()
        if library is fastlora:  # a refused adapter leaves the model merged
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                with pytest.raises(ValueError, match="matched no module"):
                    model.add_adapter("second", library.LoraConfig(r=2, target_modules=["nope"]))
            assert all(layer.merged for _, layer in ours.lora_layers())
        with pytest.warns(UserWarning, match="Unmerging the model first"):
            if how == "add_adapter":
                model.add_adapter("second", library.LoraConfig(r=2, target_modules=["k_proj"]))
            else:
                model.load_adapter(tmp_path, adapter_name="second")
    assert not any(layer.merged for _, layer in ours.lora_layers())
    _assert_same_quantized_states(ours, theirs)
    ids = tokens()
    assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, kind="same_math", dtype=torch.float32)


def test_a_target_matching_nothing_names_the_modules_to_adapt_not_their_inner_layers(checkpoint):
    _, ours = _pair(checkpoint, "nf4-fp32")
    with pytest.raises(ValueError, match="matched no module of the model") as refused:
        ours.add_adapter("x", fastlora.LoraConfig(target_modules=["nope"]))
    assert "self_attn.q_proj, " in str(refused.value) and ".base_layer" not in str(refused.value)


def _quantized_states(model):
    return {name: module.state_dict() for name, module in model.named_modules()
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


def _assert_same_quantized_states(ours, theirs):
    theirs = {name.replace("base_model.model.", "", 1): state for name, state in _quantized_states(theirs).items()}
    ours = {name.replace("base_model.model.", "", 1): state for name, state in _quantized_states(ours).items()}
    assert ours.keys() == theirs.keys() and ours
    for name, state in ours.items():
        assert state.keys() == theirs[name].keys(), name
        for key, value in state.items():
            assert same_bytes(value, theirs[name][key]), f"{name}: {key}"


@pytest.mark.parametrize("quant", ["nf4-double-bf16", "int8"])
def test_adapters_held_in_bf16_merge_as_peft(checkpoint, quant):
    """Adapters held in bf16 (cast so in both libraries, as TRL casts QLoRA's) on a model loaded in bf16:
    PEFT's bitsandbytes layers compute each update B A · scaling in bf16 and add it to the dequantized weight in
    the dtype the two promote to (an 8-bit layer's weight cast to the adapters' dtype first); merged, unmerged and
    merged for good, two adapters at once, every quantized layer's state equals PEFT's byte for byte."""
    models = {}
    for library in (peft, fastlora):
        model = library.get_peft_model(load_quantized(checkpoint, dtype=torch.bfloat16, **QUANT[quant]),
                                       library.LoraConfig(**CONFIG), autocast_adapter_dtype=False)
        model.add_adapter("second", library.LoraConfig(**{**CONFIG, "r": 4, "lora_alpha": 8}),
                          autocast_adapter_dtype=False)
        for name, param in model.named_parameters():  # an 8-bit layer's stay float32 there: cast as TRL casts them
            if "lora_" in name:
                param.data = param.data.to(torch.bfloat16)
        models[library.__name__] = model
    theirs, ours = models["peft"], models["fastlora"]
    with torch.no_grad():
        for p in theirs.parameters():
            if p.dtype == torch.bfloat16 and p.abs().sum() == 0:  # B: PEFT's zeros, so that merges move something
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    copy_lora_weights(theirs, ours)
    both = ["default", "second"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model in (theirs, ours):
            model.base_model.merge_adapter(both)
        _assert_same_quantized_states(ours, theirs)
        for model in (theirs, ours):
            model.unmerge_adapter()
        _assert_same_quantized_states(ours, theirs)
        merged_ours, merged_theirs = ours.merge_and_unload(adapter_names=both), theirs.merge_and_unload(adapter_names=both)
    _assert_same_quantized_states(merged_ours, merged_theirs)


def test_prepare_model_for_kbit_training_matches_peft(checkpoint):
    """fastlora's prepare_model_for_kbit_training leaves what PEFT's does (dtypes, frozen parameters, gradient
    checkpointing on, input embeddings' output requiring grad), and a reentrant-checkpointed step's gradients
    equal those of the step without checkpointing."""
    prepared = {}
    for name, prepare in (("peft", peft.prepare_model_for_kbit_training),
                          ("fastlora", fastlora.prepare_model_for_kbit_training)):
        model = _load(checkpoint, "nf4-double-bf16")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared[name] = prepare(model)
    a, b = prepared["peft"], prepared["fastlora"]
    assert [(n, p.dtype, p.requires_grad) for n, p in a.named_parameters()] == \
           [(n, p.dtype, p.requires_grad) for n, p in b.named_parameters()]
    assert a.is_gradient_checkpointing and b.is_gradient_checkpointing
    assert b.get_input_embeddings()(tokens()).requires_grad

    ours = fastlora.get_peft_model(b, fastlora.LoraConfig(**CONFIG)).train()
    on_peft_prepared = fastlora.get_peft_model(a, fastlora.LoraConfig(**CONFIG)).train()  # PEFT's prepare, then ours
    plain = fastlora.get_peft_model(_load(checkpoint, "nf4-double-bf16"), fastlora.LoraConfig(**CONFIG)).train()
    with torch.no_grad():
        for model in (plain, on_peft_prepared):
            for name, param in _trainable(model).items():
                param.copy_(_trainable(ours)[name])
    ids = tokens()
    for model in (ours, on_peft_prepared, plain):
        model(input_ids=ids, labels=ids).loss.backward()
    grads_plain, grads_peft_prepared = dict(_trainable(plain)), dict(_trainable(on_peft_prepared))
    for name, param in _trainable(ours).items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert_close(param.grad, grads_plain[name].grad, kind="same_math", dtype=torch.bfloat16, msg=name)
        assert torch.equal(param.grad, grads_peft_prepared[name].grad), name
    model = _load(checkpoint, "nf4-fp32")
    before = snapshot(model)
    with pytest.raises(TypeError, match="gradient_checkpointing_kwargs must be a dict"):
        fastlora.prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs="use_reentrant")
    assert_unchanged(model, before)


def test_prepare_model_for_kbit_training_takes_either_name_of_the_checkpointing_kwargs(checkpoint):
    """PEFT 0.22 calls them activation_checkpointing_kwargs (third, positional or by name), 0.21
    gradient_checkpointing_kwargs: either is taken, both are refused with the model unchanged.  Without them the
    checkpointing is transformers' default, non-reentrant, named explicitly (no warning from torch), and a step's
    LoRA gradients flow through it."""
    model = _load(checkpoint, "nf4-fp32")
    before = snapshot(model)
    with pytest.raises(ValueError, match="one setting under two names"):
        fastlora.prepare_model_for_kbit_training(model, True, {"use_reentrant": False},
                                                 gradient_checkpointing_kwargs={"use_reentrant": True})
    assert_unchanged(model, before)
    for call in (lambda m: fastlora.prepare_model_for_kbit_training(m, True, {"use_reentrant": True}),
                 lambda m: fastlora.prepare_model_for_kbit_training(
                     m, activation_checkpointing_kwargs={"use_reentrant": True}),
                 lambda m: fastlora.prepare_model_for_kbit_training(
                     m, gradient_checkpointing_kwargs={"use_reentrant": True})):
        prepared = call(_load(checkpoint, "nf4-fp32"))
        layer = prepared.model.layers[0]
        assert prepared.is_gradient_checkpointing
        assert layer._gradient_checkpointing_func.keywords == {"use_reentrant": True}
    prepared = fastlora.prepare_model_for_kbit_training(_load(checkpoint, "nf4-fp32"))
    assert prepared.model.layers[0]._gradient_checkpointing_func.keywords == {"use_reentrant": False}
    model = fastlora.get_peft_model(prepared, fastlora.LoraConfig(**CONFIG)).train()
    ids = tokens()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _trainable(model).values())


@pytest.mark.parametrize("use_dora", [False, True], ids=["QLoRA", "QDoRA"])
def test_gradient_checkpointing_replays_the_masks(checkpoint, use_dora):
    """With activation checkpointing (torch's and the reentrant kind) a step with dropout gives the loss and every
    gradient of the step without: each layer's mask drawn again from the same seed on the recomputed forward."""
    results = []
    for checkpointing in (None, False, True):
        model = fastlora.prepare_model_for_kbit_training(
            _load(checkpoint, "nf4-double-bf16"), use_gradient_checkpointing=checkpointing is not None,
            gradient_checkpointing_kwargs={"use_reentrant": bool(checkpointing)})
        torch.manual_seed(0)
        model = fastlora.get_peft_model(model, fastlora.LoraConfig(**{**CONFIG, "lora_dropout": 0.1,
                                                                      "use_dora": use_dora})).train()
        ids = tokens()
        torch.manual_seed(1)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss, grads), *others = results
    for other_loss, other_grads in others:
        assert torch.equal(other_loss, loss)
        for name, grad in grads.items():
            assert torch.equal(other_grads[name], grad), name


def _randomize_lora_biases(model):
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name and name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator))


def _grads_by_peft_name(model):
    """Each trainable parameter's gradient, under one name for PEFT's parameter (``lora_A.default.weight``,
    ``lora_B.default.bias``, ``lora_magnitude_vector.default.weight``) and fastlora's (``lora_A_default``,
    ``lora_bias_default``, ``lora_magnitude_vector_default``)."""
    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            name = re.sub(r"\.(lora_\w+?)\.default\.(weight|bias)$",
                          lambda m: f".{m[1]}" + ("_bias" if m[2] == "bias" else ""), name)
            grads[re.sub(r"\.lora_bias$", ".lora_B_bias", re.sub(r"_default$", "", name))] = param.grad
    return grads


def assert_peft_file_trains_alike(theirs, load_base, quant, folder):
    """PEFT's model ``theirs`` saved and loaded by fastlora onto ``load_base()``: trainable counts, logits, loss and
    every gradient as PEFT's; fastlora's file opened by PEFT gives the same logits, with the same keys.  Returns
    fastlora's model."""
    theirs.save_pretrained(folder / "peft")
    ours = fastlora.LoraModel.from_pretrained(load_base(), folder / "peft", is_trainable=True)
    assert isinstance(ours.get_base_model().model.layers[0].mlp.up_proj, LoRAQuantizedLinear)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ids = tokens()
    out_theirs, out_ours = theirs(input_ids=ids, labels=ids), ours(input_ids=ids, labels=ids)
    assert_close(out_ours.logits, out_theirs.logits, kind="same_math", dtype=GRAD_DTYPE[quant])
    out_theirs.loss.backward()
    out_ours.loss.backward()
    grads_theirs, grads_ours = _grads_by_peft_name(theirs), _grads_by_peft_name(ours)
    assert grads_ours.keys() == grads_theirs.keys() and len(grads_ours) == 3 * 7 * 2
    for name, grad in grads_ours.items():
        assert_close(grad, grads_theirs[name], kind="same_math", dtype=GRAD_DTYPE[quant], msg=name)
    ours.save_pretrained(folder / "ours")
    back = peft.PeftModel.from_pretrained(load_base(), folder / "ours")
    with torch.no_grad():
        assert_close(back(input_ids=ids).logits, ours(input_ids=ids).logits, kind="same_math",
                     dtype=GRAD_DTYPE[quant])
    assert fastlora.get_peft_model_state_dict(ours).keys() == peft.get_peft_model_state_dict(theirs).keys()
    return ours


@pytest.mark.parametrize("quant", ["nf4-fp32", "nf4-double-bf16", "int8"])
def test_lora_bias_matches_peft_and_files_go_both_ways(checkpoint, quant, tmp_path):
    """lora_bias=True on a quantized base: PEFT's file loaded by fastlora gives PEFT's logits, loss and every
    gradient, B's bias included; fastlora's file loaded by PEFT gives the same logits."""
    theirs = peft.get_peft_model(_load(checkpoint, quant), peft.LoraConfig(**{**CONFIG, "lora_bias": True}))
    _randomize_lora_biases(theirs)
    assert_peft_file_trains_alike(theirs, lambda: _load(checkpoint, quant), quant, tmp_path)


def test_lora_bias_adapters_active_together_and_in_a_mixed_batch_as_peft(checkpoint, tmp_path):
    """Two lora_bias adapters on a 4-bit model: both active (each term added in turn) and a mixed batch
    (`adapter_names=`, one per row, a base row among them), logits as PEFT's."""
    theirs = peft.get_peft_model(_load(checkpoint, "nf4-fp32"), peft.LoraConfig(**{**CONFIG, "lora_bias": True}))
    theirs.add_adapter("other", peft.LoraConfig(**{**CONFIG, "lora_bias": True, "r": 4}))
    _randomize_lora_biases(theirs)
    theirs.save_pretrained(tmp_path)
    ours = fastlora.LoraModel.from_pretrained(_load(checkpoint, "nf4-fp32"), tmp_path)
    ours.load_adapter(tmp_path / "other", adapter_name="other")
    theirs.eval(), ours.eval()
    ids = tokens(batch=3)
    with torch.no_grad():
        for model in (theirs, ours):
            model.base_model.set_adapter(["default", "other"])
        assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, kind="same_math", dtype=torch.float32)
        names = ["other", "__base__", "default"]
        assert_close(ours(input_ids=ids, adapter_names=names).logits, theirs(input_ids=ids, adapter_names=names).logits,
                     kind="same_math", dtype=torch.float32)


def test_lora_bias_beside_bf16_activations_sums_as_peft():
    """bf16 activations (a bf16 compute dtype) and float32 adapters: the term and scaling · b_B are summed in
    float32 and rounded once to the output's dtype, as PEFT's layer does; b_B's gradient is a float32 sum."""
    from tests.test_qdora import _quantized_linear_with_bias

    base = _quantized_linear_with_bias("nf4-double-bf16")
    settings = fastlora.LoraConfig(r=4, lora_alpha=8, lora_bias=True, target_modules=["x"]).settings
    ours = LoRAQuantizedLinear.from_quantized(copy.deepcopy(base), "default", settings, False, None).train()
    theirs = peft.tuners.lora.bnb.Linear4bit(copy.deepcopy(base), "default", r=4, lora_alpha=8, config=peft.LoraConfig(
        r=4, lora_alpha=8, lora_bias=True, init_lora_weights=False)).train()
    theirs.lora_A["default"].float()
    theirs.lora_B["default"].float()
    with torch.no_grad():
        ours.lora_bias("default").normal_()
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
        theirs.lora_B["default"].bias.copy_(ours.lora_bias("default"))
    x = torch.randn(4, 6, 48).to(torch.bfloat16)
    y_ours, y_theirs = ours(x), theirs(x)
    assert y_ours.dtype == y_theirs.dtype == torch.bfloat16
    assert_close(y_ours, y_theirs, kind="same_math", dtype=torch.bfloat16)
    dy = torch.randn(y_ours.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    (g_ours,) = torch.autograd.grad(y_ours, ours.lora_bias("default"), dy)
    (g_theirs,) = torch.autograd.grad(y_theirs, theirs.lora_B["default"].bias, dy)
    assert_close(g_ours, g_theirs, kind="same_math", dtype=torch.float32)


def test_lora_bias_merges_into_the_base_bias_and_needs_one(checkpoint):
    """Merging adds scaling · b_B to the base bias (as the forward pass adds it) and W as PEFT's merge, bit for
    bit; on a base without a bias the merge is refused and the model left unchanged."""
    from tests.test_qdora import _quantized_linear_with_bias

    base = _quantized_linear_with_bias("nf4-fp32")
    settings = fastlora.LoraConfig(r=4, lora_alpha=8, lora_bias=True, target_modules=["x"]).settings
    ours = LoRAQuantizedLinear.from_quantized(copy.deepcopy(base), "default", settings, False, None).eval()
    theirs = peft.tuners.lora.bnb.Linear4bit(copy.deepcopy(base), "default", r=4, lora_alpha=8, config=peft.LoraConfig(
        r=4, lora_alpha=8, lora_bias=True, init_lora_weights=False))
    with torch.no_grad():
        ours.lora_bias("default").normal_()
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
        theirs.lora_B["default"].bias.copy_(ours.lora_bias("default"))
        x = torch.randn(3, 48)
        assert_close(ours(x), theirs(x), kind="same_math", dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours.merge()
            theirs.merge()
    assert torch.equal(ours.base_layer.weight.data, theirs.base_layer.weight.data)
    assert_close(ours.base_layer.bias, base.bias + 2.0 * ours.lora_bias("default"), kind="same_math",
                 dtype=torch.float32)

    model = fastlora.get_peft_model(_load(checkpoint, "nf4-fp32"), fastlora.LoraConfig(**{**CONFIG, "lora_bias": True}))
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="the base layer has no bias"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_and_unload()
    assert_unchanged(model, before)


def test_low_rank_term_without_a_weight_refuses_bias_and_the_triton_backend():
    x, A, B = torch.randn(3, 5), torch.randn(2, 5), torch.randn(4, 2)
    with pytest.raises(ValueError, match="bias without weight"):
        fastlora.lora_linear(x, None, torch.zeros(4), A, B, 1.0)
    with pytest.raises(ValueError, match="backend='triton' needs the base weight"):
        fastlora.lora_linear(x, None, None, A, B, 1.0, backend="triton")
    assert_close(fastlora.lora_linear(x, None, None, A, B, 2.0), 2.0 * (x @ A.t()) @ B.t(), kind="same_math", dtype=torch.float32)


@pytest.mark.parametrize("moved, adapter_dtype", [(True, torch.float32), (False, torch.float32), (True, torch.bfloat16)],
                         ids=["fp16 weights", "not moved yet", "fp16 weights, bf16 adapters"])
def test_an_8bit_layer_holding_float_weights_merges_into_them(moved, adapter_dtype):
    """A Linear8bitLt whose weight is still float (has_fp16_weights=True, or not yet moved to a device): its weight
    reads as it is (not through an int8 scale a forward pass left behind), and merging adds scaling · B A to it
    (computed in the adapters' dtype; bf16 adapters do not round the weight itself to bf16)."""
    from fastlora.adapter_settings import AdapterSettings

    torch.manual_seed(0)
    base = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=moved)
    base = base.to("cpu") if moved else base
    original = base.weight.data.float().clone()
    assert base.weight.dtype != torch.int8
    layer = LoRAQuantizedLinear.from_quantized(base, "default", AdapterSettings(4, 8, 0.0, False, False, False), False,
                                               adapter_dtype)
    assert torch.equal(layer.base_weight(), original)
    layer(torch.randn(3, 64).to(adapter_dtype))  # bitsandbytes leaves int8 scales in the layer's state (and
    if moved:                                    # quantizes a weight not moved)
        assert torch.equal(layer.base_weight(), original)
    A, B = layer.lora_factors("default")
    with pytest.warns(UserWarning, match="rounding errors"):
        layer.merge()
    merged = original + ((B.detach() @ A.detach()) * 2.0).float()
    if moved:  # still float: the sum itself, rounded once to float32
        assert layer.base_layer.weight.dtype == torch.float32
        assert_close(layer.base_layer.weight.data, merged, kind="roundoff")
    else:  # quantized on its way back, as moving it would: within int8's rounding of each row's range
        step = merged.abs().amax(1, keepdim=True) / 127
        assert ((layer.base_weight() - merged).abs() <= step).all()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("x_shape", [(12, 72), (3, 4, 72)], ids=["2-D (into bitsandbytes' output)", "3-D"])
def test_the_default_path_keeps_x_S_and_the_seed_for_backward(bits, x_shape):
    """What autograd keeps for the low-rank term beside bitsandbytes' product (added into its output, or out of
    place): x, the rank-r S and the dropout seed; no dequantized weight, no mask, no dropped copy of x."""
    from fastlora.adapter_settings import AdapterSettings
    from fastlora.bench.measure import SavedTensorCounter, module_tensors

    torch.manual_seed(0)
    dense = nn.Linear(72, 40)
    base = (bnb.nn.Linear4bit(72, 40, compute_dtype=torch.float32, quant_type="nf4") if bits == 4
            else bnb.nn.Linear8bitLt(72, 40, has_fp16_weights=False))
    base.load_state_dict(dense.state_dict())
    base = base.to("cpu")
    if bits == 4:
        base.support_avx512bf16_for_cpu = False
    layer = LoRAQuantizedLinear.from_quantized(base, "default", AdapterSettings(4, 8, 0.2, False, False, False), False,
                                               torch.float32).train()
    x = torch.randn(*x_shape, requires_grad=True)
    counter = SavedTensorCounter(exclude=module_tensors(layer), inputs=[x])
    with counter:
        y = layer(x)
    y.sum().backward()
    tokens = x.numel() // 72
    assert counter.bytes == x.numel() * 4 + tokens * 4 * 4 + 8, counter.storages  # x, S (tokens × r=4), the seed


def test_an_overflow_between_two_adapters_of_an_8bit_merge_is_named():
    """Two adapters merged into an 8-bit layer, the first taking the weight past float16's range (where bitsandbytes
    quantizes from): the refusal names the overflow (requantized between the adapters, the weight would read back
    as Inf or NaN), and the weight is unchanged."""
    from fastlora.adapter_settings import AdapterSettings

    torch.manual_seed(0)
    base = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False).to("cpu")
    settings = AdapterSettings(4, 8, 0.0, False, False, False)
    layer = LoRAQuantizedLinear.from_quantized(base, "default", settings, False, torch.float32)
    layer.add_adapter("second", settings, init_lora_weights=False)
    with torch.no_grad():
        layer.lora_factors("default")[1].fill_(3e4)
        layer.lora_factors("default")[0].fill_(1.0)
    before = layer.base_layer.weight.data.clone()
    with pytest.raises(ValueError, match=r"beyond torch\.float16's range .* requantizing would overflow; nothing was"):
        layer.merge(["default", "second"])
    assert torch.equal(layer.base_layer.weight.data, before) and not layer.merged


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_a_4bit_weight_stored_in_a_float_dtype_trains_and_merges_as_peft(checkpoint, storage):
    """``bnb_4bit_quant_storage`` (FSDP's QLoRA keeps the packed codes in the model's float dtype): both
    prepare_model_for_kbit_training leave the packed weight as it is stored, a step equals PEFT's (logits, every
    gradient), and merge_and_unload gives PEFT's quantized weights byte for byte."""
    quantization = {**QUANT["nf4-double-bf16"], "bnb_4bit_quant_storage": storage}
    models = {}
    for name, library in (("peft", peft), ("fastlora", fastlora)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = library.prepare_model_for_kbit_training(load_quantized(checkpoint, **quantization),
                                                               use_gradient_checkpointing=False)
        assert prepared.model.layers[0].mlp.up_proj.weight.dtype == storage
        models[name] = library.get_peft_model(prepared, library.LoraConfig(**{**CONFIG, "init_lora_weights": True}))
    theirs, ours = models["peft"], models["fastlora"]
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad and p.abs().sum() == 0:  # B: PEFT's zeros, so that the step and merge move something
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    copy_lora_weights(theirs, ours)
    q_proj = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoRAQuantizedLinear) and q_proj.base_layer.weight.dtype == storage
    _assert_step_as_peft(theirs, ours, GRAD_DTYPE["nf4-double-bf16"])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_ours, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    peers = dict(merged_theirs.named_modules())
    merged = [name for name, module in merged_ours.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert len(merged) == 2 * len(SEED_TARGETS)
    for name in merged:  # the packed codes and the whole quantization state (absmax, nested absmax, ...)
        mine = dict(merged_ours.named_modules())[name]
        assert mine.weight.dtype == storage
        state, peer_state = mine.state_dict(), peers[name].state_dict()
        assert state.keys() == peer_state.keys() and any("absmax" in key for key in state)
        for key, value in state.items():
            assert same_bytes(value, peer_state[key]), f"{name}: {key}"


@pytest.mark.parametrize("compute, storage", [(torch.bfloat16, torch.uint8), (torch.float16, torch.uint8),
                                              (torch.float32, torch.bfloat16)])
def test_adapters_without_autocast_take_the_4bit_layers_compute_dtype_as_in_peft(checkpoint, compute, storage):
    """``autocast_adapter_dtype=False``: PEFT gives a 4-bit layer's adapters its compute dtype (not the dtype its
    packed codes are stored in); fastlora's are the same, and so are the logits."""
    quantization = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                        bnb_4bit_quant_storage=storage)
    theirs = peft.get_peft_model(load_quantized(checkpoint, **quantization), peft.LoraConfig(**CONFIG),
                                 autocast_adapter_dtype=False)
    ours = fastlora.get_peft_model(load_quantized(checkpoint, **quantization), fastlora.LoraConfig(**CONFIG),
                                   autocast_adapter_dtype=False)
    assert {p.dtype for p in _trainable(ours).values()} == {p.dtype for p in _trainable(theirs).values()} == {compute}
    copy_lora_weights(theirs, ours)
    ids = tokens()
    logits = ours(input_ids=ids).logits
    assert_close(logits, theirs(input_ids=ids).logits, kind="same_math", dtype=compute)


@pytest.mark.parametrize("quant", ["nf4-double-bf16", "int8"])
def test_a_quantized_head_targeted_by_lora_is_saved_and_loaded_as_peft(checkpoint, quant, tmp_path):
    """An output head bitsandbytes quantized (``llm_int8_skip_modules`` without it) and targeted by LoRA: PEFT
    saves its packed weight and quantization state beside the adapter; fastlora's file holds the same keys and
    bytes, and each library loads the other's with equal logits.  The head is the frozen base's, so the model
    keeps its own: silently onto the full-precision model (a QLoRA adapter served unquantized), with a warning
    where the file's quantized head is not the model's."""
    from safetensors.torch import load_file, save_file

    quantization = {**QUANT[quant], "llm_int8_skip_modules": ["q_proj"]}
    config = {**CONFIG, "target_modules": ["v_proj", "lm_head"]}
    theirs = peft.get_peft_model(load_quantized(checkpoint, **quantization), peft.LoraConfig(**config))
    ours = fastlora.get_peft_model(load_quantized(checkpoint, **quantization), fastlora.LoraConfig(**config))
    assert isinstance(ours.base_model.model.lm_head.base_layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    copy_lora_weights(theirs, ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "theirs")
        ours.save_pretrained(tmp_path / "ours")
    theirs_file = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    ours_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert ours_file.keys() == theirs_file.keys()
    assert any(".lm_head.base_layer.weight." in key for key in ours_file) == quant.startswith("nf4")
    for key, value in ours_file.items():
        assert same_bytes(value, theirs_file[key]), key
    ids = tokens()
    with warnings.catch_warnings():  # PEFT 0.22 calls the head's quantization state, its own file's too, unexpected
        warnings.simplefilter("ignore")
        peft_loaded = peft.PeftModel.from_pretrained(load_quantized(checkpoint, **quantization), tmp_path / "ours")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the model's own head: nothing to say
        expected = ours.eval()(input_ids=ids).logits
        for model in (fastlora.PeftModel.from_pretrained(load_quantized(checkpoint, **quantization), tmp_path / "theirs"),
                      peft_loaded):
            assert_close(model.eval()(input_ids=ids).logits, expected, kind="same_math", dtype=expected.dtype)
        served = fastlora.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(checkpoint),
                                                    tmp_path / "ours")
    assert {k: v for k, v in served.adapter_tensors().items() if "lora_" in k}.keys() == \
        {k for k in ours_file if "lora_" in k}

    head_key = "base_model.model.lm_head.base_layer.weight"
    theirs_file[head_key] = theirs_file[head_key].clone()
    theirs_file[head_key].view(-1)[0] += 1
    save_file(theirs_file, tmp_path / "theirs" / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match=r"holds a quantized lm_head that is not the model's own: the model keeps "
                                         r"its own"):
        model = fastlora.PeftModel.from_pretrained(load_quantized(checkpoint, **quantization), tmp_path / "theirs")
    with torch.no_grad():
        assert_close(model.eval()(input_ids=ids).logits, expected, kind="same_math", dtype=expected.dtype)


@pytest.mark.parametrize("quant", ["nf4-fp32", "int8"])
def test_lora_only_biases_are_saved_and_loaded_as_peft(tmp_path, quant):
    """bias="lora_only": the biases of the quantized layers (their base layers') train, are saved under PEFT's
    keys, and load back, both ways."""
    tiny_llama(attention_bias=True).save_pretrained(tmp_path / "base")
    theirs, ours = _pair(tmp_path / "base", quant, bias="lora_only", target_modules=["q_proj", "v_proj"])
    saved = assert_biases_saved_and_loaded_as_peft(theirs, ours, lambda: _load(tmp_path / "base", quant), tmp_path,
                                                   torch.float32)
    assert sum("bias" in key for key in saved) == 4


def test_an_all_linear_second_adapter_adapts_the_layers_not_the_quantized_linears_inside(checkpoint):
    assert_all_linear_second_adapter_as_peft(*_pair(checkpoint, "nf4-fp32", target_modules=["down_proj"], r=2))

"""QDoRA: DoRA adapters on bitsandbytes 4-bit and 8-bit bases (on the CPU), compared with PEFT's bitsandbytes
DoRA layers: outputs and every gradient with identical dropout masks, a base bias, files both ways, merges bit
for bit, several active adapters, and what autograd keeps (no dequantized weight)."""

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
from fastlora import cpu_masks
from fastlora.functional import SEED_HIGH
from fastlora.quantized import LoRAQuantizedLinear
from fastlora.torch_path import dora_weight_norm
from tests.models import SEED_TARGETS, copy_lora_weights, load_quantized, tiny_llama, tokens
from tests.test_qlora import QUANT, assert_peft_file_trains_alike
from tests.tolerances import assert_close

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")

CONFIG = dict(task_type="CAUSAL_LM", target_modules=SEED_TARGETS, r=8, lora_alpha=32, lora_dropout=0.0,
              init_lora_weights=False, use_dora=True)


@pytest.fixture(scope="module")
def checkpoint():
    with tempfile.TemporaryDirectory() as directory:
        tiny_llama().save_pretrained(directory)
        yield directory


def _quantized_linear_with_bias(quant):
    """A bitsandbytes 4-bit or 8-bit Linear (48 → 40) with a bias, quantized from a seeded float weight."""
    torch.manual_seed(0)
    dense = nn.Linear(48, 40)
    if quant == "int8":
        layer = bnb.nn.Linear8bitLt(48, 40, bias=True, has_fp16_weights=False)
        layer.load_state_dict(dense.state_dict())
        return layer.to("cpu")  # quantizes
    layer = bnb.nn.Linear4bit(48, 40, bias=True, compute_dtype=QUANT[quant]["bnb_4bit_compute_dtype"],
                              quant_type=QUANT[quant]["bnb_4bit_quant_type"])
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False,
                                     quant_type=QUANT[quant]["bnb_4bit_quant_type"]).to("cpu")
    layer.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    layer.support_avx512bf16_for_cpu = False  # as tests.models.load_quantized: the portable CPU kernel
    return layer


class _SeededDropout(nn.Module):
    """PEFT's dropout replaced by fastlora's CPU mask for the seed the fastlora layer drew (x flattened to rows)."""

    def __init__(self, p):
        super().__init__()
        self.p, self.seed = p, None

    def forward(self, t):
        rows = t.reshape(-1, t.shape[-1])
        keep = cpu_masks.cpu_keep_mask(self.seed, tuple(rows.shape), self.p, t.dtype).view(t.shape)
        return t * keep / (1 - self.p)


def _layer_pair(base, p):
    """fastlora's and PEFT's DoRA layer over copies of ``base``, with equal factors (float32, as get_peft_model
    makes them beside a quantized weight) and a trained magnitude (within 20% of the norm it started at)."""
    settings = fastlora.LoraConfig(r=4, lora_alpha=8, lora_dropout=p, use_dora=True, target_modules=["x"]).settings
    ours = LoRAQuantizedLinear.from_quantized(copy.deepcopy(base), "default", settings, False, None).train()
    peft_class = peft.tuners.lora.bnb.Linear4bit if isinstance(base, bnb.nn.Linear4bit) else \
        peft.tuners.lora.bnb.Linear8bitLt
    theirs = peft_class(copy.deepcopy(base), "default", r=4, lora_alpha=8, config=peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=p, use_dora=True, init_lora_weights=False)).train()
    theirs.lora_A["default"].float()
    theirs.lora_B["default"].float()
    magnitude = ours.magnitude("default")
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
        norm = dora_weight_norm(ours.base_weight(), ours.lora_A, ours.lora_B, ours.scaling)
        magnitude.copy_(norm * torch.linspace(0.8, 1.2, magnitude.numel()))
        theirs.lora_magnitude_vector["default"].weight.copy_(magnitude)
    if p:
        theirs.lora_dropout["default"] = _SeededDropout(p)
    return ours, theirs


def _outputs_and_grads(ours, theirs, x, p, train_magnitude=True, on_saved=None):
    """For each layer, fastlora's then PEFT's: [y, dx, dA, dB, dm] (dm only when m trains) for the same x, dy and
    dropout mask; ``on_saved(is_ours, tensor)`` sees each tensor autograd keeps in forward."""
    ours.magnitude("default").requires_grad_(train_magnitude)
    theirs.lora_magnitude_vector["default"].weight.requires_grad_(train_magnitude)
    results = []
    for layer in (ours, theirs):
        xi = x.clone().requires_grad_()
        torch.manual_seed(7)
        if p and layer is theirs:
            layer.lora_dropout["default"].seed = int(torch.randint(0, SEED_HIGH, (1,)))  # the seed ours drew
        saved = on_saved or (lambda is_ours, t: None)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved(layer is ours, t) or t, lambda t: t):
            y = layer(xi)
        params = ((ours.lora_A, ours.lora_B, ours.magnitude("default")) if layer is ours else
                  (theirs.lora_A["default"].weight, theirs.lora_B["default"].weight,
                   theirs.lora_magnitude_vector["default"].weight))
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
        results.append([y, *torch.autograd.grad(y, (xi, *params[:3 if train_magnitude else 2]), dy)])
    return results


def _compare_layers(ours, theirs, in_features, p, train_magnitude=True):
    results = _outputs_and_grads(ours, theirs, torch.randn(2, 5, in_features), p, train_magnitude)
    for name, a, b in zip(("y", "dx", "dA", "dB", "dm"), *results):  # DoRA's gradients sum terms that cancel
        assert_close(a, b, kind="same_math" if name == "y" else "same_math_cancelling", dtype=torch.float32, msg=name)


def _compare_layers_at_bf16(results):
    for name, a, b in zip(("y", "dx", "dA", "dB", "dm"), *results):
        assert a.dtype == b.dtype, name
        assert_close(a.float(), b.float(), kind="same_math_max", dtype=torch.bfloat16, msg=name)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("quant", list(QUANT))
def test_layer_matches_peft(checkpoint, quant, p):
    """One quantized layer: output and the gradients of x, A, B and m as PEFT's, dropout masks identical (with
    dropout the base product is the dropped input's, a second product with the dequantized weight)."""
    base = load_quantized(checkpoint, **QUANT[quant]).model.layers[0].mlp.up_proj
    ours, theirs = _layer_pair(base, p)
    _compare_layers(ours, theirs, base.in_features, p)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_layer_with_a_frozen_magnitude_matches_peft(checkpoint, p):
    """m frozen (nothing kept for its gradient): output and the gradients of x, A and B as PEFT's."""
    base = load_quantized(checkpoint, **QUANT["nf4-double-bf16"]).model.layers[0].mlp.up_proj
    ours, theirs = _layer_pair(base, p)
    _compare_layers(ours, theirs, base.in_features, p, train_magnitude=False)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("quant", ["nf4-fp32", "nf4-double-bf16", "int8"])
def test_layer_with_a_base_bias_matches_peft(quant, p):
    """A base with a bias: without dropout DoRA's base is the output without the bias, as PEFT's."""
    ours, theirs = _layer_pair(_quantized_linear_with_bias(quant), p)
    _compare_layers(ours, theirs, 48, p)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_layer_with_bf16_factors_matches_peft(checkpoint, p):
    """bf16 factors beside a float32 magnitude (TRL casts a quantized model's trained factors, not m): the
    products in bf16, g and the term in float32 as PEFT's type promotion makes them; output and gradients as
    PEFT's within bf16's tolerance (PEFT also rounds the norm to bf16, fastlora keeps it in float32)."""
    base = load_quantized(checkpoint, **QUANT["nf4-fp32"]).model.layers[0].mlp.up_proj
    ours, theirs = _layer_pair(base, p)
    for factor in (ours.lora_A, ours.lora_B, theirs.lora_A["default"].weight, theirs.lora_B["default"].weight):
        factor.data = factor.data.to(torch.bfloat16)
    x = torch.randn(2, 5, base.in_features)
    assert ours.dora_term(x, "default", torch.randn(2, 5, base.out_features)).dtype == torch.float32
    _compare_layers_at_bf16(_outputs_and_grads(ours, theirs, x, p))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_layer_with_bf16_activations_matches_peft(p):
    """bf16 activations (a bf16 compute dtype, the output in bf16) beside float32 adapters, a base bias: output
    and gradients as PEFT's within bf16's tolerance, z kept for m's gradient in bf16 (as PEFT's dm reads the
    bf16 output)."""
    ours, theirs = _layer_pair(_quantized_linear_with_bias("nf4-double-bf16"), p)
    x = torch.randn(2, 5, 48).to(torch.bfloat16)
    kept = []
    _compare_layers_at_bf16(_outputs_and_grads(
        ours, theirs, x, p, on_saved=lambda is_ours, t: kept.append((is_ours, t.dtype, t.shape))))
    output_sized = [dtype for is_ours, dtype, shape in kept if is_ours and tuple(shape) == (10, 40)]
    assert output_sized == [torch.bfloat16]  # z, and nothing else of the output's size


def test_the_term_under_autocast_is_the_term_without(checkpoint):
    """Under autocast (transformers' Trainer with bf16=True) the term is computed in the dtypes it takes
    without: norm, products and all."""
    base = load_quantized(checkpoint, **QUANT["nf4-fp32"]).model.layers[0].mlp.up_proj
    ours, _ = _layer_pair(base, 0.0)
    x = torch.randn(6, base.in_features)
    result = torch.randn(6, base.out_features)
    want = ours.dora_term(x, "default", result)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours.dora_term(x, "default", result)
    assert_close(got, want, kind="same_math", dtype=torch.float32)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_no_dequantized_weight_outlives_its_pass(checkpoint, p):
    """Each dequantized weight the DoRA term makes (the norm and, with dropout, the dropped input's product in
    forward; dx in backward) is gone when its pass returns: none is kept for backward."""
    import weakref

    base = load_quantized(checkpoint, **QUANT["nf4-fp32"]).model.layers[0].mlp.up_proj
    ours, _ = _layer_pair(base, p)
    made = []
    dequantize = ours._dequantize

    def recording(weight):
        tensor = dequantize(weight)
        made.append(weakref.ref(tensor))
        return tensor

    ours._dequantize = recording
    x = torch.randn(3, base.in_features, requires_grad=True)
    torch.manual_seed(7)
    y = ours(x)
    assert made and all(ref() is None for ref in made)
    forward_count = len(made)
    y.sum().backward()
    assert len(made) == forward_count + (1 if p else 0) and all(ref() is None for ref in made)


def test_the_dropped_pass_keeps_no_weight_sized_tensor(checkpoint):
    """What autograd keeps with dropout is smaller than the weight (x, S, the seed, the norm and z for 3 rows),
    where PEFT's layer keeps the dequantized weight (its transpose) for the dropped input's product."""
    base = load_quantized(checkpoint, **QUANT["nf4-fp32"]).model.layers[0].mlp.up_proj
    ours, theirs = _layer_pair(base, 0.3)
    weight_shape = (base.out_features, base.in_features)

    def kept_shapes(layer):
        shapes = []
        x = torch.randn(3, base.in_features, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            torch.manual_seed(7)
            if layer is theirs:
                layer.lora_dropout["default"].seed = int(torch.randint(0, SEED_HIGH, (1,)))
            layer(x)
        return shapes

    assert weight_shape[::-1] in kept_shapes(theirs)  # the hook sees a kept weight (PEFT's Ŵᵀ)
    kept = kept_shapes(ours)
    assert max(torch.Size(s).numel() for s in kept) < torch.Size(weight_shape).numel(), kept


def test_backward_reads_the_weight_its_forward_read(checkpoint):
    """A merge between forward and backward (a new quantized weight) does not change dx: backward dequantizes
    the weight the forward pass read."""
    base = load_quantized(checkpoint, **QUANT["nf4-fp32"]).model.layers[0].mlp.up_proj
    ours, _ = _layer_pair(base, 0.3)
    x = torch.randn(3, base.in_features, requires_grad=True)
    grads = []
    for merge_in_between in (False, True):
        torch.manual_seed(7)
        y = ours(x)
        if merge_in_between:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ours.merge()
        grads.append(torch.autograd.grad(y.sum(), x)[0])
    assert torch.equal(grads[0], grads[1])


def _peft_model(checkpoint, quant, **changes):
    theirs = peft.get_peft_model(load_quantized(checkpoint, **QUANT[quant]), peft.LoraConfig(**{**CONFIG, **changes}))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a trained magnitude, no longer the norm it started at
        for name, param in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=generator))
    return theirs


@pytest.mark.parametrize("quant", ["nf4-fp32", "nf4-double-bf16", "int8"])
def test_model_matches_peft_and_files_go_both_ways(checkpoint, quant, tmp_path):
    """PEFT's QDoRA file loaded by fastlora: trainable counts, logits, loss and every gradient (A, B, m) as PEFT's;
    fastlora's file loaded by PEFT gives the same logits, with the same keys."""
    assert_peft_file_trains_alike(_peft_model(checkpoint, quant), lambda: load_quantized(checkpoint, **QUANT[quant]),
                                  quant, tmp_path)


@pytest.mark.parametrize("quant", ["nf4-fp32", "nf4-double-bf16", "int8"])
def test_fresh_adapter_starts_at_the_base_model(checkpoint, quant):
    """A new QDoRA adapter (B = 0, m = ‖W‖ per row of the dequantized weight) leaves the logits the base's, and its
    magnitudes are PEFT's."""
    config = {**CONFIG, "init_lora_weights": True}
    base = load_quantized(checkpoint, **QUANT[quant])
    ids = tokens()
    with torch.no_grad():
        want = base(input_ids=ids).logits
    theirs = peft.get_peft_model(load_quantized(checkpoint, **QUANT[quant]), peft.LoraConfig(**config))
    ours = fastlora.get_peft_model(base, fastlora.LoraConfig(**config))
    with torch.no_grad():
        assert_close(ours(input_ids=ids).logits, want, kind="same_math", dtype=torch.float32)
    for name, layer in ours.lora_layers():
        peft_layer = theirs.get_base_model().get_submodule(name)
        assert_close(layer.magnitude("default"), peft_layer.lora_magnitude_vector["default"].weight,
                     kind="same_math", dtype=torch.float32, msg=name)


def _assert_quantized_weights_equal(theirs, ours):
    layers = [(name, m) for name, m in theirs.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    ours_by_name = dict(ours.named_modules())
    assert layers
    for name, layer in layers:
        mine = ours_by_name[name]
        mine = getattr(mine, "base_layer", mine)
        assert torch.equal(layer.weight.data, mine.weight.data), name
        if isinstance(layer, bnb.nn.Linear4bit):  # the quantization state too: absmax, its own quantization
            dequantized = [bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state) for m in (layer, mine)]
            assert torch.equal(*dequantized), name
        else:
            assert torch.equal(*(m.weight.SCB if m.weight.SCB is not None else m.state.SCB for m in (layer, mine))), name


@pytest.mark.parametrize("quant", ["nf4-fp32", "int8"])
def test_merge_and_unload_as_peft(checkpoint, quant, tmp_path):
    """Merging dequantizes, applies W ← g ⊙ (W + s·B A) and quantizes again: the quantized weights equal PEFT's
    merge of the same adapter bit for bit, after merge_adapter, unmerge_adapter and merge_and_unload, and so do
    the merged models' logits; with the adapter disabled the logits are the base model's."""
    theirs = _peft_model(checkpoint, quant).eval()
    theirs.save_pretrained(tmp_path)
    ours = fastlora.LoraModel.from_pretrained(load_quantized(checkpoint, **QUANT[quant]), tmp_path).eval()
    ids = tokens()
    with torch.no_grad():
        base_logits = load_quantized(checkpoint, **QUANT[quant])(input_ids=ids).logits
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ours.disable_adapter():
            assert torch.equal(ours(input_ids=ids).logits, base_logits)
        for model in (theirs, ours):  # unmerging requantizes again: each weight as PEFT's, bit for bit
            model.merge_adapter()
        _assert_quantized_weights_equal(theirs, ours)
        for model in (theirs, ours):
            model.unmerge_adapter()
        _assert_quantized_weights_equal(theirs, ours)
        merged_theirs, merged_ours = theirs.merge_and_unload(), ours.merge_and_unload(safe_merge=True)
        assert not any(isinstance(m, LoRAQuantizedLinear) for m in merged_ours.modules())
        _assert_quantized_weights_equal(merged_theirs, merged_ours)
        assert torch.equal(merged_ours(input_ids=ids).logits, merged_theirs(input_ids=ids).logits)


@pytest.mark.parametrize("order", [["plain", "default"], ["default", "plain"]], ids=["LoRA then DoRA", "DoRA then LoRA"])
def test_beside_a_lora_adapter_as_peft(checkpoint, order, tmp_path):
    """A QDoRA adapter active with a plain one, in either order: each update added in turn, the DoRA one taking the
    output so far as its base, as PEFT computes; logits and every gradient as PEFT's."""
    plain = dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"], r=2, lora_alpha=5,
                 init_lora_weights=False)
    theirs = _peft_model(checkpoint, "nf4-fp32")
    theirs.add_adapter("plain", peft.LoraConfig(**plain))
    theirs.save_pretrained(tmp_path)
    ours = fastlora.LoraModel.from_pretrained(load_quantized(checkpoint, **QUANT["nf4-fp32"]), tmp_path,
                                              is_trainable=True)
    ours.load_adapter(tmp_path / "plain", adapter_name="plain", is_trainable=True)
    copy_lora_weights(theirs, ours)
    for model in (theirs, ours):
        model.base_model.set_adapter(order)
        for name, param in model.named_parameters():  # set_adapter freezes nothing it activates
            if "lora_" in name:
                param.requires_grad_(True)
    ids = tokens()
    out_theirs, out_ours = theirs(input_ids=ids, labels=ids), ours(input_ids=ids, labels=ids)
    assert_close(out_ours.logits, out_theirs.logits, kind="same_math", dtype=torch.float32)
    out_theirs.loss.backward()
    out_ours.loss.backward()
    grads_theirs = {n.replace(".weight", "") if "magnitude" in n else n: p.grad
                    for n, p in theirs.named_parameters() if p.requires_grad}
    for name, param in ours.named_parameters():
        if not param.requires_grad:
            continue
        key = re.sub(r"\.lora_magnitude_vector_(\w+)$", r".lora_magnitude_vector.\1", name)
        key = re.sub(r"\.lora_([AB])_(\w+)$", r".lora_\1.\2.weight", key)
        assert param.grad is not None, name
        assert_close(param.grad, grads_theirs[key], kind="same_math_cancelling", msg=name)

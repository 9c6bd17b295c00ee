"""The fused QLoRA layer (a 4-bit base with ``base_4bit=fused``: fastlora.qlora_ops over kernels/qlora.py) under the
interpreter: outputs and every gradient equal to the dense kernels' on bitsandbytes' dequantized weight (the same
seed, so the same dropout mask), and to bitsandbytes' own product plus the low-rank term without dropout; autograd
keeps x, S and the seed, never a weight-sized tensor."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
bnb = pytest.importorskip("bitsandbytes")

from fastlora import LoRALinear  # noqa: E402
from fastlora.adapter_settings import AdapterSettings  # noqa: E402
from fastlora.bench.measure import SavedTensorCounter, module_tensors  # noqa: E402
from fastlora.kernels.configs import INTERPRET  # noqa: E402
from fastlora.quantized import LoRAQuantizedLinear  # noqa: E402
from fastlora.schedules import use_kernel_variants  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

pytestmark = pytest.mark.skipif(not INTERPRET, reason="interpreter tests (TRITON_INTERPRET=1)")


def _layers(quant_type="nf4", nested=True, dropout=0.2, bias=True, in_features=72, out_features=40, backend="triton",
            compute=torch.bfloat16, storage=torch.uint8):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    base = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute,
                             compress_statistics=nested, quant_type=quant_type, quant_storage=storage)
    base.load_state_dict(linear.state_dict())
    base = base.to("cpu")  # quantizes
    base.support_avx512bf16_for_cpu = False
    settings = AdapterSettings(4, 8, dropout, False, False, False)
    fused = LoRAQuantizedLinear.from_quantized(base, "default", settings, False, torch.float32, backend=backend)
    dense_linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        dense_linear.weight.copy_(bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state))
        if bias:
            dense_linear.bias.copy_(base.bias)
    dense = LoRALinear.from_linear(dense_linear.to(compute), r=4, lora_alpha=8, lora_dropout=dropout,
                                   init_lora_weights=False, adapter_dtype=torch.float32, backend="triton")
    with torch.no_grad():
        dense.lora_A.copy_(fused.lora_A)
        dense.lora_B.copy_(fused.lora_B)
    return fused, dense


def _run(layer, x, seed=7):
    """(y, dx, dA, dB) of one step, the gradients fresh tensors (a second run on the layer does not add into them)."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = layer(x)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    return y, x.grad, layer.lora_A.grad, layer.lora_B.grad


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double-quantized"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_layer_equals_the_dense_kernels_on_the_dequantized_weight(quant_type, nested, dropout):
    fused, dense = _layers(quant_type, nested, dropout)
    x = torch.randn(3, 11, 72, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with use_kernel_variants(base_4bit="fused"):
        assert fused._fused_4bit_schedule(x, ["default"]) is not None
        got = _run(fused, x)
        expected = _run(dense, x)
    for name, g, e in zip(("y", "dx", "dA", "dB"), got, expected):
        assert_close(g, e, kind="same_math" if g.dtype == torch.bfloat16 else "same_math_cancelling", msg=name)


def test_fused_layer_equals_bitsandbytes_product_plus_the_low_rank_term():
    fused, _ = _layers(dropout=0.0)
    reference, _ = _layers(dropout=0.0, backend="torch")
    x = torch.randn(13, 72, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with use_kernel_variants(base_4bit="fused"):
        got = _run(fused, x)
    expected = _run(reference, x)  # bitsandbytes' bf16 product, then the low-rank term: one more rounding
    for name, g, e in zip(("y", "dx", "dA", "dB"), got, expected):
        assert_close(g.float(), e.float(), kind="same_math", dtype=torch.bfloat16, msg=name)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_a_weight_stored_in_a_float_dtype_reads_as_its_bytes(storage):
    """``quant_storage`` (FSDP's QLoRA) keeps the packed codes in a float tensor: the fused path reads its bytes,
    so it gives the uint8-stored layer's output and gradients exactly."""
    stored, _ = _layers(storage=storage)
    packed, _ = _layers()
    assert stored.base_layer.weight.dtype == storage
    assert torch.equal(stored.base_layer.weight.data.view(torch.uint8).flatten(), packed.base_layer.weight.data.flatten())
    x = torch.randn(3, 5, 72, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with use_kernel_variants(base_4bit="fused"):
        assert stored._fused_4bit_schedule(x, ["default"]) is not None
        got, expected = _run(stored, x), _run(packed, x)
    for name, g, e in zip(("y", "dx", "dA", "dB"), got, expected):
        assert torch.equal(g, e), name


def test_a_trained_base_bias_gets_its_gradient_as_on_bitsandbytes_path():
    """bias="all" / "lora_only" train the base bias: the fused path gives it dy summed over the rows."""
    fused, _ = _layers(dropout=0.0)
    reference, _ = _layers(dropout=0.0, backend="torch")
    x = torch.randn(9, 72, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    for layer in (fused, reference):
        layer.base_layer.bias.requires_grad_(True)
    with use_kernel_variants(base_4bit="fused"):
        _run(fused, x)
    _run(reference, x)
    assert fused.base_layer.bias.grad is not None
    # (bitsandbytes' own forward turns its bias into the input's dtype, bf16; the fused path leaves it as it is)
    assert_close(fused.base_layer.bias.grad.float(), reference.base_layer.bias.grad.float(), kind="same_math",
                 dtype=torch.bfloat16)


def test_an_fp32_compute_dtype_keeps_bitsandbytes_product():
    """The 4-bit GEMM's dots and config lists are 16-bit: an fp32 compute dtype (transformers' default) keeps
    bitsandbytes' product plus the low-rank term."""
    fused, _ = _layers(compute=torch.float32)
    with use_kernel_variants(base_4bit="fused"):
        assert fused._fused_4bit_schedule(torch.randn(5, 72), ["default"]) is None


def test_the_default_schedule_keeps_bitsandbytes_product():
    fused, _ = _layers()
    x = torch.randn(5, 72).to(torch.bfloat16)
    assert fused._fused_4bit_schedule(x, ["default"]) is None  # base_4bit=dequant: dequantize-then-matmul
    with use_kernel_variants(base="fused"):  # the dense GEMM's choice is not the 4-bit one
        assert fused._fused_4bit_schedule(x, ["default"]) is None


@pytest.mark.parametrize("lora_bias", [False, True])
def test_the_triton_backend_off_the_fused_path_adds_the_term_as_the_torch_path(lora_bias):
    """backend="triton" on a quantized layer whose call does not run fused (the default schedule, or an adapter the
    4-bit GEMM does not take) keeps bitsandbytes' product and adds the adapter's term on the torch path, as
    backend="auto" does: the kernels have no call for a term without its base product."""
    settings = AdapterSettings(4, 8, 0.2, False, False, lora_bias)
    layers = []
    for backend in ("triton", "torch"):
        layer, _ = _layers(backend=backend)
        torch.manual_seed(5)
        layer.add_adapter("other", settings, init_lora_weights=False)
        layer.set_adapter("other")
        if lora_bias:
            with torch.no_grad():
                layer.lora_bias("other").normal_()
        layers.append(layer)
    x = torch.randn(5, 72, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    got, expected = _run(layers[0], x), _run(layers[1], x)
    for name, g, e in zip(("y", "dx", "dA", "dB"), got, expected):
        assert torch.equal(g, e), name


def test_the_schedule_table_chooses_the_fused_4bit_product_per_shape(monkeypatch):
    """A GPU run records where the fused 4-bit GEMM wins (bench/qlora_crossover.py): a class of the
    layer's (N, K) deciding base_4bit=fused fuses the calls whose token count it holds, and only those; the
    environment still wins."""
    from fastlora import schedules

    fused, _ = _layers()
    table = [{"N": 40, "K": 72, "tokens": [1, 64], "variants": {"base_4bit": "fused"}},
             {"N": 40, "K": 72, "tokens": [65, 512], "variants": {"base_4bit": "dequant"}},
             {"N": 40, "K": 72, "tokens": [1, 512], "variants": {"base": "fused", "db": "separate"}}]  # the dense run's
    monkeypatch.setattr(schedules, "_TABLE", table)
    few, many = torch.randn(2, 16, 72).to(torch.bfloat16), torch.randn(4, 100, 72).to(torch.bfloat16)
    chosen = fused._fused_4bit_schedule(few, ["default"])
    assert chosen is not None and chosen.db == "separate"  # both runs' classes: the rank-r kernels' db too
    assert chosen.base == "cublas"  # a variant the 4-bit call does not read stays at its default
    assert fused._fused_4bit_schedule(many, ["default"]) is None
    # a dense layer of the same shape reads the dense run's classes only: one schedule across the 4-bit ranges
    dense = [schedules.resolve("triton", x, torch.zeros(40, 72)) for x in (few, many)]
    assert dense[0] == dense[1] and (dense[0].base, dense[0].db, dense[0].base_4bit) == ("fused", "separate", "dequant")
    y_table = _run(fused, few)
    with use_kernel_variants(base_4bit="fused"):
        y_named = _run(fused, few)
    for g, e in zip(y_table, y_named):
        assert torch.equal(g, e)
    monkeypatch.setenv("FASTLORA_KERNEL_VARIANTS", "base_4bit=dequant")
    assert fused._fused_4bit_schedule(few, ["default"]) is None


def test_a_traced_call_keeps_bitsandbytes_product(monkeypatch):
    """Under torch.compile (which cannot run under the interpreter: is_compiling stands in) a 4-bit layer takes
    bitsandbytes' product and the registered op, not the fused call, which would break the graph."""
    fused, _ = _layers()
    x = torch.randn(5, 72).to(torch.bfloat16)
    with use_kernel_variants(base_4bit="fused"):
        assert fused._fused_4bit_schedule(x, ["default"]) is not None
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert fused._fused_4bit_schedule(x, ["default"]) is None


def test_autograd_keeps_x_S_and_the_seed_only():
    fused, _ = _layers(dropout=0.2)
    x = torch.randn(8, 72).to(torch.bfloat16).requires_grad_(True)  # smaller than the weight: a saved weight would
    # be the largest
    counter = SavedTensorCounter(exclude=module_tensors(fused), inputs=[x])
    with use_kernel_variants(base_4bit="fused"), counter:
        y = fused(x)
    y.sum().backward()
    weight_bytes = 40 * 72 * 2
    assert max(counter.storages.values()) < weight_bytes
    assert counter.bytes == x.numel() * 2 + 8 * 4 * 4 + 8  # x (bf16), S (8 × r=4, fp32), the seed


def test_dora_and_lora_bias_adapters_keep_bitsandbytes_product():
    """The 4-bit GEMM adds a plain adapter's term: a DoRA adapter or one with lora_bias takes bitsandbytes'
    product plus its own term."""
    fused, _ = _layers()
    fused.add_adapter("dora", AdapterSettings(4, 8, 0.2, False, True, False))
    fused.add_adapter("biased", AdapterSettings(4, 8, 0.2, False, False, True))
    x = torch.randn(5, 72).to(torch.bfloat16)
    with use_kernel_variants(base_4bit="fused"):
        assert fused._fused_4bit_schedule(x, ["default"]) is not None
        assert fused._fused_4bit_schedule(x, ["dora"]) is None
        assert fused._fused_4bit_schedule(x, ["biased"]) is None


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_replays_the_fused_layers_mask(reentrant):
    """Under activation checkpointing (both kinds) the fused layer's forward runs again in backward: it draws the
    same seed (torch's RNG state is restored), so the mask, the output and every gradient equal the step without."""
    from torch.utils.checkpoint import checkpoint

    fused, _ = _layers(dropout=0.3)
    x = torch.randn(2, 9, 72, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    weights = torch.linspace(-1, 1, 2 * 9 * 40).reshape(2, 9, 40)
    results = []
    for checkpointed in (False, True):
        xi = x.clone().requires_grad_(True)
        fused.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        with use_kernel_variants(base_4bit="fused"):
            y = checkpoint(fused, xi, use_reentrant=reentrant) if checkpointed else fused(xi)
            (y.float() * weights).sum().backward()
        results.append((y, xi.grad, fused.lora_A.grad, fused.lora_B.grad))
    for name, g, e in zip(("y", "dx", "dA", "dB"), *results):
        assert torch.equal(g, e), name


@pytest.mark.parametrize("use_dora, x_shape", [(False, (3, 11, 72)), (False, (33, 72)), (True, (3, 11, 72))],
                         ids=["lora", "lora 2-D", "dora"])
def test_on_a_cuda_device_the_default_path_draws_the_fused_paths_mask(monkeypatch, use_dora, x_shape):
    """On a CUDA device the low-rank term beside bitsandbytes' product (the default schedule, out of place or, for
    a 2-D x, added into bitsandbytes' output; QDoRA's) applies the kernels' Philox mask, forward and backward:
    with the device's rule in force here, the default path equals the fused one with dropout, the same seed giving
    the same mask (for DoRA: the DoRA kernels on the dequantized weight, as the fused path does not take DoRA)."""
    import fastlora.ops

    monkeypatch.setattr(fastlora.ops, "kernel_masks_on", lambda t: True)
    x = torch.randn(*x_shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    if use_dora:
        fused, dense = _layers(dropout=0.3, backend="torch")
        for layer in (fused, dense):
            layer.add_adapter("dora", AdapterSettings(4, 8, 0.3, False, True, False), init_lora_weights=False,
                              adapter_dtype=torch.float32)
            layer.set_adapter("dora")
        with torch.no_grad():
            for mine, theirs in zip(dense.lora_factors("dora"), fused.lora_factors("dora")):
                mine.copy_(theirs)
            dense.magnitude("dora").copy_(fused.magnitude("dora"))
        dense.backend = "triton"
        got, expected = _run(fused, x), _run(dense, x)  # the active adapter's gradients: DoRA's
    else:
        default, _ = _layers(dropout=0.3, backend="torch")
        fused, _ = _layers(dropout=0.3)
        got = _run(default, x)
        with use_kernel_variants(base_4bit="fused"):
            assert fused._fused_4bit_schedule(x, ["default"]) is not None
            expected = _run(fused, x)
    with torch.no_grad():
        assert not torch.equal(got[0], fused.eval()(x))  # the mask drops something
    for name, g, e in zip(("y", "dx", "dA", "dB"), got, expected):
        if use_dora and g.dtype != torch.bfloat16:  # the DoRA kernels' products read x, and h, in bf16
            assert_close(g, e, kind="same_math", branch_dtype=torch.bfloat16, msg=name)
        else:
            assert_close(g, e, kind="same_math" if g.dtype == torch.bfloat16 else "same_math_cancelling", msg=name)


def test_a_weight_whose_quantization_state_a_wrapper_dropped_reads_the_layers_copy():
    """Where a wrapper (FSDP's flattening) leaves a 4-bit weight without its quantization state, the copy
    bitsandbytes keeps on the layer is read instead, as bitsandbytes' own forward does: the fused forward and
    backward, the schedule's choice, and the dequantized weight a merge reads are what they were."""
    fused, _ = _layers(dropout=0.2)
    x = torch.randn(3, 11, 72, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with use_kernel_variants(base_4bit="fused"):
        expected = _run(fused, x)
        weight = fused.base_weight()
        fused.base_layer.weight.quant_state = None
        assert fused.base_layer.quant_state is not None
        assert fused._fused_4bit_schedule(x, ["default"]) is not None
        got = _run(fused, x)
    assert torch.equal(fused.base_weight(), weight)
    for name, g, e in zip(("y", "dx", "dA", "dB"), got, expected):
        assert torch.equal(g, e), name

"""The kernel checks in compiled mode on a CUDA GPU: the interpreter suite's shapes, Llama-sized shapes, and
operands past 2^31 elements (64-bit offsets).  Skipped without CUDA or under TRITON_INTERPRET.

    python -m pytest tests/test_kernels_gpu.py        (bench/gpu_check.sh runs it)
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from fastlora.kernels.configs import INTERPRET  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(INTERPRET, reason="compiled mode only (TRITON_INTERPRET is set)"),
]

from fastlora import schedules  # noqa: E402
from fastlora.op_scalars import OpScalars  # noqa: E402
from fastlora.kernels import configs  # noqa: E402
from fastlora.kernels.launchers import lora_backward, lora_forward  # noqa: E402
from tests import kernel_checks as kc  # noqa: E402
from tests.kernel_checks import Case, bf16, f16, f32  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

DEVICE = "cuda"

# Correctness does not depend on autotuning, compile time does: every new shape specialisation compiles each
# config of the list.  So the suite pins one config (PINNED) and test_every_config runs each config of this
# GPU's lists once; the benchmark exercises the autotuner itself.
PINNED = "BLOCK_M=64,BLOCK_N=64,BLOCK_K=32,GROUP_M=8,num_warps=4,num_stages=3"


def unpinned(test):
    """Run ``test`` with the GEMM's own config lists (autotuning) rather than PINNED."""
    test.unpinned = True
    return test


@pytest.fixture(autouse=True)
def _pinned_config(request):
    if getattr(request.function, "unpinned", False):
        yield
        return
    with configs.pin_gemm_config(PINNED):
        yield


MEDIUM_CASES = [
    # Llama-3-8B projection shapes at moderate token counts
    Case(4096, 4096, 4096, 16, bf16, p=0.1),
    Case(4096, 4096, 4096, 16, bf16, f32, p=0.1),  # PEFT's default: fp32 adapters beside a bf16 base
    Case(2048, 4096, 14336, 16, f16, p=0.1),
    Case(2048, 14336, 4096, 64, bf16, p=0.05, bias=False),
    Case(1024, 4096, 1024, 128, bf16, f32, p=0.1),
    Case(777, 1000, 999, 256, f16, p=0.2),  # odd everything, the largest rank
    Case(2048, 4096, 4096, 16, f32, p=0.1),  # exact fp32 (torch's default matmul precision)
    Case(8192, 4096, 1024, 16, bf16, p=0.1, dy_layout="expanded"),
    Case(3000, 4096, 4096, 16, bf16, p=0.1, x_layout="row-strided"),
]

# x, y, dy and dx each hold 2^31 + 2^18 elements: every GEMM and skinny kernel runs with 64-bit offsets.
HUGE_CASE = Case(2**31 // 4096 + 64, 4096, 4096, 16, bf16, f32, p=0.1)


@pytest.mark.preflight
def test_preflight_one_small_case():
    """What ``gpu_check.sh --preflight`` runs: the compiled forward and backward at one small shape, bf16, on both
    base products."""
    for base in schedules.VARIANTS["base"]:
        with schedules.use_kernel_variants(base=base):
            kc.check_case(Case(96, 128, 80, 8, bf16, f32, p=0.1), DEVICE)


@pytest.mark.preflight
def test_preflight_bitsandbytes_4bit_on_cuda():
    """bitsandbytes on the GPU (its CUDA library loaded: a 4-bit quantize and dequantize there), and the Triton
    4-bit reader agreeing with it: what QLoRA's GPU tests and steps rest on.  Skipped without bitsandbytes
    (bench/gpu_wheels.sh fetches its wheel to carry to a machine that lacks it)."""
    from fastlora.kernels.dequant4 import dequantize_4bit

    packed, state, expected = _bnb_4bit(256, 320, "nf4", False)
    assert packed.is_cuda and expected.is_cuda
    assert torch.equal(dequantize_4bit(packed, state), expected)


BASES = pytest.mark.parametrize("base", schedules.VARIANTS["base"])  # cuBLAS + the low-rank pass; the fused GEMM


@BASES
@pytest.mark.parametrize("case", kc.SMALL_CASES[::3], ids=str)  # all of them run in the interpreter
def test_small_matches_reference(case, base):
    with schedules.use_kernel_variants(base=base):
        kc.check_case(case, DEVICE)


@BASES
@pytest.mark.parametrize("case", MEDIUM_CASES, ids=str)
def test_medium_matches_reference(case, base):
    with schedules.use_kernel_variants(base=base):
        kc.check_case(case, DEVICE)


def _arch() -> int:
    return torch.cuda.get_device_capability()[0] * 10


def _all_configs(fp32: bool, low_rank_last: bool = False) -> list[dict]:
    seen, out = set(), []
    for masked in (False, True):
        for cfg in configs.config_dicts(_arch(), fp32, masked, low_rank_last, tma=True):
            key = tuple(sorted(cfg.items()))
            if key not in seen:
                seen.add(key)
                out.append(cfg)
    return out


@unpinned
@pytest.mark.parametrize("low_rank", ["prologue", "epilogue"])
@pytest.mark.parametrize("fp32", [False, True], ids=["16-bit", "fp32"])
def test_every_config(fp32, low_rank):
    """Each config of this GPU's lists (forward and dropout dx) for each place of the low-rank term, on a shape
    with tails in every dimension whose rows TMA can read (so Hopper's TMA candidates read through descriptors)."""
    case = Case(300, 520, 264, 24, f32 if fp32 else bf16, p=0.1)
    with schedules.use_kernel_variants(base="fused", low_rank=low_rank):
        for cfg in _all_configs(fp32, low_rank == "epilogue"):
            with configs.pin_gemm_config(cfg):
                try:
                    kc.check_case(case, DEVICE)
                except AssertionError as exc:
                    raise AssertionError(f"config {cfg}: {exc}") from exc


@unpinned
def test_autotuned_launch():
    """The autotuner's own path (benchmarks its list once for this M bucket), then a second M in the bucket."""
    kc.check_case(Case(1500, 1024, 1024, 16, bf16, p=0.1), DEVICE)
    kc.check_case(Case(1800, 1024, 1024, 16, bf16, p=0.1), DEVICE)


@BASES
def test_past_int32_offsets(base):
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip(f"needs ~40 GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    with schedules.use_kernel_variants(base=base):
        kc.check_large(HUGE_CASE, DEVICE)
    torch.cuda.empty_cache()


def test_need_flags():
    kc.check_need_flags(DEVICE)


def test_mask_forward_backward_philox():
    kc.check_mask(DEVICE, M=256, K=1024)


def test_keep_rate():
    kc.check_keep_rate(DEVICE)


def test_no_seed_without_dropout():
    kc.check_no_seed(DEVICE)


def test_empty_batch():
    kc.check_empty(DEVICE)


@pytest.mark.parametrize("dtype", [f32, bf16, torch.float64], ids=str)
def test_zero_dropped_kernel(dtype):
    kc.check_zero_dropped(DEVICE, dtype, M=1000, K=4096, p=0.1)


@pytest.mark.parametrize("schedule", ["fused", "composed"])
@pytest.mark.parametrize("dtype, adapter_dtype", [(f32, f32), (bf16, f32), (bf16, bf16)], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_dora_kernel_path(dtype, adapter_dtype, p, schedule):
    with schedules.use_kernel_variants(dora=schedule):
        kc.check_dora(DEVICE, 512, 1024, 768, 16, dtype, adapter_dtype, bias=True, p=p)


@pytest.mark.parametrize("schedule", ["fused", "composed"])
def test_dora_zero_magnitude(schedule):
    """dm from the output y, and from z recomputed where m = 0."""
    with schedules.use_kernel_variants(dora=schedule):
        kc.check_dora(DEVICE, 512, 1024, 768, 16, bf16, f32, bias=False, p=0.0, zero_magnitudes=(0, 700, 767))


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_dora_step_without_host_sync(p):
    """DoRA's forward and backward on the kernel path make no host synchronisation (torch's sync debug mode
    raises on one): no data-dependent choice reads m on the host."""
    from fastlora import dora_ops

    x, W, b, A, B, m = (t.to(DEVICE) for t in kc.dora_operands(bf16, f32, False, 512, 1024, 768, 16))
    leaves = [t.requires_grad_() for t in (x, A, B, m)]
    seed = torch.tensor([5], device=DEVICE) if p else None

    def step():
        y = dora_ops.dora_linear(leaves[0], W, None, *leaves[1:], seed, OpScalars(0.5, p, schedules.kernel_schedule()),
                                 output_for_backward=True)
        return torch.autograd.grad(y.float().square().sum(), leaves)

    step()  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_compiled_dora_op_kernel_path(p):
    """torch.compile(fullgraph=True) of the DoRA op on the kernel path = eager, with one seed (without bias at
    p = 0 both keep y, not z)."""
    from fastlora import dora_ops

    x, W, b, A, B, m = (t.to(DEVICE) for t in kc.dora_operands(bf16, f32, False, 512, 1024, 768, 16))
    leaves = [t.requires_grad_() for t in (x, A, B, m)]
    seed = torch.tensor([11], device=DEVICE) if p else None

    def f(x, A, B, m):
        return dora_ops.dora_linear(x, W, None, A, B, m, seed, OpScalars(0.5, p, schedules.kernel_schedule()),
                                    output_for_backward=True)

    results = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        y = fn(*leaves)
        results.append([y, *torch.autograd.grad(y.float().square().sum(), leaves)])
    for eager, compiled in zip(*results):
        # Not a dtype's tolerance: the compiled graph launches the same kernels as eager, so y and dx (bf16) and
        # the fp32 gradients agree to 1e-5 whatever their dtype.
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_cuda_graph_replay():
    """No host synchronisation: the launchers capture into a CUDA graph (after autotuning) and replay it; a new
    seed written into the seed tensor changes the mask without re-capture."""
    case = Case(512, 1024, 1024, 16, bf16, p=0.1)
    x, w, b, A, B, dy, seed = kc.make_inputs(case, DEVICE)

    def step():
        y, S = lora_forward(x, w, b, A, B, seed, case.scaling, case.p)
        return (y, S) + lora_backward(dy, x, w, A, B, S, seed, case.scaling, case.p, True, True, True)

    eager = step()  # autotunes and compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for name, a, e in zip(("y", "S", "dx", "dA", "dB"), captured, eager):
        assert a.dtype == bf16, name
        assert_close(a, e, kind="same_math", msg=name)  # the same kernels, replayed from the graph
    seed.fill_(case.seed + 1)
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(captured[1], eager[1]), "a new seed did not change S"


# The registered ops on the kernel path: opcheck, and torch.compile(fullgraph=True) tracing into the
# triton_op (the interpreter cannot do either, so these run only here).


@pytest.mark.parametrize("persistent", [False, True], ids=["tiled", "persistent"])
def test_tma_config_eager_and_compiled(persistent):
    """A TMA config of the fused GEMM: eager against the reference, with the scratch allocator the launcher sets;
    then the layer under torch.compile(fullgraph=True), where Inductor launches the kernel (and sets its own
    allocator), equal to eager."""
    from fastlora import LoRALinear

    if _arch() < 90:
        pytest.skip("TMA configs are Hopper's (sm_90 and later)")
    cfg = next(c for c in configs.config_dicts(_arch(), False, True, tma=True)
               if c.get("TMA") and bool(c.get("PERSISTENT")) == persistent)
    with configs.pin_gemm_config(cfg), schedules.use_kernel_variants(base="fused"):
        kc.check_case(Case(1000, 4096, 1032, 16, bf16, p=0.1), DEVICE)
        layer = LoRALinear(1024, 520, r=16, lora_alpha=32, lora_dropout=0.0, device=DEVICE, dtype=torch.bfloat16,
                           backend="triton")
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.02)
        x = torch.randn(3, 171, 1024, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        runs = []
        for module in (layer, torch.compile(layer, fullgraph=True)):
            x.grad = None
            y = module(x)
            y.float().square().sum().backward()
            runs.append((y.detach(), x.grad.clone()))
    for got, want in zip(*reversed(runs)):
        assert_close(got, want, kind="same_math")


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_opcheck_kernel_path(p):
    from fastlora import ops

    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(64, 96, device=DEVICE, dtype=torch.bfloat16, generator=g, requires_grad=True)
    W = torch.randn(80, 96, device=DEVICE, dtype=torch.bfloat16, generator=g)
    b = torch.randn(80, device=DEVICE, dtype=torch.bfloat16, generator=g)
    A = torch.randn(16, 96, device=DEVICE, generator=g, requires_grad=True)
    B = torch.randn(80, 16, device=DEVICE, generator=g, requires_grad=True)
    seed = torch.tensor([7], device=DEVICE) if p else None
    torch.library.opcheck(ops.lora_linear_op, (x, W, b, A, B, seed, 2.0, p, schedules.kernel_schedule().key))


def test_compile_fullgraph_kernel_path():
    from fastlora import LoRALinear

    layer = LoRALinear(256, 192, r=16, lora_alpha=32, lora_dropout=0.0, device=DEVICE, dtype=torch.bfloat16,
                       adapter_dtype=torch.float32, backend="triton")
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02)
    x = torch.randn(4, 33, 256, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    eager = layer(x)
    eager.float().square().sum().backward()
    want = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)]
    for t in (x, layer.lora_A, layer.lora_B):
        t.grad = None
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x)
    out.float().square().sum().backward()
    torch.testing.assert_close(out, eager)
    for t, g in zip((x, layer.lora_A, layer.lora_B), want):
        # GPU-only bound, kept as it was: bf16 x.grad, and fp32 A and B gradients computed through the bf16 base,
        # compiled against eager; the table's bf16 same_math (1e-2) would tighten it unmeasured.
        torch.testing.assert_close(t.grad, g, atol=2e-2, rtol=2e-2)
    # With dropout: the seed comes from torch's RNG when compiled too.  Inductor draws random numbers with its
    # own generator unless fallback_random is set; with it, under one seed the compiled and the eager layer
    # draw the same seed, hence the same mask, and give the same outputs and gradients.
    layer.lora_dropout = 0.1
    runs = []
    with torch._inductor.config.patch(fallback_random=True):
        for module in (layer, torch.compile(layer, fullgraph=True)):
            for t in (x, layer.lora_A, layer.lora_B):
                t.grad = None
            torch.manual_seed(3)
            y = module(x)
            y.float().square().sum().backward()
            runs.append([y.detach()] + [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)])
    for got, want in zip(runs[1], runs[0]):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)  # as above
    assert not torch.allclose(runs[0][0], eager.detach())  # dropout did change the output


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_eager_layer_on_cuda_with_both_backends(p):
    """LoRALinear in eager mode on CUDA: the kernel path (the autograd.Function beside the op) and the torch
    backend agree, with dropout too: on CUDA the torch path applies the kernels' Philox mask, the same for the
    same seed."""
    from fastlora import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(256, 192, r=16, lora_alpha=32, lora_dropout=p, device=DEVICE, dtype=torch.float32)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02)
    x = torch.randn(300, 256, device=DEVICE, requires_grad=True)
    with torch.no_grad():
        no_dropout = layer.eval()(x)
    layer.train()
    results = {}
    for backend in ("triton", "torch"):
        layer.backend = backend
        for t in (x, layer.lora_A, layer.lora_B):
            t.grad = None
        torch.manual_seed(1)  # one seed for both backends
        y = layer(x)
        y.square().sum().backward()
        results[backend] = [y.detach()] + [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)]
        assert all(torch.isfinite(t).all() for t in results[backend])
        if p:
            assert not torch.allclose(y, no_dropout), f"{backend}: dropout changed nothing"
    for a, b in zip(results["triton"], results["torch"]):
        # GPU-only bound, kept as it was: the kernels against cuBLAS in fp32 on CUDA, gradients of a squared
        # sum over 300 x 256; the table's fp32 same_math_cancelling (1e-4) would tighten it unmeasured.
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("variants", [{"base": "fused"}, {"db": "separate"}, {"base": "fused", "low_rank": "epilogue"},
                                      {"base": "fused", "db": "separate", "low_rank": "epilogue"}], ids=str)
def test_schedule_variants_compiled(variants):
    """The schedule variants bench/kernel_variants.py times, compiled, against the float64 reference."""
    with schedules.use_kernel_variants(**variants):
        kc.check_case(Case(2048, 4096, 4096, 16, bf16, f32, p=0.1), DEVICE)
        kc.check_case(Case(777, 1000, 999, 64, f16, p=0.2), DEVICE)


def test_rank_r_precision_beside_peft():
    """PEFT's default setup (bf16 base, fp32 adapters) under torch's default precision: the rank-r kernels run
    3×tf32 on tensor cores; S, dA and dB stay within 4× PEFT's own error (torch's fp32 matmuls) against
    float64.  Under torch's "high" setting they run plain tf32 and may be less exact."""
    M, K, N, r, s = 4096, 4096, 4096, 16, 2.0
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(M, K, device=DEVICE, generator=g).to(bf16)
    w = (torch.randn(N, K, device=DEVICE, generator=g) * K**-0.5).to(bf16)
    A = torch.randn(r, K, device=DEVICE, generator=g) * K**-0.5
    B = torch.randn(N, r, device=DEVICE, generator=g) * r**-0.5
    dy = torch.randn(M, N, device=DEVICE, generator=g).to(bf16)
    xd, dyd, Ad, Bd = x.double(), dy.double(), A.double(), B.double()
    S_ref = xd @ Ad.T
    refs = {"S": S_ref, "dA": (s * dyd @ Bd).T @ xd, "dB": s * dyd.T @ S_ref}

    def rel(got, ref):
        return ((got.double() - ref).abs().max() / ref.abs().max()).item()

    assert torch.get_float32_matmul_precision() == "highest"
    _, S = lora_forward(x, w, None, A, B, None, s, 0.0)
    _, dA, dB = lora_backward(dy, x, w, A, B, S, None, s, 0.0, False, True, True)
    ours = {"S": rel(S, refs["S"]), "dA": rel(dA, refs["dA"]), "dB": rel(dB, refs["dB"])}
    xf, dyf = x.float(), dy.float()
    peft = {"S": rel(xf @ A.T, refs["S"]), "dA": rel((s * dyf @ B).T @ xf, refs["dA"]),
            "dB": rel(s * dyf.T @ (xf @ A.T), refs["dB"])}
    for name in ours:
        assert ours[name] <= 4 * peft[name] + 1e-7, f"{name}: {ours[name]:.3g} against PEFT's {peft[name]:.3g}"


def _bnb_4bit(out_features, in_features, quant_type, nested, dtype=bf16):
    bnb = pytest.importorskip("bitsandbytes")
    weight = torch.randn(out_features, in_features, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    packed, state = bnb.functional.quantize_4bit(weight.to(dtype), blocksize=64, quant_type=quant_type,
                                                 compress_statistics=nested)
    return packed, state, bnb.functional.dequantize_4bit(packed, state)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double-quantized"])
def test_dequant4_compiled_as_bitsandbytes(quant_type, nested):
    """tests/test_dequant4.py's check, compiled: bitsandbytes' CUDA dequantize to the bit, but where the GPU
    contracts the double-quantized absmax's multiply-add into one rounding (one bf16 ulp at most)."""
    from fastlora.kernels.dequant4 import dequantize_4bit

    packed, state, expected = _bnb_4bit(4096, 1000, quant_type, nested)
    got = dequantize_4bit(packed, state)
    if nested:
        assert_close(got, expected, kind="same_math")
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_gemm4bit_compiled_equals_the_dense_kernel_on_the_dequantized_weight(dropout_p):
    """tests/test_gemm4bit.py's check, compiled, at a Llama-3-8B projection (4096 → 4096, 2048 tokens)."""
    from fastlora.kernels.gemm import launch_fused_gemm
    from fastlora.kernels.gemm4bit import launch_fused_gemm_4bit

    M, K, N, r = 2048, 4096, 4096, 16
    packed, state, W = _bnb_4bit(N, K, "nf4", True)
    g = torch.Generator(DEVICE).manual_seed(1)
    x, dy = torch.randn(M, K, device=DEVICE, generator=g).to(bf16), torch.randn(M, N, device=DEVICE, generator=g).to(bf16)
    S, B = torch.randn(M, r, device=DEVICE, generator=g), torch.randn(N, r, device=DEVICE, generator=g) / 16
    A = torch.randn(r, K, device=DEVICE, generator=g) / 64
    seed = torch.tensor([99], device=DEVICE)
    for got, dense in ((launch_fused_gemm_4bit(x, packed, state, True, None, S, B.t(), seed, 2.0, 0.0),
                        launch_fused_gemm(x, W.t(), None, S, B.t(), seed, 2.0, 0.0, "prologue")),
                       (launch_fused_gemm_4bit(dy, packed, state, False, None, S, A, seed, 1.0, dropout_p),
                        launch_fused_gemm(dy, W, None, S, A, seed, 1.0, dropout_p, "prologue"))):
        assert_close(got, dense, kind="same_math")


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_fused_qlora_layer_compiled_agrees_with_bitsandbytes_and_the_low_rank_term(p):
    """The fused QLoRA layer (base_4bit=fused) against bitsandbytes' product plus the torch path's low-rank term,
    bf16, forward and backward (y, dx, dA, dB), with dropout too: on CUDA both draw the kernels' Philox mask from
    one seed."""
    bnb = pytest.importorskip("bitsandbytes")
    from torch import nn

    from fastlora.adapter_settings import AdapterSettings
    from fastlora.quantized import LoRAQuantizedLinear

    torch.manual_seed(0)
    dense = nn.Linear(4096, 1024, bias=False)
    layers = []
    for backend in ("auto", "torch"):
        base = bnb.nn.Linear4bit(4096, 1024, bias=False, compute_dtype=bf16, quant_type="nf4")
        base.load_state_dict(dense.state_dict())
        base = base.to(DEVICE)
        layer = LoRAQuantizedLinear.from_quantized(base, "default", AdapterSettings(16, 32, p, False, False, False),
                                                   False, torch.float32, backend=backend)
        layers.append(layer.train())
    with torch.no_grad():
        layers[1].lora_A.copy_(layers[0].lora_A)
        layers[1].lora_B.copy_(layers[0].lora_B)
    x = torch.randn(4, 512, 4096, device=DEVICE, dtype=bf16)
    dy = torch.randn(4, 512, 1024, device=DEVICE, dtype=bf16)
    results = []
    with schedules.use_kernel_variants(base_4bit="fused"):
        assert layers[0]._fused_4bit_schedule(x, ["default"]) is not None
        for layer in layers:
            xi = x.clone().requires_grad_(True)
            torch.manual_seed(1)  # one seed: one mask
            y = layer(xi)
            results.append([y, *torch.autograd.grad(y, (xi, layer.lora_A, layer.lora_B), dy)])
        assert layers[1]._fused_4bit_schedule(x, ["default"]) is None  # the torch backend: bitsandbytes' product
    for name, got, expected in zip(("y", "dx", "dA", "dB"), *results):
        # dA and dB are float32 sums of bf16 operands (x, dy) in both: bf16's bound
        assert_close(got.float(), expected.float(), kind="same_math", dtype=bf16, msg=name)


def test_qdora_layer_on_cuda_matches_peft():
    """A DoRA adapter on a CUDA nf4 base (bf16 compute, bf16 activations, float32 adapters) against PEFT's
    bitsandbytes DoRA layer: output and the gradients of x, A, B and m, within bf16's tolerance (no dropout)."""
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    import copy

    import peft.tuners.lora.bnb  # noqa: F401  (PEFT's bitsandbytes layers)
    from torch import nn

    from fastlora.adapter_settings import AdapterSettings
    from fastlora.quantized import LoRAQuantizedLinear

    torch.manual_seed(0)
    dense = nn.Linear(1024, 512)
    base = bnb.nn.Linear4bit(1024, 512, compute_dtype=bf16, quant_type="nf4")
    base.load_state_dict(dense.state_dict())
    base = base.to(DEVICE)
    ours = LoRAQuantizedLinear.from_quantized(copy.deepcopy(base), "default",
                                              AdapterSettings(16, 32, 0.0, False, True, False), False, f32).train()
    theirs = peft.tuners.lora.bnb.Linear4bit(copy.deepcopy(base), "default", r=16, lora_alpha=32, config=peft.LoraConfig(
        r=16, lora_alpha=32, use_dora=True, init_lora_weights=False), use_dora=True, init_lora_weights=False).train()
    assert theirs.use_dora["default"]  # a DoRA layer whichever way this PEFT reads its options
    theirs.lora_A["default"].float()
    theirs.lora_B["default"].float()
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
        ours.magnitude("default").mul_(torch.linspace(0.8, 1.2, 512, device=DEVICE))
        theirs.lora_magnitude_vector["default"].weight.copy_(ours.magnitude("default"))
    x = torch.randn(4, 256, 1024, device=DEVICE, dtype=bf16)
    dy = torch.randn(4, 256, 512, device=DEVICE, dtype=bf16)
    results = []
    for layer, params in ((ours, (ours.lora_A, ours.lora_B, ours.magnitude("default"))),
                          (theirs, (theirs.lora_A["default"].weight, theirs.lora_B["default"].weight,
                                    theirs.lora_magnitude_vector["default"].weight))):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        results.append([y, *torch.autograd.grad(y, (xi, *params), dy)])
    for name, got, expected in zip(("y", "dx", "dA", "dB", "dm"), *results):
        assert got.dtype == expected.dtype, name
        assert_close(got.float(), expected.float(), kind="same_math_max", dtype=bf16, msg=name)


def test_grouped_low_rank_compiled_equals_the_per_expert_products():
    """tests/test_grouped_kernels.py's check, compiled: 8 experts of uneven (one empty) segments, 4096 rows of bf16
    beside fp32 adapters, 1024 → 2048, r = 16; forward and every gradient."""
    from fastlora.grouped_experts import grouped_low_rank

    counts, r, K, N = [700, 0, 1200, 96, 800, 500, 300, 500], 16, 1024, 2048
    g = torch.Generator(DEVICE).manual_seed(3)
    rows = torch.randn(sum(counts), K, device=DEVICE, generator=g).to(bf16).requires_grad_(True)
    A = (torch.randn(8 * r, K, device=DEVICE, generator=g) / 32).requires_grad_(True)
    B = (torch.randn(N, r * 8, device=DEVICE, generator=g) / 4).requires_grad_(True)

    def run(kernels):
        update = grouped_low_rank(rows, counts, A.reshape(8, r, K), B.reshape(N, r, 8).permute(2, 0, 1), 2.0, kernels)
        return update, *torch.autograd.grad((update * update.detach().sign()).sum(), (rows, A, B))

    for name, got, expected in zip(("update", "d_rows", "dA", "dB"), run(True), run(False)):
        assert_close(got.float(), expected.float(), kind="same_math_cancelling" if got.dtype == f32 else "same_math",
                     dtype=got.dtype, msg=name)


def test_mixed_batch_compiled_on_the_grouped_kernels_equals_the_torch_path():
    """tests/test_grouped_kernels.py's model check, compiled: three adapters' rows (and base rows) of one batch in
    one grouped call, against the torch path's per-adapter products (dropout off), logits and LoRA gradients."""
    from fastlora.adapter_settings import AdapterSettings
    from fastlora import LoRALinear

    torch.manual_seed(0)
    layers = []
    for backend in ("auto", "torch"):
        layer = LoRALinear(1024, 2048, r=8, lora_alpha=16, init_lora_weights=False, backend=backend, adapter_name="a",
                           device=DEVICE, dtype=bf16, adapter_dtype=f32)
        for name, r in (("b", 16), ("c", 4)):
            layer.add_adapter(name, AdapterSettings(r, 2 * r, 0.0, False, False, False), init_lora_weights=False,
                              adapter_dtype=f32)
        layers.append(layer)
    with torch.no_grad():
        layers[1].weight.copy_(layers[0].weight)
        layers[1].bias.copy_(layers[0].bias)
        for name in "abc":
            for mine, theirs in zip(layers[1].lora_factors(name), layers[0].lora_factors(name)):
                mine.copy_(theirs)
    x = torch.randn(12, 256, 1024, device=DEVICE, dtype=bf16)
    rows = {"a": torch.tensor([0, 5, 7]), "b": torch.tensor([1, 2, 3, 11]), "c": torch.tensor([8])}
    results = []
    for layer in layers:
        assert layer._grouped_rows(x, rows) == (layer.backend == "auto")
        y = layer.mixed_batch_forward(x, rows)
        y.float().square().mean().backward()
        results.append((y, [p.grad for n in "abc" for p in layer.lora_factors(n)]))
    assert_close(results[0][0].float(), results[1][0].float(), kind="same_math", dtype=bf16)
    for got, expected in zip(results[0][1], results[1][1]):
        assert_close(got, expected, kind="same_math_cancelling")


@pytest.mark.parametrize("dtype", [f32, bf16], ids=["fp32 x", "bf16 x"])
def test_mixed_batch_compiled_with_dropout_matches_the_reference(dtype):
    """tests/test_grouped_kernels.py's mixed-batch check, compiled: three adapters' rows read through an index,
    their dropout masks on the input (S) and on dx, every gradient against float64 with the same Philox masks."""
    from tests.test_grouped_kernels import check_mixed_batch_rows

    check_mixed_batch_rows((9, 64, 40), dtype, DEVICE)


@unpinned
def test_dora_every_config():
    """Each config of the DoRA GEMM's 16-bit lists (one accumulator without dropout; two with, so the smaller
    tiles), on a shape with tails everywhere.  Last in the file: the slowest to compile."""
    for p in (0.0, 0.1):
        for cfg in configs.dora_config_dicts(_arch(), "16-bit", p > 0):
            with configs.pin_gemm_config(cfg):
                try:
                    kc.check_dora(DEVICE, 300, 520, 264, 24, bf16, f32, bias=True, p=p)
                except AssertionError as exc:
                    raise AssertionError(f"p={p} config {cfg}: {exc}") from exc

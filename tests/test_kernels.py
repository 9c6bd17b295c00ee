"""Kernel tests under the Triton interpreter (CPU): the real kernel code on small shapes, odd sizes included.

Run with TRITON_INTERPRET=1 (tests/conftest.py sets it when CUDA is absent; it must be set before triton is
imported).  The compiled-mode twin, with large shapes, is tests/test_kernels_gpu.py.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from fastlora.kernels.configs import INTERPRET  # noqa: E402

pytestmark = pytest.mark.skipif(not INTERPRET, reason="interpreter tests (TRITON_INTERPRET=1); see test_kernels_gpu.py")

from fastlora import schedules  # noqa: E402
from fastlora.op_scalars import OpScalars  # noqa: E402
from tests import kernel_checks as kc  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

CASES = kc.SMALL_CASES


@pytest.mark.parametrize("base", schedules.VARIANTS["base"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case, base):
    """Both base products (cuBLAS with the low-rank pass, the fused GEMM) against the float64 reference."""
    with schedules.use_kernel_variants(base=base):
        kc.check_case(case, "cpu")


def test_need_flags():
    kc.check_need_flags("cpu")


def test_mask_forward_backward_philox():
    kc.check_mask("cpu")


def test_keep_rate():
    kc.check_keep_rate("cpu")


def test_no_seed_without_dropout():
    kc.check_no_seed("cpu")


def test_empty_batch():
    kc.check_empty("cpu")


def test_philox_reproduction_matches_triton():
    """tests/philox.py reproduces tl.randint4x bit for bit (both counter words), so it is Triton's Philox."""
    import triton
    import triton.language as tl

    from tests import philox

    @triton.jit
    def randint4x_kernel(seed, off_ptr, out_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        a, b, c, d = tl.randint4x(seed, tl.load(off_ptr + i))
        tl.store(out_ptr + i, a.to(tl.int32, bitcast=True))
        tl.store(out_ptr + N + i, b.to(tl.int32, bitcast=True))
        tl.store(out_ptr + 2 * N + i, c.to(tl.int32, bitcast=True))
        tl.store(out_ptr + 3 * N + i, d.to(tl.int32, bitcast=True))

    offsets = torch.arange(64, dtype=torch.int64) * 7919 + (5 << 32)
    out = torch.empty(4 * 64, dtype=torch.int32)
    seed = 0x1234_5678_9ABC_DEF0
    randint4x_kernel[(1,)](seed, offsets, out, N=64)
    expected = torch.stack(philox.randint4x(seed, offsets))
    assert torch.equal(out.view(4, 64).to(torch.int64) & 0xFFFFFFFF, expected)


def _real_configs() -> list[dict]:
    """Every distinct GEMM config of the Hopper and Ampere lists (as run on GPUs), the TMA candidates included."""
    from fastlora.kernels import configs

    seen, out = set(), []
    for arch in (80, 90):
        for fp32 in (False, True):
            for masked in (False, True):
                for cfg in configs.config_dicts(arch, fp32, masked, tma=True):
                    key = tuple(sorted(cfg.items()))
                    if key not in seen:
                        seen.add(key)
                        out.append(cfg)
    return out


def _config_id(cfg: dict) -> str:
    return "{BLOCK_M}x{BLOCK_N}x{BLOCK_K}-w{num_warps}-s{num_stages}".format(**cfg) + "".join(
        f"-{flag.lower()}" for flag in ("TMA", "PERSISTENT") if cfg.get(flag))


@pytest.mark.parametrize("config", _real_configs(), ids=_config_id)
def test_real_gemm_configs(config):
    """The GPU configs' block shapes (tails, swizzle, mask tiles) under the interpreter, in the fused GEMM."""
    from fastlora.kernels import configs

    with schedules.use_kernel_variants(base="fused"), configs.pin_gemm_config(config):
        kc.check_case(kc.Case(70, 97, 130, 24, torch.float16, p=0.1), "cpu")


# TMA reads: shapes whose rows TMA can read (16-byte aligned: K and N multiples of 8 in 16 bits), with tails in
# every dimension of the tiles; B read along K (forward, x Wᵀ) and along N (dx, dy W), and swapped by a
# transposed weight.
TMA_CASES = [
    kc.Case(70, 104, 136, 24, torch.float16, p=0.1),
    kc.Case(70, 104, 136, 24, torch.bfloat16, torch.float32, p=0.1, bias=False),
    kc.Case(37, 72, 40, 8, torch.float16, p=0.3, weight_layout="transposed"),
]
# Small tiles, so that the persistent programs (two under the interpreter) walk several tiles each.
SMALL_PERSISTENT = [dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1, TMA=1, PERSISTENT=1),
                    dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1, PERSISTENT=1)]


def _tma_configs() -> list[dict]:
    from fastlora.kernels import configs

    hopper = [c for masked in (False, True) for c in configs.config_dicts(90, False, masked, tma=True) if c.get("TMA")]
    return [*{tuple(sorted(c.items())): c for c in hopper}.values(), *SMALL_PERSISTENT]


@pytest.mark.parametrize("low_rank", schedules.VARIANTS["low_rank"])
@pytest.mark.parametrize("config", _tma_configs(), ids=_config_id)
def test_tma_and_persistent_configs(config, low_rank, monkeypatch):
    """The Hopper TMA and persistent schedules against the float64 reference: descriptor reads zero-filled past
    every edge, B through either orientation, the persistent loop over several tiles, the low-rank term before
    and after the main loop; a TMA config launches with the descriptors' scratch allocator."""
    from fastlora.kernels import configs, gemm

    scratch = []
    real = gemm.launch_with_scratch
    monkeypatch.setattr(gemm, "launch_with_scratch", lambda *a: scratch.append(1) or real(*a))
    with schedules.use_kernel_variants(base="fused", low_rank=low_rank), configs.pin_gemm_config(config):
        for case in TMA_CASES:
            kc.check_case(case, "cpu")
    assert scratch, "no launch read its operands through TMA"


def test_operands_tma_cannot_read_take_the_pointer_loads(monkeypatch):
    """A TMA config pinned for operands TMA cannot read (rows of 97 fp16: 194 bytes) runs without TMA, correctly."""
    from fastlora.kernels import configs, gemm

    scratch = []
    monkeypatch.setattr(gemm, "launch_with_scratch", lambda *a: scratch.append(1))
    with schedules.use_kernel_variants(base="fused"), configs.pin_gemm_config(SMALL_PERSISTENT[0]):
        kc.check_case(kc.Case(70, 97, 130, 24, torch.float16, p=0.1), "cpu")
    assert not scratch


def test_which_operands_tma_can_read():
    """16-byte aligned starts and leading strides, the last dimension contiguous (B: either one)."""
    from fastlora.kernels.common import tma_readable

    x = torch.empty(64, 104, dtype=torch.float16)
    w = torch.empty(136, 104, dtype=torch.float16)
    assert tma_readable(x, w.t())  # forward: B = Wᵀ, contiguous along K
    assert tma_readable(torch.empty(64, 136, dtype=torch.float16), w)  # dx: B = W, contiguous along N
    assert not tma_readable(torch.empty(64, 97, dtype=torch.float16), torch.empty(33, 97, dtype=torch.float16).t())
    assert not tma_readable(x[:, ::2], w.t()[::2])  # A's rows not contiguous
    assert not tma_readable(torch.empty(64, 112, dtype=torch.float16)[:, 1:105], w.t())  # start off 16 bytes
    assert not tma_readable(x, torch.empty(104, 272, dtype=torch.float16)[:, ::2])  # B contiguous along neither
    assert not tma_readable(torch.empty(64, 104), torch.empty(136, 104).t())  # fp32: no TMA config proved for it
    row = torch.empty(1, 104, dtype=torch.float16)
    assert not tma_readable(row.expand(64, 104), w.t())  # rows of A expanded from one (stride 0)
    assert not tma_readable(x, torch.empty(1, 136, dtype=torch.float16).expand(104, 136))  # B's rows expanded


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_zero_dropped_kernel(dtype):
    kc.check_zero_dropped("cpu", dtype)


def test_zero_dropped_kernel_int64_offsets(monkeypatch):
    from fastlora.kernels import common

    monkeypatch.setattr(common, "_INT32_LIMIT", 64)
    kc.check_zero_dropped("cpu", torch.float32, M=9, K=40, p=0.6)


@pytest.mark.parametrize("schedule", ["fused", "composed"])
@pytest.mark.parametrize("dtype, adapter_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                  (torch.float16, torch.float16)], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dora_kernel_path(dtype, adapter_dtype, p, schedule):
    """DoRA on its own kernels ("fused") and on the LoRA kernels with torch passes ("composed")."""
    with schedules.use_kernel_variants(dora=schedule):
        kc.check_dora("cpu", 37, 97, 33, 8, dtype, adapter_dtype, bias=True, p=p)
        kc.check_dora("cpu", 16, 40, 24, 4, dtype, adapter_dtype, bias=False, p=p)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dora_gpu_tile(p):
    """One of the DoRA GEMM's GPU tiles (64 × 128, K step 64) under the interpreter: tails in every dimension,
    the mask over 64-column steps of x."""
    from fastlora.kernels import configs

    with configs.pin_gemm_config("BLOCK_M=64,BLOCK_N=128,BLOCK_K=64,GROUP_M=8,num_warps=4,num_stages=4"):
        kc.check_dora("cpu", 70, 150, 140, 8, torch.bfloat16, torch.float32, bias=True, p=p)


@pytest.mark.parametrize("schedule", ["fused", "composed"])
def test_dora_zero_magnitude_kernel_path(schedule):
    """No dropout, no bias: backward takes dm from the output y, and where m = 0 (y keeps nothing of z) from z
    recomputed by the zero-magnitude pass; the tail block of columns included."""
    with schedules.use_kernel_variants(dora=schedule):
        kc.check_dora("cpu", 37, 97, 70, 8, torch.bfloat16, torch.float32, bias=False, p=0.0,
                      zero_magnitudes=(0, 33, 69))
        kc.check_dora("cpu", 16, 40, 24, 4, torch.float32, torch.float32, bias=False, p=0.0, zero_magnitudes=(5,))


def test_dora_zero_magnitude_strided_operands():
    """A magnitude that is a strided view, a transposed x: the zero-magnitude pass reads the right columns."""
    from fastlora import dora_ops, reference
    from fastlora.schedules import kernel_schedule

    x, W, _, A, B, m = kc.dora_operands(torch.float32, torch.float32, False, 20, 40, 24, 4)
    m[3] = 0.0
    m_view = torch.stack([m, torch.ones_like(m)], 1)[:, 0].requires_grad_()  # stride 2
    x_t = x.t().contiguous().t().requires_grad_()
    dy = torch.randn(20, 24, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(dora_ops.dora_linear(x_t, W, None, A, B, m_view, None, OpScalars(0.5, 0.0, kernel_schedule()),
                                                output_for_backward=True), m_view, dy)[0]
    m64 = m.double().requires_grad_()
    y64 = reference.dora(x, W, None, A, B, m64, 0.5)
    want = torch.autograd.grad(y64, m64, dy.double())[0]
    assert got.dtype == torch.float32
    assert_close(got, want, kind="reference_max", msg="dm")


def test_dora_norm_kernel_rank_chunks():
    """Ranks above the skinny cap: the row-norm kernel's program columns each add their part of n²."""
    from fastlora.kernels import configs, dora

    for dtype, adapter_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32)):
        W = torch.randn(50, 70).to(dtype)
        A = (torch.randn(configs.SKINNY_R_MAX + 5, 70) * 0.1).to(adapter_dtype)
        B = (torch.randn(50, A.shape[0]) * 0.1).to(adapter_dtype)
        want = torch.linalg.vector_norm(W.double() + 2.0 * B.double() @ A.double(), dim=1)
        n = dora.dora_weight_norm(W, A, B, 2.0)
        assert n.dtype == torch.float32
        assert_close(n, want, kind="reference_max", msg="n")


def test_dora_dB_beside_a_small_magnitude():
    """fp16 adapters, g = m / n far below 1: dB = g ⊙ s·dyᵀ S is finite though s·dyᵀ S is not in fp16."""
    from fastlora.kernels import dora

    gen = torch.Generator().manual_seed(0)
    M, K, N, r = 32, 40, 24, 4
    x, W = (torch.randn(shape, generator=gen).half() for shape in ((M, K), (N, K)))
    A, B = (torch.randn(shape, generator=gen).half() for shape in ((r, K), (N, r)))
    S = (x.float() @ A.float().t()).half()
    dy = (torch.randn(M, N, generator=gen) * 3000).half()
    g = torch.full((N,), 1e-3)
    assert not torch.isfinite((2.0 * dy.float().t() @ S.float()).half()).all()  # the unscaled dB overflows
    _, _, dB = dora.dora_backward(dy, x, W, A, B, S, g, None, 2.0, 0.0, False, False, True)
    want = g[:, None].double() * 2.0 * dy.double().t() @ S.double()
    assert dB.dtype == torch.float16
    assert_close(dB, want, kind="reference_max", msg="dB")


def test_dora_int64_offsets_path(monkeypatch):
    from fastlora.kernels import common

    monkeypatch.setattr(common, "_INT32_LIMIT", 64)
    kc.check_dora("cpu", 37, 97, 33, 8, torch.bfloat16, torch.float32, bias=True, p=0.3)


def test_row_chunked_oracle():
    """The GPU suite's chunked reference (for tensors past 2^31 elements), here on a small shape."""
    kc.check_large(kc.Case(100, 33, 20, 8, torch.float16, torch.float32, p=0.2), "cpu", row_chunk=32)


def test_int64_offsets_path(monkeypatch):
    """The 64-bit offset code (taken for operands past 2^31 elements) on small shapes: lower the limit."""
    from fastlora.kernels import common

    monkeypatch.setattr(common, "_INT32_LIMIT", 64)
    assert common.needs_int64(torch.empty(9, 9))
    kc.check_case(kc.Case(37, 33, 64, 8, torch.float16, torch.float32, p=0.1, x_layout="row-strided"), "cpu")
    kc.check_case(kc.Case(70, 97, 33, 16, p=0.2, dy_layout="expanded"), "cpu")


@pytest.mark.parametrize("r", [16, 32, 64, 128, 200])
def test_real_skinny_blocks(monkeypatch, r):
    """The skinny kernels' GPU block choices (configs._ROWS / _COLS) under the interpreter."""
    from fastlora.kernels import configs

    monkeypatch.setattr(configs, "INTERPRET", False)  # rows_blocks / cols_blocks: the GPU tables
    with configs.pin_gemm_config("BLOCK_M=32,BLOCK_N=32,BLOCK_K=32,num_warps=4,num_stages=1"):
        kc.check_case(kc.Case(150, 200, 72, r, torch.float16, torch.float32, p=0.1), "cpu")
        kc.check_case(kc.Case(9, 300, 40, r, p=0.2, bias=False), "cpu")


def test_dot_precision_choices():
    """fp32 dots follow torch's matmul precision, except: a 16-bit GEMM's fp32 prologue runs tf32 (its sum is
    rounded to 16 bits), and a rank-r kernel over a 16-bit operand with fp32 adapters runs 3×tf32 (tensor cores,
    fp32-class results) under "highest"; exact fp32 and 3×tf32 skinny dots get their own (smaller) tiles."""
    from fastlora.kernels import configs
    from fastlora.kernels.common import gemm_precision, skinny_precision, small_skinny_tiles

    f32, bf16 = torch.float32, torch.bfloat16
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert gemm_precision(f32) == "ieee" and gemm_precision(bf16) == "tf32"
        assert skinny_precision(bf16, f32) == "tf32x3" and skinny_precision(f32, f32) == "ieee"
        assert small_skinny_tiles(bf16, f32, "tf32x3") and small_skinny_tiles(f32, f32, "ieee")
        assert not small_skinny_tiles(bf16, bf16, skinny_precision(bf16, bf16))
        assert small_skinny_tiles(f32, bf16, skinny_precision(f32, bf16))  # fp32 x converted in registers
        torch.set_float32_matmul_precision("high")
        assert gemm_precision(f32) == "tf32" and skinny_precision(bf16, f32) == "tf32"
        assert not small_skinny_tiles(f32, f32, skinny_precision(f32, f32))
    finally:
        torch.set_float32_matmul_precision(previous)
    assert configs._ROWS_EXACT.keys() == configs._ROWS.keys() and configs._COLS_EXACT.keys() == configs._COLS.keys()


VARIANT_CASES = [
    kc.Case(37, 97, 64, 16, torch.bfloat16, torch.float32, p=0.1),
    kc.Case(128, 33, 97, 8, torch.float16, bias=False),
    kc.Case(1, 64, 33, 33, p=0.3, dy_layout="expanded"),
    kc.Case(70, 40, 130, 24, torch.float32, torch.bfloat16, p=0.2),
]


@pytest.mark.parametrize("variants", [{"db": "separate"}, {"base": "fused", "db": "separate"},
                                      {"base": "fused", "low_rank": "epilogue"},
                                      {"base": "fused", "db": "separate", "low_rank": "epilogue"}], ids=str)
@pytest.mark.parametrize("case", VARIANT_CASES, ids=str)
def test_schedule_variants(variants, case):
    """Each schedule variant the GPU check times computes the same outputs and gradients as the default."""
    with schedules.use_kernel_variants(**variants):
        assert all(getattr(schedules.kernel_schedule(), k) == v for k, v in variants.items())
        kc.check_case(case, "cpu")


def test_variant_choice_from_the_environment(monkeypatch):
    default = schedules.kernel_schedule()
    assert (default.base, default.db, default.low_rank, default.dora) == ("cublas", "atomic", "prologue", "fused")
    monkeypatch.setenv("FASTLORA_KERNEL_VARIANTS", "db=separate")
    assert schedules.kernel_schedule().db == "separate"
    x = torch.zeros(2, 3)
    assert schedules.resolve("triton", x).db == "separate" and schedules.resolve("torch", x).name == "torch"
    assert schedules.Schedule.from_key(schedules.kernel_schedule().key) == schedules.kernel_schedule()
    monkeypatch.setenv("FASTLORA_KERNEL_VARIANTS", "db=sideways")
    with pytest.raises(ValueError, match="db=atomic|separate"):
        schedules.kernel_schedule()


def test_the_schedule_chosen_per_call_reaches_the_launchers(monkeypatch):
    """lora_linear resolves the schedule once (FASTLORA_KERNEL_VARIANTS or use_kernel_variants) and the launchers
    run what it names: cuBLAS and the low-rank pass by default, else the fused GEMM (its low-rank term last with
    low_rank=epilogue), the separate dB pass, DoRA composed of the LoRA kernels."""
    from fastlora import LoRALinear
    from fastlora.kernels import backward, forward, gemm, launchers

    seen = {"dB": 0, "low_rank_last": set(), "add_passes": 0, "dora_kernels": 0}
    launch_dB, autotuned, add, dora_forward = (backward.launch_dB, gemm.autotuned_gemm, forward.launch_low_rank_add,
                                               launchers.dora_forward)

    def spy_dB(*args, **kwargs):
        seen["dB"] += 1
        return launch_dB(*args, **kwargs)

    def spy_gemm(fp32, masked, low_rank_last, tma=False):
        seen["low_rank_last"].add(low_rank_last)
        return autotuned(fp32, masked, low_rank_last, tma)

    def spy_add(*args, **kwargs):
        seen["add_passes"] += 1
        return add(*args, **kwargs)

    def spy_dora(*args, **kwargs):
        seen["dora_kernels"] += 1
        return dora_forward(*args, **kwargs)

    monkeypatch.setattr(backward, "launch_dB", spy_dB)
    monkeypatch.setattr(gemm, "autotuned_gemm", spy_gemm)
    monkeypatch.setattr(forward, "launch_low_rank_add", spy_add)
    monkeypatch.setattr(backward, "launch_low_rank_add", spy_add)
    monkeypatch.setattr(launchers, "dora_forward", spy_dora)
    x = torch.randn(9, 16, requires_grad=True)

    def step(**layer_args):
        layer = LoRALinear(16, 12, r=4, lora_alpha=8, backend="triton", **layer_args)
        torch.nn.init.normal_(layer.lora_B)
        layer(x).sum().backward()

    step()
    assert seen == {"dB": 0, "low_rank_last": set(), "add_passes": 2, "dora_kernels": 0}  # forward and dx
    with schedules.use_kernel_variants(base="fused"):
        step()
    assert seen["add_passes"] == 2 and seen["low_rank_last"] == {False}
    with schedules.use_kernel_variants(base="fused", db="separate", low_rank="epilogue"):
        step()
    assert seen["dB"] == 1 and seen["low_rank_last"] == {False, True}
    step(use_dora=True)
    assert seen["dora_kernels"] == 1
    monkeypatch.setenv("FASTLORA_KERNEL_VARIANTS", "dora=composed")
    step(use_dora=True)
    assert seen["dora_kernels"] == 1 and seen["add_passes"] == 4  # composed DoRA on the cuBLAS-backed LoRA kernels


def test_a_second_active_adapter_on_the_triton_backend_adds_its_term_on_the_torch_path():
    """backend="triton" with two active adapters: the first runs in the kernels, the second's term (no base product
    of its own to fuse into) on the torch path, as with backend="auto"; the result is both adapters' sum."""
    from fastlora import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(16, 12, r=4, lora_alpha=8, backend="triton", init_lora_weights=False)
    layer.add_adapter("second", layer.adapter_settings["default"], init_lora_weights=False)
    layer.set_adapter(["default", "second"])
    x = torch.randn(6, 16, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    expected = x @ layer.weight.t() + layer.bias
    for name in ("default", "second"):
        A, B = layer.lora_factors(name)
        expected = expected + 2.0 * (x @ A.t()) @ B.t()
    assert_close(y, expected, kind="same_math", dtype=torch.float32)
    assert all(f.grad is not None for name in ("default", "second") for f in layer.lora_factors(name))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_the_torch_path_on_a_cuda_device_draws_the_kernels_mask(monkeypatch, use_dora):
    """On a CUDA device the torch path applies the kernels' Philox mask (one launch, no host sync), forward and
    backward: with the device's rule in force here, backend="torch" equals backend="triton" with dropout, the same
    seed giving the same mask; a second active adapter's term (the torch path beside the kernels) too."""
    import fastlora.ops
    from fastlora import LoRALinear

    monkeypatch.setattr(fastlora.ops, "kernel_masks_on", lambda t: True)
    results = {}
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        layer = LoRALinear(40, 24, r=4, lora_alpha=8, lora_dropout=0.3, use_dora=use_dora, backend=backend,
                           init_lora_weights=False)
        layer.add_adapter("second", layer.adapter_settings["default"], init_lora_weights=False)
        layer.set_adapter(["default", "second"])
        x = torch.randn(2, 9, 40, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch.manual_seed(5)
        y = layer(x)
        (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        results[backend] = [y, x.grad, *(f.grad for n in ("default", "second") for f in layer.lora_factors(n))]
    with torch.no_grad():
        assert not torch.allclose(results["torch"][0], layer.eval()(x))  # the mask drops something
    for name, got, expected in zip(("y", "dx", "dA", "dB", "dA2", "dB2"), results["torch"], results["triton"]):
        assert_close(got, expected, kind="same_math_cancelling", dtype=torch.float32, msg=name)

"""Checks shared by tests/test_kernels.py (Triton interpreter, CPU) and tests/test_kernels_gpu.py (compiled, CUDA).

Each check runs ``fastlora.kernels`` and compares with ``fastlora.reference`` (the plain math, in float64), the
dropout mask of the reference reproduced by ``tests/philox.py`` (torch Philox, independent of the kernels).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from fastlora import reference
from fastlora.op_scalars import OpScalars
from fastlora.schedules import kernel_schedule
from fastlora.kernels.launchers import lora_backward, lora_forward
from tests import philox
from tests.tolerances import assert_close

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16

@dataclass(frozen=True)
class Case:
    M: int
    K: int
    N: int
    r: int
    dtype: torch.dtype = torch.float32
    adapter_dtype: torch.dtype | None = None  # None: same as dtype
    bias: bool = True
    p: float = 0.0
    scaling: float = 0.5
    x_layout: str = "contiguous"  # "contiguous" | "row-strided" (padded rows) | "column-strided" (copied)
    dy_layout: str = "random"  # "random" | "expanded" (stride-0 ones, as y.sum().backward() gives)
    weight_layout: str = "contiguous"  # "contiguous" | "transposed" (a view of a (K, N) tensor)
    seed: int = 1234

    def __str__(self) -> str:
        a = "" if self.adapter_dtype in (None, self.dtype) else f"-A{str(self.adapter_dtype)[6:]}"
        return (f"{self.M}x{self.K}->{self.N}-r{self.r}-{str(self.dtype)[6:]}{a}-p{self.p}"
                f"{'-bias' if self.bias else ''}-{self.x_layout}-{self.dy_layout}-{self.weight_layout}")


# Small shapes (<= 128 a side, odd sizes): the interpreter's suite, and the compiled suite's first part.

SMALL_CASES = [
    # odd shapes, fp32, with and without bias and dropout
    Case(1, 33, 64, 8),
    Case(37, 97, 33, 1, bias=False),
    Case(37, 1, 97, 8, p=0.1),
    Case(128, 64, 1, 16, p=0.5),
    Case(128, 97, 97, 33, p=0.2, bias=False),
    Case(37, 64, 33, 100, p=0.1),  # r past the epilogue's 64-wide chunk
    Case(9, 33, 17, 256),  # r at its maximum
    # fp16 fully, bf16 through the interpreter's fp32 upcast; fp32 adapters beside a 16-bit base
    Case(37, 97, 64, 16, f16, p=0.1),
    Case(128, 33, 97, 8, f16, bias=False),
    Case(37, 97, 64, 16, bf16, p=0.1),
    Case(64, 64, 33, 33, bf16, bias=False),
    Case(37, 64, 97, 16, f16, f32, p=0.1),
    Case(37, 64, 97, 16, bf16, f32, p=0.1),
    Case(1, 97, 33, 8, bf16, f32),
    # 16-bit adapters beside an fp32 base: the LoRA branch in 16 bits, as on the torch path
    Case(37, 64, 97, 16, f32, bf16, p=0.1),
    Case(37, 97, 33, 8, f32, f16, bias=False),
    # layouts: padded rows, a column-strided x (copied), a stride-0 dy, a transposed weight view
    Case(37, 33, 64, 8, p=0.1, x_layout="row-strided"),
    Case(37, 33, 64, 8, f16, p=0.1, x_layout="column-strided"),
    Case(37, 33, 64, 8, p=0.3, dy_layout="expanded"),
    Case(37, 33, 64, 8, bf16, f32, p=0.3, dy_layout="expanded"),
    Case(37, 97, 33, 16, p=0.1, weight_layout="transposed"),
    # a large seed (both key words used) and a negative one
    Case(64, 64, 33, 8, p=0.4, seed=2**62 + 12345),
    Case(64, 64, 33, 8, p=0.4, seed=-99),
]

# A sweep over the odd sizes: every M with every (K, N) pairing, rank, dtype and dropout rotating.
_RANKS, _DTYPES = (1, 8, 16, 33), (f32, f16, bf16)
SMALL_CASES += [
    Case(M, K, N, _RANKS[i % 4], _DTYPES[i % 3], p=(0.15 if i % 2 else 0.0), bias=bool(i % 3))
    for i, (M, (K, N)) in enumerate(
        (M, kn) for M in (1, 37, 128) for kn in ((1, 97), (33, 64), (64, 33), (97, 1))
    )
]


def _strided(t: torch.Tensor, layout: str) -> torch.Tensor:
    M, K = t.shape
    if layout == "row-strided":
        big = torch.zeros(M, K + 7, dtype=t.dtype, device=t.device)
        big[:, :K] = t
        return big[:, :K]
    if layout == "column-strided":
        big = torch.zeros(M, 2 * K, dtype=t.dtype, device=t.device)
        big[:, ::2] = t
        return big[:, ::2]
    return t


def make_inputs(case: Case, device: str):
    g = torch.Generator(device=device).manual_seed(zlib.crc32(str(case).encode()))
    adt = case.adapter_dtype or case.dtype

    def rnd(*shape, dtype, scale=1.0):
        t = torch.randn(*shape, generator=g, device=device, dtype=dtype)
        return t.mul_(scale) if scale != 1.0 else t

    x = _strided(rnd(case.M, case.K, dtype=case.dtype), case.x_layout)
    w = rnd(case.N, case.K, dtype=case.dtype, scale=case.K**-0.5)
    if case.weight_layout == "transposed":
        w = w.t().contiguous().t()
    b = rnd(case.N, dtype=case.dtype) if case.bias else None
    A = rnd(case.r, case.K, dtype=adt, scale=case.K**-0.5)
    B = rnd(case.N, case.r, dtype=adt, scale=case.r**-0.5)
    if case.dy_layout == "expanded":
        dy = torch.ones(1, 1, dtype=case.dtype, device=device).expand(case.M, case.N)
    else:
        dy = rnd(case.M, case.N, dtype=case.dtype)
    seed = torch.tensor([case.seed], dtype=torch.int64, device=device)
    return x, w, b, A, B, dy, seed


def _check(name: str, got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
           branch_dtype: torch.dtype | None = None) -> None:
    """An output of the kernels: of ``dtype``, and within its tolerance of the float64 reference relative to the
    reference's largest magnitude; y and dx add the low-rank term computed in the adapters' dtype
    (``branch_dtype``), hence the coarser of the two."""
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    assert_close(got, ref, kind="reference_max", branch_dtype=branch_dtype, msg=name)


def check_case(case: Case, device: str) -> None:
    """Forward (y, S) and backward (dx, dA, dB) of the kernels against the float64 reference."""
    x, w, b, A, B, dy, seed = make_inputs(case, device)
    plan = kernel_schedule()  # the variants of the calling test's use_kernel_variants, if any
    y, S = lora_forward(x, w, b, A, B, seed, case.scaling, case.p, low_rank=plan.low_rank, base=plan.base)
    dx, dA, dB = lora_backward(dy, x, w, A, B, S, seed, case.scaling, case.p, True, True, True, db=plan.db,
                               low_rank=plan.low_rank, base=plan.base)

    keep = philox.keep_mask(case.seed, case.M, case.K, case.p).to(device) if case.p > 0 else None
    d = lambda t: None if t is None else t.double()  # noqa: E731
    y_ref, S_ref = reference.lora(x, w, b, A, B, case.scaling, keep, case.p)
    dx_ref, dA_ref, dB_ref = reference.lora_grads(dy, x, w, A, B, case.scaling, keep, case.p)
    adt = case.adapter_dtype or case.dtype
    _check("y", y, y_ref, case.dtype, adt)
    _check("S", S, S_ref, adt)
    _check("dx", dx, dx_ref, case.dtype, adt)
    _check("dA", dA, dA_ref, adt)
    _check("dB", dB, dB_ref, adt)


def check_large(case: Case, device: str, row_chunk: int = 1 << 16) -> None:
    """check_case for inputs too big for a float64 copy: the reference runs on row chunks (y, S, dx compared
    per chunk, dA and dB summed over chunks), the mask of each chunk reproduced from its first row."""
    x, w, b, A, B, dy, seed = make_inputs(case, device)
    plan = kernel_schedule()  # the variants of the calling test's use_kernel_variants, if any
    y, S = lora_forward(x, w, b, A, B, seed, case.scaling, case.p, low_rank=plan.low_rank, base=plan.base)
    dx, dA, dB = lora_backward(dy, x, w, A, B, S, seed, case.scaling, case.p, True, True, True, db=plan.db,
                               low_rank=plan.low_rank, base=plan.base)
    adt = case.adapter_dtype or case.dtype
    dA_ref = torch.zeros(case.r, case.K, dtype=torch.float64, device=device)
    dB_ref = torch.zeros(case.N, case.r, dtype=torch.float64, device=device)
    for start in range(0, case.M, row_chunk):
        rows = slice(start, min(case.M, start + row_chunk))
        n = rows.stop - start
        keep = philox.keep_mask(case.seed, n, case.K, case.p, device=device, row_start=start) if case.p > 0 else None
        y_ref, S_ref = reference.lora(x[rows], w, b, A, B, case.scaling, keep, case.p)
        dx_ref, dA_part, dB_part = reference.lora_grads(dy[rows], x[rows], w, A, B, case.scaling, keep, case.p)
        _check(f"y[{start}:]", y[rows], y_ref, case.dtype, adt)
        _check(f"S[{start}:]", S[rows], S_ref, adt)
        _check(f"dx[{start}:]", dx[rows], dx_ref, case.dtype, adt)
        dA_ref += dA_part
        dB_ref += dB_part
        del y_ref, S_ref, dx_ref, keep
    _check("dA", dA, dA_ref, adt)
    _check("dB", dB, dB_ref, adt)


def check_need_flags(device: str) -> None:
    """Outputs not asked for are None; each one asked for alone equals the all-at-once result."""
    case = Case(M=19, K=33, N=20, r=8, p=0.25)
    x, w, b, A, B, dy, seed = make_inputs(case, device)
    _, S = lora_forward(x, w, b, A, B, seed, case.scaling, case.p)
    full = lora_backward(dy, x, w, A, B, S, seed, case.scaling, case.p, True, True, True)
    for i in range(3):
        flags = [j == i for j in range(3)]
        part = lora_backward(dy, x, w, A, B, S, seed, case.scaling, case.p, *flags)
        for j in range(3):
            if j == i:
                assert_close(part[j], full[j], kind="roundoff", msg=("dx", "dA", "dB")[j])
            else:
                assert part[j] is None
    assert lora_backward(dy, x, w, A, B, S, seed, case.scaling, case.p, False, False, False) == (None, None, None)


def masks_via_identity(K: int, M: int, p: float, seed: int, device: str, dtype=torch.float32):
    """The kernels' mask read back from both directions: with x = 1, A = I and r = K, forward gives
    S = m/(1-p); with W = 0, B = I, dy = 1 and s = 1, backward gives dx = m/(1-p)."""
    x = torch.ones(M, K, dtype=dtype, device=device)
    eye = torch.eye(K, dtype=dtype, device=device)
    w = torch.zeros(K, K, dtype=dtype, device=device)
    seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
    _, S = lora_forward(x, w, None, eye, eye, seed_t, 1.0, p)
    dx, _, _ = lora_backward(x, x, w, eye, eye, S, seed_t, 1.0, p, True, False, False)
    return S != 0, dx != 0


def check_mask(device: str, M: int = 64, K: int = 64) -> None:
    """One mask for forward and backward, equal to the torch Philox reproduction, seeded, at rate 1 - p."""
    for p, seed in ((0.1, 7), (0.5, -3), (0.3, 2**40 + 5)):
        fwd, bwd = masks_via_identity(K, M, p, seed, device)
        expected = philox.keep_mask(seed, M, K, p).to(device)
        assert torch.equal(fwd, bwd), "forward and backward masks differ"
        assert torch.equal(fwd, expected), "kernel mask differs from the torch Philox reproduction"
        n = fwd.numel()
        rate = fwd.double().mean().item()
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(rate - (1 - p)) < 5 * sigma, f"keep rate {rate:.4f} for p={p} (n={n})"
    again, _ = masks_via_identity(K, M, 0.3, 11, device)
    same, _ = masks_via_identity(K, M, 0.3, 11, device)
    other, _ = masks_via_identity(K, M, 0.3, 12, device)
    assert torch.equal(again, same), "same seed gave different masks"
    assert (again != other).float().mean().item() > 0.2, "different seeds gave (nearly) the same mask"


def check_keep_rate(device: str) -> None:
    """Keep rate of a larger mask (torch reproduction of the kernels' stream), per row and overall."""
    for p in (0.05, 0.1, 0.5, 0.9):
        keep = philox.keep_mask(99, 256, 512, p).to(device)
        rate = keep.double().mean().item()
        sigma = math.sqrt(p * (1 - p) / keep.numel())
        assert abs(rate - (1 - p)) < 5 * sigma, f"p={p}: keep rate {rate}"
        col_rate = keep.double().mean(0)
        col_sigma = math.sqrt(p * (1 - p) / keep.shape[0])
        assert (col_rate - (1 - p)).abs().max().item() < 6 * col_sigma, "a column's keep rate is off"


def check_no_seed(device: str) -> None:
    """Without dropout the seed may be None; with dropout it is required."""
    case = Case(M=9, K=33, N=17, r=4)
    x, w, b, A, B, dy, seed = make_inputs(case, device)
    with_seed = lora_forward(x, w, b, A, B, seed, 0.5, 0.0)
    y, S = lora_forward(x, w, b, A, B, None, 0.5, 0.0)
    assert torch.equal(y, with_seed[0]) and torch.equal(S, with_seed[1])
    grads = lora_backward(dy, x, w, A, B, S, None, 0.5, 0.0, True, True, True)
    assert all(g is not None for g in grads)
    try:
        lora_forward(x, w, b, A, B, None, 0.5, 0.1)
    except ValueError:
        pass
    else:
        raise AssertionError("dropout without a seed was accepted")


def check_empty(device: str) -> None:
    case = Case(M=0, K=33, N=17, r=8, p=0.1)
    x, w, b, A, B, dy, seed = make_inputs(case, device)
    y, S = lora_forward(x, w, b, A, B, seed, 0.5, 0.1)
    assert y.shape == (0, 17) and S.shape == (0, 8)
    dx, dA, dB = lora_backward(dy, x, w, A, B, S, seed, 0.5, 0.1, True, True, True)
    assert dx.shape == (0, 33) and dA.shape == (8, 33) and dB.shape == (17, 8)
    assert dA.abs().sum().item() == 0 and dB.abs().sum().item() == 0


# ---- DoRA's kernel path: its products through torch, the mask applied by kernels.zero_dropped_ ----------


def check_zero_dropped(device: str, dtype: torch.dtype, M: int = 37, K: int = 97, p: float = 0.3,
                       seed: int = 2**40 + 77) -> None:
    """Every (M, K) slice of a stack multiplied by the kernels' mask for (seed, row, col), NaN kept as NaN."""
    from fastlora.kernels.launchers import zero_dropped_

    # drawn in float64: a float64 tensor's values past float32's precision must come through unrounded
    t = torch.randn(3, M, K, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device=device,
                                                                                                 dtype=dtype)
    keep = philox.keep_mask(seed, M, K, p, device=device)
    dropped, kept = (~keep).nonzero()[0], keep.nonzero()[0]
    t[1, dropped[0], dropped[1]] = t[2, kept[0], kept[1]] = float("nan")  # x ⊙ m: both stay NaN
    got = zero_dropped_(t.clone(), torch.tensor([seed], device=device), p)
    want = t * keep.to(dtype)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


def dora_operands(base_dtype: torch.dtype, adapter_dtype: torch.dtype, bias: bool, M: int = 9, K: int = 24,
                  N: int = 16, r: int = 4, seed: int = 0):
    """(x, W, b, A, B, m) for DoRA checks: m within 20% of ‖W + 0.5·B A‖ per row (a trained magnitude)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(base_dtype)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(base_dtype)
    b = torch.randn(N, generator=g).to(base_dtype) if bias else None
    A = (torch.randn(r, K, generator=g) / K**0.5).to(adapter_dtype)
    B = (torch.randn(N, r, generator=g) / r**0.5).to(adapter_dtype)
    norm = torch.linalg.vector_norm(W.double() + 0.5 * B.double() @ A.double(), dim=1)
    m = (norm * (1 + 0.2 * torch.randn(N, generator=g, dtype=torch.float64))).to(adapter_dtype)
    return x, W, b, A, B, m


def check_dora(device: str, M: int, K: int, N: int, r: int, dtype: torch.dtype, adapter_dtype: torch.dtype,
               bias: bool, p: float, seed: int = 99, zero_magnitudes: tuple[int, ...] = (),
               output_for_backward: bool = True) -> None:
    """fastlora::dora_linear with ``use_kernels`` against float64 with the kernels' mask: y and dx to the base
    dtype's tolerance, dA and dB to the adapters', dm (in the adapters' dtype) to the coarser of the adapters'
    and the base dtype's (it sums dy ⊙ x Wᵀ, a product in the base dtype).  ``zero_magnitudes``: rows of m set
    to 0; ``output_for_backward``: backward may read y (without dropout and bias), as the functional op allows."""
    from fastlora import dora_ops

    x, W, b, A, B, m = dora_operands(dtype, adapter_dtype, bias, M, K, N, r, seed=1)
    m[list(zero_magnitudes)] = 0.0
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(2)).to(dtype)
    leaves = [t.to(device).requires_grad_() for t in (x, A, B, m)]
    seed_t = torch.tensor([seed], device=device) if p else None
    y = dora_ops.dora_linear(leaves[0], W.to(device), b.to(device) if bias else None, *leaves[1:], seed_t,
                             OpScalars(0.5, p, kernel_schedule()), output_for_backward=output_for_backward)
    grads = torch.autograd.grad(y, leaves, dy.to(device))
    keep = philox.keep_mask(seed, M, K, p).double() if p else None
    ref_leaves = [t.double().requires_grad_() for t in (x, A, B, m)]
    y_ref = reference.dora(ref_leaves[0], W, b, *ref_leaves[1:], 0.5, keep, p)
    ref_grads = torch.autograd.grad(y_ref, ref_leaves, dy.double())
    for name, got, want, branch_dtype in zip(("y", "dx", "dA", "dB", "dm"), (y, *grads), (y_ref, *ref_grads),
                                             (None, None, None, None, dtype)):
        _check(name, got.cpu(), want, dtype if name in ("y", "dx") else adapter_dtype, branch_dtype)

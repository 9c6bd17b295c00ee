"""Checks shared by tests/test_kernels.py (Triton interpreter, CPU) and tests/test_kernels_gpu.py (compiled, CUDA).

Each check runs ``fastlora.kernels`` and compares with ``fastlora.reference`` evaluated on float64 copies, the
dropout mask of the reference reproduced by ``tests/philox.py`` (torch Philox, independent of the kernels).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from fastlora import reference
from fastlora.kernels import lora_backward, lora_forward
from tests import philox

# Tolerance per base dtype, relative: |got - ref| <= tol·|ref| + tol·max|ref|.
TOLERANCE = {
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}


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
    g = torch.Generator(device="cpu").manual_seed(zlib.crc32(str(case).encode()))
    adt = case.adapter_dtype or case.dtype

    def rnd(*shape, dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)

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


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float, dtype: torch.dtype) -> None:
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    ref = ref.to(got.device)
    scale = ref.abs().max().item()
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * max(scale, 1e-30), msg=lambda m: f"{name}: {m}")


def check_case(case: Case, device: str) -> None:
    """Forward (y, S) and backward (dx, dA, dB) of the kernels against the float64 reference."""
    x, w, b, A, B, dy, seed = make_inputs(case, device)
    y, S = lora_forward(x, w, b, A, B, seed, case.scaling, case.p)
    dx, dA, dB = lora_backward(dy, x, w, A, B, S, seed, case.scaling, case.p, True, True, True)

    keep = philox.keep_mask(case.seed, case.M, case.K, case.p).to(device) if case.p > 0 else None
    d = lambda t: None if t is None else t.double()  # noqa: E731
    y_ref, S_ref = reference.lora_forward(d(x), d(w), d(b), d(A), d(B), case.scaling, keep, case.p)
    # Backward from the reference's own S: the comparison then tests backward alone.
    dx_ref, dA_ref, dB_ref = reference.lora_backward(
        d(dy), d(x), d(w), d(A), d(B), S_ref, case.scaling, keep, case.p)
    tol = TOLERANCE[case.dtype]
    adt = case.adapter_dtype or case.dtype
    assert_close("y", y, y_ref, tol, case.dtype)
    assert_close("S", S, S_ref, tol, adt)
    assert_close("dx", dx, dx_ref, tol, case.dtype)
    assert_close("dA", dA, dA_ref, tol, adt)
    assert_close("dB", dB, dB_ref, tol, adt)


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
                torch.testing.assert_close(part[j], full[j], rtol=1e-6, atol=1e-6)
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


def check_empty(device: str) -> None:
    case = Case(M=0, K=33, N=17, r=8, p=0.1)
    x, w, b, A, B, dy, seed = make_inputs(case, device)
    y, S = lora_forward(x, w, b, A, B, seed, 0.5, 0.1)
    assert y.shape == (0, 17) and S.shape == (0, 8)
    dx, dA, dB = lora_backward(dy, x, w, A, B, S, seed, 0.5, 0.1, True, True, True)
    assert dx.shape == (0, 33) and dA.shape == (8, 33) and dB.shape == (17, 8)
    assert dA.abs().sum().item() == 0 and dB.abs().sum().item() == 0

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

from tests import kernel_checks as kc  # noqa: E402
from tests.kernel_checks import Case  # noqa: E402

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16

CASES = [
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
CASES += [
    Case(M, K, N, _RANKS[i % 4], _DTYPES[i % 3], p=(0.15 if i % 2 else 0.0), bias=bool(i % 3))
    for i, (M, (K, N)) in enumerate(
        (M, kn) for M in (1, 37, 128) for kn in ((1, 97), (33, 64), (64, 33), (97, 1))
    )
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case):
    kc.check_case(case, "cpu")


def test_need_flags():
    kc.check_need_flags("cpu")


def test_mask_forward_backward_philox():
    kc.check_mask("cpu")


def test_keep_rate():
    kc.check_keep_rate("cpu")


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

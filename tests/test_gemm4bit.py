"""The fused GEMM over bitsandbytes' 4-bit weights (kernels/gemm4bit.py) under the interpreter: the forward
product (x Wᵀ + b + s·S Bᵀ) against float64 arithmetic on bitsandbytes' own dequantized weight, and both
directions (forward, and dx = dy W + (dS A) ⊙ m with the dropout mask) equal to the dense fused GEMM run on that
dequantized weight — every quant type, with and without double-quantized absmax, tails in every dimension."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
bnb = pytest.importorskip("bitsandbytes")

from fastlora.kernels.configs import INTERPRET  # noqa: E402
from fastlora.kernels.gemm import launch_fused_gemm  # noqa: E402
from fastlora.kernels.gemm4bit import launch_fused_gemm_4bit  # noqa: E402
from tests.bnb_reference import quantized_4bit  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

pytestmark = pytest.mark.skipif(not INTERPRET, reason="interpreter tests (TRITON_INTERPRET=1)")


def _quantized(out_features, in_features, quant_type, nested, blocksize, dtype=torch.float32, seed=0):
    """(packed, quant_state, bitsandbytes' dequantized weight) of a random (out × in) weight."""
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return quantized_4bit(weight, blocksize, quant_type, nested)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


SHAPES = [(37, 72, 40, 4, 64), (16, 64, 96, 8, 64), (5, 130, 33, 3, 32)]  # M, in, out, r, blocksize


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double-quantized"])
@pytest.mark.parametrize("M, K, N, r, blocksize", SHAPES)
def test_forward_is_the_product_with_bitsandbytes_dequantized_weight(quant_type, nested, M, K, N, r, blocksize):
    packed, state, W = _quantized(N, K, quant_type, nested, blocksize)
    x, bias, S, B = _randn(M, K, seed=1), _randn(N, seed=2), _randn(M, r, seed=3), _randn(N, r, seed=4)
    y = launch_fused_gemm_4bit(x, packed, state, True, bias, S, B.t(), None, 2.0, 0.0)
    expected = (x.double() @ W.double().t() + bias.double() + 2.0 * S.double() @ B.double().t())
    assert y.shape == (M, N) and y.dtype == x.dtype
    assert_close(y, expected, kind="reference_max")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double-quantized"])
@pytest.mark.parametrize("M, K, N, r, blocksize", SHAPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_both_directions_equal_the_dense_kernel_on_the_dequantized_weight(quant_type, nested, M, K, N, r, blocksize,
                                                                          dropout_p):
    """Forward (B = Wᵀ) and dx (B = W, the masked low-rank term): the same tiles, mask and sums as the dense fused
    GEMM over bitsandbytes' dequantized weight."""
    packed, state, W = _quantized(N, K, quant_type, nested, blocksize)
    seed = torch.tensor([1234], dtype=torch.int64)
    x, S, B = _randn(M, K, seed=5), _randn(M, r, seed=6), _randn(N, r, seed=7)
    forward = launch_fused_gemm_4bit(x, packed, state, True, None, S, B.t(), seed, 1.5, 0.0)
    assert_close(forward, launch_fused_gemm(x, W.t(), None, S, B.t(), seed, 1.5, 0.0, "prologue"), kind="same_math")
    dy, dS, A = _randn(M, N, seed=8), _randn(M, r, seed=9), _randn(r, K, seed=10)
    dx = launch_fused_gemm_4bit(dy, packed, state, False, None, dS, A, seed, 1.0, dropout_p)
    dense = launch_fused_gemm(dy, W, None, dS, A, seed, 1.0, dropout_p, "prologue")
    assert dx.shape == (M, K)
    assert_close(dx, dense, kind="same_math")


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_16_bit_weight_is_rounded_as_bitsandbytes_rounds_it(stored):
    """A weight quantized from 16 bits dequantizes to 16-bit values; the kernel rounds each to that dtype before the
    dot, so an fp32 product over it equals the product with bitsandbytes' 16-bit dequantized weight."""
    packed, state, W = _quantized(24, 64, "nf4", True, 64, dtype=stored)
    x, S, B = _randn(9, 64, seed=11), torch.zeros(9, 2), torch.zeros(24, 2)
    y = launch_fused_gemm_4bit(x, packed, state, True, None, S, B.t(), None, 1.0, 0.0)
    assert_close(y, x.double() @ W.double().t(), kind="reference_max")

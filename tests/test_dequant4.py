"""The Triton reader of bitsandbytes' 4-bit weights (kernels/dequant4.py) under the interpreter: every quant type,
with and without double-quantized absmax, every dtype bitsandbytes dequantizes to, sizes that end inside a
block — bit for bit equal to bitsandbytes' own dequantize on the CPU.  On CUDA, tests/test_kernels_gpu.py's
twin would compare the compiled kernel."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
bnb = pytest.importorskip("bitsandbytes")

from fastlora.kernels.configs import INTERPRET  # noqa: E402
from fastlora.kernels.dequant4 import dequantize_4bit  # noqa: E402
from tests.bnb_reference import quantized_4bit  # noqa: E402

pytestmark = pytest.mark.skipif(not INTERPRET, reason="interpreter tests (TRITON_INTERPRET=1)")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double-quantized"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape, blocksize", [((48, 64), 64), ((33, 29), 64), ((96, 80), 128), ((7, 300), 32),
                                              ((5, 256), 128)])
def test_bit_for_bit_as_bitsandbytes(quant_type, nested, dtype, shape, blocksize):
    """Against bitsandbytes' reference computation (its default backend: fp32 code · absmax, rounded once), and
    against its CPU dequantize where that one is right: bitsandbytes 0.50's CPU kernel mis-indexes absmax when a
    row's length is not a multiple of the block size (its error is 2-4× the quantization error there)."""
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))).to(dtype)
    weight[0, :3] = torch.tensor([0.0, -0.0, 3.5])  # zeros and an outlier block
    packed, state, reference = quantized_4bit(weight, blocksize, quant_type, nested)
    got = dequantize_4bit(packed, state)
    assert got.dtype == dtype and got.shape == weight.shape
    assert torch.equal(got, reference), (got - reference).abs().max()
    if shape[-1] % blocksize == 0 or shape[-1] % 2:
        assert torch.equal(got, bnb.functional.dequantize_4bit(packed, state))


def test_a_planted_nibble_order_is_caught():
    """Reading the low nibble first (the other byte order) gives other values: the test above would see it."""
    weight = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    swapped = ((packed & 15) << 4) | (packed >> 4)
    assert not torch.equal(dequantize_4bit(swapped, state), bnb.functional.dequantize_4bit(packed, state))

"""bitsandbytes' 4-bit quantization of a weight and its reference dequantization (bitsandbytes' default backend:
fp32 code · absmax, rounded once), shared by the tests of the Triton 4-bit reader and GEMM."""

from __future__ import annotations

import torch


def quantized_4bit(weight: torch.Tensor, blocksize: int, quant_type: str, nested: bool):
    """(packed, quant_state, the reference dequantized weight in ``weight``'s dtype)."""
    import bitsandbytes as bnb
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    packed, state = bnb.functional.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type,
                                                 compress_statistics=nested)
    absmax = state.absmax
    if nested:
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    reference = _dequantize_4bit_compute(packed.view(torch.uint8).reshape(-1), absmax.float(), state.code.float(),
                                         blocksize, state.shape, weight.dtype)
    return packed, state, reference

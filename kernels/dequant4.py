"""bitsandbytes' 4-bit weights (nf4, fp4; with or without double-quantized absmax) read by Triton: the values a
GEMM's main loop would load, and a kernel that writes the whole weight out (to test the reader against
bitsandbytes' own dequantize, bit for bit, and as the reference layout for a fused 4-bit GEMM).

bitsandbytes' layout (``Params4bit`` data, uint8): element e of the flattened weight is the high nibble of byte
e // 2 when e is even, the low nibble when odd; its value is

    w[e] = code[nibble(e)] · absmax[e // blocksize]                 (fp32, then rounded to the weight's dtype)

with ``code`` the 16-entry nf4 or fp4 table.  With double quantization ("nested") absmax is itself stored as
uint8 codes of a blockwise 8-bit quantization:

    absmax[b] = code2[absmax_q[b]] · absmax2[b // blocksize2] + offset

Every product and sum is fp32, in bitsandbytes' order, so the values are bitsandbytes' to the bit (the
interpreter tests check it; a GPU may contract the nested absmax's multiply-add into one rounding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import launch
from .configs import INTERPRET

__all__ = ["dequant4_values", "dequantize_4bit_kernel", "dequantize_4bit_arguments", "dequantize_4bit",
           "weight_4bit_operands"]

BLOCK = 1024  # elements per program


@triton.jit
def dequant4_values(packed_ptr, absmax_ptr, code_ptr, absmax_code_ptr, absmax2_ptr, offset, elements, inside,
                    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr):
    """fp32 values of the flattened weight's ``elements`` (an int tensor of element indices; ``inside`` masks
    the loads); ``offset`` the fp32 value :func:`nested_offset` loads (0.0 without nesting)."""
    byte = tl.load(packed_ptr + elements // 2, mask=inside, other=0).to(tl.int32)
    nibble = tl.where(elements % 2 == 0, byte >> 4, byte & 15)
    value = tl.load(code_ptr + nibble, mask=inside, other=0.0)
    block = elements // BLOCKSIZE
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=inside, other=0).to(tl.int32)
        scale = tl.load(absmax_code_ptr + q, mask=inside, other=0.0) * tl.load(absmax2_ptr + block // BLOCKSIZE2,
                                                                               mask=inside, other=0.0)
        scale = scale + offset
    else:
        scale = tl.load(absmax_ptr + block, mask=inside, other=0.0)
    return value * scale


@triton.jit
def nested_offset(offset_ptr, NESTED: tl.constexpr):
    """The double-quantized absmax's offset, read once per program from the one-element tensor bitsandbytes keeps
    it in (on the device: no host sync to pass it as a scalar); 0.0 without nesting (the pointer is not read)."""
    if NESTED:
        return tl.load(offset_ptr).to(tl.float32)
    return 0.0


@triton.jit
def dequantize_4bit_kernel(packed_ptr, absmax_ptr, code_ptr, absmax_code_ptr, absmax2_ptr, out_ptr, offset_ptr, n,
                           BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                           INT64: tl.constexpr, BLOCK: tl.constexpr):
    """out[e] = w[e] for the flattened weight (module docstring), in out's dtype."""
    elements = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if INT64:
        elements = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = elements < n
    offset = nested_offset(offset_ptr, NESTED)
    values = dequant4_values(packed_ptr, absmax_ptr, code_ptr, absmax_code_ptr, absmax2_ptr, offset, elements, inside,
                             BLOCKSIZE, NESTED, BLOCKSIZE2)
    tl.store(out_ptr + elements, values.to(out_ptr.dtype.element_ty), mask=inside)


def dequantize_4bit_arguments(*, packed, absmax, code, absmax_code, absmax2, out, offset, n: int,
                              blocksize: int, nested: bool, blocksize2: int, int64: bool) -> dict:
    """``dequantize_4bit_kernel``'s arguments by name (the launcher passes tensors, bench/compile_check.py pointer
    types and example sizes); without nesting ``absmax_code`` / ``absmax2`` / ``offset`` are any pointer (never
    read)."""
    return dict(packed_ptr=packed, absmax_ptr=absmax, code_ptr=code, absmax_code_ptr=absmax_code,
                absmax2_ptr=absmax2, out_ptr=out, offset_ptr=offset, n=n, BLOCKSIZE=blocksize, NESTED=nested,
                BLOCKSIZE2=blocksize2, INT64=int64, BLOCK=BLOCK)


def weight_4bit_operands(packed: Tensor, quant_state) -> dict:
    """The 4-bit weight's arguments of ``dequant4_values`` (and of the kernels that call it), from a bitsandbytes
    ``Params4bit`` (``packed``, uint8) and its ``QuantState``: the pointers (the nested absmax's offset too) and the
    constexprs BLOCKSIZE, NESTED, BLOCKSIZE2 (without nesting the absmax code and offset pointers are any pointer,
    never read)."""
    state = quant_state
    nested = bool(state.nested)
    inner = state.state2 if nested else None
    return dict(packed_ptr=packed.view(torch.uint8).reshape(-1), absmax_ptr=state.absmax,
                code_ptr=state.code.float().contiguous(),
                absmax_code_ptr=inner.code.float().contiguous() if nested else state.absmax,
                absmax2_ptr=inner.absmax.float().contiguous() if nested else state.absmax,
                offset_ptr=_offset_tensor(state.offset, packed.device) if nested else state.absmax,
                BLOCKSIZE=int(state.blocksize), NESTED=nested,
                BLOCKSIZE2=int(inner.blocksize) if nested else 1)


def _offset_tensor(offset, device: torch.device) -> Tensor:
    """The nested absmax's offset as a float32 tensor on ``device``: bitsandbytes' own tensor where it is one
    already (no copy), else made from the number."""
    return torch.as_tensor(offset, dtype=torch.float32, device=device).reshape(1)


def dequantize_4bit(packed: Tensor, quant_state) -> Tensor:
    """The weight a bitsandbytes ``Params4bit`` (``packed``, uint8) and its ``QuantState`` stand for, in the state's
    shape and dtype."""
    state = quant_state
    n = 1
    for size in state.shape:
        n *= int(size)
    # Triton's interpreter truncates an fp32 → bf16 store (a GPU rounds to nearest): there the kernel writes fp32
    # and torch rounds
    store_dtype = torch.float32 if INTERPRET and state.dtype == torch.bfloat16 else state.dtype
    out = torch.empty(tuple(state.shape), dtype=store_dtype, device=packed.device)
    if n == 0:
        return out.to(state.dtype)
    w = weight_4bit_operands(packed, state)
    args = dequantize_4bit_arguments(
        packed=w["packed_ptr"], absmax=w["absmax_ptr"], code=w["code_ptr"], absmax_code=w["absmax_code_ptr"],
        absmax2=w["absmax2_ptr"], out=out, offset=w["offset_ptr"], n=n, blocksize=w["BLOCKSIZE"], nested=w["NESTED"],
        blocksize2=w["BLOCKSIZE2"], int64=n > 2**31 - BLOCK)
    launch(dequantize_4bit_kernel)[(triton.cdiv(n, BLOCK),)](**args)
    return out.to(state.dtype)

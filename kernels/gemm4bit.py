"""The fused GEMM over a bitsandbytes 4-bit weight: the main loop reads the packed weight and dequantizes each
tile in registers (``dequant4.dequant4_values``), so no 16-bit copy of W is ever written, forward or backward.

    C[M, N] = A[M, K] · B[K, N]  (+ bias[N])  +  scale · keep ⊙ (P[M, R] · Q[R, N])

B is the dequantized weight W (out × in, flattened row by row as bitsandbytes stores it) seen through element
strides: B[k, n] = W.flat[k · stride_bk + n · stride_bn].

forward: A = x (M × in),  B = Wᵀ (stride_bk = 1, stride_bn = in),  P = S,  Q = the LoRA Bᵀ, scale = s, no mask.
dx:      A = dy (M × out), B = W (stride_bk = in, stride_bn = 1),  P = dS, Q = the LoRA A, scale = 1, mask m.

Each dequantized value is rounded to the weight's stored dtype (``STORED``: 0 fp32, 1 fp16, 2 bf16) and then to
A's dtype, as bitsandbytes' dequantize-then-matmul rounds it; the rest (tiles, swizzle, the low-rank term in the
prologue, bias, fp32 accumulation, INT64, UPCAST) is the dense fused GEMM's (gemm.py), through its helpers.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import gemm_precision, needs_int64, upcast
from .configs import gemm4bit_configs
from .dequant4 import dequant4_values, nested_offset, weight_4bit_operands
from .dropout import keep_threshold
from .gemm import dot_acc, gemm_arguments, launch_tiled_gemm, low_rank_tile, store_tile_with_bias, tile_coordinates

__all__ = ["fused_gemm_4bit_kernel", "fused_gemm_4bit_arguments", "launch_fused_gemm_4bit", "STORED_CODES"]

STORED_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def bf16_rounded(values):
    """fp32 values rounded to the nearest bfloat16 (ties to even), kept in fp32: integer arithmetic on the bits,
    the same on a GPU and under the interpreter (which truncates an fp32 → bf16 cast).  Finite values."""
    bits = values.to(tl.int32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits & -65536).to(tl.float32, bitcast=True)


@triton.jit
def fused_gemm_4bit_kernel(
    a_ptr, packed_ptr, absmax_ptr, code_ptr, absmax_code_ptr, absmax2_ptr, c_ptr, bias_ptr, p_ptr, q_ptr, seed_ptr,
    M, N, K, R,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_pm, stride_pr, stride_qr, stride_qn,
    offset_ptr, lora_scale, keep_threshold, M_BUCKET,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr, STORED: tl.constexpr,
    INT64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    lora_scale = tl.cast(lora_scale, tl.float32)  # Inductor passes Python floats as fp64 scalars
    offs_m, offs_n, rows, cols, pid_n = tile_coordinates(M, N, INT64, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    # Prologue: the low-rank term seeds the accumulator (the mask's registers are free again before the loop).
    acc = low_rank_tile(p_ptr, q_ptr, seed_ptr, rows, cols, offs_m, pid_n, R, stride_pm, stride_pr,
                        stride_qr, stride_qn, lora_scale, keep_threshold,
                        DROPOUT, BLOCK_R, UPCAST, PRECISION, BLOCK_M, BLOCK_N)

    # Main loop: A's tile loaded, B's tile dequantized from the packed weight.
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    k_elements = offs_k
    if INT64:
        k_elements = k_elements.to(tl.int64)
    b_elements = k_elements[:, None] * stride_bk + cols[None, :] * stride_bn
    every_col = cols[None, :] >= 0  # all true: gives the K mask the tile's shape
    offset = nested_offset(offset_ptr, NESTED)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = dequant4_values(packed_ptr, absmax_ptr, code_ptr, absmax_code_ptr, absmax2_ptr, offset, b_elements,
                            (offs_k[:, None] < k_left) & every_col, BLOCKSIZE, NESTED, BLOCKSIZE2)
        if STORED == 1:
            b = b.to(tl.float16).to(tl.float32)
        elif STORED == 2:
            b = bf16_rounded(b)
        if a_ptr.dtype.element_ty == tl.bfloat16:  # round to nearest here too (the interpreter's cast truncates)
            b = bf16_rounded(b)
        b = b.to(a.dtype)
        acc = dot_acc(a, b, acc, UPCAST, PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_elements += BLOCK_K * stride_bk

    store_tile_with_bias(c_ptr, acc, bias_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn, HAS_BIAS, INT64)


def fused_gemm_4bit_arguments(*, weight: dict, stored: int, **operands) -> dict:
    """``fused_gemm_4bit_kernel``'s arguments by name (the launcher passes tensors, bench/compile_check.py pointer
    types and example sizes): the dense GEMM's (:func:`gemm_arguments`, the same keywords but B), with B's
    pointer replaced by the 4-bit weight's arguments (``weight``: ``dequant4.weight_4bit_operands``) and its
    storage code ``stored``.  ``b_strides``: B's element strides (k, n) into the flattened weight."""
    args = gemm_arguments(b=None, **operands)
    del args["b_ptr"]
    return dict(args, **weight, STORED=stored)


@lru_cache(maxsize=None)
def _autotuned(configs: tuple):
    # stride_bk tells the forward (B = Wᵀ) from the dx GEMM (B = W) when their shapes coincide
    return triton.autotune(configs=list(configs), key=["M_BUCKET", "N", "K", "stride_bk", "NESTED"])(
        fused_gemm_4bit_kernel)


def launch_fused_gemm_4bit(a: Tensor, packed: Tensor, quant_state, transposed: bool, bias: Tensor | None, p: Tensor,
                           q: Tensor, seed: Tensor, lora_scale: float, dropout_p: float) -> Tensor:
    """C = A·B + bias + scale · keep ⊙ (P·Q) (M, N) in A's dtype, B the 4-bit weight W (out × in) dequantized
    tile by tile: Wᵀ with ``transposed`` (the forward: A = x, N = out), W otherwise (dx: A = dy, N = in).
    P (M, R), Q (R, N) any strides; A's last stride 1 is not required.  M > 0."""
    out_features, in_features = (int(s) for s in quant_state.shape)
    N = out_features if transposed else in_features
    b_strides = (1, in_features) if transposed else (in_features, 1)
    c = torch.empty((a.shape[0], N), device=a.device, dtype=a.dtype)
    dropout = dropout_p > 0.0
    args = fused_gemm_4bit_arguments(
        a=a, weight=weight_4bit_operands(packed, quant_state), c=c, bias=bias if bias is not None else c, p=p, q=q,
        seed=seed if dropout else c, M=a.shape[0], N=N, K=a.shape[1], R=p.shape[1], a_strides=a.stride(),
        b_strides=b_strides, c_strides=c.stride(), p_strides=p.stride(), q_strides=q.stride(),
        lora_scale=float(lora_scale), keep_threshold=keep_threshold(dropout_p) if dropout else 0,
        has_bias=bias is not None, dropout=dropout,
        stored=STORED_CODES[quant_state.dtype], fp32_adapters=q.dtype == torch.float32,
        int64=needs_int64(a, c) or out_features * in_features > 2**31 - 1, upcast=upcast(a, q),
        precision=gemm_precision(a.dtype))
    launch_tiled_gemm(_autotuned(gemm4bit_configs(dropout)), args)
    return c

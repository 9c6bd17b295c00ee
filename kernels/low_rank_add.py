"""The low-rank term added in place to a product cuBLAS computed: the cuBLAS-backed schedule's one Triton pass.

    C[M, N] += scale · keep(m, n) ⊙ (P[M, R] · Q[R, N])

forward: C = y = x Wᵀ + b (cuBLAS), P = S, Q = Bᵀ (the LoRA B), scale = s, no mask.
dx:      C = dy W (cuBLAS),          P = dS·s/(1-p), Q = A (the LoRA A), scale = 1, mask m.

The same tile of the low-rank term as the fused GEMM's (``gemm.low_rank_tile``: fp32 over R in BLOCK_R chunks, the
Philox mask of (row, column)), then one read and one write of C's tile: a memory-bound pass over C.  Grid: one
program per (BLOCK_M × BLOCK_N) tile of C, GROUP_M-row swizzled like the GEMM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import block_r, gemm_precision, launch, needs_int64, upcast
from .configs import r_chunk
from .dropout import keep_threshold
from .gemm import low_rank_tile, store_tile, tile_coordinates

__all__ = ["low_rank_add_kernel", "low_rank_add_arguments", "launch_low_rank_add", "LOW_RANK_ADD_BLOCKS"]

# A memory-bound pass: tiles large enough to stream C in wide rows, small enough for the fp32 low-rank tile.
LOW_RANK_ADD_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 2}


@triton.jit
def low_rank_add_kernel(
    c_ptr, p_ptr, q_ptr, seed_ptr,
    M, N, R,
    stride_cm, stride_cn, stride_pm, stride_pr, stride_qr, stride_qn,
    lora_scale, keep_threshold,
    DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, INT64: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    lora_scale = tl.cast(lora_scale, tl.float32)  # Inductor passes Python floats as fp64 scalars
    offs_m, offs_n, rows, cols, pid_n = tile_coordinates(M, N, INT64, BLOCK_M, BLOCK_N, GROUP_M)
    acc = low_rank_tile(p_ptr, q_ptr, seed_ptr, rows, cols, offs_m, pid_n, R, stride_pm, stride_pr,
                        stride_qr, stride_qn, lora_scale, keep_threshold,
                        DROPOUT, BLOCK_R, UPCAST, PRECISION, BLOCK_M, BLOCK_N)
    c_rows = offs_m
    c_cols = offs_n
    if INT64:
        c_rows = c_rows.to(tl.int64)
        c_cols = c_cols.to(tl.int64)
    inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    c = tl.load(c_ptr + c_rows[:, None] * stride_cm + c_cols[None, :] * stride_cn, mask=inside, other=0.0)
    store_tile(c_ptr, acc + c.to(tl.float32), offs_m, offs_n, M, N, stride_cm, stride_cn, INT64)


def low_rank_add_arguments(*, c, p, q, seed, M: int, N: int, R: int, c_strides, p_strides, q_strides, lora_scale,
                           keep_threshold: int, dropout: bool, fp32_adapters: bool, int64: bool, upcast: bool,
                           precision: str) -> dict:
    """``low_rank_add_kernel``'s arguments by name (the launcher passes tensors, bench/compile_check.py pointer
    types and example sizes); strides are (rows, columns) pairs, Q's those of its R × N view."""
    blocks = {k: LOW_RANK_ADD_BLOCKS[k] for k in ("BLOCK_M", "BLOCK_N", "GROUP_M")}
    return dict(
        c_ptr=c, p_ptr=p, q_ptr=q, seed_ptr=seed, M=M, N=N, R=R,
        stride_cm=c_strides[0], stride_cn=c_strides[1], stride_pm=p_strides[0], stride_pr=p_strides[1],
        stride_qr=q_strides[0], stride_qn=q_strides[1], lora_scale=lora_scale, keep_threshold=keep_threshold,
        DROPOUT=dropout, BLOCK_R=r_chunk(block_r(R), fp32_adapters), INT64=int64, UPCAST=upcast,
        PRECISION=precision, **blocks,
    )


def launch_low_rank_add(c: Tensor, p: Tensor, q: Tensor, seed: Tensor | None, lora_scale: float,
                        dropout_p: float) -> Tensor:
    """C += scale · keep ⊙ (P·Q) in place and return C, for C (M, N), P (M, R), Q (R, N) (a view: no copy), the
    mask regenerated from ``seed`` when dropout_p > 0.  M > 0."""
    M, N = c.shape
    dropout = dropout_p > 0.0
    grid = (triton.cdiv(M, LOW_RANK_ADD_BLOCKS["BLOCK_M"]) * triton.cdiv(N, LOW_RANK_ADD_BLOCKS["BLOCK_N"]),)
    args = low_rank_add_arguments(
        c=c, p=p, q=q, seed=seed if dropout else c, M=M, N=N, R=p.shape[1], c_strides=c.stride(),
        p_strides=p.stride(), q_strides=q.stride(), lora_scale=float(lora_scale),
        keep_threshold=keep_threshold(dropout_p) if dropout else 0, dropout=dropout,
        fp32_adapters=q.dtype == torch.float32, int64=needs_int64(c, p, q), upcast=upcast(c, q),
        precision=gemm_precision(c.dtype))
    launch(low_rank_add_kernel)[grid](**args, num_warps=LOW_RANK_ADD_BLOCKS["num_warps"],
                                      num_stages=LOW_RANK_ADD_BLOCKS["num_stages"])
    return c

"""Backward launchers: dS and dB from one read of dy, dA from x and dS, dx from the fused GEMM (written once).

``lora_backward`` is the entry point; ``launch_dS_dB``, ``launch_dA`` and ``launch_dx_gemm`` are its three
launches, public so that a benchmark can time them one by one.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from .common import (
    backward_operands, empty_batch_grads, launch, needs_int64, seed_arg, skinny_precision, small_skinny_tiles,
    split_reduction, upcast,
)
from .configs import cols_blocks, rows_blocks, skinny_block_r
from .dropout import keep_threshold
from .gemm import launch_fused_gemm
from .low_rank_add import launch_low_rank_add
from .skinny import cols_arguments, cols_kernel, launch_options, rows_arguments, rows_kernel

__all__ = ["lora_backward", "launch_dS_dB", "launch_dB", "launch_dA", "launch_dx_gemm"]


def launch_dS_dB(
    dy: Tensor, lora_B: Tensor, S: Tensor, scaling: float, dropout_p: float, need_dS: bool, need_dB: bool,
    dB_dtype: torch.dtype | None = None, db: str = "atomic",
) -> tuple[Tensor | None, Tensor | None]:
    """One pass over dy: dS = s·dy B / (1-p) (M, r) in the adapters' dtype and dB = s·dyᵀ S (N, r) in
    ``dB_dtype`` (default lora_B's; fp32 atomics); N is split across programs when M alone gives too few.  With
    ``db="separate"`` dB comes from ``launch_dB`` instead.  M > 0."""
    dB_dtype = dB_dtype or lora_B.dtype
    if need_dB and db == "separate":
        dS, _ = launch_dS_dB_fused(dy, lora_B, S, scaling, dropout_p, need_dS, False) if need_dS else (None, None)
        return dS, launch_dB(dy, S, scaling, dB_dtype)
    dS, dB = launch_dS_dB_fused(dy, lora_B, S, scaling, dropout_p, need_dS, need_dB)
    return dS, (dB.to(dB_dtype) if need_dB else None)


def launch_dB(dy: Tensor, S: Tensor, scaling: float, dtype: torch.dtype) -> Tensor:
    """dB = s·dyᵀ S (N, r) in ``dtype``, reduced over M inside each program (fp32 atomics only when M is split
    because N alone gives too few programs).  M > 0."""
    return _column_reduction(dy, S, float(scaling), S, 0.0, dtype).t().contiguous()  # dBᵀ computed, (r, N)


def _column_reduction(X: Tensor, P: Tensor, scale: float, seed: Tensor, dropout_p: float,
                      dtype: torch.dtype) -> Tensor:
    """scale · Pᵀ (X ⊙ m) (r, D) in ``dtype`` with the column-skinny kernel (m: the dropout mask when
    dropout_p > 0); M is split across programs (fp32 atomics into a zero-filled buffer) when D alone gives
    too few.  X (M, D) row-major, P (M, r), M > 0."""
    M, D = X.shape
    r = P.shape[1]
    dropout = dropout_p > 0.0
    sbr = skinny_block_r(r)
    precision = skinny_precision(X.dtype, P.dtype)
    blocks = cols_blocks(sbr, small_skinny_tiles(X.dtype, P.dtype, precision))
    d_blocks = triton.cdiv(D, blocks["BLOCK_D"])
    splits, per_split = split_reduction(d_blocks * triton.cdiv(r, sbr), M, blocks["BLOCK_M"])
    atomic = splits > 1
    out = torch.zeros((r, D), device=X.device, dtype=torch.float32) if atomic else \
        torch.empty((r, D), device=X.device, dtype=dtype)
    args = cols_arguments(
        x=X, p=P, out=out, seed=seed, M=M, D=D, R=r, rows_per_split=per_split, x_strides=X.stride(),
        p_strides=P.stride(), out_strides=out.stride(), out_scale=scale,
        keep_threshold=keep_threshold(dropout_p) if dropout else 0, dropout=dropout, atomic=atomic, block_r=sbr,
        int64=needs_int64(X), upcast=upcast(X, P), precision=precision, blocks=blocks)
    launch(cols_kernel)[(d_blocks, splits, triton.cdiv(r, sbr))](**args, **launch_options(blocks))
    return out.to(dtype)


def launch_dS_dB_fused(
    dy: Tensor, lora_B: Tensor, S: Tensor, scaling: float, dropout_p: float, need_dS: bool, need_dB: bool
) -> tuple[Tensor | None, Tensor | None]:
    M, N = dy.shape
    r = lora_B.shape[1]
    sbr = skinny_block_r(r)
    precision = skinny_precision(dy.dtype, lora_B.dtype)
    blocks = rows_blocks(sbr, small_skinny_tiles(dy.dtype, lora_B.dtype, precision))
    grid_mr = triton.cdiv(M, blocks["BLOCK_M"]) * triton.cdiv(r, sbr)
    splits, per_split = split_reduction(grid_mr, N, blocks["BLOCK_D"])
    atomic_out = need_dS and splits > 1
    dS = None
    if need_dS:
        dS = torch.zeros((M, r), device=dy.device, dtype=torch.float32) if atomic_out else \
            torch.empty((M, r), device=dy.device, dtype=lora_B.dtype)
    dB = torch.zeros((N, r), device=dy.device, dtype=torch.float32) if need_dB else None
    # Outputs not asked for get a placeholder (never written: their stores are compiled out), not an input, so
    # that torch.compile's mutation analysis of the kernel sees no input written.
    placeholder = torch.empty((0, r), device=dy.device, dtype=torch.float32)
    out = dS if need_dS else placeholder
    acc = dB if need_dB else placeholder
    args = rows_arguments(
        x=dy, q=lora_B, out=out, s=S, dq=acc, seed=S, M=M, D=N, R=r, cols_per_split=per_split, x_strides=dy.stride(),
        q_strides=lora_B.stride(), out_strides=out.stride(), s_strides=S.stride(), dq_strides=acc.stride(),
        out_scale=float(scaling) / (1.0 - dropout_p), dq_scale=float(scaling), keep_threshold=0, dropout=False,
        store_out=need_dS, atomic_out=atomic_out, acc_dq=need_dB, block_r=sbr, int64=needs_int64(dy),
        upcast=upcast(dy, lora_B), precision=precision, blocks=blocks)
    launch(rows_kernel)[(triton.cdiv(M, blocks["BLOCK_M"]), triton.cdiv(r, sbr), splits)](
        **args, **launch_options(blocks))
    return (dS.to(lora_B.dtype) if need_dS else None), dB  # dB: fp32


def launch_dA(x: Tensor, dS: Tensor, seed: Tensor, dropout_p: float, dtype: torch.dtype) -> Tensor:
    """dA = dSᵀ (x ⊙ m) (r, K) in ``dtype``; M is split across programs (fp32 atomics) when K alone gives too
    few.  x row-major, M > 0."""
    return _column_reduction(x, dS, 1.0, seed, dropout_p, dtype)


def launch_dx_gemm(
    dy: Tensor, weight: Tensor, dS: Tensor, lora_A: Tensor, seed: Tensor, dropout_p: float,
    low_rank: str = "prologue",
) -> Tensor:
    """dx = dy W + (dS A) ⊙ m (M, K) in dy's dtype: one autotuned GEMM, the masked low-rank term in its
    accumulator (before the main loop, or after it with ``low_rank="epilogue"``).  M > 0."""
    return launch_fused_gemm(dy, weight, None, dS, lora_A, seed, 1.0, dropout_p, low_rank)


def lora_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    S: Tensor,
    seed: Tensor | None,
    scaling: float,
    dropout_p: float,
    need_dx: bool,
    need_dA: bool,
    need_dB: bool,
    db: str = "atomic",
    low_rank: str = "prologue",
    base: str = "fused",
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Return ``(dx, dA, dB)`` (None where not needed) in the dtypes of x, lora_A, lora_B.

    dB = s·dyᵀ S;  dS = s·dy B / (1-p);  dA = dSᵀ (x ⊙ m);  dx = dy W + (dS A) ⊙ m — with the forward's mask,
    regenerated from ``seed`` (None allowed when dropout_p == 0).  dy (M, N) may have any strides, including 0
    (an expanded gradient).  The dx GEMM reads it in x's dtype (cast if it differs); dS and dB read it as given
    when it comes in the adapters' dtype (a gradient in fp32 beside a 16-bit base, as DoRA's g ⊙ dy, keeps its
    precision in the rank-r products).  ``db``, ``low_rank`` and ``base``: the schedule's variants
    (fastlora.schedules); with base="cublas" dx = dy W is cuBLAS's and one Triton pass adds (dS A) ⊙ m in place.
    """
    dy, dy_low_rank, x = backward_operands(dy, x, weight, lora_A, lora_B)
    M, N = dy.shape
    if M == 0:
        return empty_batch_grads(x, N, lora_A, lora_B, need_dx, need_dA, need_dB)
    seed = seed_arg(seed, dropout_p > 0.0, S)
    dS, dB = None, None
    if need_dx or need_dA or need_dB:
        dS, dB = launch_dS_dB(dy_low_rank, lora_B, S, scaling, dropout_p, need_dx or need_dA, need_dB, db=db)
    dA = launch_dA(x, dS, seed, dropout_p, lora_A.dtype) if need_dA else None
    dx = None
    if need_dx and base == "cublas":
        dx = launch_low_rank_add(torch.mm(dy, weight), dS, lora_A, seed, 1.0, dropout_p)
    elif need_dx:
        dx = launch_dx_gemm(dy, weight, dS, lora_A, seed, dropout_p, low_rank)
    return dx, dA, dB

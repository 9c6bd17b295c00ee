"""Backward launcher: dS and dB from one read of dy, dA from x and dS, dx from the fused GEMM (written once)."""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from .common import block_r, check_dtypes, dot_precision, launch, needs_int64, row_major, seed_arg, split_reduction, upcast
from .configs import cols_blocks, m_bucket, r_chunk, rows_blocks, skinny_block_r
from .dropout import keep_threshold
from .gemm import autotuned_gemm
from .skinny import cols_kernel, rows_kernel

__all__ = ["lora_backward"]


def lora_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    S: Tensor,
    seed: Tensor,
    scaling: float,
    dropout_p: float,
    need_dx: bool,
    need_dA: bool,
    need_dB: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Return ``(dx, dA, dB)`` (None where not needed) in the dtypes of x, lora_A, lora_B.

    dB = s·dyᵀ S;  dS = s·dy B / (1-p);  dA = dSᵀ (x ⊙ m);  dx = dy W + (dS A) ⊙ m — with the forward's mask,
    regenerated from ``seed``.  dy (M, N) may have any strides, including 0 (an expanded gradient).
    """
    check_dtypes(x, weight, lora_A, lora_B)
    if dy.dtype != x.dtype:  # e.g. a gradient arriving in another precision: the dx GEMM needs one dtype
        dy = dy.to(x.dtype)
    x = row_major(x)
    M, N = dy.shape
    K = x.shape[1]
    r = lora_A.shape[0]
    dev = x.device
    need_dS = need_dx or need_dA
    if M == 0:
        return (
            torch.empty((0, K), device=dev, dtype=x.dtype) if need_dx else None,
            torch.zeros((r, K), device=dev, dtype=lora_A.dtype) if need_dA else None,
            torch.zeros((N, r), device=dev, dtype=lora_B.dtype) if need_dB else None,
        )

    dropout = dropout_p > 0.0
    threshold = keep_threshold(dropout_p) if dropout else 0
    seed = seed_arg(seed, dropout, S)
    br = block_r(r)
    sbr = skinny_block_r(r)
    common = dict(
        INT64=needs_int64(dy, x, weight),
        UPCAST=upcast(x, lora_A),
        PRECISION=dot_precision(),
    )
    dx = dA = dB = None
    # dS (carrying s/(1-p)) and dB from one pass over dy; N split across programs when M gives too few.
    dB32 = torch.zeros((N, r), device=dev, dtype=torch.float32) if need_dB else None
    dS = None
    if need_dS or need_dB:
        blocks = rows_blocks(sbr)
        grid_mr = triton.cdiv(M, blocks["BLOCK_M"]) * triton.cdiv(r, sbr)
        splits, per_split = split_reduction(grid_mr, N, blocks["BLOCK_D"])
        atomic_out = need_dS and splits > 1
        if need_dS:
            dS = torch.zeros((M, r), device=dev, dtype=torch.float32) if atomic_out else \
                torch.empty((M, r), device=dev, dtype=lora_A.dtype)
        out = dS if need_dS else S
        acc = dB32 if need_dB else S
        launch(rows_kernel)[(triton.cdiv(M, blocks["BLOCK_M"]), triton.cdiv(r, sbr), splits)](
            dy, lora_B, out, S, acc, seed,
            M, N, r, per_split,
            dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), out.stride(0), out.stride(1),
            S.stride(0), S.stride(1), acc.stride(0), acc.stride(1),
            float(scaling) / (1.0 - dropout_p), float(scaling), 0,
            DROPOUT=False, STORE_OUT=need_dS, ATOMIC_OUT=atomic_out, ACC_DQ=need_dB, BLOCK_R=sbr,
            **common, **blocks,
        )
        if atomic_out:
            dS = dS.to(lora_A.dtype)
    if need_dB:
        dB = dB32.to(lora_B.dtype)

    # dA = dSᵀ (x ⊙ m), M split across programs (fp32 atomics) when K alone gives too few.
    if need_dA:
        blocks = cols_blocks(sbr)
        d_blocks = triton.cdiv(K, blocks["BLOCK_D"])
        splits, per_split = split_reduction(d_blocks * triton.cdiv(r, sbr), M, blocks["BLOCK_M"])
        atomic = splits > 1
        if atomic:
            dA32 = torch.zeros((r, K), device=dev, dtype=torch.float32)
        else:
            dA32 = torch.empty((r, K), device=dev, dtype=lora_A.dtype)
        launch(cols_kernel)[(d_blocks, splits, triton.cdiv(r, sbr))](
            x, dS, dA32, seed,
            M, K, r, per_split,
            x.stride(0), x.stride(1), dS.stride(0), dS.stride(1), dA32.stride(0), dA32.stride(1),
            threshold,
            DROPOUT=dropout, ATOMIC=atomic, BLOCK_R=sbr, **common, **blocks,
        )
        dA = dA32.to(lora_A.dtype)

    # dx = dy W + (dS A) ⊙ m, the masked low-rank term added in the GEMM's epilogue.
    if need_dx:
        dx = torch.empty((M, K), device=dev, dtype=x.dtype)

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)

        launch(autotuned_gemm(x.dtype == torch.float32, dropout))[grid](
            dy, weight, dx, dx, dS, lora_A, seed,
            M, K, N, r,
            dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), dx.stride(0), dx.stride(1),
            dS.stride(0), dS.stride(1), lora_A.stride(0), lora_A.stride(1),
            1.0, threshold, m_bucket(M),
            HAS_BIAS=False, DROPOUT=dropout, BLOCK_R=r_chunk(br, lora_A.dtype == torch.float32), **common,
        )
    return dx, dA, dB

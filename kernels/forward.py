"""Forward launcher: S from the row-skinny kernel, then the fused GEMM writes y = x Wᵀ + b + s·S Bᵀ once."""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from .common import block_r, check_dtypes, dot_precision, launch, needs_int64, row_major, seed_arg, split_reduction, upcast
from .configs import m_bucket, r_chunk, rows_blocks, skinny_block_r
from .dropout import keep_threshold
from .gemm import autotuned_gemm
from .skinny import rows_kernel

__all__ = ["lora_forward"]


def lora_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    seed: Tensor,
    scaling: float,
    dropout_p: float,
) -> tuple[Tensor, Tensor]:
    """Return ``(y, S)``: S = (x ⊙ m) Aᵀ / (1-p) in lora_A's dtype, y = x Wᵀ + b + s·S Bᵀ in x's dtype.

    x (M, K) any strides (copied only when its last stride is not 1); weight (N, K); bias (N,) or None;
    lora_A (r, K); lora_B (N, r); seed: int64 tensor of shape (1,) on x's device (loaded by the kernels;
    may be None when dropout_p == 0).
    dropout_p == 0 compiles the mask out.  fp32 accumulation throughout; no host synchronisation.
    """
    check_dtypes(x, weight, lora_A, lora_B)
    x = row_major(x)
    M, K = x.shape
    N = weight.shape[0]
    r = lora_A.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return y, torch.empty((0, r), device=x.device, dtype=lora_A.dtype)

    dropout = dropout_p > 0.0
    threshold = keep_threshold(dropout_p) if dropout else 0
    seed = seed_arg(seed, dropout, y)
    br = block_r(r)
    common = dict(
        INT64=needs_int64(x, y, weight),
        UPCAST=upcast(x, lora_A),
        PRECISION=dot_precision(),
    )

    # S = (x ⊙ m) Aᵀ / (1-p); K split across programs (fp32 atomics) when M gives too few.
    sbr = skinny_block_r(r)
    blocks = rows_blocks(sbr)
    grid_mr = triton.cdiv(M, blocks["BLOCK_M"]) * triton.cdiv(r, sbr)
    splits, per_split = split_reduction(grid_mr, K, blocks["BLOCK_D"])
    atomic_out = splits > 1
    if atomic_out:
        S_out = torch.zeros((M, r), device=x.device, dtype=torch.float32)
    else:
        S_out = torch.empty((M, r), device=x.device, dtype=lora_A.dtype)
    launch(rows_kernel)[(triton.cdiv(M, blocks["BLOCK_M"]), triton.cdiv(r, sbr), splits)](
        x, lora_A, S_out, S_out, S_out, seed,
        M, K, r, per_split,
        x.stride(0), x.stride(1), lora_A.stride(1), lora_A.stride(0), S_out.stride(0), S_out.stride(1),
        0, 0, 0, 0,
        1.0 / (1.0 - dropout_p), 1.0, threshold,
        DROPOUT=dropout, STORE_OUT=True, ATOMIC_OUT=atomic_out, ACC_DQ=False, BLOCK_R=sbr, **common, **blocks,
    )
    S = S_out.to(lora_A.dtype)  # a no-op unless fp32 partial sums were accumulated for 16-bit adapters

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    launch(autotuned_gemm(x.dtype == torch.float32, False))[grid](
        x, weight, y, bias if bias is not None else y, S, lora_B, seed,
        M, N, K, r,
        x.stride(0), x.stride(1), weight.stride(1), weight.stride(0), y.stride(0), y.stride(1),
        S.stride(0), S.stride(1), lora_B.stride(1), lora_B.stride(0),
        float(scaling), 0, m_bucket(M),
        HAS_BIAS=bias is not None, DROPOUT=False, BLOCK_R=r_chunk(br, lora_A.dtype == torch.float32), **common,
    )
    return y, S

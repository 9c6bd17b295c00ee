"""Forward launchers: S from the row-skinny kernel, then the fused GEMM writes y = x Wᵀ + b + s·S Bᵀ once.

``lora_forward`` is the entry point; ``launch_S`` and ``launch_forward_gemm`` are its two launches, public
so that a benchmark can time them one by one.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from .common import (
    check_dtypes, launch, needs_int64, row_major, seed_arg, skinny_precision, small_skinny_tiles, split_reduction,
    upcast,
)
from .configs import rows_blocks, skinny_block_r
from .dropout import keep_threshold
from .gemm import launch_fused_gemm
from .low_rank_add import launch_low_rank_add
from .skinny import launch_options, rows_arguments, rows_kernel

__all__ = ["lora_forward", "launch_S", "launch_forward_gemm", "linear_plus_low_rank"]


def launch_S(x: Tensor, lora_A: Tensor, seed: Tensor, dropout_p: float) -> Tensor:
    """S = (x ⊙ m) Aᵀ / (1-p) (M, r) in lora_A's dtype; K is split across programs (fp32 atomics) when M alone
    gives too few.  x row-major, M > 0."""
    M, K = x.shape
    r = lora_A.shape[0]
    dropout = dropout_p > 0.0
    sbr = skinny_block_r(r)
    precision = skinny_precision(x.dtype, lora_A.dtype)
    blocks = rows_blocks(sbr, small_skinny_tiles(x.dtype, lora_A.dtype, precision))
    grid_mr = triton.cdiv(M, blocks["BLOCK_M"]) * triton.cdiv(r, sbr)
    splits, per_split = split_reduction(grid_mr, K, blocks["BLOCK_D"])
    atomic_out = splits > 1
    if atomic_out:
        S = torch.zeros((M, r), device=x.device, dtype=torch.float32)
    else:
        S = torch.empty((M, r), device=x.device, dtype=lora_A.dtype)
    args = rows_arguments(
        x=x, q=lora_A, out=S, s=S, dq=S, seed=seed, M=M, D=K, R=r, cols_per_split=per_split, x_strides=x.stride(),
        q_strides=lora_A.t().stride(), out_strides=S.stride(), s_strides=(0, 0), dq_strides=(0, 0),
        out_scale=1.0 / (1.0 - dropout_p), dq_scale=1.0, keep_threshold=keep_threshold(dropout_p) if dropout else 0,
        dropout=dropout, store_out=True, atomic_out=atomic_out, acc_dq=False, block_r=sbr, int64=needs_int64(x),
        upcast=upcast(x, lora_A), precision=precision, blocks=blocks)
    launch(rows_kernel)[(triton.cdiv(M, blocks["BLOCK_M"]), triton.cdiv(r, sbr), splits)](
        **args, **launch_options(blocks))
    return S.to(lora_A.dtype)  # a no-op unless fp32 partial sums were accumulated for 16-bit adapters


def launch_forward_gemm(
    x: Tensor, weight: Tensor, bias: Tensor | None, S: Tensor, lora_B: Tensor, scaling: float,
    low_rank: str = "prologue",
) -> Tensor:
    """y = x Wᵀ + b + s·S Bᵀ (M, N) in x's dtype: one autotuned GEMM, the low-rank term seeding its accumulator
    (``low_rank="prologue"``) or added after the main loop ("epilogue")."""
    return launch_fused_gemm(x, weight.t(), bias, S, lora_B.t(), S, scaling, 0.0, low_rank)


def lora_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    seed: Tensor | None,
    scaling: float,
    dropout_p: float,
    low_rank: str = "prologue",
    base: str = "fused",
) -> tuple[Tensor, Tensor]:
    """Return ``(y, S)``: S = (x ⊙ m) Aᵀ / (1-p) in lora_A's dtype, y = x Wᵀ + b + s·S Bᵀ in x's dtype.

    x (M, K) any strides (copied only when its last stride is not 1); weight (N, K); bias (N,) or None;
    lora_A (r, K); lora_B (N, r); seed: int64 tensor of shape (1,) on x's device (loaded by the kernels;
    may be None when dropout_p == 0).  dropout_p == 0 compiles the mask out.  fp32 accumulation throughout;
    no host synchronisation.  ``base``: "fused" (one GEMM with the low-rank term in its accumulator; ``low_rank``
    says where) or "cublas" (x Wᵀ + b by cuBLAS, then one Triton pass adds s·S Bᵀ in place); see
    fastlora.schedules.
    """
    check_dtypes(x, weight, lora_A, lora_B)
    x = row_major(x)
    M, K = x.shape
    N = weight.shape[0]
    if M == 0:
        return (torch.empty((0, N), device=x.device, dtype=x.dtype),
                torch.empty((0, lora_A.shape[0]), device=x.device, dtype=lora_A.dtype))
    S = launch_S(x, lora_A, seed_arg(seed, dropout_p > 0.0, x), dropout_p)
    return linear_plus_low_rank(x, weight, bias, S, lora_B, scaling, low_rank, base), S


def linear_plus_low_rank(x: Tensor, weight: Tensor, bias: Tensor | None, S: Tensor, lora_B: Tensor, scaling: float,
                         low_rank: str = "prologue", base: str = "fused") -> Tensor:
    """y = x Wᵀ + b + s·S Bᵀ (M, N) in x's dtype, for x (M, K) row-major, S (M, r), lora_B (N, r): ``base`` "fused"
    (one GEMM, the low-rank term in its accumulator where ``low_rank`` says) or "cublas" (x Wᵀ + b by cuBLAS,
    then one Triton pass adds s·S Bᵀ in place).  M > 0."""
    if base == "cublas":
        y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
        return launch_low_rank_add(y, S, lora_B.t(), None, scaling, 0.0)
    return launch_forward_gemm(x, weight, bias, S, lora_B, scaling, low_rank)

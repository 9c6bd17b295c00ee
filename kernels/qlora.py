"""Launchers for a LoRA layer over a bitsandbytes 4-bit weight, fused: the dense launchers' rank-r kernels, with
the base product by the 4-bit GEMM (gemm4bit.py), which dequantizes W tile by tile in its main loop.

    forward  S = (x ⊙ m) Aᵀ / (1-p);  y = x Ŵᵀ + b + s·S Bᵀ                      (two launches)
    backward dS = s·dy B / (1-p), dB = s·dyᵀ S;  dA = dSᵀ (x ⊙ m);  dx = dy Ŵ + (dS A) ⊙ m

Ŵ is the dequantized weight; it never exists in memory, forward or backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backward import launch_dA, launch_dS_dB
from .common import empty_batch_grads, gradient_operands, row_major, seed_arg
from .forward import launch_S
from .gemm4bit import launch_fused_gemm_4bit

__all__ = ["qlora_forward", "qlora_backward"]


def qlora_forward(x: Tensor, packed: Tensor, quant_state, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                  seed: Tensor | None, scaling: float, dropout_p: float) -> tuple[Tensor, Tensor]:
    """``(y, S)`` for x (M, in) in the compute dtype, the 4-bit weight (``packed`` and its ``quant_state``, out × in),
    bias (out,) in x's dtype or None, A (r, in) and B (out, r) in the adapters' dtype."""
    x = row_major(x)
    M = x.shape[0]
    out_features = int(quant_state.shape[0])
    if M == 0:
        return (torch.empty((0, out_features), device=x.device, dtype=x.dtype),
                torch.empty((0, lora_A.shape[0]), device=x.device, dtype=lora_A.dtype))
    S = launch_S(x, lora_A, seed_arg(seed, dropout_p > 0.0, x), dropout_p)
    y = launch_fused_gemm_4bit(x, packed, quant_state, True, bias, S, lora_B.t(), S, scaling, 0.0)
    return y, S


def qlora_backward(dy: Tensor, x: Tensor, packed: Tensor, quant_state, lora_A: Tensor, lora_B: Tensor, S: Tensor,
                   seed: Tensor | None, scaling: float, dropout_p: float, need_dx: bool, need_dA: bool, need_dB: bool,
                   db: str = "atomic") -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dA, dB)`` (None where not needed) in the dtypes of x, lora_A, lora_B, the mask regenerated from
    ``seed``."""
    dy, dy_low_rank, x = gradient_operands(dy, x, lora_B)
    M, N = dy.shape
    if M == 0:
        return empty_batch_grads(x, N, lora_A, lora_B, need_dx, need_dA, need_dB)
    seed = seed_arg(seed, dropout_p > 0.0, S)
    dS, dB = launch_dS_dB(dy_low_rank, lora_B, S, scaling, dropout_p, need_dx or need_dA, need_dB, db=db)
    dA = launch_dA(x, dS, seed, dropout_p, lora_A.dtype) if need_dA else None
    dx = launch_fused_gemm_4bit(dy, packed, quant_state, False, None, dS, lora_A, seed, 1.0, dropout_p) if need_dx else None
    return dx, dA, dB

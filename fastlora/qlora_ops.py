"""A LoRA layer over a bitsandbytes 4-bit weight in the fused kernels (``fastlora.kernels`` qlora_forward /
qlora_backward), with autograd:

    y = x Ŵᵀ + b + s·S Bᵀ,  S = dropout(x) Aᵀ          Ŵ: the 4-bit weight, dequantized inside the GEMM's main loop

What autograd keeps is a dense base's: x, the rank-r S and the one-element seed (plus references to the packed
weight and the adapters).  The dequantized weight is never formed, forward or backward (dx = dy Ŵ + (dS A) ⊙ m
reads the packed weight again).  Eager autograd only (under ``torch.compile`` the layer takes bitsandbytes'
product instead: this call would break the graph).

:func:`add_low_rank_` is the other quantized path, any bitsandbytes layer on the torch path: the layer's own
product first, then the adapter's term added into that output in place (no M × N temporary, no second output
tensor), with the same autograd keeping.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlora import torch_path
from fastlora.ops import keep_fn
from fastlora.schedules import Schedule

__all__ = ["lora_linear_4bit", "add_low_rank_"]


class _LoRA4bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_A, lora_B, packed, quant_state, bias, seed, scaling, dropout_p, schedule: Schedule):
        from fastlora.kernels import launchers as kernels

        y, S = kernels.qlora_forward(x, packed, quant_state, bias, lora_A, lora_B, seed, scaling, dropout_p)
        ctx.save_for_backward(x, lora_A, lora_B, S, seed)
        ctx.packed, ctx.quant_state, ctx.scaling, ctx.dropout_p, ctx.db = (packed, quant_state, scaling, dropout_p,
                                                                           schedule.db)
        return y

    @staticmethod
    def backward(ctx, dy):
        from fastlora.kernels import launchers as kernels

        x, lora_A, lora_B, S, seed = ctx.saved_tensors
        need_dx, need_dA, need_dB = ctx.needs_input_grad[:3]
        dx, dA, dB = kernels.qlora_backward(dy, x, ctx.packed, ctx.quant_state, lora_A, lora_B, S, seed, ctx.scaling,
                                            ctx.dropout_p, need_dx, need_dA, need_dB, db=ctx.db)
        db = dy.sum(0) if ctx.needs_input_grad[5] else None  # a bias that trains (bias="all" / "lora_only")
        return dx, dA, dB, None, None, db, None, None, None, None


def lora_linear_4bit(x: Tensor, packed: Tensor, quant_state, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                     scaling: float, dropout_p: float, seed: Tensor | None, schedule: Schedule) -> Tensor:
    """y (..., out) in x's dtype for x (..., in): the 4-bit base product, bias and the LoRA term in one GEMM (see the
    module docstring); ``dropout_p`` and ``seed`` as :func:`fastlora.functional.dropout_and_seed` draws them."""
    x2d = x.reshape(-1, x.shape[-1])
    y = _LoRA4bit.apply(x2d, lora_A, lora_B, packed, quant_state, bias, seed, float(scaling), dropout_p, schedule)
    return y.view(*x.shape[:-1], y.shape[-1])


class _AddLowRank(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, x, lora_A, lora_B, seed, scaling, dropout_p):
        flat_x = x.reshape(-1, x.shape[-1])
        S = torch_path.add_low_rank_(out.view(-1, out.shape[-1]), flat_x, lora_A, lora_B, scaling,
                                     keep_fn(seed, dropout_p), dropout_p)
        ctx.mark_dirty(out)
        ctx.save_for_backward(x, lora_A, lora_B, S, seed)
        ctx.scaling, ctx.dropout_p = scaling, dropout_p
        return out

    @staticmethod
    def backward(ctx, d_out):
        x, lora_A, lora_B, S, seed = ctx.saved_tensors
        need_dx, need_dA, need_dB = ctx.needs_input_grad[1:4]
        dx, dA, dB = torch_path.lora_backward(
            d_out.reshape(-1, d_out.shape[-1]), x.reshape(-1, x.shape[-1]), None, lora_A, lora_B, S, ctx.scaling,
            keep_fn(seed, ctx.dropout_p), ctx.dropout_p, need_dx, need_dA, need_dB)
        if dx is not None:
            dx = dx.view(x.shape).to(x.dtype)
        return d_out, dx, dA, dB, None, None, None


def add_low_rank_(out: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, dropout_p: float,
                  seed: Tensor | None) -> Tensor:
    """``out`` (..., out_features), a base output computed from x (..., in_features) elsewhere, plus
    scaling · (dropout(x) Aᵀ) Bᵀ, added in place and returned (see :func:`fastlora.torch_path.add_low_rank_`
    for the rounding); ``dropout_p`` and ``seed`` as :func:`fastlora.functional.dropout_and_seed` draws them.
    Eager autograd (an in-place ``autograd.Function``)."""
    return _AddLowRank.apply(out, x, lora_A, lora_B, seed, float(scaling), dropout_p)

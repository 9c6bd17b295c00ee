"""One adapter's low-rank term on a segment of the batch's rows, for mixed batches:

    y_seg = scaling · (dropout(x[rows]) Aᵀ) Bᵀ      (in the adapters' dtype, returned in x's)

computed by the torch path without a base weight.  What autograd keeps: x itself (the same storage the base
product keeps, so no copy of the rows), the row indices, the rank-r S and a seed; backward gathers the rows
again and regenerates the mask.  dx is the rows' gradient scattered into a zero tensor of x's shape.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlora import torch_path
from fastlora.functional import dropout_and_seed
from fastlora.ops import keep_fn

__all__ = ["segment_low_rank"]


class _SegmentLowRank(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rows, lora_A, lora_B, scaling, dropout_p, seed):
        x_rows = x.index_select(0, rows)
        flat = x_rows.reshape(-1, x.shape[-1])
        y, S = torch_path.lora_forward(flat, None, None, lora_A, lora_B, scaling, keep_fn(seed, dropout_p), dropout_p)
        ctx.save_for_backward(x, rows, lora_A, lora_B, S, seed)
        ctx.scaling, ctx.dropout_p = scaling, dropout_p
        return y.view(*x_rows.shape[:-1], lora_B.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, rows, lora_A, lora_B, S, seed = ctx.saved_tensors
        need_dx, _, need_dA, need_dB = ctx.needs_input_grad[:4]
        flat = x.index_select(0, rows).reshape(-1, x.shape[-1])
        dx_rows, dA, dB = torch_path.lora_backward(
            dy.reshape(-1, dy.shape[-1]), flat, None, lora_A, lora_B, S, ctx.scaling,
            keep_fn(seed, ctx.dropout_p), ctx.dropout_p, need_dx, need_dA, need_dB)
        dx = None
        if need_dx:
            dx = torch.zeros_like(x).index_add_(0, rows, dx_rows.view(len(rows), *x.shape[1:]).to(x.dtype))
        return dx, None, dA, dB, None, None, None


def segment_low_rank(x: Tensor, rows: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, dropout_p: float,
                     training: bool) -> Tensor:
    """scaling · (dropout(x[rows]) Aᵀ) Bᵀ, shaped as x[rows] with the last dimension out_features; dropout only in
    training, its mask from a seed drawn from torch's generator on x's device."""
    p, seed = dropout_and_seed(dropout_p, training, x.device)
    return _SegmentLowRank.apply(x, rows, lora_A, lora_B, float(scaling), p, seed)

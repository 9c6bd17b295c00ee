"""Many adapters' low-rank terms over one batch in the grouped kernels (``fastlora.kernels`` grouped.py), with
autograd: the experts of a mixture of experts (rows sorted by expert) and the adapters of a mixed batch (each
adapter's rows of x, read through an index).  For segment e with factors A_e (r_e × in), B_e (out × r_e),
scaling s_e and dropout p_e:

    U[rows of e] = s_e · ((x ⊙ m_e) A_eᵀ / (1-p_e)) B_eᵀ          (rows of no segment: 0)

two launches forward and four backward whatever the number of segments; the mask is regenerated from each
segment's seed (Philox, on x's own (row, column), as the dense kernels draw it).  What autograd keeps: x (the
caller's tensor, never a copy of the rows), the rank-r S of every position, and the per-segment values.
Ranks that differ are padded to the largest with zeros (a copy of the small factors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["grouped_lora", "stack_factors"]


class _GroupedLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, per_segment_A, per_segment_B, segments, scalings, keep_scale, dropout, rows_out):
        from fastlora.kernels.grouped import segment_matmul

        indexed = segments.index is not None
        positions = segments.index.shape[0] if indexed else x.shape[0]
        S = segment_matmul(x, per_segment_A.transpose(1, 2), segments, keep_scale, positions, p_indexed=indexed,
                           mask="p" if dropout else None)
        update = segment_matmul(S, per_segment_B.transpose(1, 2), segments, scalings, rows_out, c_indexed=indexed)
        ctx.save_for_backward(x, per_segment_A, per_segment_B, S, scalings, keep_scale)
        ctx.segments, ctx.dropout = segments, dropout
        return update

    @staticmethod
    def backward(ctx, d_update):
        from fastlora.kernels.grouped import segment_matmul, segment_reduce

        x, per_segment_A, per_segment_B, S, scalings, keep_scale = ctx.saved_tensors
        segments, dropout = ctx.segments, ctx.dropout
        indexed = segments.index is not None
        ones = torch.ones_like(scalings)
        d_update = d_update if d_update.stride(-1) == 1 else d_update.contiguous()
        dS = segment_matmul(d_update, per_segment_B, segments, scalings * keep_scale, S.shape[0], p_indexed=indexed,
                            dtype=per_segment_A.dtype)
        dB = segment_reduce(d_update, S, segments, scalings, p_indexed=indexed) if ctx.needs_input_grad[2] else None
        # dA_eᵀ = (x ⊙ m)ᵀ dS: x cast to the adapters' dtype, never dS to x's
        dA = (segment_reduce(x, dS, segments, ones, p_indexed=indexed, mask=dropout).transpose(1, 2)
              if ctx.needs_input_grad[1] else None)
        dx = (segment_matmul(dS, per_segment_A, segments, ones, x.shape[0], c_indexed=indexed,
                             mask="c" if dropout else None, dtype=x.dtype) if ctx.needs_input_grad[0] else None)
        return dx, dA, dB, None, None, None, None, None


def stack_factors(factors: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """(A_e stacked (E, r, in), B_e stacked (E, out, r)) from (A_e, B_e) pairs, ranks padded to the largest with
    zeros (differentiable: each A_e, B_e gets its own gradient back)."""
    r = max(A.shape[0] for A, _ in factors)
    return (torch.stack([F.pad(A, (0, 0, 0, r - A.shape[0])) for A, _ in factors]),
            torch.stack([F.pad(B, (0, r - B.shape[1])) for _, B in factors]))


def grouped_lora(x: Tensor, per_segment_A: Tensor, per_segment_B: Tensor, starts: Tensor, scalings: list[float],
                 index: Tensor | None = None, dropout: list[tuple[float, Tensor | None]] | None = None,
                 rows_out: int | None = None) -> Tensor:
    """U (see the module docstring) in the adapters' dtype: x (rows × in); the factors stacked (E, r, in) and
    (E, out, r); ``starts`` (E + 1) the segments' bounds over the positions; ``index`` the row of x of each
    position (None: positions are x's rows, sorted by segment); ``dropout`` each segment's (p, seed) as
    :func:`fastlora.functional.dropout_and_seed` draws them (None: no dropout); ``rows_out`` the result's rows
    (x's by default)."""
    from fastlora.kernels.dropout import keep_threshold
    from fastlora.kernels.grouped import Segments

    device = x.device
    dropping = dropout is not None and any(p > 0.0 for p, _ in dropout)
    keep = [1.0 / (1.0 - p) for p, _ in dropout] if dropping else [1.0] * len(scalings)
    seeds = thresholds = None
    if dropping:
        zero = torch.zeros(1, dtype=torch.int64, device=device)  # the seed of a segment that drops nothing (threshold 0)
        seeds = torch.cat([zero if seed is None else seed for _, seed in dropout]).to(torch.int64)
        thresholds = torch.tensor([keep_threshold(p) for p, _ in dropout], dtype=torch.int32, device=device)
    segments = Segments(starts.to(device=device, dtype=torch.int32),
                        None if index is None else index.to(device=device, dtype=torch.int64), seeds, thresholds)
    values = torch.tensor([scalings, keep], dtype=torch.float32, device=device)
    return _GroupedLoRA.apply(x, per_segment_A, per_segment_B, segments, values[0], values[1], dropping,
                              x.shape[0] if rows_out is None else rows_out)

"""Many adapters' low-rank terms over one batch in the grouped kernels (``fastlora.kernels`` grouped.py), with
autograd: the experts of a mixture of experts (rows sorted by expert) and the adapters of a mixed batch (each
adapter's rows of x, read through an index).  For segment e with factors A_e (r_e × in), B_e (out × r_e),
scaling s_e and dropout p_e:

    U[rows of e] = s_e · ((x ⊙ m_e) A_eᵀ / (1-p_e)) B_eᵀ          (rows of no segment: 0)

two launches forward and four backward whatever the number of segments; the mask is regenerated from each
segment's seed (Philox, on x's own (row, column), as the dense kernels draw it).  What autograd keeps: x (the
caller's tensor, never a copy of the rows), the rank-r S of every position, and the per-segment values.
Ranks that differ are padded to the largest with zeros (a copy of the small factors).

:func:`grouped_lora_linear` gives x Wᵀ + b + U with U taken into the base product (y written once), for a mixed
batch over a frozen dense layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["grouped_lora", "grouped_lora_linear", "stack_factors"]


class _GroupedLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, per_segment_A, per_segment_B, segments, scalings, keep_scale, dropout, rows_out):
        from fastlora.kernels.grouped import segment_matmul

        S = _segments_S(x, per_segment_A, segments, keep_scale, dropout)
        update = segment_matmul(S, per_segment_B.transpose(1, 2), segments, scalings, rows_out,
                                c_indexed=segments.index is not None)
        ctx.save_for_backward(x, per_segment_A, per_segment_B, S, scalings, keep_scale)
        ctx.segments, ctx.dropout = segments, dropout
        return update

    @staticmethod
    def backward(ctx, d_update):
        x, per_segment_A, per_segment_B, S, scalings, keep_scale = ctx.saved_tensors
        dx, dA, dB = _grouped_grads(d_update, x, per_segment_A, per_segment_B, S, scalings, keep_scale, ctx.segments,
                                    ctx.dropout, *ctx.needs_input_grad[:3])
        return dx, dA, dB, None, None, None, None, None


class _GroupedLoRALinear(torch.autograd.Function):
    """y = x Wᵀ + b + U, U as :class:`_GroupedLoRA` computes it, added by the base product itself: every segment's
    s_e · S_e in its own block of columns of one (rows × E·r) matrix P, zero elsewhere (base rows: all zero), and
    the B_e side by side in one (out × E·r) matrix, so that P Bᵀ is each row's own adapter's term, which the fused
    GEMM takes into its accumulator (or the one in-place pass after cuBLAS adds): y is written once.  W and b
    frozen; backward dx = dy W (cuBLAS) + the grouped dx."""

    @staticmethod
    def forward(ctx, x, weight, bias, per_segment_A, per_segment_B, segments, scalings, keep_scale, dropout, schedule):
        from fastlora.kernels.launchers import linear_plus_low_rank

        S = _segments_S(x, per_segment_A, segments, keep_scale, dropout)
        P, B_side_by_side = _block_columns(S, per_segment_B, segments, scalings, x.shape[0])
        y = linear_plus_low_rank(x, weight, bias, P, B_side_by_side, 1.0, schedule.low_rank, schedule.base)
        ctx.save_for_backward(x, weight, per_segment_A, per_segment_B, S, scalings, keep_scale)
        ctx.segments, ctx.dropout = segments, dropout
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, per_segment_A, per_segment_B, S, scalings, keep_scale = ctx.saved_tensors
        need_dx, _, _, need_dA, need_dB = ctx.needs_input_grad[:5]
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        dx, dA, dB = _grouped_grads(dy, x, per_segment_A, per_segment_B, S, scalings, keep_scale, ctx.segments,
                                    ctx.dropout, need_dx, need_dA, need_dB)
        if need_dx:
            dx = torch.addmm(dx, dy.to(weight.dtype), weight)  # dy W by cuBLAS, onto the adapters' part
        return dx, None, None, dA, dB, None, None, None, None, None


def _segments_S(x: Tensor, per_segment_A: Tensor, segments, keep_scale: Tensor, dropout: bool) -> Tensor:
    """S of every position: (x ⊙ m_e) A_eᵀ / (1-p_e) for the position's segment e, in the adapters' dtype."""
    from fastlora.kernels.grouped import segment_matmul

    indexed = segments.index is not None
    positions = segments.index.shape[0] if indexed else x.shape[0]
    return segment_matmul(x, per_segment_A.transpose(1, 2), segments, keep_scale, positions, p_indexed=indexed,
                          mask="p" if dropout else None)


def _block_columns(S: Tensor, per_segment_B: Tensor, segments, scalings: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """(P, B side by side): P (rows × E·r) holds s_e · S of each position in its row and its segment's block of r
    columns, zero elsewhere; B side by side (out × E·r) the B_e in the same blocks.  So P Bᵀ = s_e · S B_eᵀ in
    each position's row, and 0 in rows of no segment.  Found on the device (no host synchronisation)."""
    E, N, r = per_segment_B.shape
    positions = torch.arange(S.shape[0], device=S.device, dtype=segments.starts.dtype)
    segment_of = torch.searchsorted(segments.starts[1:].contiguous(), positions, right=True)
    row_of = segments.index if segments.index is not None else positions.long()
    P = S.new_zeros(rows, E, r)
    P[row_of, segment_of] = (S * scalings[segment_of, None]).to(S.dtype)
    return P.view(rows, E * r), per_segment_B.permute(1, 0, 2).reshape(N, E * r)


def _grouped_grads(d_update: Tensor, x: Tensor, per_segment_A: Tensor, per_segment_B: Tensor, S: Tensor,
                   scalings: Tensor, keep_scale: Tensor, segments, dropout: bool, need_dx: bool, need_dA: bool,
                   need_dB: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dA, dB) of U from dU (rows × out): dx the adapters' part alone, zero in rows of no segment."""
    from fastlora.kernels.grouped import segment_matmul, segment_reduce

    indexed = segments.index is not None
    ones = torch.ones_like(scalings)
    d_update = d_update if d_update.stride(-1) == 1 else d_update.contiguous()
    dS = segment_matmul(d_update, per_segment_B, segments, scalings * keep_scale, S.shape[0], p_indexed=indexed,
                        dtype=per_segment_A.dtype)
    dB = segment_reduce(d_update, S, segments, scalings, p_indexed=indexed) if need_dB else None
    # dA_eᵀ = (x ⊙ m)ᵀ dS: x cast to the adapters' dtype, never dS to x's
    dA = segment_reduce(x, dS, segments, ones, p_indexed=indexed, mask=dropout).transpose(1, 2) if need_dA else None
    dx = (segment_matmul(dS, per_segment_A, segments, ones, x.shape[0], c_indexed=indexed,
                         mask="c" if dropout else None, dtype=x.dtype) if need_dx else None)
    return dx, dA, dB


def stack_factors(factors: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """(A_e stacked (E, r, in), B_e stacked (E, out, r)) from (A_e, B_e) pairs, ranks padded to the largest with
    zeros (differentiable: each A_e, B_e gets its own gradient back)."""
    r = max(A.shape[0] for A, _ in factors)
    # (F.pad copies even when it pads nothing: the factors of the largest rank go to the stack as they are)
    return (torch.stack([A if A.shape[0] == r else F.pad(A, (0, 0, 0, r - A.shape[0])) for A, _ in factors]),
            torch.stack([B if B.shape[1] == r else F.pad(B, (0, r - B.shape[1])) for _, B in factors]))


def grouped_lora(x: Tensor, per_segment_A: Tensor, per_segment_B: Tensor, starts: Tensor, scalings: list[float],
                 index: Tensor | None = None, dropout: list[tuple[float, Tensor | None]] | None = None,
                 rows_out: int | None = None) -> Tensor:
    """U (see the module docstring) in the adapters' dtype: x (rows × in); the factors stacked (E, r, in) and
    (E, out, r); ``starts`` (E + 1) the segments' bounds over the positions; ``index`` the row of x of each
    position (None: positions are x's rows, sorted by segment); ``dropout`` each segment's (p, seed) as
    :func:`fastlora.functional.dropout_and_seed` draws them (None: no dropout); ``rows_out`` the result's rows
    (x's by default)."""
    segments, values, dropping = _segments(x.device, starts, scalings, index, dropout)
    return _GroupedLoRA.apply(x, per_segment_A, per_segment_B, segments, values[0], values[1], dropping,
                              x.shape[0] if rows_out is None else rows_out)


def grouped_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, per_segment_A: Tensor, per_segment_B: Tensor,
                        starts: Tensor, scalings: list[float], schedule, index: Tensor | None = None,
                        dropout: list[tuple[float, Tensor | None]] | None = None) -> Tensor:
    """x Wᵀ + b + U in x's dtype, U added by the base product itself (``schedule``'s base: the fused GEMM's
    accumulator, or cuBLAS and one in-place pass), for a frozen W (out × in) and b; x (rows × in) row-major and
    the rest as :func:`grouped_lora`."""
    segments, values, dropping = _segments(x.device, starts, scalings, index, dropout)
    return _GroupedLoRALinear.apply(x, weight, bias, per_segment_A, per_segment_B, segments, values[0], values[1],
                                    dropping, schedule)


def _segments(device, starts: Tensor, scalings: list[float], index: Tensor | None,
              dropout: list[tuple[float, Tensor | None]] | None):
    """(Segments, the (2, E) per-segment scalings and keep scales, whether any segment drops) on ``device``."""
    from fastlora.kernels.dropout import keep_threshold
    from fastlora.kernels.grouped import Segments

    dropping = dropout is not None and any(p > 0.0 for p, _ in dropout)
    keep = [1.0 / (1.0 - p) for p, _ in dropout] if dropping else [1.0] * len(scalings)
    seeds = thresholds = None
    if dropping:
        zero = torch.zeros(1, dtype=torch.int64, device=device)  # the seed of a segment that drops nothing (threshold 0)
        seeds = torch.cat([zero if seed is None else seed for _, seed in dropout]).to(torch.int64)
        thresholds = torch.tensor([keep_threshold(p) for p, _ in dropout], dtype=torch.int32, device=device)
    segments = Segments(starts.to(device=device, dtype=torch.int32),
                        None if index is None else index.to(device=device, dtype=torch.int64), seeds, thresholds)
    return segments, torch.tensor([scalings, keep], dtype=torch.float32, device=device), dropping

"""Adapters' low-rank terms on segments of the batch's rows, for mixed batches, on the torch path:

    y_seg = scaling · (dropout(x[rows]) Aᵀ) Bᵀ      (in the adapters' dtype, returned in x's)

:func:`segment_low_rank` computes one adapter's; :func:`grouped_segments_low_rank` every adapter's at once, as
batched products over the segments stacked (k, rows, ·), padded to the longest with zero rows and ranks padded
to the largest with zeros: a fixed number of ops per layer whatever the number of adapters, each adapter's
mask drawn from its own seed on its own rows exactly as :func:`segment_low_rank` draws it (the rare-drop masks
of all of them in one batch of ops, :func:`fastlora.cpu_masks.zero_dropped_segments_`).
:func:`grouped_segments_linear` adds the frozen base product, x Wᵀ + b, in the same autograd node, and reads a
batch sorted by adapter in place.  What autograd keeps in all three: x itself (the same storage the base
product keeps, so no copy of the rows), the row indices, the rank-r S and the seeds; backward gathers the rows
again (not for a sorted batch) and regenerates the masks.  dx is the rows' gradient scattered into a zero tensor
of x's shape, or, with the base product, added at the rows into dy W.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from fastlora import cpu_masks, torch_path
from fastlora.functional import dropout_and_seed
from fastlora.ops import keep_fn, kernel_masks_on

__all__ = ["segment_low_rank", "grouped_segments_low_rank", "grouped_segments_linear", "rows_in_order",
           "tokens_per_row"]


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


class _GroupedSegmentsLowRank(torch.autograd.Function):
    """x (rows, …, K); ``rows`` the rows (dim 0) of every segment, one segment after the other (``counts`` tokens
    each: its rows times the tokens of a row), or None when the segments are x's rows in order (then x is read
    in place, no rows gathered or scattered); per segment a scaling, a dropout p, a seed and its factors A_e
    (r_e, K), B_e (N, r_e), given flat (A_0, B_0, A_1, B_1, …) so that autograd keeps the parameters themselves,
    stacked inside (ranks padded with zeros) for the batched products.

    Without ``weight``: returns the segments' updates (their tokens, N), in x's dtype.  With a frozen ``weight``
    (N, K) and ``bias`` of x's dtype: returns x Wᵀ + b (x's tokens, N) with each segment's update (rounded to x's
    dtype) added at its rows, in place: one output and one autograd node for the layer, and backward's
    dx = dy W with the segments' part added in place.  The outputs are 2-D (the callers shape them); the base
    product's is no view, so that the layer's output may be changed in place."""

    @staticmethod
    def forward(ctx, x, weight, bias, rows, counts, scalings, dropout_ps, seeds, *factors):
        out, S = _segments_forward(x, weight, bias, rows, counts, scalings, dropout_ps, seeds, factors)
        ctx.save_for_backward(x, weight, rows, S, *factors, *[seed for seed in seeds if seed is not None])
        ctx.counts, ctx.scalings, ctx.dropout_ps = counts, scalings, dropout_ps
        ctx.seeded = [seed is not None for seed in seeds]
        return out

    @staticmethod
    def backward(ctx, d_out):
        x, weight, rows, S, *kept = ctx.saved_tensors
        factors = kept[:2 * len(ctx.counts)]
        seeds = iter(kept[2 * len(ctx.counts):])
        seeds = [next(seeds) if seeded else None for seeded in ctx.seeded]
        counts, scalings, dropout_ps = ctx.counts, ctx.scalings, ctx.dropout_ps
        lora_A, lora_B = _stacked(factors)
        need_dx = ctx.needs_input_grad[0]
        need_dA = any(ctx.needs_input_grad[8::2])
        need_dB = any(ctx.needs_input_grad[9::2])
        d_flat = d_out.reshape(-1, d_out.shape[-1])
        d_rows = d_flat if weight is None or rows is None else _rows_of(d_flat, rows, x.shape[0])
        dy = _stack(d_rows.to(lora_A.dtype), counts)
        dB = None
        if need_dB:
            dB = torch_path.mm_rank_columns(dy.transpose(1, 2), S).mul_(_per_segment(scalings, lora_A))
        dx = dA = None
        if need_dx or need_dA:
            # dS · 1/(1-p) per segment, so the masked products below need no M × K scaling pass
            dS_kept = torch_path.mm_rank_columns(dy, lora_B).mul_(
                _per_segment([s / (1.0 - p) for s, p in zip(scalings, dropout_ps)], lora_A))
            # x's rows and the dx part side by side, so that each segment's mask is regenerated once for both
            parts = torch.empty((len(counts), int(need_dA) + int(need_dx), max(counts), x.shape[-1]),
                                dtype=lora_A.dtype, device=x.device)
            if need_dA:
                parts[:, 0] = _stack_rows(x, rows, counts, lora_A.dtype)
            if need_dx:
                parts[:, -1] = torch.bmm(dS_kept, lora_A)  # not out=: into a strided view it is slower and untraceable
            _drop_segments_(parts, counts, seeds, dropout_ps)
            if need_dA:
                dA = torch.bmm(dS_kept.transpose(1, 2), parts[:, 0])
            if need_dx:
                dx_rows = _unstack_rows(parts[:, -1], counts).to(x.dtype)
                if weight is None:
                    dx = torch.zeros_like(x).index_add_(0, rows, dx_rows.view(len(rows), *x.shape[1:]))
                else:
                    dx = _add_at_rows_(torch.mm(d_flat, weight), rows, dx_rows).view(x.shape)
        grads = []
        for e, (A, B) in enumerate(zip(factors[0::2], factors[1::2])):
            r = A.shape[0]
            grads += [None if dA is None else dA[e, :r], None if dB is None else dB[e, :, :r]]
        return (dx, None, None, None, None, None, None, None, *grads)


def _segments_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, rows: Tensor | None, counts: list[int],
                      scalings: list[float], dropout_ps: list[float], seeds: list[Tensor | None],
                      factors: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """:class:`_GroupedSegmentsLowRank`'s output, and the stacked rank-r S its backward keeps."""
    lora_A, lora_B = _stacked(factors)
    stacked = _stack_rows(x, rows, counts, lora_A.dtype, fresh=any(seed is not None for seed in seeds))
    _drop_segments_(stacked, counts, seeds, dropout_ps)
    keep_scale = _per_segment([1.0 / (1.0 - p) for p in dropout_ps], lora_A)
    S = torch_path.mm_rank_columns(stacked, lora_A.transpose(1, 2)).mul_(keep_scale)  # keep scale on rank-r S
    update = _unstack_rows(torch.bmm(S, lora_B.transpose(1, 2)).mul_(_per_segment(scalings, lora_A)), counts)
    if weight is None:  # (the callers add it into the base output, never change it in place)
        return update.to(x.dtype), S
    flat = x.reshape(-1, x.shape[-1])
    y = torch.addmm(bias, flat, weight.t()) if bias is not None else torch.mm(flat, weight.t())
    return _add_at_rows_(y, rows, update.to(y.dtype)), S


def _grouped_segments(x: Tensor, weight: Tensor | None, bias: Tensor | None, rows: Tensor | None, counts: list[int],
                      scalings: list[float], dropout_ps: list[float], seeds: list[Tensor | None],
                      *factors: Tensor) -> Tensor:
    """:class:`_GroupedSegmentsLowRank` where autograd records (grad mode, and x or a factor requiring grad), else
    its forward alone: the same values without a node.  (torch.compile also binds the arguments of an
    autograd.Function that takes a variable number of them wrongly when no input requires grad.)"""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *factors)):
        return _GroupedSegmentsLowRank.apply(x, weight, bias, rows, counts, scalings, dropout_ps, seeds, *factors)
    return _segments_forward(x, weight, bias, rows, counts, scalings, dropout_ps, seeds, factors)[0]


def _rows_of(flat: Tensor, rows: Tensor, row_count: int) -> Tensor:
    """The tokens of rows ``rows`` (dim 0 of a tensor of ``row_count`` rows, flattened to (tokens, ·) in ``flat``,
    any strides)."""
    tokens_per_row = flat.shape[0] // max(row_count, 1)
    by_row = flat.reshape(row_count, tokens_per_row, flat.shape[-1])
    return by_row.index_select(0, rows).reshape(-1, flat.shape[-1])


def _add_at_rows_(out: Tensor, rows: Tensor | None, values: Tensor) -> Tensor:
    """out (tokens, ·) with ``values`` (the tokens of rows ``rows``, one after the other; every row in order
    when ``rows`` is None) added at their rows, in place."""
    if rows is None:
        return out.add_(values)
    if values.numel() > 0:
        tokens_per_row = values.shape[0] // rows.numel()
        out.view(-1, tokens_per_row * out.shape[-1]).index_add_(0, rows, values.view(rows.numel(), -1))
    return out


def _stacked(factors) -> tuple[Tensor, Tensor]:
    """The flat (A_0, B_0, A_1, B_1, …) stacked, ranks padded to the largest with zeros (outside autograd here:
    the Function returns each factor's gradient itself)."""
    from fastlora.grouped_lora import stack_factors

    return stack_factors(list(zip(factors[0::2], factors[1::2])))


def _per_segment(values: list[float], like: Tensor) -> Tensor:
    """Per-segment factors as a (k, 1, 1) tensor, to scale a stack of segments: in float32 (float64 for float64
    stacks), so that a 16-bit stack is scaled in float32 and rounded once, as by a Python scalar, not by a factor
    rounded to 16 bits first.  Read only (cached: every layer of a mixed batch asks for the same)."""
    return _segment_factors(tuple(values), torch.promote_types(like.dtype, torch.float32), like.device)


@functools.lru_cache(maxsize=256)
def _segment_factors(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=dtype, device=device).view(-1, 1, 1)


def _stack_rows(x: Tensor, rows: Tensor | None, counts: list[int], dtype: torch.dtype, fresh: bool = True) -> Tensor:
    """The tokens of x's rows ``rows`` (segment after segment, ``counts`` tokens each; None: every row in order)
    as a (k, longest, K) stack in ``dtype``, the shorter segments padded with zero rows: a fresh tensor, or with
    ``fresh=False`` possibly x's own storage (not to be written)."""
    if rows is not None:
        return _stack(x.index_select(0, rows).reshape(-1, x.shape[-1]).to(dtype), counts)
    flat = x.reshape(-1, x.shape[-1])
    return _stack(flat.to(dtype, copy=fresh, memory_format=torch.contiguous_format), counts)


def _stack(rows: Tensor, counts: list[int]) -> Tensor:
    """Rows of consecutive segments (``counts`` each) as a (k, longest, ·) stack, the shorter ones padded with zero
    rows (a view of ``rows`` when the segments are equal)."""
    longest = max(counts)
    if all(c == longest for c in counts):
        return rows.reshape(len(counts), longest, rows.shape[-1])
    stacked = rows.new_zeros(len(counts), longest, rows.shape[-1])
    for e, (start, count) in enumerate(zip(_starts(counts), counts)):
        stacked[e, :count] = rows[start:start + count]
    return stacked


def _unstack_rows(stacked: Tensor, counts: list[int]) -> Tensor:
    """The inverse of :func:`_stack_rows`: the segments' rows one after the other, padding dropped."""
    if all(c == stacked.shape[1] for c in counts):
        return stacked.reshape(-1, stacked.shape[-1])
    return torch.cat([stacked[e, :count] for e, count in enumerate(counts)])


def _starts(counts: list[int]) -> list[int]:
    out, total = [], 0
    for count in counts:
        out.append(total)
        total += count
    return out


def _drop_segments_(stacked: Tensor, counts: list[int], seeds: list[Tensor | None], dropout_ps: list[float]) -> Tensor:
    """Each segment's rows ⊙ its mask, in place: the mask of (seed, p) on the segment's own (rows × K), as one
    adapter's call draws it.  ``stacked`` is (k, longest, K), or (k, parts, longest, K) for parts that share
    their segment's mask (drawn once for all of them where the segment is the longest)."""
    if (type(stacked) is Tensor and not kernel_masks_on(stacked) and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()):  # eager on the CPU generator's masks: the rare drops in one batch of ops
        return cpu_masks.zero_dropped_segments_(stacked, counts, [None if s is None else int(s) for s in seeds],
                                                dropout_ps)
    for e, (count, seed, p) in enumerate(zip(counts, seeds, dropout_ps)):  # else each segment's keep function
        keep = keep_fn(seed, p)
        if keep is not None:
            for piece in cpu_masks.segment_pieces(stacked, e, count):
                keep(piece)
    return stacked


def grouped_segments_low_rank(x: Tensor, groups: list[Tensor], factors: list[tuple[Tensor, Tensor]],
                              scalings: list[float], dropout_ps: list[float], training: bool) -> tuple[Tensor, Tensor]:
    """Every adapter's update on its own rows of x (dim 0): ``groups`` the rows of each adapter (disjoint),
    ``factors`` its (A, B) (one dtype; ranks may differ), ``scalings`` and ``dropout_ps`` its own.  Returns
    (rows, updates): the groups' rows one after the other, and their updates shaped as x[rows] with the last
    dimension out_features, in x's dtype, to be accumulated at those rows.  Seeds are drawn one per adapter in
    the order given, as one :func:`segment_low_rank` call per adapter would draw them."""
    rows = torch.cat([group.to(x.device) for group in groups])
    update = _grouped_segments(x, None, None, rows, *_segment_arguments(x, groups, scalings, dropout_ps, training,
                                                                        factors))
    return rows, update.view(len(rows), *x.shape[1:-1], factors[0][1].shape[0])


def grouped_segments_linear(x: Tensor, weight: Tensor, bias: Tensor | None, groups: list[Tensor],
                            factors: list[tuple[Tensor, Tensor]], scalings: list[float], dropout_ps: list[float],
                            training: bool) -> Tensor:
    """x Wᵀ + b (W and b frozen, of x's dtype) with every adapter's update (as :func:`grouped_segments_low_rank`
    computes it, rounded to x's dtype) added at its own rows: one output tensor and one autograd node.  When the
    groups are x's rows in order (a batch sorted by adapter, no base rows) the rows are read in place, never
    gathered."""
    rows = torch.cat(groups)  # checked where the groups are (the CPU, as PeftModel builds them): no device sync
    rows = None if rows_in_order(rows, x.shape[0]) else rows.to(x.device)
    y = _grouped_segments(x, weight, bias, rows, *_segment_arguments(x, groups, scalings, dropout_ps, training,
                                                                   factors))
    return y.view(*x.shape[:-1], weight.shape[0])


def _segment_arguments(x: Tensor, groups: list[Tensor], scalings: list[float], dropout_ps: list[float],
                       training: bool, factors: list[tuple[Tensor, Tensor]]) -> tuple:
    """(counts, scalings, ps, seeds, *factors flat) of :class:`_GroupedSegmentsLowRank`: each group's tokens,
    and one seed drawn per adapter in order."""
    tokens = tokens_per_row(x)
    drawn = [dropout_and_seed(p, training, x.device) for p in dropout_ps]
    return ([len(group) * tokens for group in groups], [float(s) for s in scalings], [p for p, _ in drawn],
            [seed for _, seed in drawn], *[t for pair in factors for t in pair])


def rows_in_order(rows: Tensor, row_count: int) -> bool:
    """Whether ``rows`` are every one of ``row_count`` rows, in order (a batch sorted by adapter, no other rows).
    False under ``torch.compile``, whose trace does not know the rows' values (comparing them would break the graph):
    the compiled batch takes the general path, which gives the same values."""
    if torch.compiler.is_compiling():
        return False
    return rows.numel() == row_count and torch.equal(rows, torch.arange(row_count, device=rows.device))


def tokens_per_row(x: Tensor) -> int:
    """The tokens (positions of in_features values) in one row (dim 0) of x (rows, …, in_features)."""
    return x.numel() // max(x.shape[0] * x.shape[-1], 1)

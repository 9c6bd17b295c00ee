"""The CPU backend's dropout masks: drawn from a seeded torch.Generator, applied in place, never stored.

For p <= 0.15 the dropped positions are drawn as geometric gaps (rare events) and zeroed by index, for
p >= 0.85 the kept ones; other p compare a 16-bit uniform per element with :func:`keep_threshold`.  The
kernels draw their masks from Philox instead (``kernels/dropout.py``): the same keep rate, another stream.
"""

from __future__ import annotations

import functools
import math
import threading

import torch
from torch import Tensor

__all__ = ["zero_dropped_", "zero_dropped_segments_", "segment_pieces", "cpu_keep_mask", "rare_dropped_positions", "keep_threshold"]

# The two backends draw different masks for one seed; each is reproducible from it.
# One generator per thread: reseeding a shared one while another thread draws from it would mix masks.
_GENERATORS = threading.local()
_GEOMETRIC_MAX_Q = 0.15  # where the two samplers cost the same on one core (measured at 0.5M-1.4M elements)


def keep_threshold(dropout_p: float) -> int:
    """u >= keep_threshold(p) keeps an element whose 16-bit uniform is u."""
    return round(dropout_p * 2**16)


def zero_dropped_(t: Tensor, seed: int, dropout_p: float) -> Tensor:
    """Multiply by 0, in place, the elements of the contiguous tensor ``t`` (on any device) that the
    CPU-generated mask for ``(seed, p)`` drops (so a dropped NaN stays NaN, as in x ⊙ m), and return ``t``.  The mask has the shape of ``t``'s last two dimensions; leading dimensions share it.
    The same seed, mask shape and p give the same mask."""
    if not t.is_contiguous():
        raise ValueError("zero_dropped_ needs a contiguous tensor")
    if dropout_p <= 0.0 or t.numel() == 0:
        return t
    if dropout_p >= 1.0:
        return t.zero_()
    generator = _seeded_generator(seed)
    mask_numel = t.shape[-1] * t.shape[-2] if t.dim() >= 2 else t.numel()
    rows = t.view(-1, mask_numel)  # one row per mask-shaped slice
    # Drawn on the CPU generator, then moved to t's device (the torch backend on an accelerator other than CUDA,
    # where it applies the kernels' mask: fastlora.ops.kernel_masks_on).
    # Dropped elements are multiplied by 0, as dropout's x ⊙ m: a dropped NaN or Inf stays NaN.  Filling with 0
    # is the same when every element is finite, which one sum tells (a NaN or Inf makes it non-finite; an
    # overflow to Inf only sends the call the slow, exact way).  A bool or integer tensor holds no NaN.
    all_finite = not t.is_floating_point() or math.isfinite(t.sum().item())
    if dropout_p <= _GEOMETRIC_MAX_Q:
        dropped = _rare_positions(generator, mask_numel, dropout_p).to(t.device)
        if all_finite:
            rows.index_fill_(1, dropped, 0)
        else:
            rows.index_copy_(1, dropped, rows.index_select(1, dropped).mul_(0))
    elif dropout_p >= 1.0 - _GEOMETRIC_MAX_Q:
        kept = _rare_positions(generator, mask_numel, 1.0 - dropout_p).to(t.device)
        values = rows.index_select(1, kept)
        (rows.zero_() if all_finite else rows.mul_(0)).index_copy_(1, kept, values)
    else:
        rows.mul_(_keep_per_element(generator, mask_numel, dropout_p, t.dtype).to(t.device))
    return t


def _seeded_generator(seed: int) -> torch.Generator:
    generator = _thread_generator()
    generator.manual_seed(int(seed))
    return generator


def _thread_generator() -> torch.Generator:
    generator = getattr(_GENERATORS, "cpu", None)
    if generator is None:
        generator = _GENERATORS.cpu = torch.Generator(device="cpu")
    return generator


def rare_dropped_positions(seed: int, M: int, K: int, dropout_p: float) -> tuple[Tensor, Tensor] | None:
    """(rows, cols), row-major order, of the elements of an M × K input that :func:`zero_dropped_` drops for
    ``(seed, p)`` when it draws them as rare events (0 < p ≤ 0.15); None for other p."""
    if not 0.0 < dropout_p <= _GEOMETRIC_MAX_Q or M * K == 0:
        return None
    flat = _rare_positions(_seeded_generator(seed), M * K, dropout_p)
    return flat.div(K, rounding_mode="floor"), flat.remainder(K)


def cpu_keep_mask(seed: int, shape: tuple[int, ...], dropout_p: float, dtype: torch.dtype = torch.bool) -> Tensor:
    """The mask :func:`zero_dropped_` applies, as a tensor of ``shape`` (bool, or 0/1 in ``dtype``)."""
    return zero_dropped_(torch.ones(shape, dtype=dtype), seed, dropout_p)


def _keep_per_element(generator: torch.Generator, numel: int, dropout_p: float, dtype: torch.dtype) -> Tensor:
    threshold = keep_threshold(dropout_p)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64).random_(-(2**63), None, generator=generator)
    # int16 holds u - 2^15, so compare against the threshold shifted the same way
    uniforms = words.view(torch.int16)[:numel]
    return torch.ge(uniforms, threshold - 2**15, out=torch.empty(numel, dtype=dtype))


def _rare_positions(generator: torch.Generator, numel: int, q: float) -> Tensor:
    """Sorted positions in [0, numel) of the elements an i.i.d. Bernoulli(q) draw marks, from geometric
    gaps.  Draws come in batches of the expected count plus six standard deviations; a batch that ends
    short of ``numel`` (rare) is followed by another from the same generator, so the result still
    depends on the generator's seed alone."""
    inv_log_not_q = 1.0 / math.log1p(-q)
    found = []
    start = 0  # the first position the next gap counts from
    while start < numel:
        count = _draw_count(numel - start, q)
        words = torch.empty((count + 1) // 2, dtype=torch.int64).random_(-(2**63), None, generator=generator)
        positions = _positions(words.view(torch.int32)[:count], inv_log_not_q, numel, start)
        inside = int(torch.searchsorted(positions, numel))
        found.append(positions[:inside])
        start = numel if inside < count else int(positions[-1]) + 1
    return found[0] if len(found) == 1 else torch.cat(found)


def _draw_count(left: int, q: float) -> int:
    """Gaps drawn in one batch for ``left`` positions: the expected count plus six standard deviations."""
    return int(left * q + 6.0 * math.sqrt(left * q * (1.0 - q))) + 64


def _positions(words: Tensor, inv_log_not_q: float | Tensor, numel: int | Tensor, start: int) -> Tensor:
    """Positions (along the last dimension, from ``start``) of the marked elements whose geometric gaps the int32
    ``words`` give; ``inv_log_not_q`` = 1 / log(1 - q) and ``numel`` scalars, or (n, 1) float32 columns for n rows
    of words (the same values per row as the scalars give)."""
    # 23-bit uniforms u = (k + 1/2) / 2^23, k < 2^23: exact in float32, never 0 or 1 (log u is finite, < 0)
    # (k - 2^22 for the word's top 23 bits k, exact in float32; + 2^22 + 1/2 is exact too)
    u = words.bitwise_right_shift(9).to(torch.float32).add_(2**22 + 0.5).mul_(2.0**-23)
    # A gap past numel ends the draw either way; clamping first keeps a tiny q's astronomically long gaps (up
    # to inf) from overflowing int64 (positions before the first such gap are unchanged).  The gaps are
    # positive, so the conversion's truncation is their floor.
    gaps = u.log_().mul_(inv_log_not_q).clamp_(max=numel)
    # position of the j-th marked element: start + Σ_{i≤j} (gap_i + 1) - 1
    return gaps.to(torch.int64).add_(1).cumsum_(-1).add_(start - 1)


def zero_dropped_segments_(stacked: Tensor, counts: list[int], seeds: list[int | None],
                           dropout_ps: list[float]) -> Tensor:
    """For each segment e of the contiguous ``stacked`` (k, longest, K) or (k, parts, longest, K), multiply by 0 in
    place what the mask of ``(seeds[e], dropout_ps[e])`` drops in its first ``counts[e]`` rows (each part alike):
    the mask :func:`zero_dropped_` applies to those rows, element for element (None or p = 0: no dropout; where
    the stack holds a NaN or Inf, a dropped finite element may become -0.0 where that call gives 0.0).  The
    rare-drop segments' positions come from one batch of ops for all of them (one seeded draw each), the others
    from one :func:`zero_dropped_` call each."""
    if not stacked.is_contiguous():
        raise ValueError("zero_dropped_segments_ needs a contiguous tensor")
    k, longest, K = stacked.shape[0], stacked.shape[-2], stacked.shape[-1]
    parts = stacked.shape[1] if stacked.dim() == 4 else 1
    dropping = [e for e in range(k) if seeds[e] is not None and dropout_ps[e] > 0.0 and counts[e] > 0]
    rare = [e for e in dropping if dropout_ps[e] <= _GEOMETRIC_MAX_Q]
    positions, inside = _rare_positions_batched([seeds[e] for e in rare], [counts[e] * K for e in rare],
                                                [dropout_ps[e] for e in rare])
    one_by_one = [e for e in dropping if e not in rare] + [e for e, n in zip(rare, inside) if n is None]
    if positions is not None:
        # each segment's valid positions, offset to its place in the stack (slices: a boolean mask costs 5x more)
        placed = positions.add_(_column(tuple(e * parts * longest * K for e in rare)))
        flat = torch.cat([placed[i, :n or 0] for i, n in enumerate(inside)])
        if parts > 1:  # each part of a segment takes its mask
            flat = flat.add(_column(tuple(p * longest * K for p in range(parts)))).view(-1)
        if flat.device != stacked.device:
            flat = flat.to(stacked.device)
        every = stacked.view(-1)
        if not stacked.is_floating_point() or math.isfinite(stacked.sum().item()):
            every.index_fill_(0, flat, 0)
        else:  # x ⊙ m: a dropped NaN or Inf stays NaN
            every.index_copy_(0, flat, every.index_select(0, flat).mul_(0))
    for e in one_by_one:
        for piece in segment_pieces(stacked, e, counts[e]):
            zero_dropped_(piece, seeds[e], dropout_ps[e])
    return stacked


def segment_pieces(stacked: Tensor, e: int, count: int) -> tuple[Tensor, ...]:
    """The contiguous views of segment e's first ``count`` rows in ``stacked`` (k, longest, K) or
    (k, parts, longest, K), each to take the segment's mask (a mask call's leading dimensions share it): the
    segment at once where its rows are contiguous across the parts, else one view per part."""
    segment = stacked[e]
    if segment.dim() == 2 or count == segment.shape[-2]:
        return (segment[..., :count, :],)
    return tuple(part[:count] for part in segment)


def _rare_positions_batched(seeds: list[int], numels: list[int], qs: list[float]) -> tuple[Tensor | None, list]:
    """:func:`_rare_positions` of several (seed, numel, q) at once: (positions, one row per draw, each row's
    first ``inside[i]`` valid; inside[i] None where one batch of gaps ended short of numel, a draw to make alone)."""
    if not seeds:
        return None, []
    generator = _thread_generator()  # reseeded for each draw
    draws, inv, limit, numel_column = _batch_constants(tuple(numels), tuple(qs))
    # (a row's words past its own draws are never read as its positions: see the fallback below)
    words = torch.empty(len(seeds), (max(draws) + 1) // 2, dtype=torch.int64)
    for i, (seed, count) in enumerate(zip(seeds, draws)):
        generator.manual_seed(int(seed))
        words[i, :(count + 1) // 2].random_(-(2**63), None, generator=generator)
    positions = _positions(words.view(torch.int32)[:, :max(draws)], inv, limit, 0)
    # Every word gives a gap ≥ 0, so each row is sorted and a row counts a position past its draws only when
    # all its draws fell short of numel: the draw one batch did not finish, made again alone.
    inside = torch.searchsorted(positions, numel_column).view(-1).tolist()
    return positions, [n if n < count else None for n, count in zip(inside, draws)]


@functools.lru_cache(maxsize=256)
def _column(values: tuple[int, ...]) -> Tensor:
    """``values`` as an int64 (n, 1) column (read only; one layer's segments repeat it in every layer)."""
    return torch.tensor(values, dtype=torch.int64).view(-1, 1)


@functools.lru_cache(maxsize=256)
def _batch_constants(numels: tuple[int, ...], qs: tuple[float, ...]) -> tuple[list[int], Tensor, Tensor, Tensor]:
    """The batched draw's per-row constants (one layer's segments repeat them in every layer): each row's gap
    count, 1 / log(1 - q) and numel as float32 columns, numel as an int64 column (read only)."""
    return ([_draw_count(numel, q) for numel, q in zip(numels, qs)],
            torch.tensor([1.0 / math.log1p(-q) for q in qs], dtype=torch.float32).view(-1, 1),
            torch.tensor(numels, dtype=torch.float32).view(-1, 1), torch.tensor(numels, dtype=torch.int64).view(-1, 1))

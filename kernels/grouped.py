"""Grouped (segmented) low-rank products: many adapters' factors over one batch, one launch for all of them.

Segment e (an expert of a mixture of experts, or an adapter of a mixed batch) owns the positions
[starts[e], starts[e+1]) of a sorted order; with an index, position i stands for row index[i] of the operand (the
batch's own rows, never gathered into a copy).  Each segment has its own factors, scale and dropout (seed and
keep threshold).

segment_matmul_kernel — grid (E, cdiv(T, BLOCK_M), cdiv(N, BLOCK_N)); program (e, i, j) takes block i of segment
e's positions (it does nothing past the segment's end) and column block j:
    C[rows of e] = scale_e · (keep ⊙) P[rows of e] · Q_e      P (· × D), Q_e (D × N) at q_ptr + e·stride_qe
  MASK_P: the keep mask on P's tile (S = (x ⊙ m) Aᵀ / (1-p)); MASK_C: on the result (dx = (dS A) ⊙ m)
  forward:  S = X A_eᵀ (D = in, N = r),  U = s · S B_eᵀ (D = r, N = out)
  backward: dS = s · dU B_e (D = out, N = r),  dX = dS A_e (D = r, N = in)

segment_reduce_kernel — grid (E, cdiv(D1, BLOCK_1), cdiv(D2, BLOCK_2)); program (e, i, j) reduces segment e's
positions in BLOCK_M steps:
    OUT_e = scale_e · ((keep ⊙) P[rows of e])ᵀ Q[rows of e]    (D1 × D2 per segment; zero for an empty one)
  backward: dB_e = s · dUᵀ S (D1 = out, D2 = r),  dA_eᵀ = (X ⊙ m)ᵀ dS (D1 = in, D2 = r)

The mask of element (row, col) is dropout.py's for the segment's seed, row the operand's own row (so every kernel
regenerates the same mask); P is cast to Q's dtype before each dot (the adapters' dtype, as the other rank-r
kernels); fp32 accumulation; every operand through its strides; tails masked; INT64 for operands past 2^31
elements; UPCAST (interpreter only) computes 16-bit operands in fp32.  ``starts`` (E + 1, int32) and the
per-segment values stay on the device: no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import launch, needs_int64, skinny_precision, upcast
from .dropout import keep_mask, philox_key
from .gemm import dot_acc

__all__ = ["segment_matmul_kernel", "segment_reduce_kernel", "segment_matmul", "segment_reduce",
           "segment_matmul_arguments", "segment_reduce_arguments", "Segments", "GROUPED_BLOCKS", "MAX_POSITIONS"]

GROUPED_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": 32, "num_warps": 4, "num_stages": 2}
# The most positions one launch takes: CUDA caps the grid's second dimension (position blocks) at 65535.
MAX_POSITIONS = 65535 * GROUPED_BLOCKS["BLOCK_M"]


@triton.jit
def _segment(starts_ptr, seeds_ptr, thresholds_ptr, DROPOUT: tl.constexpr):
    """(start, end, Philox key, keep threshold) of this program's segment (program_id 0)."""
    segment = tl.program_id(0)
    start = tl.load(starts_ptr + segment)
    end = tl.load(starts_ptr + segment + 1)
    k0 = 0
    k1 = 0
    threshold = 0
    if DROPOUT:
        k0, k1 = philox_key(seeds_ptr + segment)
        threshold = tl.load(thresholds_ptr + segment)
    return start, end, k0, k1, threshold


@triton.jit
def _rows(index_ptr, positions, ok, INDEXED: tl.constexpr, INT64: tl.constexpr):
    """The operand's rows for ``positions``: through the index when INDEXED, else the positions themselves."""
    rows = positions
    if INDEXED:
        rows = tl.load(index_ptr + positions, mask=ok, other=0)
    if INT64:
        rows = rows.to(tl.int64)
    return rows


@triton.jit
def segment_matmul_kernel(
    p_ptr, q_ptr, c_ptr, starts_ptr, scales_ptr, p_index_ptr, c_index_ptr, seeds_ptr, thresholds_ptr,
    N, D,
    stride_pm, stride_pd, stride_qe, stride_qd, stride_qn, stride_cm, stride_cn,
    P_INDEXED: tl.constexpr, C_INDEXED: tl.constexpr, MASK_P: tl.constexpr, MASK_C: tl.constexpr,
    INT64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    segment = tl.program_id(0)
    start, end, k0, k1, threshold = _segment(starts_ptr, seeds_ptr, thresholds_ptr, MASK_P or MASK_C)
    first = start + tl.program_id(1) * BLOCK_M
    if first < end:
        positions = first + tl.arange(0, BLOCK_M)
        row_ok = positions < end
        p_rows = _rows(p_index_ptr, positions, row_ok, P_INDEXED, INT64)
        c_rows = _rows(c_index_ptr, positions, row_ok, C_INDEXED, INT64)
        col_start = tl.program_id(2) * BLOCK_N
        offs_n = col_start + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        col_ok = offs_n < N
        cols = offs_n
        q_base = q_ptr + segment * stride_qe
        if INT64:
            cols = cols.to(tl.int64)
            q_base = q_ptr + segment.to(tl.int64) * stride_qe
        p_ptrs = p_ptr + p_rows[:, None] * stride_pm + offs_d[None, :] * stride_pd
        q_ptrs = q_base + offs_d[:, None] * stride_qd + cols[None, :] * stride_qn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d in range(0, tl.cdiv(D, BLOCK_D)):
            d_left = D - d * BLOCK_D
            q = tl.load(q_ptrs, mask=(offs_d[:, None] < d_left) & col_ok[None, :], other=0.0)
            p = tl.load(p_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < d_left), other=0.0).to(q.dtype)
            if MASK_P:
                p = tl.where(keep_mask(k0, k1, p_rows, d * BLOCK_D, threshold, BLOCK_M, BLOCK_D), p, p * 0.0)
            acc = dot_acc(p, q, acc, UPCAST, PRECISION)
            p_ptrs += BLOCK_D * stride_pd
            q_ptrs += BLOCK_D * stride_qd
        if MASK_C:  # a dropped element becomes its value · 0, so a dropped NaN stays NaN
            acc = tl.where(keep_mask(k0, k1, c_rows, col_start, threshold, BLOCK_M, BLOCK_N), acc, acc * 0.0)
        acc = acc * tl.load(scales_ptr + segment)
        tl.store(c_ptr + c_rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def segment_reduce_kernel(
    p_ptr, q_ptr, out_ptr, starts_ptr, scales_ptr, p_index_ptr, seeds_ptr, thresholds_ptr,
    D1, D2,
    stride_pm, stride_p1, stride_qm, stride_q2, stride_oe, stride_o1, stride_o2,
    P_INDEXED: tl.constexpr, MASK_P: tl.constexpr,
    INT64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_1: tl.constexpr, BLOCK_2: tl.constexpr,
):
    segment = tl.program_id(0)
    start, end, k0, k1, threshold = _segment(starts_ptr, seeds_ptr, thresholds_ptr, MASK_P)
    col_1 = tl.program_id(1) * BLOCK_1
    offs_1 = col_1 + tl.arange(0, BLOCK_1)
    offs_2 = tl.program_id(2) * BLOCK_2 + tl.arange(0, BLOCK_2)
    ok_1 = offs_1 < D1
    ok_2 = offs_2 < D2
    acc = tl.zeros((BLOCK_1, BLOCK_2), dtype=tl.float32)
    for first in range(start, end, BLOCK_M):  # the segment's positions; none: the zero it stores
        positions = first + tl.arange(0, BLOCK_M)
        row_ok = positions < end
        p_rows = _rows(p_index_ptr, positions, row_ok, P_INDEXED, INT64)
        q_rows = _rows(p_index_ptr, positions, row_ok, False, INT64)
        q = tl.load(q_ptr + q_rows[:, None] * stride_qm + offs_2[None, :] * stride_q2,
                    mask=row_ok[:, None] & ok_2[None, :], other=0.0)
        p = tl.load(p_ptr + p_rows[:, None] * stride_pm + offs_1[None, :] * stride_p1,
                    mask=row_ok[:, None] & ok_1[None, :], other=0.0).to(q.dtype)
        if MASK_P:
            p = tl.where(keep_mask(k0, k1, p_rows, col_1, threshold, BLOCK_M, BLOCK_1), p, p * 0.0)
        acc = dot_acc(tl.trans(p), q, acc, UPCAST, PRECISION)
    out_base = out_ptr + segment * stride_oe
    if INT64:
        out_base = out_ptr + segment.to(tl.int64) * stride_oe
    tl.store(out_base + offs_1[:, None] * stride_o1 + offs_2[None, :] * stride_o2,
             (acc * tl.load(scales_ptr + segment)).to(out_ptr.dtype.element_ty), mask=ok_1[:, None] & ok_2[None, :])


class Segments:
    """The segments of one grouped call: ``starts`` (E + 1, int32), ``index`` (the operand row of each position, or
    None when positions are rows), and each segment's dropout (``seeds`` int64 and keep ``thresholds`` int32, or
    None without dropout), all on the device."""

    def __init__(self, starts: Tensor, index: Tensor | None = None, seeds: Tensor | None = None,
                 thresholds: Tensor | None = None):
        self.starts, self.index, self.seeds, self.thresholds = starts, index, seeds, thresholds

    @property
    def count(self) -> int:
        return self.starts.shape[0] - 1


def segment_matmul_arguments(*, p, q, c, starts, scales, p_index, c_index, seeds, thresholds, N: int, D: int,
                             p_strides, q_strides, c_strides, p_indexed: bool, c_indexed: bool, mask_p: bool,
                             mask_c: bool, int64: bool, upcast: bool, precision: str) -> dict:
    """``segment_matmul_kernel``'s arguments by name (the launcher passes tensors, bench/compile_check.py pointer
    types and example sizes); ``q_strides`` = (segment, d, n) of Q_e (D × N); unused pointers are any pointer."""
    return dict(p_ptr=p, q_ptr=q, c_ptr=c, starts_ptr=starts, scales_ptr=scales, p_index_ptr=p_index,
                c_index_ptr=c_index, seeds_ptr=seeds, thresholds_ptr=thresholds, N=N, D=D,
                stride_pm=p_strides[0], stride_pd=p_strides[1], stride_qe=q_strides[0], stride_qd=q_strides[1],
                stride_qn=q_strides[2], stride_cm=c_strides[0], stride_cn=c_strides[1],
                P_INDEXED=p_indexed, C_INDEXED=c_indexed, MASK_P=mask_p, MASK_C=mask_c,
                INT64=int64, UPCAST=upcast, PRECISION=precision,
                BLOCK_M=GROUPED_BLOCKS["BLOCK_M"], BLOCK_N=GROUPED_BLOCKS["BLOCK_N"], BLOCK_D=GROUPED_BLOCKS["BLOCK_D"])


def segment_reduce_arguments(*, p, q, out, starts, scales, p_index, seeds, thresholds, D1: int, D2: int, p_strides,
                             q_strides, out_strides, p_indexed: bool, mask_p: bool, int64: bool, upcast: bool,
                             precision: str) -> dict:
    """``segment_reduce_kernel``'s arguments by name; ``out_strides`` = (segment, d1, d2)."""
    return dict(p_ptr=p, q_ptr=q, out_ptr=out, starts_ptr=starts, scales_ptr=scales, p_index_ptr=p_index,
                seeds_ptr=seeds, thresholds_ptr=thresholds, D1=D1, D2=D2,
                stride_pm=p_strides[0], stride_p1=p_strides[1], stride_qm=q_strides[0], stride_q2=q_strides[1],
                stride_oe=out_strides[0], stride_o1=out_strides[1], stride_o2=out_strides[2],
                P_INDEXED=p_indexed, MASK_P=mask_p, INT64=int64, UPCAST=upcast, PRECISION=precision,
                BLOCK_M=GROUPED_BLOCKS["BLOCK_M"], BLOCK_1=GROUPED_BLOCKS["BLOCK_N"], BLOCK_2=GROUPED_BLOCKS["BLOCK_N"])


def _options() -> dict:
    return {k: GROUPED_BLOCKS[k] for k in ("num_warps", "num_stages")}


def segment_matmul(p: Tensor, q: Tensor, segments: Segments, scales: Tensor, rows: int, *, p_indexed: bool = False,
                   c_indexed: bool = False, mask: str | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """scale_e · (keep ⊙) P[rows of e] · Q[e] for every segment e: Q (E × D × N) any strides, ``scales`` (E) fp32.
    The result has ``rows`` rows in ``dtype`` (Q's by default): one per position, or with ``c_indexed`` one per
    operand row (rows no segment holds are zero).  ``mask``: "p" or "c" (the segments' dropout), or None."""
    D, N = q.shape[1], q.shape[2]
    out = (torch.zeros if c_indexed else torch.empty)((rows, N), device=p.device, dtype=dtype or q.dtype)
    positions = int(segments.index.shape[0]) if segments.index is not None else p.shape[0]
    if positions == 0 or N == 0:
        return out
    some = segments.starts
    args = segment_matmul_arguments(
        p=p, q=q, c=out, starts=segments.starts, scales=scales, p_index=segments.index if p_indexed else some,
        c_index=segments.index if c_indexed else some, seeds=segments.seeds if mask else some,
        thresholds=segments.thresholds if mask else some, N=N, D=D, p_strides=p.stride(), q_strides=q.stride(),
        c_strides=out.stride(), p_indexed=p_indexed, c_indexed=c_indexed, mask_p=mask == "p", mask_c=mask == "c",
        int64=needs_int64(p, q, out), upcast=upcast(p, q), precision=skinny_precision(p.dtype, q.dtype))
    grid = (segments.count, triton.cdiv(positions, GROUPED_BLOCKS["BLOCK_M"]), triton.cdiv(N, GROUPED_BLOCKS["BLOCK_N"]))
    launch(segment_matmul_kernel)[grid](**args, **_options())
    return out


def segment_reduce(p: Tensor, q: Tensor, segments: Segments, scales: Tensor, *, p_indexed: bool = False,
                   mask: bool = False, dtype: torch.dtype | None = None) -> Tensor:
    """scale_e · ((keep ⊙) P[rows of e])ᵀ · Q[positions of e] for every segment e, (E × D1 × D2) in ``dtype`` (Q's by
    default): P (· × D1), its rows through the index with ``p_indexed``; Q (positions × D2)."""
    D1, D2 = p.shape[1], q.shape[1]
    out = torch.empty((segments.count, D1, D2), device=p.device, dtype=dtype or q.dtype)
    some = segments.starts
    args = segment_reduce_arguments(
        p=p, q=q, out=out, starts=segments.starts, scales=scales, p_index=segments.index if p_indexed else some,
        seeds=segments.seeds if mask else some, thresholds=segments.thresholds if mask else some, D1=D1, D2=D2,
        p_strides=p.stride(), q_strides=q.stride(), out_strides=out.stride(), p_indexed=p_indexed, mask_p=mask,
        int64=needs_int64(p, q, out), upcast=upcast(p, q), precision=skinny_precision(p.dtype, q.dtype))
    grid = (segments.count, triton.cdiv(D1, GROUPED_BLOCKS["BLOCK_N"]), triton.cdiv(D2, GROUPED_BLOCKS["BLOCK_N"]))
    launch(segment_reduce_kernel)[grid](**args, **_options())
    return out

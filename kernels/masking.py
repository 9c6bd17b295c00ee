"""The dropout mask applied on its own: zero, in place, the elements the kernels' Philox mask drops.

The fused kernels apply the mask inside their loops; the products that run through torch on a CUDA device (the
torch path, DoRA's op, the term beside a quantized base) apply it to whole tensors with this elementwise
kernel instead, on the tensor's device.  Element
(row, col) of each (M, K) slice of a contiguous (..., M, K) tensor gets the mask of element (row, col) of
an M × K input under the same seed (:mod:`.dropout`), and is multiplied by 0 when dropped, as x ⊙ m
(a dropped NaN stays NaN).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .common import launch, needs_int64
from .dropout import keep_mask, keep_threshold, philox_key

__all__ = ["zero_dropped_kernel", "zero_dropped_arguments", "zero_dropped_"]

# One program per (32 × 128) tile: 4096 elements, 512 Philox evaluations.
BLOCK_ROWS = 32
BLOCK_COLS = 128


@triton.jit
def zero_dropped_kernel(
    t_ptr, seed_ptr, rows_total, M, K, keep_threshold,
    INT64: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """t[row, col] *= keep(seed, row % M, col) for the (rows_total, K) row-major view of a (..., M, K) tensor."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col_start = tl.program_id(1) * BLOCK_COLS
    cols = col_start + tl.arange(0, BLOCK_COLS)
    inside = (rows[:, None] < rows_total) & (cols[None, :] < K)
    offsets_rows = rows.to(tl.int64) if INT64 else rows
    ptrs = t_ptr + offsets_rows[:, None] * K + cols[None, :]
    t = tl.load(ptrs, mask=inside, other=0.0)
    if t_ptr.dtype.element_ty != tl.float64:  # (the interpreter cannot compute in bf16; float64 stays exact)
        t = t.to(tl.float32)
    k0, k1 = philox_key(seed_ptr)
    keep = keep_mask(k0, k1, rows % M, col_start, keep_threshold, BLOCK_ROWS, BLOCK_COLS)
    tl.store(ptrs, tl.where(keep, t, t * 0.0).to(t_ptr.dtype.element_ty), mask=inside)


def zero_dropped_arguments(*, t, seed, rows_total: int, M: int, K: int, keep_threshold: int, int64: bool) -> dict:
    """``zero_dropped_kernel``'s arguments by name, with this module's blocks (the launcher passes a tensor,
    bench/compile_check.py pointer types and example sizes)."""
    return dict(t_ptr=t, seed_ptr=seed, rows_total=rows_total, M=M, K=K, keep_threshold=keep_threshold, INT64=int64,
                BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLS=BLOCK_COLS)


def zero_dropped_(t: Tensor, seed: Tensor, dropout_p: float) -> Tensor:
    """Multiply by 0, in place, the elements of the contiguous tensor ``t`` (..., M, K) that the kernels' mask for
    ``seed`` (an int64 tensor of shape (1,) on t's device) drops; every (M, K) slice gets the same mask."""
    if not t.is_contiguous():
        raise ValueError("zero_dropped_ needs a contiguous tensor")
    if dropout_p <= 0.0 or t.numel() == 0:
        return t
    M, K = (t.shape[-2], t.shape[-1]) if t.dim() >= 2 else (1, t.numel())
    rows_total = t.numel() // K
    grid = (triton.cdiv(rows_total, BLOCK_ROWS), triton.cdiv(K, BLOCK_COLS))
    launch(zero_dropped_kernel)[grid](**zero_dropped_arguments(
        t=t, seed=seed, rows_total=rows_total, M=M, K=K, keep_threshold=keep_threshold(dropout_p),
        int64=needs_int64(t)))
    return t


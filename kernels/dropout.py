"""The dropout keep mask: a counter-based Philox-4x32-10 stream, regenerated bit for bit wherever it is needed.

Element (row, col) of an M × K input belongs to counter ``(col // 4, row, 0, 0)`` under key
``(seed & 0xffffffff, seed >> 32)`` and takes word ``col % 4`` of that counter's four output words.  So one
Philox evaluation serves four neighbouring columns, the counters are 32-bit for any M, K < 2^32 (no 64-bit
offset arithmetic, so the stream never depends on whether a launcher picked 64-bit pointer offsets), and
the mask of an element depends only on (seed, row, col): any tile shape, in any kernel, regenerates it.

An element is kept when its word, read as a signed int32, is ``>= threshold`` with
``threshold = -2^31 + round(p · 2^32)`` (``keep_threshold(p)``), i.e. with probability 1 - p up to 2^-32
(the same rule as ``fastlora.reference.cpu_keep_mask``).  The rounds are those of Triton's ``tl.randint4x``
(Philox-4x32-10 constants); ``tests/philox.py`` reproduces the stream in torch for the test oracle.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["keep_threshold", "philox4x32", "keep_mask"]

_PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
_PHILOX_KEY_B = tl.constexpr(0xBB67AE85)
_PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
_PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)


def keep_threshold(dropout_p: float) -> int:
    """Signed int32 threshold: a word ``w`` (as int32) is kept iff ``w >= keep_threshold(p)``."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return min(-(2**31) + round(dropout_p * 2**32), 2**31 - 1)


@triton.jit
def philox4x32(c0, c1, c2, c3, k0, k1):
    """Ten Philox-4x32 rounds on uint32 counters (c0..c3) with uint32 key (k0, k1); returns four uint32 words."""
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(_PHILOX_ROUND_B, a2) ^ c1 ^ k0
        c2 = tl.umulhi(_PHILOX_ROUND_A, a0) ^ c3 ^ k1
        c1 = tl.mul(_PHILOX_ROUND_B, a2, sanitize_overflow=False)
        c3 = tl.mul(_PHILOX_ROUND_A, a0, sanitize_overflow=False)
        k0 = tl.add(k0, _PHILOX_KEY_A, sanitize_overflow=False)
        k1 = tl.add(k1, _PHILOX_KEY_B, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def keep_mask(seed_ptr, rows, col_start, threshold, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Bool (BLOCK_ROWS, BLOCK_COLS) keep mask for ``rows`` (a BLOCK_ROWS vector of row indices) and columns
    ``col_start + arange(BLOCK_COLS)``; ``col_start`` must be a multiple of 4 and BLOCK_COLS of 4."""
    seed = tl.load(seed_ptr).to(tl.int64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    groups = (col_start // 4 + tl.arange(0, BLOCK_COLS // 4)).to(tl.uint32)
    c1 = rows.to(tl.uint32)[:, None] + tl.zeros((BLOCK_ROWS, BLOCK_COLS // 4), dtype=tl.uint32)
    c0 = groups[None, :] + tl.zeros((BLOCK_ROWS, BLOCK_COLS // 4), dtype=tl.uint32)
    zero = tl.zeros((BLOCK_ROWS, BLOCK_COLS // 4), dtype=tl.uint32)
    w0, w1, w2, w3 = philox4x32(c0, c1, zero, zero, k0, k1)
    # Interleave so column 4g + w takes word w of group g.  tl.join appends its new axis last, so the outer
    # join indexes the lowest bit of w: (g, w >> 1, w & 1) → 4g + w after the row-major reshape.
    words = tl.join(tl.join(w0, w2), tl.join(w1, w3))
    words = tl.reshape(words, (BLOCK_ROWS, BLOCK_COLS))
    return words.to(tl.int32, bitcast=True) >= threshold

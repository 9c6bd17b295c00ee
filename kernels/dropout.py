"""The dropout keep mask: a counter-based Philox-4x32-10 stream, regenerated bit for bit wherever it is needed.

Element (row, col) of an M × K input belongs to counter ``(col // 8, row, 0, 0)`` under key
``(seed & 0xffffffff, seed >> 32)``; of that counter's four 32-bit output words it takes word ``(col % 8) // 2``,
low half (bits 0-15) for even ``col``, high half for odd.  So one Philox evaluation (~60 integer instructions)
serves eight neighbouring columns — the mask is regenerated three times per training step (S, dA, dx), so
its cost counts — the counters are 32-bit for any M, K < 2^32 (no 64-bit offset arithmetic: the stream never
depends on whether a launcher picked 64-bit pointer offsets), and an element's mask depends only on
(seed, row, col), so any tile shape in any kernel regenerates it.

An element is kept when its 16-bit value is ``>= keep_threshold(p) = round(p · 2^16)``: probability
1 - p up to 2^-17.  The rounds and constants are those of Triton's ``tl.randint4x`` (Philox-4x32-10);
``tests/philox.py`` reproduces the stream in torch for the test oracle and checks it against tl.randint4x.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["keep_threshold", "philox4x32", "philox_key", "keep_mask"]

_PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
_PHILOX_KEY_B = tl.constexpr(0xBB67AE85)
_PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
_PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)


def keep_threshold(dropout_p: float) -> int:
    """Threshold in [0, 2^16]: an element whose 16-bit value is ``>= keep_threshold(p)`` is kept."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return round(dropout_p * 2**16)


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
def philox_key(seed_ptr):
    """The Philox key (k0, k1) from the int64 seed tensor: load it once per program, outside loops."""
    seed = tl.load(seed_ptr).to(tl.int64)
    return (seed & 0xFFFFFFFF).to(tl.uint32), ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def keep_mask(k0, k1, rows, col_start, threshold, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Bool (BLOCK_ROWS, BLOCK_COLS) keep mask under key (k0, k1) for ``rows`` (a BLOCK_ROWS vector of row
    indices) and columns ``col_start + arange(BLOCK_COLS)``; ``col_start`` and BLOCK_COLS multiples of 8."""
    zero = tl.zeros((BLOCK_ROWS, BLOCK_COLS // 8), dtype=tl.uint32)
    c0 = (col_start // 8 + tl.arange(0, BLOCK_COLS // 8)).to(tl.uint32)[None, :] + zero
    c1 = rows.to(tl.uint32)[:, None] + zero
    w0, w1, w2, w3 = philox4x32(c0, c1, zero, zero, k0, k1)
    # Column 8g + j takes half j % 2 of word j // 2.  tl.join appends its new axis last, so after three joins
    # the axes are (g, bit 2 of j, bit 1, bit 0) and a row-major reshape puts element j at 8g + j.
    lo0, hi0 = w0 & 0xFFFF, w0 >> 16
    lo1, hi1 = w1 & 0xFFFF, w1 >> 16
    lo2, hi2 = w2 & 0xFFFF, w2 >> 16
    lo3, hi3 = w3 & 0xFFFF, w3 >> 16
    even = tl.join(tl.join(lo0, lo2), tl.join(lo1, lo3))  # j = 0, 4, 2, 6 → (bit 2, bit 1)
    odd = tl.join(tl.join(hi0, hi2), tl.join(hi1, hi3))  # j = 1, 5, 3, 7
    halves = tl.reshape(tl.join(even, odd), (BLOCK_ROWS, BLOCK_COLS))
    return halves.to(tl.int32, bitcast=True) >= threshold

"""Philox-4x32-10 in plain torch (int64 arithmetic), independent of the kernels: the test oracle's mask.

Mirrors the stream documented in ``kernels/dropout.py``: element (row, col) uses counter
``(col // 8, row, 0, 0)``, key ``(seed & 0xffffffff, seed >> 32)``, the low (even col) or high (odd col)
16 bits of word ``(col % 8) // 2``, and is kept when that value is ``>= round(p · 2^16)``.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57


def _mul_hi_lo(a: torch.Tensor, const: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a * const for uint32 values held in int64 (no int64 overflow)."""
    c_hi, c_lo = const >> 16, const & 0xFFFF
    lo_part = a * c_lo  # < 2^48
    hi = (a * c_hi + (lo_part >> 16)) >> 16
    lo = (a * const) & _MASK32  # wraps modulo 2^64; the low 32 bits stay exact
    return hi & _MASK32, lo


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Four uint32 output words (as int64 tensors) of Philox-4x32-10 for counters c0..c3 (int64 tensors)."""
    c0, c1, c2, c3 = (torch.as_tensor(c).to(torch.int64) & _MASK32 for c in (c0, c1, c2, c3))
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(c2, _ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def randint4x(seed: int, offsets: torch.Tensor):
    """What ``tl.randint4x(seed, offsets)`` returns (as uint32 values in int64): counter (lo, hi, 0, 0)."""
    offsets = offsets.to(torch.int64)
    seed &= (1 << 64) - 1
    zero = torch.zeros_like(offsets)
    return philox4x32_10(offsets & _MASK32, (offsets >> 32) & _MASK32, zero, zero, seed & _MASK32, seed >> 32)


def keep_threshold(dropout_p: float) -> int:
    return round(dropout_p * 2**16)


def keep_mask(seed: int, rows: int, cols: int, dropout_p: float, device="cpu", row_start: int = 0) -> torch.Tensor:
    """Bool (rows, cols) keep mask of the kernels' stream for ``seed``, rows ``row_start ... row_start+rows-1``."""
    seed &= (1 << 64) - 1
    groups = (cols + 7) // 8
    g = torch.arange(groups, dtype=torch.int64, device=device)[None, :].expand(rows, groups)
    r = torch.arange(row_start, row_start + rows, dtype=torch.int64, device=device)[:, None].expand(rows, groups)
    zero = torch.zeros_like(g)
    words = philox4x32_10(g, r, zero, zero, seed & _MASK32, seed >> 32)
    halves = [h for w in words for h in (w & 0xFFFF, w >> 16)]  # j = 2·word + half
    values = torch.stack(halves, dim=-1).reshape(rows, groups * 8)[:, :cols]
    return values >= keep_threshold(dropout_p)

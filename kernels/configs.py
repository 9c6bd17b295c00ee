"""Launch configurations: autotune lists for the fused GEMM (Hopper, Ampere), block sizes for the skinny
kernels, the M bucket used as autotune key, and the ``FASTLORA_TRITON_CONFIG`` pin.

``FASTLORA_TRITON_CONFIG="BLOCK_M=128,BLOCK_N=128,BLOCK_K=64,GROUP_M=8,num_warps=8,num_stages=3"`` replaces
the GEMM's autotune list with that one config (keys not given keep the first config's value).  Under the
Triton interpreter (``TRITON_INTERPRET=1``) one small config is used, so tests stay fast and exercise tails.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton

__all__ = [
    "INTERPRET",
    "gemm_configs",
    "config_dicts",
    "pinned_config",
    "m_bucket",
    "rows_blocks",
    "cols_blocks",
    "R_CHUNK_MAX",
    "num_sms",
]

# Read once, as Triton itself does when kernels are decorated.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The low-rank epilogue of the GEMM walks r in chunks of at most this many columns (register budget).
R_CHUNK_MAX = 64

_GEMM_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages).  Pruned by bench/compile_check.py: every entry
# compiles for its architecture with no spill and within shared memory, in fp16, bf16 and fp32 (tf32).
_HOPPER_16BIT = [
    (128, 256, 64, 8, 8, 3),
    (128, 128, 64, 8, 8, 4),
    (128, 128, 64, 8, 4, 4),
    (64, 128, 64, 8, 4, 4),
    (128, 64, 64, 8, 4, 4),
    (64, 64, 64, 8, 4, 4),
]
_AMPERE_16BIT = [
    (128, 256, 32, 8, 8, 3),
    (128, 128, 32, 8, 4, 4),
    (128, 64, 32, 8, 4, 4),
    (64, 128, 32, 8, 4, 4),
    (64, 64, 32, 8, 4, 4),
]
_FP32 = [
    (128, 128, 32, 8, 8, 3),
    (64, 128, 32, 8, 4, 3),
    (64, 64, 32, 8, 4, 3),
]
_INTERPRETER = [(32, 32, 32, 4, 4, 1)]


def _arch() -> int:
    if torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        return major * 10
    return 90


def config_dicts(arch: int, fp32: bool) -> list[dict]:
    """The GEMM's config list for an architecture (80, 90, ...) and operand class, as dicts."""
    if fp32:
        table = _FP32
    else:
        table = _HOPPER_16BIT if arch >= 90 else _AMPERE_16BIT
    return [dict(zip(_GEMM_KEYS, row)) for row in table]


def pinned_config() -> dict | None:
    """The config pinned by FASTLORA_TRITON_CONFIG, or None."""
    spec = os.environ.get("FASTLORA_TRITON_CONFIG", "").strip()
    if not spec:
        return None
    out = dict(zip(_GEMM_KEYS, _HOPPER_16BIT[1]))
    for item in spec.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in out:
            raise ValueError(f"FASTLORA_TRITON_CONFIG: unknown key {key!r} (known: {', '.join(_GEMM_KEYS)})")
        out[key] = int(value)
    return out


def _to_config(d: dict) -> triton.Config:
    meta = {k: d[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
    return triton.Config(meta, num_warps=d["num_warps"], num_stages=d["num_stages"])


@lru_cache(maxsize=None)
def gemm_configs(fp32: bool) -> tuple[triton.Config, ...]:
    """Autotune configs for the fused GEMM on the current device."""
    if INTERPRET:
        return tuple(_to_config(dict(zip(_GEMM_KEYS, row))) for row in _INTERPRETER)
    pinned = pinned_config()
    if pinned is not None:
        return (_to_config(pinned),)
    return tuple(_to_config(d) for d in config_dicts(_arch(), fp32))


def m_bucket(m: int) -> int:
    """Autotune key for the token count: the next power of two (at least 16), so each bucket tunes once."""
    return max(16, triton.next_power_of_2(int(m)))


@lru_cache(maxsize=None)
def num_sms() -> int:
    if INTERPRET or not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def rows_blocks(block_r: int) -> dict:
    """Blocks for the row-skinny kernel (S = x Aᵀ; dS, dB from dy): rows per program shrink as r grows."""
    if INTERPRET:
        return dict(BLOCK_M=32, BLOCK_D=32, num_warps=4, num_stages=1)
    block_m = 64 if block_r <= 64 else (32 if block_r <= 128 else 16)
    return dict(BLOCK_M=block_m, BLOCK_D=64 if block_r <= 128 else 32, num_warps=4, num_stages=3)


def cols_blocks(block_r: int) -> dict:
    """Blocks for the column-skinny kernel (dA = dSᵀ h)."""
    if INTERPRET:
        return dict(BLOCK_M=32, BLOCK_D=32, num_warps=4, num_stages=1)
    block_d = 128 if block_r <= 32 else (64 if block_r <= 128 else 32)
    return dict(BLOCK_M=64, BLOCK_D=block_d, num_warps=4, num_stages=3)

"""Launch configurations: autotune lists for the fused GEMM (Hopper, Ampere), block sizes for the skinny
kernels, the M bucket used as autotune key, and the ``FASTLORA_TRITON_CONFIG`` pin.

``FASTLORA_TRITON_CONFIG="BLOCK_M=128,BLOCK_N=128,BLOCK_K=64,GROUP_M=8,num_warps=8,num_stages=3"`` replaces
the GEMMs' autotune lists (LoRA's fused GEMM and DoRA's) with that one config (keys not given keep the first
config's value; a tile too large for DoRA's two accumulators spills there, which is slow, not wrong).  The fused
GEMM's schedule flags ``TMA=1`` and ``PERSISTENT=1`` may be added (TMA only where the operands allow it; the
other GEMMs ignore both).  Under the Triton interpreter (``TRITON_INTERPRET=1``) one small config is used, so
tests stay fast and exercise tails.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from functools import lru_cache

import torch
import triton

__all__ = [
    "INTERPRET",
    "SCHEDULE_FLAGS",
    "gemm_configs",
    "dora_gemm_configs",
    "dora_config_dicts",
    "gemm4bit_configs",
    "gemm4bit_config_dicts",
    "config_dicts",
    "pinned_config",
    "pin_gemm_config",
    "parse_config",
    "m_bucket",
    "rows_blocks",
    "skinny_block_r",
    "SKINNY_R_MAX",
    "cols_blocks",
    "r_chunk",
    "num_sms",
]

# Read once, as Triton itself does when kernels are decorated.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The GEMM's low-rank prologue walks r in chunks of at most this many columns (register budget): fp32
# adapters (and fp32 FMA dots) take twice the registers per element, hence the smaller chunk.
R_CHUNK_16BIT = 64
R_CHUNK_FP32 = 16

_GEMM_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
# The fused GEMM's schedule flags (its constexprs; absent from a config: off).  TMA: A and B read through
# tensor-memory-accelerator descriptors; PERSISTENT: one program per SM walking the tiles.
SCHEDULE_FLAGS = ("TMA", "PERSISTENT")

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages).  Pruned by bench/compile_check.py: every entry
# compiles for its architecture with no spill and within shared memory, in fp16, bf16 and fp32 (tf32, ieee).
# The masked lists serve the dx GEMM with dropout, whose prologue holds Philox state beside the accumulator.
_TABLES = {
    # (arch class, fp32, masked)
    ("hopper", False, False): [
        (128, 256, 64, 8, 8, 3),
        (128, 128, 64, 8, 8, 4),
        (128, 128, 64, 8, 4, 4),
        (64, 128, 64, 8, 4, 4),
        (128, 64, 64, 8, 4, 4),
        (64, 64, 64, 8, 4, 4),
    ],
    ("hopper", False, True): [
        (128, 128, 64, 8, 8, 4),
        (64, 128, 64, 8, 4, 4),
        (128, 64, 64, 8, 4, 4),
        (64, 64, 64, 8, 4, 4),
    ],
    ("ampere", False, False): [
        (128, 256, 32, 8, 8, 3),
        (128, 128, 32, 8, 8, 3),
        (128, 64, 32, 8, 4, 4),
        (64, 128, 32, 8, 4, 4),
        (64, 64, 32, 8, 4, 4),
    ],
    ("ampere", False, True): [
        (128, 128, 32, 8, 8, 3),
        (64, 128, 32, 8, 4, 4),
        (64, 64, 32, 8, 4, 4),
    ],
    ("hopper", True, False): [
        (128, 128, 32, 8, 8, 3),
        (64, 128, 32, 8, 4, 3),
        (64, 64, 32, 8, 4, 3),
    ],
    ("hopper", True, True): [
        (128, 128, 32, 8, 8, 3),
        (64, 128, 32, 8, 4, 3),
        (64, 64, 32, 8, 4, 3),
    ],
    ("ampere", True, False): [
        (128, 128, 32, 8, 8, 3),
        (64, 128, 32, 8, 4, 3),
        (64, 64, 32, 8, 4, 3),
    ],
    ("ampere", True, True): [
        (128, 128, 32, 8, 8, 3),
        (64, 64, 32, 8, 4, 3),
    ],
}
_INTERPRETER = [(32, 32, 32, 4, 4, 1)]

# Hopper candidates for 16-bit operands that read A and B through TMA descriptors (sm_90's bulk tensor copies
# feeding wgmma), one tile per program or persistent, beside the classic lists above, all in one autotune so that
# the first GPU run picks per shape.  (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, TMA,
# PERSISTENT); chosen with bench/compile_check.py as the lists above (no spills with triton 3.6 and 3.9: the
# 4-warp persistent tiles spill), which also proves wgmma and cp.async.bulk.tensor in their PTX.  Warp
# specialization (``tl.range(..., warp_specialize=True)`` on the K loop or the persistent loop) is not among them:
# for sm_90 triton 3.6 and 3.9 compile it to PTX byte-identical to the plain loop, or fail to compile it.
_HOPPER_TMA = {
    # masked
    False: [
        (128, 256, 64, 8, 8, 3, 1, 0),
        (128, 128, 64, 8, 8, 4, 1, 0),
        (128, 256, 64, 8, 8, 3, 1, 1),
        (128, 128, 64, 8, 8, 4, 1, 1),
    ],
    True: [
        (128, 128, 64, 8, 8, 4, 1, 0),
        (128, 128, 64, 8, 8, 4, 1, 1),
    ],
}


def _arch() -> int:
    if torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        return major * 10
    return 90


# With the low-rank term after the main loop, its tile's accumulator lives beside the main one: tiles whose
# accumulator takes more than this many fp32 values per thread spill there.
_LOW_RANK_LAST_ACC_PER_THREAD = 64


def config_dicts(arch: int, fp32: bool, masked: bool = False, low_rank_last: bool = False, tma: bool = False
                 ) -> list[dict]:
    """The GEMM's config list for an architecture (80, 90, ...), operand class, masked prologue or not, and
    schedule (``low_rank_last``: the low-rank term after the main loop), as dicts; ``tma``: with the Hopper
    TMA candidates (16-bit operands on sm_90 and later, whose layout TMA can read)."""
    table = _TABLES[("hopper" if arch >= 90 else "ampere", fp32, masked)]
    dicts = [dict(zip(_GEMM_KEYS, row)) for row in table]
    if tma and arch >= 90 and not fp32:
        dicts += [dict(zip(_GEMM_KEYS + SCHEDULE_FLAGS, row)) for row in _HOPPER_TMA[masked]]
    if low_rank_last:
        dicts = [d for d in dicts
                 if d["BLOCK_M"] * d["BLOCK_N"] <= _LOW_RANK_LAST_ACC_PER_THREAD * 32 * d["num_warps"]]
    return dicts


# DoRA's GEMM (dora.py): its epilogue holds z, g and the output; with dropout a second accumulator and, forward,
# the Philox state inside the main loop.  Chosen with bench/compile_check.py as the lists above (no spills with
# triton 3.6 and 3.9), per class of dots: 16-bit operands, fp32 ones as tf32, and exact fp32 ("ieee": FMA
# dots on the CUDA cores, which take the most registers and need no tile shape that wgmma wants).
_DORA_TABLES = {
    # (arch class, dots, dropout)
    ("hopper", "16-bit", False): [
        (128, 128, 64, 8, 8, 4),
        (64, 128, 64, 8, 4, 4),
        (128, 64, 64, 8, 4, 4),
        (64, 64, 64, 8, 4, 4),
    ],
    ("hopper", "16-bit", True): [
        (128, 128, 64, 8, 8, 4),
        (64, 128, 64, 8, 4, 4),
        (64, 64, 64, 8, 4, 4),
    ],
    ("ampere", "16-bit", False): [
        (128, 128, 32, 8, 8, 3),
        (128, 64, 32, 8, 4, 4),
        (64, 64, 32, 8, 4, 4),
    ],
    ("ampere", "16-bit", True): [
        (128, 128, 32, 8, 8, 3),
        (64, 128, 32, 8, 4, 4),
        (64, 64, 32, 8, 4, 4),
    ],
    ("hopper", "tf32", False): [(64, 64, 32, 8, 4, 3)],
    ("hopper", "tf32", True): [(64, 64, 32, 8, 8, 3)],
    ("ampere", "tf32", False): [
        (128, 128, 32, 8, 8, 3),
        (64, 128, 32, 8, 4, 3),
        (64, 64, 32, 8, 4, 3),
    ],
    ("ampere", "tf32", True): [
        (64, 64, 32, 8, 8, 3),
        (32, 64, 32, 8, 4, 3),
    ],
    ("hopper", "ieee", False): [(64, 32, 32, 8, 4, 3), (32, 32, 32, 8, 4, 3)],
    ("hopper", "ieee", True): [(32, 32, 32, 8, 4, 3)],
    ("ampere", "ieee", False): [(64, 32, 32, 8, 4, 3), (32, 32, 32, 8, 4, 3)],
    ("ampere", "ieee", True): [(32, 32, 32, 8, 4, 3)],
}


# The GEMM over a 4-bit weight (gemm4bit.py): the main loop dequantizes B's tile in registers (a byte, a code and an
# absmax per element), which the dense lists' larger K steps and deeper pipelines spill or overflow shared memory
# with.  Chosen with bench/compile_check.py (triton 3.6 and 3.9): no spills with plain or double-quantized absmax,
# 32- or 64-bit offsets, wgmma on sm_90, the fp32 adapters' prologue in tf32 as launched (triton 3.6 spills 64-wide
# K steps, 64 × 128 tiles and, with the mask on sm_80, three-stage 128-row tiles and a two-stage 64 × 64 tile on
# four warps).  16-bit
# operands only (a QLoRA compute dtype).
_GEMM4BIT_TABLES = {
    # (arch class, masked low-rank term: the dx GEMM with dropout)
    ("hopper", False): [(128, 64, 32, 8, 4, 3), (128, 128, 32, 8, 8, 3), (64, 64, 32, 8, 4, 2)],
    ("hopper", True): [(128, 64, 32, 8, 4, 3), (128, 128, 32, 8, 8, 3), (64, 64, 32, 8, 4, 2)],
    ("ampere", False): [(128, 64, 32, 8, 4, 3), (128, 128, 32, 8, 8, 3), (64, 64, 32, 8, 4, 2)],
    ("ampere", True): [(128, 64, 32, 8, 4, 2), (64, 64, 32, 8, 4, 3), (64, 64, 32, 8, 8, 2)],
}


def gemm4bit_config_dicts(arch: int, masked: bool) -> list[dict]:
    """The 4-bit GEMM's config list for an architecture and masked low-rank term or not, as dicts."""
    return [dict(zip(_GEMM_KEYS, row)) for row in _GEMM4BIT_TABLES[("hopper" if arch >= 90 else "ampere", masked)]]


@lru_cache(maxsize=None)
def gemm4bit_configs(masked: bool) -> tuple[triton.Config, ...]:
    """Autotune configs for the 4-bit GEMM on the current device."""
    return _autotune_list(lambda: gemm4bit_config_dicts(_arch(), masked))


def dora_config_dicts(arch: int, dots: str, dropout: bool) -> list[dict]:
    """DoRA's GEMM config list for an architecture, class of dots ("16-bit", "tf32", "ieee") and dropout."""
    return [dict(zip(_GEMM_KEYS, row)) for row in _DORA_TABLES[("hopper" if arch >= 90 else "ampere", dots, dropout)]]


def parse_config(spec: str) -> dict:
    """``"BLOCK_M=128,BLOCK_N=128,..."`` → a config dict (keys not given keep the default Hopper config's)."""
    out = dict(zip(_GEMM_KEYS, _TABLES[("hopper", False, False)][1]))
    for item in spec.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in out and key not in SCHEDULE_FLAGS:
            raise ValueError(f"GEMM config: unknown key {key!r} (known: {', '.join(_GEMM_KEYS + SCHEDULE_FLAGS)})")
        out[key] = int(value)
    return out


def pinned_config() -> dict | None:
    """The config pinned by ``pin_gemm_config`` or else by FASTLORA_TRITON_CONFIG, or None."""
    if _OVERRIDE is not None:
        return dict(_OVERRIDE)
    spec = os.environ.get("FASTLORA_TRITON_CONFIG", "").strip()
    return parse_config(spec) if spec else None


_OVERRIDE: dict | None = None


@contextmanager
def pin_gemm_config(config: dict | str):
    """Within the block, the fused GEMM runs this one config (dict or FASTLORA_TRITON_CONFIG syntax) instead of
    autotuning: for tests, and for benchmarking one config.  Not thread-safe."""
    global _OVERRIDE
    previous = _OVERRIDE
    _OVERRIDE = parse_config(config) if isinstance(config, str) else dict(config)
    for configs in (gemm_configs, dora_gemm_configs, gemm4bit_configs):
        configs.cache_clear()
    try:
        yield
    finally:
        _OVERRIDE = previous
        for configs in (gemm_configs, dora_gemm_configs, gemm4bit_configs):
            configs.cache_clear()


def _to_config(d: dict, flags: bool = False, tma: bool = False) -> triton.Config:
    """A triton.Config of a config dict; ``flags``: the kernel takes the schedule flags (the fused GEMM), with TMA
    only where its operands allow it (``tma``)."""
    meta = {k: d[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
    if flags:
        meta.update({k: bool(d.get(k, 0)) for k in SCHEDULE_FLAGS})
        meta["TMA"] = meta["TMA"] and tma
    return triton.Config(meta, num_warps=d["num_warps"], num_stages=d["num_stages"])


@lru_cache(maxsize=None)
def gemm_configs(fp32: bool, masked: bool, low_rank_last: bool = False, tma: bool = False
                 ) -> tuple[triton.Config, ...]:
    """Autotune configs for the fused GEMM on the current device (``masked``: the dropout-masked low-rank
    term; ``low_rank_last``: that term after the main loop; ``tma``: its operands can be read through TMA
    descriptors, so the Hopper TMA candidates join the list, and a pinned config may ask for TMA)."""
    return _autotune_list(lambda: config_dicts(_arch(), fp32, masked, low_rank_last, tma), flags=True, tma=tma)


@lru_cache(maxsize=None)
def dora_gemm_configs(dots: str, dropout: bool) -> tuple[triton.Config, ...]:
    """Autotune configs for DoRA's GEMM on the current device (``dots`` as in ``dora_config_dicts``)."""
    return _autotune_list(lambda: dora_config_dicts(_arch(), dots, dropout))


def _autotune_list(dicts, flags: bool = False, tma: bool = False) -> tuple[triton.Config, ...]:
    if _OVERRIDE is not None:  # an explicit pin wins, under the interpreter too (tests of real configs)
        return (_to_config(_OVERRIDE, flags, tma),)
    if INTERPRET:
        return tuple(_to_config(dict(zip(_GEMM_KEYS, row)), flags) for row in _INTERPRETER)
    pinned = pinned_config()
    if pinned is not None:
        return (_to_config(pinned, flags, tma),)
    return tuple(_to_config(d, flags, tma) for d in dicts())


def r_chunk(block_r: int, adapter_fp32: bool) -> int:
    """BLOCK_R of the GEMM's low-rank prologue for a padded rank ``block_r``."""
    return min(block_r, R_CHUNK_FP32 if adapter_fp32 else R_CHUNK_16BIT)


def m_bucket(m) -> int:
    """Autotune key for the token count: the next power of two (at least 16), so each bucket tunes once.

    Found by comparisons, not ``int(m)``: under torch.compile with dynamic shapes ``m`` is a SymInt, and
    comparisons only guard on the bucket's range (one graph per bucket) where ``int`` would pin one M."""
    bucket = 16
    while bucket < m:
        bucket *= 2
    return bucket


@lru_cache(maxsize=None)
def num_sms() -> int:
    """Streaming multiprocessors of the current GPU (2 under the interpreter: tests then see both split and
    unsplit reductions at small sizes)."""
    if INTERPRET or not torch.cuda.is_available():
        return 2
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


# The skinny kernels hold a (rows × BLOCK_R) accumulator: ranks above this take several program columns.
SKINNY_R_MAX = 128


def skinny_block_r(r: int) -> int:
    """BLOCK_R of the skinny kernels: r padded to a power of two >= 16 (tl.dot), at most SKINNY_R_MAX."""
    return min(SKINNY_R_MAX, max(16, triton.next_power_of_2(int(r))))


# Chosen with bench/compile_check.py: no spills on sm_80 / sm_90 in fp16, bf16, bf16 + fp32 adapters, fp32,
# with triton 3.6 and 3.9.  Rows per program as large as registers allow: the dB partial sums (fp32 reductions
# into N × r) number cdiv(M, BLOCK_M) · N · r.
_ROWS = {16: (128, 64, 8, 3), 32: (128, 64, 8, 3), 64: (64, 32, 8, 3), 128: (32, 32, 4, 3)}
_COLS = {16: (64, 128, 8, 3), 32: (64, 64, 8, 3), 64: (64, 128, 8, 3), 128: (64, 64, 8, 3)}
# fp32 adapters under torch's default matmul precision ("highest"): exact fp32 dots (fp32 x or dy) and 3×tf32
# dots (16-bit x or dy) take more registers, so smaller tiles (chosen the same way, with room to spare: the
# ones above spill up to 4.7 KB there).
_ROWS_EXACT = {16: (64, 32, 8, 3), 32: (32, 32, 4, 3), 64: (32, 32, 8, 3), 128: (32, 32, 8, 3)}
_COLS_EXACT = {16: (16, 128, 8, 3), 32: (32, 32, 8, 3), 64: (32, 32, 8, 3), 128: (16, 32, 8, 3)}
_SKINNY_KEYS = ("BLOCK_M", "BLOCK_D", "num_warps", "num_stages")
_SKINNY_INTERPRETER = (32, 32, 4, 1)


def rows_blocks(block_r: int, exact_fp32: bool = False) -> dict:
    """Blocks for the row-skinny kernel (S = x Aᵀ; dS, dB from dy) at a skinny BLOCK_R (``exact_fp32``: its
    dots are exact fp32 ones)."""
    table = _ROWS_EXACT if exact_fp32 else _ROWS
    return dict(zip(_SKINNY_KEYS, _SKINNY_INTERPRETER if INTERPRET else table[block_r]))


def cols_blocks(block_r: int, exact_fp32: bool = False) -> dict:
    """Blocks for the column-skinny kernel (dA = dSᵀ h) at a skinny BLOCK_R (``exact_fp32`` as above)."""
    table = _COLS_EXACT if exact_fp32 else _COLS
    return dict(zip(_SKINNY_KEYS, _SKINNY_INTERPRETER if INTERPRET else table[block_r]))

"""Schedules: how one call of a LoRA (or DoRA) layer is computed, chosen once per call.

:func:`fastlora.functional.lora_linear` resolves the schedule from the layer's ``backend``, the device of x
and ``FASTLORA_KERNEL_VARIANTS``; the ops receive it as its key (a string, what an op schema can carry) and
every choice below them reads the :class:`Schedule`, never the environment.

    torch    the torch path (fastlora.torch_path): the CPU backend, and backend="torch" on any device
    triton   the Triton kernels (CUDA's default): the rank-r kernels and, for the base product, ``base``

A kernel schedule has variants the GPU check times side by side, the first choice the default:

    base       "cublas": the base product x Wᵀ + b (forward) and dy W (dx) by cuBLAS, then one memory-bound
               Triton pass adds the low-rank term in place (one more read and write of y / dx); "fused": one
               Triton GEMM with the low-rank term in its accumulator (y / dx written once).  cuBLAS is the
               default until a GPU run shows the Triton GEMM matching it: its cost is the frozen layer's plus
               rank-sized work plus one pass over the output, never more than PEFT's chain
    db         "atomic": dB accumulated with fp32 atomics in the pass that computes dS from dy (one read of
               dy); "separate": reduced over M in a pass of its own (a second read of dy, no atomics)
    low_rank   the fused GEMMs' low-rank term before ("prologue") or after ("epilogue") the main loop (base="fused")
    dora       DoRA on its own kernels ("fused": their own GEMMs, whatever ``base``) or composed of the LoRA
               kernels and torch passes ("composed", which follows ``base``)
    base_4bit  a bitsandbytes 4-bit base's product (one active LoRA adapter): "dequant", bitsandbytes' own
               (the weight dequantized to 16 bits, then cuBLAS, forward and for dx) with the low-rank term added
               after; "fused", one Triton GEMM that dequantizes the weight tile by tile in its main loop with the
               low-rank term in its accumulator (no 16-bit copy of the weight).  "dequant" is the default until a
               GPU run records where the fused GEMM wins (it reads a quarter of the weight's bytes, so it can win
               where the product is memory-bound: few tokens)

``FASTLORA_KERNEL_VARIANTS="db=separate,low_rank=epilogue"`` or :func:`use_kernel_variants` choose them.
A variant neither names is taken from the schedule table, ``fastlora/data/kernel_schedules.json``: the winner per
(token count, N, K) class that a GPU run measured (a class may decide some variants only: bench/qlora_crossover.py
decides ``base_4bit``, bench/kernel_variants.py ``base``, ``db`` and ``low_rank``; ``dora`` keeps its default).
A call reads the variants of its kind (:data:`DENSE_VARIANTS`, :data:`QUANTIZED_VARIANTS`).  A shape of no class,
or a token count more than twice away from its class's range, takes the defaults above: with the table empty (no
GPU run yet), every shape does.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources

from torch import Tensor

__all__ = ["Schedule", "SCHEDULES", "VARIANTS", "DENSE_VARIANTS", "QUANTIZED_VARIANTS", "BACKENDS", "resolve",
           "kernel_schedule", "use_kernel_variants", "schedule_table", "table_variants", "triton_interpreter_on"]

BACKENDS = ("auto", "torch", "triton")
VARIANTS = {"base": ("cublas", "fused"), "db": ("atomic", "separate"), "low_rank": ("prologue", "epilogue"),
            "dora": ("fused", "composed"), "base_4bit": ("dequant", "fused")}


@dataclass(frozen=True)
class Schedule:
    """One way to compute a call: ``name`` one of :data:`SCHEDULES`, with the kernel variants (ignored by the
    torch schedule)."""

    name: str
    base: str = VARIANTS["base"][0]
    db: str = VARIANTS["db"][0]
    low_rank: str = VARIANTS["low_rank"][0]
    dora: str = VARIANTS["dora"][0]
    base_4bit: str = VARIANTS["base_4bit"][0]

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"schedule {self.name!r}: choose from {sorted(SCHEDULES)}")
        for variant, choices in VARIANTS.items():
            if getattr(self, variant) not in choices:
                raise ValueError(f"kernel variant {variant}={getattr(self, variant)!r}: choose from {'|'.join(choices)}")

    @property
    def uses_kernels(self) -> bool:
        return SCHEDULES[self.name]

    @property
    def key(self) -> str:
        """The schedule as the ops carry it, the name and every variant:
        ``"triton:base=cublas,db=atomic,low_rank=prologue,dora=fused,base_4bit=dequant"``."""
        if not self.uses_kernels:
            return self.name
        return self.name + ":" + ",".join(f"{v}={getattr(self, v)}" for v in VARIANTS)

    @staticmethod
    def from_key(key: str) -> "Schedule":
        schedule = _PARSED.get(key)
        if schedule is None:  # a plain dict, not functools' cache: torch.compile traces through this
            name, _, variants = key.partition(":")
            schedule = _PARSED[key] = Schedule(name, **_parse_variants(variants))
        return schedule


# name → whether it runs the Triton kernels
SCHEDULES = {"torch": False, "triton": True}
TORCH = Schedule("torch")
_PARSED: dict[str, Schedule] = {}

_VARIANT_OVERRIDE: dict[str, str] = {}


def _parse_variants(spec: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (i.strip() for i in spec.split(","))):
        name, _, choice = item.partition("=")
        if name not in VARIANTS or choice not in VARIANTS[name]:
            raise ValueError(f"kernel variant {item!r}: choose from "
                             + "; ".join(f"{k}={'|'.join(v)}" for k, v in VARIANTS.items()))
        out[name] = choice
    return out


def _read_table() -> list[dict]:
    text = resources.files("fastlora").joinpath("data", "kernel_schedules.json").read_text()
    return json.loads(text)["classes"]


# Read with the module, not on first use: the first use may be inside torch.compile, which cannot trace a file
# read (a graph break, or an error under fullgraph=True).
_TABLE: list[dict] = _read_table()


def schedule_table() -> list[dict]:
    """The classes of ``fastlora/data/kernel_schedules.json``: each ``{"N", "K", "tokens": [lo, hi], "variants"}``."""
    return _TABLE


def table_variants(tokens: int, N: int, K: int, table: list[dict] | None = None,
                   variants: tuple[str, ...] = tuple(VARIANTS)) -> dict[str, str]:
    """The ``variants`` the table gives an (tokens × K) → N call, each from the first class of the same N, K that
    decides it and whose token range holds ``tokens``, else whose range widened by a factor of 2 each way holds
    it; a variant no such class decides is left out (its default).  Integer comparisons only, and only with the
    classes deciding one of ``variants``: under torch.compile with a dynamic token count each one is a guard, so
    the graphs are at most as many as those classes (a dense layer's call does not split at the 4-bit run's
    token ranges)."""
    classes = [e for e in (schedule_table() if table is None else table)
               if (e["N"], e["K"]) == (N, K) and any(v in e["variants"] for v in variants)]
    chosen: dict[str, str] = {}
    for widen in (False, True):
        for entry in classes:
            lo, hi = entry["tokens"]
            if (lo + 1) // 2 <= tokens <= 2 * hi if widen else lo <= tokens <= hi:
                for variant, choice in entry["variants"].items():
                    if variant in variants:
                        chosen.setdefault(variant, choice)
    return chosen


# The variants a call over a dense (or Conv1D, or expert) weight reads, and those of a bitsandbytes 4-bit one.
DENSE_VARIANTS = ("base", "db", "low_rank", "dora")
QUANTIZED_VARIANTS = ("base_4bit", "db")


def kernel_schedule(tokens: int | None = None, N: int | None = None, K: int | None = None,
                    variants: tuple[str, ...] = DENSE_VARIANTS) -> Schedule:
    """The kernel schedule: the variants ``FASTLORA_KERNEL_VARIANTS`` and :func:`use_kernel_variants` choose,
    the others (of ``variants``, those the call reads) from the schedule table for a (tokens × K) → N call when
    the shape is given, else the defaults."""
    chosen = table_variants(tokens, N, K, variants=variants) if tokens is not None and schedule_table() else {}
    chosen.update(_parse_variants(os.environ.get("FASTLORA_KERNEL_VARIANTS", "")))
    chosen.update(_VARIANT_OVERRIDE)
    return Schedule("triton", **chosen)


@contextmanager
def use_kernel_variants(**choices: str):
    """Within the block, kernel schedules take these variants (for tests and benchmarks; not thread-safe)."""
    chosen = _parse_variants(",".join(f"{k}={v}" for k, v in choices.items()))
    previous = dict(_VARIANT_OVERRIDE)
    _VARIANT_OVERRIDE.update(chosen)
    try:
        yield
    finally:
        _VARIANT_OVERRIDE.clear()
        _VARIANT_OVERRIDE.update(previous)


def triton_interpreter_on() -> bool:
    """Whether Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``) in this process."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON_IMPORTS: bool | None = None  # triton_imports' answer once asked (not functools.cache: Dynamo warns on it)


def triton_imports() -> bool:
    """Whether triton imports here: tried once, on the first call that could use it (a CUDA tensor's), not at
    fastlora's import.  False where it is missing (Windows) or broken, so that CUDA calls keep the torch path and
    the CPU generator's dropout masks rather than fail."""
    global _TRITON_IMPORTS
    if _TRITON_IMPORTS is None:
        try:
            import triton  # noqa: F401

            _TRITON_IMPORTS = True
        except Exception:  # not only ImportError: a broken install can raise anything while importing
            _TRITON_IMPORTS = False
    return _TRITON_IMPORTS


def resolve(backend: str, x: Tensor, weight: Tensor | None = None) -> Schedule:
    """The schedule of one call: "torch" for backend="torch" and off CUDA, the kernel schedule for
    backend="triton" (CUDA, or the CPU under TRITON_INTERPRET=1) and for "auto" on CUDA where triton imports,
    for x's token count and ``weight``'s (N, K) when given."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return TORCH
    if x.is_cuda or (backend == "triton" and triton_interpreter_on()):
        if backend == "auto" and not triton_imports():
            return TORCH
        if weight is None:
            return kernel_schedule()
        N, K = weight.shape
        return kernel_schedule(x.numel() // max(K, 1), N, K)
    if backend == "triton":
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the interpreter); "
            f"x is on {x.device}"
        )
    return TORCH


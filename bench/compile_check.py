"""Compile every fastlora kernel for real GPUs, without one: sm_80 (A100) and sm_90 (H100/H200).

For each kernel, each autotune config (the fused GEMM) or block choice (the skinny kernels), each dtype it
supports (exact-fp32 "ieee" dots included) and each feature variant the launchers use (64-bit offsets, the fp64
scalar arguments torch.compile's Inductor passes), this compiles the kernel ahead of time with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` using a signature that mirrors a real
Llama-shaped launch (16-byte aligned pointers, strides of 1 specialised as Triton does), then reads the
cubin's resources with the ``cuobjdump -res-usage`` that ships in Triton's package.

Fails (exit 1) on a compile error, any spill (STACK or LOCAL > 0), dynamic shared memory above the chip's
limit, a 16-bit / tf32 fused GEMM on sm_90 that does not use ``wgmma.mma_async``, any kernel whose dots
should run on tensor cores (16-bit operands, tf32, 3×tf32 — every kernel of PEFT's default bf16-base /
fp32-adapter setup) and has no ``mma`` instruction, an exact-fp32 kernel that has one (tf32 rounding), or a
3×tf32 kernel with fewer than three times the ``mma`` instructions of its plain-tf32 twin.  Prints one line per GEMM config and per skinny block
choice (worst case over its variants), with whether its tensor-core variants all use them.

    python bench/compile_check.py [--jobs N] [--arch 80,90] [--verbose]

Runs without CUDA; never under TRITON_INTERPRET (removed from the environment before triton is imported).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from fastlora.kernels.common import gemm_precision, small_skinny_tiles  # noqa: E402
from fastlora.kernels.configs import gemm4bit_config_dicts  # noqa: E402
from fastlora.kernels.configs import (  # noqa: E402
    SCHEDULE_FLAGS, cols_blocks, config_dicts, dora_config_dicts, rows_blocks, skinny_block_r,
)
from fastlora.kernels.dora import (  # noqa: E402
    ZERO_DM_BLOCKS, _norm_blocks, dora_gemm_arguments, dora_gemm_kernel, dora_norm_arguments, dora_norm_kernel,
    zero_magnitude_dm_arguments, zero_magnitude_dm_kernel,
)
from fastlora.kernels.dequant4 import BLOCK as DEQUANT4_BLOCK  # noqa: E402
from fastlora.kernels.dequant4 import dequantize_4bit_arguments, dequantize_4bit_kernel  # noqa: E402
from fastlora.kernels.dropout import keep_threshold  # noqa: E402
from fastlora.kernels.gemm import fused_gemm_arguments, fused_gemm_kernel  # noqa: E402
from fastlora.kernels.grouped import (  # noqa: E402
    GROUPED_BLOCKS, segment_matmul_arguments, segment_matmul_kernel, segment_reduce_arguments, segment_reduce_kernel,
)
from fastlora.kernels.gemm4bit import STORED_CODES, fused_gemm_4bit_arguments, fused_gemm_4bit_kernel  # noqa: E402
from fastlora.kernels.low_rank_add import (  # noqa: E402
    LOW_RANK_ADD_BLOCKS, low_rank_add_arguments, low_rank_add_kernel,
)
from fastlora.kernels.masking import BLOCK_COLS, BLOCK_ROWS, zero_dropped_arguments, zero_dropped_kernel  # noqa: E402
from fastlora.kernels.skinny import cols_arguments, cols_kernel, rows_arguments, rows_kernel  # noqa: E402

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # opt-in dynamic shared memory per block
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
KERNELS = {"gemm": fused_gemm_kernel, "low_rank_add": low_rank_add_kernel, "rows": rows_kernel, "cols": cols_kernel,
           "mask": zero_dropped_kernel, "dequant4": dequantize_4bit_kernel, "gemm4bit": fused_gemm_4bit_kernel,
           "grouped_matmul": segment_matmul_kernel, "grouped_reduce": segment_reduce_kernel,
           "dora_gemm": dora_gemm_kernel, "dora_norm": dora_norm_kernel, "dora_zero_dm": zero_magnitude_dm_kernel}

# Llama-3-8B-like launch: 8192 tokens, 4096 → 4096.
M, K, N = 8192, 4096, 4096


@dataclass(frozen=True)
class Ptr:
    dtype: str  # Triton's spelling: fp16, bf16, fp32, i64


class F64(float):
    """A float argument typed fp64, as Inductor types Python floats when it launches a user Triton kernel
    (torch.compile of the kernel path); Triton's own launcher types them fp32."""


@dataclass
class Job:
    kernel: str  # key of KERNELS
    group: str  # the table row this job belongs to
    variant: str
    arch: int
    args: dict
    num_warps: int
    num_stages: int
    needs_wgmma: bool = False
    needs_tensor_cores: bool = False  # 16-bit, tf32 or 3×tf32 dots: an mma instruction must be there
    exact_fp32: bool = False  # "ieee" dots on fp32 operands: no mma instruction may be there (no tf32 rounding)
    # 3×tf32 dots: at least three times the mma instructions of the same kernel compiled with plain tf32 (the
    # two compile to the same instruction; only the count tells 3×tf32 from a silent fallback to tf32)
    triple_tf32: bool = False
    # A and B read through TMA descriptors: the PTX must have bulk tensor copies (cp.async.bulk.tensor)
    needs_bulk_tensor: bool = False


@dataclass
class Result:
    job: Job
    ok: bool = False
    error: str = ""
    regs: int = 0
    stack: int = 0
    local: int = 0
    shared: int = 0
    wgmma: bool = False
    tensor_cores: bool = False
    bulk_tensor: bool = False
    mma_count: int = 0
    seconds: float = 0.0
    problems: list = field(default_factory=list)


def _signature(fn, args: dict):
    """(signature, constexprs, attrs) as Triton's launcher would specialise ``args``."""
    constexpr_names = {p.name for p in fn.params if p.is_constexpr}
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        v = args[name]
        if name in constexpr_names:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, Ptr):
            sig[name] = "*" + v.dtype
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp64" if isinstance(v, F64) else "fp32"
        elif isinstance(v, int):
            if v == 1:
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{name}: {v!r}")
    return sig, consts, attrs


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    out = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        found = [int(v) for v in re.findall(rf"\b{key}:(\d+)", text)]
        out[key] = max(found) if found else 0
    return out


def _compile(job: Job, args: dict):
    fn = KERNELS[job.kernel]
    sig, consts, attrs = _signature(fn, args)
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", job.arch, 32),
                          options={"num_warps": job.num_warps, "num_stages": job.num_stages})


def _mma_count(ptx: str) -> int:
    return len(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)\.", ptx))


def run_job(job: Job) -> Result:
    res = Result(job)
    t0 = time.time()
    try:
        kernel = _compile(job, job.args)
        usage = _resources(kernel.asm["cubin"])
        res.regs, res.stack, res.local = usage["REG"], usage["STACK"], usage["LOCAL"]
        res.shared = max(int(kernel.metadata.shared), usage["SHARED"])
        ptx = kernel.asm["ptx"]
        res.wgmma = "wgmma.mma_async" in ptx
        res.bulk_tensor = "cp.async.bulk.tensor" in ptx
        res.tensor_cores = res.wgmma or "mma.sync" in ptx
        res.mma_count = _mma_count(ptx)
        if job.triple_tf32:
            plain = _mma_count(_compile(job, dict(job.args, PRECISION="tf32")).asm["ptx"])
            if res.mma_count < 3 * plain:
                res.problems.append(f"3×tf32 dots compiled to {res.mma_count} mma instructions, plain tf32 to "
                                    f"{plain}: not three products")
        res.ok = True
    except Exception as exc:  # noqa: BLE001 - every compile failure is a finding
        while exc.__cause__ is not None:  # the root cause, not the call-site frames around it
            exc = exc.__cause__
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        res.error = f"{type(exc).__name__}: {lines[-1][:200] if lines else ''}"
    res.seconds = time.time() - t0
    if not res.ok:
        res.problems = ["compile error: " + res.error]
    else:
        if res.stack or res.local:
            res.problems.append(f"spills (STACK {res.stack}, LOCAL {res.local})")
        if res.shared > SHARED_LIMIT[job.arch]:
            res.problems.append(f"shared {res.shared} B > {SHARED_LIMIT[job.arch]} B")
        if job.needs_wgmma and not res.wgmma:
            res.problems.append("no wgmma on sm_90")
        if job.needs_bulk_tensor and not res.bulk_tensor:
            res.problems.append("no bulk tensor copy (cp.async.bulk.tensor) in a TMA config")
        if job.needs_tensor_cores and not res.tensor_cores:
            res.problems.append("no tensor-core instruction (mma) where its dots should use them")
        if job.exact_fp32 and res.tensor_cores:
            res.problems.append("tensor-core instructions in exact-fp32 dots (they would round to tf32)")
    return res


# ----------------------------------------------------------------------------------------------------------
# The launches to compile (mirroring kernels/forward.py and kernels/backward.py)

# (base dtype, adapter dtype, fp32 dot precision): "ieee" is torch's default matmul precision ("highest"),
# "tf32" what torch.set_float32_matmul_precision("high") gives.  A 16-bit GEMM's fp32 prologue always runs
# tf32 (common.gemm_precision).
DTYPE_VARIANTS_16 = [("fp16", "fp16", "ieee"), ("bf16", "bf16", "ieee"), ("bf16", "fp32", "tf32")]
DTYPE_VARIANTS_32 = [("fp32", "fp32", "tf32"), ("fp32", "fp32", "ieee"), ("fp32", "bf16", "ieee")]


def _gemm_args(direction: str, dt: str, adt: str, prec: str, r: int, meta: dict, int64: bool = False,
               scale: float = 0.5, low_rank_last: bool = False) -> dict:
    """The launchers' argument mapping (fused_gemm_arguments) with pointer types and example sizes: B and Q as
    the forward GEMM's transposed views (Wᵀ, the LoRA Bᵀ) or the dx GEMM's row-major W and A."""
    fwd = direction == "fwd"
    return dict(fused_gemm_arguments(
        a=Ptr(dt), b=Ptr(dt), c=Ptr(dt), bias=Ptr(dt), p=Ptr(adt), q=Ptr(adt), seed=Ptr("i64"),
        M=M, N=N, K=K, R=r, a_strides=(K, 1), b_strides=(1, K) if fwd else (N, 1), c_strides=(N, 1),
        p_strides=(r, 1), q_strides=(1, r) if fwd else (K, 1), lora_scale=scale, keep_threshold=keep_threshold(0.1),
        has_bias=fwd, dropout=direction == "dx-dropout", low_rank_last=low_rank_last, fp32_adapters=adt == "fp32",
        int64=int64, upcast=False, precision=prec), **meta)


def _schedule_name(cfg: dict) -> str:
    """The schedule flags of a GEMM config, as words for its table row."""
    return "".join(f" {word}" for flag, word in zip(SCHEDULE_FLAGS, ("tma", "persistent")) if cfg.get(flag))


def gemm_jobs(arch: int) -> list[Job]:
    """Each config of each list (with the Hopper TMA candidates): the unmasked list (forward; dx without dropout)
    and the masked list (dx)."""
    jobs = []
    for fp32, dtypes in ((False, DTYPE_VARIANTS_16), (True, DTYPE_VARIANTS_32)):
        for masked in (False, True):
            directions = (("dx-dropout", 64),) if masked else (("fwd", 16), ("dx", 64))
            epilogue_ok = config_dicts(arch, fp32, masked, low_rank_last=True, tma=True)
            for cfg in config_dicts(arch, fp32, masked, tma=True):
                meta = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
                meta.update({k: bool(cfg.get(k, 0)) for k in SCHEDULE_FLAGS})
                name = "gemm {BLOCK_M}x{BLOCK_N}x{BLOCK_K} w{num_warps} s{num_stages} ".format(**cfg) + (
                    "fp32" if fp32 else "16-bit") + (" masked" if masked else "") + _schedule_name(cfg)
                variants = [(d, dt, adt, prec, r, False, 0.5, False) for dt, adt, prec in dtypes for d, r in directions]
                # the low-rank term after the main loop (a schedule variant, on the configs it may use)
                if cfg in epilogue_ok:
                    variants += [(d, dt, adt, prec, r, False, 0.5, True) for dt, adt, prec in dtypes
                                 for d, r in directions]
                # 64-bit offsets (operands past 2^31 elements), and the fp64 scale Inductor passes, once per config.
                dt = "fp32" if fp32 else "bf16"
                variants.append((directions[-1][0], dt, dt, "tf32", 64, True, 0.5, False))
                variants.append((directions[-1][0], dt, dt, "tf32", 64, False, F64(0.5), False))
                for direction, dt, adt, prec, r, int64, scale, last in variants:
                    args = _gemm_args(direction, dt, adt, prec, r, meta, int64, scale, last)
                    tensor_cores = not (dt == "fp32" and prec == "ieee")
                    label = f"{direction} {dt}/{adt} {prec} r{r}" + (" int64" if int64 else "") + (
                        " fp64-scale" if isinstance(scale, F64) else "") + (" low-rank-last" if last else "")
                    jobs.append(Job("gemm", name, label, arch, args, cfg["num_warps"], cfg["num_stages"],
                                    needs_wgmma=arch >= 90 and tensor_cores, needs_tensor_cores=tensor_cores,
                                    exact_fp32=dt == adt == "fp32" and prec == "ieee", needs_bulk_tensor=meta["TMA"]))
    return jobs


# (big operand's dtype, adapter dtype, dot precision as common.skinny_precision picks it); the dots run in the
# adapters' dtype.  bf16 / fp32 "tf32x3" is PEFT's default setup under torch's default ("highest") precision.
SKINNY_DTYPES = [("fp16", "fp16", "ieee"), ("bf16", "bf16", "ieee"), ("bf16", "fp32", "tf32"),
                 ("bf16", "fp32", "tf32x3"), ("fp32", "fp32", "tf32"), ("fp32", "fp32", "ieee"),
                 ("fp32", "bf16", "ieee")]


_TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _skinny_tensor_cores(adt: str, prec: str) -> bool:
    return adt != "fp32" or prec in ("tf32", "tf32x3")
RANKS = [16, 32, 64, 128]  # skinny BLOCK_R values; larger ranks run in 128-wide chunks


def low_rank_add_jobs(arch: int) -> list[Job]:
    """The cuBLAS-backed schedule's pass (C += scale · keep ⊙ P·Q): forward (no mask, Q = the LoRA Bᵀ) and dx
    (masked, Q = the LoRA A) in every dtype setup of the GEMMs, 64-bit offsets and the fp64 scale once each."""
    blocks = LOW_RANK_ADD_BLOCKS
    name = f"low-rank add {blocks['BLOCK_M']}x{blocks['BLOCK_N']} w{blocks['num_warps']} s{blocks['num_stages']}"
    variants = [(d, dt, adt, prec, r, False, 0.5) for dt, adt, prec in DTYPE_VARIANTS_16 + DTYPE_VARIANTS_32
                for d, r in (("fwd", 16), ("dx", 64))]
    variants += [("dx", "bf16", "fp32", "tf32", 64, True, 0.5), ("fwd", "bf16", "bf16", "tf32", 16, False, F64(0.5))]
    jobs = []
    for direction, dt, adt, prec, r, int64, scale in variants:
        fwd = direction == "fwd"
        args = dict(low_rank_add_arguments(
            c=Ptr(dt), p=Ptr(adt), q=Ptr(adt), seed=Ptr("i64"), M=M, N=N, R=r, c_strides=(N, 1), p_strides=(r, 1),
            q_strides=(1, r) if fwd else (N, 1), lora_scale=scale, keep_threshold=keep_threshold(0.1),
            dropout=not fwd, fp32_adapters=adt == "fp32", int64=int64, upcast=False, precision=prec))
        tensor_cores = not (adt == "fp32" and prec == "ieee")
        label = f"{direction} {dt}/{adt} {prec} r{r}" + (" int64" if int64 else "") + (
            " fp64-scale" if isinstance(scale, F64) else "")
        jobs.append(Job("low_rank_add", name, label, arch, args, blocks["num_warps"], blocks["num_stages"],
                        needs_tensor_cores=tensor_cores, exact_fp32=not tensor_cores))
    return jobs


def skinny_jobs(arch: int) -> list[Job]:
    jobs = []
    for r in RANKS:
        br = skinny_block_r(r)
        for dt, adt, prec in SKINNY_DTYPES:
            small = small_skinny_tiles(_TORCH[dt], _TORCH[adt], prec)  # as the launchers choose
            rb, cb = rows_blocks(br, small), cols_blocks(br, small)
            tc = _skinny_tensor_cores(adt, prec)
            exact = dt == adt == "fp32" and prec == "ieee"
            triple = prec == "tf32x3"
            for direction, atomic_out in (("fwd", False), ("fwd", True), ("bwd", False), ("bwd", True)):
                fwd = direction == "fwd"
                args = rows_arguments(
                    x=Ptr(dt), q=Ptr(adt), out=Ptr("fp32" if atomic_out else adt), s=Ptr(adt),
                    dq=Ptr(adt if fwd else "fp32"), seed=Ptr("i64"),
                    M=M, D=K, R=r, cols_per_split=1024 if atomic_out else K, x_strides=(K, 1),
                    q_strides=(1, K) if fwd else (r, 1), out_strides=(r, 1),
                    s_strides=(0, 0) if fwd else (r, 1), dq_strides=(0, 0) if fwd else (r, 1),
                    out_scale=1.1, dq_scale=0.5, keep_threshold=keep_threshold(0.1), dropout=fwd, store_out=True,
                    atomic_out=atomic_out, acc_dq=not fwd, block_r=br, int64=False, upcast=False, precision=prec,
                    blocks=rb,
                )
                name = f"rows r{br} {rb['BLOCK_M']}x{rb['BLOCK_D']} w{rb['num_warps']} s{rb['num_stages']}"
                label = f"{direction} {dt}/{adt} {prec}" + (" split" if atomic_out else "")
                jobs.append(Job("rows", name, label, arch, args, rb["num_warps"], rb["num_stages"],
                                needs_tensor_cores=tc, exact_fp32=exact, triple_tf32=triple))
                if atomic_out and dt == "bf16":  # 64-bit offsets (operands past 2^31 elements)
                    jobs.append(Job("rows", name, label + " int64", arch, dict(args, INT64=True),
                                    rb["num_warps"], rb["num_stages"], needs_tensor_cores=tc))
                if atomic_out and dt == adt == "bf16":  # the fp64 scales Inductor passes
                    jobs.append(Job("rows", name, label + " fp64-scale", arch,
                                    dict(args, out_scale=F64(1.1), dq_scale=F64(0.5)), rb["num_warps"],
                                    rb["num_stages"], needs_tensor_cores=tc))
            for atomic, use in ((True, "dA"), (False, "dA"), (True, "dB"), (False, "dB")):
                # dA = dSᵀ h (x, masked); dBᵀ = s·Sᵀ dy (the "separate" dB schedule: no mask, a scale)
                dA = use == "dA"
                args = cols_arguments(
                    x=Ptr(dt), p=Ptr(adt), out=Ptr("fp32" if atomic else adt), seed=Ptr("i64"),
                    M=M, D=K, R=r, rows_per_split=512, x_strides=(K, 1), p_strides=(r, 1), out_strides=(K, 1),
                    out_scale=1.0 if dA else 0.5, keep_threshold=keep_threshold(0.1) if dA else 0, dropout=dA,
                    atomic=atomic, block_r=br, int64=False, upcast=False, precision=prec, blocks=cb,
                )
                name = f"cols r{br} {cb['BLOCK_M']}x{cb['BLOCK_D']} w{cb['num_warps']} s{cb['num_stages']}"
                jobs.append(Job("cols", name, f"{use} {dt}/{adt} {prec} atomic={atomic}", arch, args,
                                cb["num_warps"], cb["num_stages"], needs_tensor_cores=tc, exact_fp32=exact,
                                triple_tf32=triple))
                if atomic and dt == "bf16":  # 64-bit offsets
                    jobs.append(Job("cols", name, f"{use} {dt}/{adt} {prec} atomic int64", arch,
                                    dict(args, INT64=True), cb["num_warps"], cb["num_stages"], needs_tensor_cores=tc))
    return jobs


def mask_jobs(arch: int) -> list[Job]:
    """The elementwise masking kernel (dropout on whole tensors: the torch path and DoRA's products on CUDA): each
    dtype, 32- and 64-bit offsets."""
    jobs = []
    for dt in ("fp32", "bf16", "fp16", "fp64"):
        for int64 in (False, True):
            args = zero_dropped_arguments(t=Ptr(dt), seed=Ptr("i64"), rows_total=3 * M, M=M, K=K,
                                          keep_threshold=keep_threshold(0.1), int64=int64)
            jobs.append(Job("mask", f"zero_dropped {BLOCK_ROWS}x{BLOCK_COLS} w4", f"{dt}" + (" int64" if int64 else ""),
                            arch, args, 4, 3))  # the launcher's defaults
    return jobs


def _dora_gemm_args(direction: str, dt: str, adt: str, prec: str, r: int, meta: dict, dropout: bool,
                    int64: bool = False, scale: float = 0.5) -> dict:
    """DoRA's GEMM arguments (dora_gemm_arguments) with pointer types and example sizes: forward B = Wᵀ and
    Q = the LoRA Bᵀ (transposed views), dx B = W and Q = the LoRA A."""
    fwd = direction == "fwd"
    return dict(dora_gemm_arguments(
        z=Ptr(dt), z_strides=(N, 1), g=Ptr("fp32"), dropout_p=0.1, backward=not fwd, store_z=fwd,
        a=Ptr(dt), b=Ptr(dt), c=Ptr(dt), bias=Ptr(dt), p=Ptr(adt), q=Ptr(adt), seed=Ptr("i64"),
        M=M, N=N, K=K, R=r, a_strides=(K, 1), b_strides=(1, K) if fwd else (N, 1), c_strides=(N, 1),
        p_strides=(r, 1), q_strides=(1, r) if fwd else (K, 1), lora_scale=scale, keep_threshold=keep_threshold(0.1),
        has_bias=fwd, dropout=dropout, fp32_adapters=adt == "fp32", int64=int64, upcast=False, precision=prec),
        **meta)


def dequant4_jobs(arch: int) -> list[Job]:
    """The 4-bit weight reader (bitsandbytes' nf4 / fp4 layout): plain and double-quantized absmax, each output
    dtype, 64-bit offsets once."""
    jobs = []
    for nested in (False, True):
        for dt in ("fp32", "bf16", "fp16"):
            for int64 in ((False, True) if dt == "bf16" else (False,)):
                args = dequantize_4bit_arguments(
                    packed=Ptr("u8"), absmax=Ptr("u8" if nested else "fp32"), code=Ptr("fp32"),
                    absmax_code=Ptr("fp32"), absmax2=Ptr("fp32"), out=Ptr(dt), offset=Ptr("fp32"), n=M * K, blocksize=64,
                    nested=nested, blocksize2=256, int64=int64)
                label = f"{dt}" + (" double-quantized" if nested else "") + (" int64" if int64 else "")
                jobs.append(Job("dequant4", f"dequant4 {DEQUANT4_BLOCK} w4", label, arch, args, 4, 3))
    return jobs


def gemm4bit_jobs(arch: int) -> list[Job]:
    """The fused GEMM over a 4-bit weight (dequantized in its main loop) as the launcher calls it (fp32 adapters'
    prologue in tf32, common.gemm_precision): each 16-bit config of the unmasked list (the forward, B = Wᵀ) and
    of the masked list (dx with dropout, B = W), bf16 operands from a weight quantized from bf16 (transformers'
    loading) or from fp32 (a Linear4bit quantized from its own fp32 parameter), plain and double-quantized
    absmax; fp16, and 64-bit offsets, once per config."""
    jobs = []
    for masked in (False, True):
        direction, r = ("dx-dropout", 64) if masked else ("fwd", 16)
        fwd = direction == "fwd"
        for cfg in gemm4bit_config_dicts(arch, masked):
            meta = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
            name = "gemm4bit {BLOCK_M}x{BLOCK_N}x{BLOCK_K} w{num_warps} s{num_stages}".format(**cfg) + (
                " masked" if masked else "")
            for dt, stored, nested, int64 in (("bf16", "bf16", False, False), ("bf16", "bf16", True, False),
                                              ("bf16", "fp32", True, False), ("fp16", "fp16", True, False),
                                              ("bf16", "bf16", True, True)):
                weight = dict(packed_ptr=Ptr("u8"), absmax_ptr=Ptr("u8" if nested else "fp32"), code_ptr=Ptr("fp32"),
                              absmax_code_ptr=Ptr("fp32"), absmax2_ptr=Ptr("fp32"), offset_ptr=Ptr("fp32"),
                              BLOCKSIZE=64, NESTED=nested, BLOCKSIZE2=256)
                args = dict(fused_gemm_4bit_arguments(
                    a=Ptr(dt), weight=weight, c=Ptr(dt), bias=Ptr(dt), p=Ptr("fp32"), q=Ptr("fp32"), seed=Ptr("i64"),
                    M=M, N=N, K=K, R=r, a_strides=(K, 1), b_strides=(1, K) if fwd else (K, 1), c_strides=(N, 1),
                    p_strides=(r, 1), q_strides=(1, r) if fwd else (K, 1), lora_scale=0.5,
                    keep_threshold=keep_threshold(0.1), has_bias=fwd, dropout=masked,
                    stored=STORED_CODES[_TORCH[stored]], fp32_adapters=True, int64=int64, upcast=False,
                    precision=gemm_precision(_TORCH[dt])), **meta)
                label = (f"{direction} {dt}/fp32" + (f", {stored} weight" if stored != dt else "")
                         + (" double-quantized" if nested else "") + (" int64" if int64 else ""))
                jobs.append(Job("gemm4bit", name, label, arch, args, cfg["num_warps"], cfg["num_stages"],
                                needs_wgmma=arch >= 90, needs_tensor_cores=True))
    return jobs


def grouped_jobs(arch: int) -> list[Job]:
    """The grouped low-rank kernels (kernels/grouped.py): each operand class they are launched with (16-bit rows
    beside fp32 adapters, fp32 throughout, 16-bit adapters) and each precision the rank-r kernels use, as the
    experts of a mixture of experts launch them (positions are rows); the mixed batch's forms (rows through an
    index, the dropout mask on the input or on the result) once per class; 64-bit offsets once per kernel."""
    jobs, D, r = [], K, 16
    options = {k: GROUPED_BLOCKS[k] for k in ("num_warps", "num_stages")}
    pointers = dict(starts=Ptr("i32"), scales=Ptr("fp32"), seeds=Ptr("i64"), thresholds=Ptr("i32"))
    forms = [("experts", False, False, None), ("mixed input", True, False, "p"), ("mixed result", False, True, "c")]
    for p_dt, q_dt, c_dt, prec in (("bf16", "fp32", "fp32", "tf32"), ("bf16", "fp32", "fp32", "tf32x3"),
                                   ("fp32", "fp32", "bf16", "tf32"), ("fp32", "fp32", "fp32", "ieee"),
                                   ("bf16", "bf16", "bf16", "ieee")):
        tensor_cores, exact = prec != "ieee" or q_dt != "fp32", prec == "ieee" and q_dt == "fp32"
        for form, p_indexed, c_indexed, mask in forms:
            for int64 in ((False, True) if prec == "tf32" and p_dt == "bf16" and form == "experts" else (False,)):
                suffix = f"{form} {p_dt}·{q_dt}→{c_dt} {prec}" + (" int64" if int64 else "")
                args = segment_matmul_arguments(
                    p=Ptr(p_dt), q=Ptr(q_dt), c=Ptr(c_dt), p_index=Ptr("i64"), c_index=Ptr("i64"), **pointers, N=r,
                    D=D, p_strides=(D, 1), q_strides=(r * D, 1, D), c_strides=(r, 1), p_indexed=p_indexed,
                    c_indexed=c_indexed, mask_p=mask == "p", mask_c=mask == "c", int64=int64, upcast=False,
                    precision=prec)
                jobs.append(Job("grouped_matmul", "grouped segment_matmul", suffix, arch, args, options["num_warps"],
                                options["num_stages"], needs_tensor_cores=tensor_cores, exact_fp32=exact))
                if form == "mixed result":
                    continue
                args = segment_reduce_arguments(
                    p=Ptr(p_dt), q=Ptr(q_dt), out=Ptr("fp32"), p_index=Ptr("i64"), **pointers, D1=D, D2=r,
                    p_strides=(D, 1), q_strides=(r, 1), out_strides=(D * r, r, 1), p_indexed=p_indexed,
                    mask_p=mask == "p", int64=int64, upcast=False, precision=prec)
                jobs.append(Job("grouped_reduce", "grouped segment_reduce", suffix, arch, args, options["num_warps"],
                                options["num_stages"], needs_tensor_cores=tensor_cores, exact_fp32=exact))
    return jobs


def dora_jobs(arch: int) -> list[Job]:
    """DoRA's GEMM with each config of its lists (configs.dora_config_dicts), forward and dx; the zero-magnitude
    pass; its row-norm kernel per rank block and dtype setup."""
    jobs = []
    for dots in ("16-bit", "tf32", "ieee"):
        dtypes = DTYPE_VARIANTS_16 if dots == "16-bit" else [v for v in DTYPE_VARIANTS_32 if v[2] == dots]
        dt = "bf16" if dots == "16-bit" else "fp32"
        for dropout in (False, True):
            for cfg in dora_config_dicts(arch, dots, dropout):
                meta = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
                name = "dora gemm {BLOCK_M}x{BLOCK_N}x{BLOCK_K} w{num_warps} s{num_stages} ".format(**cfg) + dots + (
                    " dropout" if dropout else "")
                variants = [(d, dt, adt, prec, 16, False, 0.5) for dt, adt, prec in dtypes for d in ("fwd", "dx")]
                prec = "tf32" if dots == "16-bit" else dots
                variants.append(("dx", dt, dt, prec, 64, True, 0.5))
                variants.append(("fwd", dt, dt, prec, 64, False, F64(0.5)))
                for direction, dt, adt, prec, r, int64, scale in variants:
                    tensor_cores = not (dt == "fp32" and prec == "ieee")
                    label = f"{direction} {dt}/{adt} {prec} r{r}" + (" int64" if int64 else "") + (
                        " fp64-scale" if isinstance(scale, F64) else "")
                    jobs.append(Job("dora_gemm", name, label, arch,
                                    _dora_gemm_args(direction, dt, adt, prec, r, meta, dropout, int64, scale),
                                    cfg["num_warps"], cfg["num_stages"], needs_wgmma=arch >= 90 and tensor_cores,
                                    needs_tensor_cores=tensor_cores, exact_fp32=dt == adt == "fp32" and prec == "ieee"))
    zb = ZERO_DM_BLOCKS
    for dt, adt, prec in DTYPE_VARIANTS_16 + DTYPE_VARIANTS_32:  # the zero-magnitude pass, as the GEMMs' dtypes
        tensor_cores = not (dt == "fp32" and prec == "ieee")
        for int64 in (False, True):
            args = zero_magnitude_dm_arguments(
                dy=Ptr(dt), x=Ptr(dt), w=Ptr(dt), s=Ptr(adt), b=Ptr(adt), m=Ptr(adt), n=Ptr("fp32"), out=Ptr("fp32"),
                M=M, N=N, K=K, R=16, dy_strides=(N, 1), x_strides=(K, 1), w_strides=(K, 1), s_strides=(16, 1),
                b_strides=(16, 1), lora_scale=0.5, int64=int64, upcast=False, precision=prec,
                fp32_adapters=adt == "fp32")
            name = f"dora zero-m dm {zb['BLOCK_M']}x{zb['BLOCK_N']}x{zb['BLOCK_K']} w{zb['num_warps']}"
            jobs.append(Job("dora_zero_dm", name, f"{dt}/{adt} {prec}" + (" int64" if int64 else ""), arch, args,
                            zb["num_warps"], 3, needs_tensor_cores=tensor_cores,
                            exact_fp32=dt == adt == "fp32" and prec == "ieee"))
    for r in RANKS:
        br = skinny_block_r(r)
        for dt, adt, prec in SKINNY_DTYPES:
            dot_fp32 = dt != adt
            blocks = _norm_blocks(br, dot_fp32 or dt == "fp32")
            args = dora_norm_arguments(
                w=Ptr(dt), a=Ptr(adt), b=Ptr(adt), quad=Ptr("fp32"), out=Ptr("fp32"), N=N, K=K, R=r, w_strides=(K, 1),
                a_strides=(K, 1), b_strides=(r, 1), out_strides=(N, 1), lora_scale=0.5, final=True, dot_fp32=dot_fp32,
                int64=False, upcast=False, precision=prec, block_r=br, blocks=blocks)
            name = f"dora norm r{br} {blocks['BLOCK_N']}x{blocks['BLOCK_K']} w{blocks['num_warps']}"
            tc = not (prec == "ieee" and (dot_fp32 or dt == "fp32"))
            jobs.append(Job("dora_norm", name, f"{dt}/{adt} {prec}", arch, args, blocks["num_warps"], 3,
                            needs_tensor_cores=tc, exact_fp32=not tc, triple_tf32=prec == "tf32x3"))
            if dt == adt == "bf16":  # several rank chunks; 64-bit offsets; the fp64 scale Inductor passes
                jobs.append(Job("dora_norm", name, f"{dt}/{adt} chunked int64 fp64-scale", arch,
                                dict(args, FINAL=False, INT64=True, lora_scale=F64(0.5)), blocks["num_warps"], 3,
                                needs_tensor_cores=True))
    return jobs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: CPU count)")
    ap.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    ap.add_argument("--only", default="", help="compile only kernels whose table name contains this")
    ap.add_argument("--verbose", action="store_true", help="one line per compile")
    opts = ap.parse_args()

    jobs = []
    for arch in (int(a) for a in opts.arch.split(",")):
        jobs += (gemm_jobs(arch) + low_rank_add_jobs(arch) + skinny_jobs(arch) + mask_jobs(arch) + dora_jobs(arch)
                 + dequant4_jobs(arch) + gemm4bit_jobs(arch) + grouped_jobs(arch))
    jobs = [j for j in jobs if opts.only in j.group]
    t0 = time.time()
    if opts.jobs > 1:
        with ProcessPoolExecutor(opts.jobs) as pool:
            results = list(pool.map(run_job, jobs))
    else:
        results = [run_job(j) for j in jobs]

    rows: dict[tuple, list[Result]] = {}
    for res in results:
        rows.setdefault((res.job.arch, res.job.group), []).append(res)
        if opts.verbose:
            j = res.job
            print(f"  sm_{j.arch} {j.group:<40} {j.variant:<28} REG {res.regs:>3} STACK {res.stack} "
                  f"SHARED {res.shared:>6} wgmma {'y' if res.wgmma else 'n'} mma {'y' if res.tensor_cores else 'n'} "
                  f"{res.seconds:5.1f}s "
                  f"{'; '.join(res.problems)}")

    print(f"{'arch':<6} {'kernel / config':<42} {'n':>3} {'REG max':>7} {'STACK':>5} {'SHARED max':>10} "
          f"{'wgmma':>6} {'TC':>4}  status")
    failures = 0
    for (arch, group), rs in rows.items():
        ok = [r for r in rs if r.ok]
        problems = [f"{r.job.variant}: {p}" for r in rs for p in r.problems]
        failures += bool(problems)
        wg = "-" if not any(r.job.needs_wgmma for r in rs) else (
            "all" if all(r.wgmma for r in rs if r.job.needs_wgmma) else "NO")
        tc = "-" if not any(r.job.needs_tensor_cores for r in rs) else (
            "all" if all(r.tensor_cores for r in rs if r.job.needs_tensor_cores) else "NO")
        print(f"sm_{arch:<3} {group:<42} {len(rs):>3} {max((r.regs for r in ok), default=0):>7} "
              f"{max((r.stack + r.local for r in ok), default=0):>5} {max((r.shared for r in ok), default=0):>10} "
              f"{wg:>6} {tc:>4}  {'ok' if not problems else 'FAIL'}")
        for p in problems:
            print(f"       ! {p}")
    print(f"{len(results)} compiles, {len(rows)} configs, {failures} failing, {time.time() - t0:.0f} s "
          f"(triton {triton.__version__})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

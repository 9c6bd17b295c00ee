"""The fused GEMM: a base matmul whose accumulator also takes the (optionally dropout-masked) low-rank term.

    C[M, N] = A[M, K] · B[K, N]  (+ bias[N])  +  scale · keep(m, n) ⊙ (P[M, R] · Q[R, N])

forward: A = x, B = Wᵀ, P = S, Q = Bᵀ (the LoRA B), scale = s, no mask          → y, written once.
dx:      A = dy, B = W,  P = dS·s/(1-p), Q = A (the LoRA A), scale = 1, mask m  → dx, written once.

Grid: one program per (BLOCK_M × BLOCK_N) tile of C, ``cdiv(M, BLOCK_M) · cdiv(N, BLOCK_N)`` programs in
GROUP_M-row swizzled order (L2 reuse of B).  Every operand is addressed through its strides (stride 0 is
fine); tails are masked; the accumulator is fp32; the low-rank product runs over R in BLOCK_R chunks in the
adapters' dtype (P is cast to Q's dtype), either in a prologue (it seeds the accumulator: one accumulator,
and the Philox registers are released before the main loop) or, with LOW_RANK_LAST, after the main loop
(which then starts at once); bias is added in the epilogue and C is stored once, in its own dtype.
INT64 switches row / column offsets to 64 bits (for operands past 2^31 elements); UPCAST (interpreter only)
computes bf16 in fp32, which the interpreter cannot do natively.

Hopper schedules (config flags, see kernels/configs.py): TMA reads A and B through device-side tensor
descriptors (bulk copies feeding wgmma, zero-filled past the edges; the launcher checks the layout and sets the
descriptors' scratch allocator), PERSISTENT launches at most one program per SM, each walking the tiles
``num_programs`` apart in the same swizzled order.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import block_r, gemm_precision, launch, launch_with_scratch, needs_int64, tma_readable, upcast
from .configs import gemm_configs, m_bucket, num_sms, r_chunk
from .dropout import keep_mask, keep_threshold, philox_key

__all__ = ["fused_gemm_kernel", "fused_gemm_tile", "autotuned_gemm", "gemm_arguments", "fused_gemm_arguments",
           "gemm_operands", "launch_tiled_gemm", "launch_fused_gemm", "tile_indices", "tile_offsets", "tile_coordinates",
           "low_rank_tile", "load_k_step", "dot_acc", "store_tile", "store_tile_with_bias"]


@triton.jit
def tile_indices(tile_id, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of C tile number ``tile_id`` in GROUP_M-row swizzled order (L2 reuse of B)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (tile_id // per_group) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % per_group) % group_rows
    pid_n = (tile_id % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def tile_offsets(pid_m, pid_n, M, N, INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(offs_m, offs_n, rows, cols) of tile (pid_m, pid_n), where rows / cols are the offsets wrapped into [0, M)
    / [0, N) (the main loop then needs no M/N masks; the store masks them), 64-bit when INT64."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M
    cols = offs_n % N
    if INT64:
        rows = rows.to(tl.int64)
        cols = cols.to(tl.int64)
    return offs_m, offs_n, rows, cols


@triton.jit
def tile_coordinates(M, N, INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     GROUP_M: tl.constexpr):
    """This program's C tile (one program per tile): (offs_m, offs_n, rows, cols, pid_n) as ``tile_offsets``."""
    pid_m, pid_n = tile_indices(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m, offs_n, rows, cols = tile_offsets(pid_m, pid_n, M, N, INT64, BLOCK_M, BLOCK_N)
    return offs_m, offs_n, rows, cols, pid_n


@triton.jit
def load_k_step(a_ptrs, b_ptrs, offs_k, k_left, UPCAST: tl.constexpr):
    """One K step's A (rows × BLOCK_K) and B (BLOCK_K × cols) tiles, columns / rows past K read as 0."""
    a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
    b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return a, b


@triton.jit
def dot_acc(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a·b, fp32 accumulation, with a and b widened to fp32 first under the interpreter (UPCAST: it cannot
    multiply 16-bit operands natively)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def store_tile(c_ptr, tile, offs_m, offs_n, M, N, stride_cm, stride_cn, INT64: tl.constexpr):
    """Store an fp32 tile into C (its own dtype), masking rows >= M and columns >= N."""
    c_rows = offs_m
    c_cols = offs_n
    if INT64:
        c_rows = c_rows.to(tl.int64)
        c_cols = c_cols.to(tl.int64)
    c_ptrs = c_ptr + c_rows[:, None] * stride_cm + c_cols[None, :] * stride_cn
    tl.store(c_ptrs, tile.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def store_tile_with_bias(c_ptr, tile, bias_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn, HAS_BIAS: tl.constexpr,
                         INT64: tl.constexpr):
    """The GEMMs' epilogue: bias (N,) added to the fp32 tile (HAS_BIAS), then ``store_tile``."""
    if HAS_BIAS:
        tile += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    store_tile(c_ptr, tile, offs_m, offs_n, M, N, stride_cm, stride_cn, INT64)


@triton.jit
def low_rank_tile(p_ptr, q_ptr, seed_ptr, rows, cols, offs_m, pid_n, R, stride_pm, stride_pr, stride_qr, stride_qn,
                   lora_scale, keep_threshold,
                   DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """scale · keep ⊙ (P · Q) for one (BLOCK_M × BLOCK_N) tile, fp32, over R in BLOCK_R chunks."""
    offs_r = tl.arange(0, BLOCK_R)
    p_ptrs = p_ptr + rows[:, None] * stride_pm + offs_r[None, :] * stride_pr
    q_ptrs = q_ptr + offs_r[:, None] * stride_qr + cols[None, :] * stride_qn
    tile = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in tl.range(0, tl.cdiv(R, BLOCK_R), num_stages=1):  # not pipelined: it would multiply shared memory
        r_left = R - r * BLOCK_R
        q = tl.load(q_ptrs, mask=offs_r[:, None] < r_left, other=0.0)
        p = tl.load(p_ptrs, mask=offs_r[None, :] < r_left, other=0.0).to(q.dtype)
        tile = dot_acc(p, q, tile, UPCAST, PRECISION)
        p_ptrs += BLOCK_R * stride_pr
        q_ptrs += BLOCK_R * stride_qr
    if DROPOUT:
        k0, k1 = philox_key(seed_ptr)
        # (dS A) ⊙ m: a dropped element becomes its value · 0, so a dropped NaN stays NaN
        tile = tl.where(keep_mask(k0, k1, offs_m, pid_n * BLOCK_N, keep_threshold, BLOCK_M, BLOCK_N), tile, tile * 0.0)
    return tile * lora_scale


@triton.jit
def fused_gemm_tile(
    tile_id, a_ptr, b_ptr, a_desc, b_desc, c_ptr, bias_ptr, p_ptr, q_ptr, seed_ptr,
    M, N, K, R,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_pm, stride_pr, stride_qr, stride_qn,
    lora_scale, keep_threshold,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, LOW_RANK_LAST: tl.constexpr, BLOCK_R: tl.constexpr,
    INT64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, B_K_MAJOR: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C tile number ``tile_id``: the low-rank term, the base GEMM's main loop, bias, one store."""
    pid_m, pid_n = tile_indices(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m, offs_n, rows, cols = tile_offsets(pid_m, pid_n, M, N, INT64, BLOCK_M, BLOCK_N)

    if LOW_RANK_LAST:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        # Prologue: the low-rank term becomes the initial accumulator, so the main loop carries a single
        # accumulator and the mask's registers are free again before it.
        acc = low_rank_tile(p_ptr, q_ptr, seed_ptr, rows, cols, offs_m, pid_n, R, stride_pm, stride_pr,
                            stride_qr, stride_qn, lora_scale, keep_threshold,
                            DROPOUT, BLOCK_R, UPCAST, PRECISION, BLOCK_M, BLOCK_N)

    # Main loop: the base GEMM.
    if TMA:
        # Tensor-memory-accelerator copies: the descriptors zero-fill past M, N and K.
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            if B_K_MAJOR:  # B = Wᵀ: W's (N, K) rows hold B's columns
                b = b_desc.load([pid_n * BLOCK_N, k * BLOCK_K]).T
            else:
                b = b_desc.load([k * BLOCK_K, pid_n * BLOCK_N])
            acc = dot_acc(a, b, acc, UPCAST, PRECISION)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - k * BLOCK_K
            a, b = load_k_step(a_ptrs, b_ptrs, offs_k, k_left, UPCAST)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

    if LOW_RANK_LAST:
        # Epilogue: the low-rank term after the pipelined loop (nothing delays the loop's start).
        acc += low_rank_tile(p_ptr, q_ptr, seed_ptr, rows, cols, offs_m, pid_n, R, stride_pm, stride_pr,
                             stride_qr, stride_qn, lora_scale, keep_threshold,
                             DROPOUT, BLOCK_R, UPCAST, PRECISION, BLOCK_M, BLOCK_N)
    store_tile_with_bias(c_ptr, acc, bias_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn, HAS_BIAS, INT64)


@triton.jit
def fused_gemm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, p_ptr, q_ptr, seed_ptr,
    M, N, K, R,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_pm, stride_pr, stride_qr, stride_qn,
    lora_scale, keep_threshold, M_BUCKET,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, LOW_RANK_LAST: tl.constexpr, BLOCK_R: tl.constexpr,
    INT64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, B_K_MAJOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TMA: tl.constexpr, PERSISTENT: tl.constexpr,
):
    lora_scale = tl.cast(lora_scale, tl.float32)  # Inductor passes Python floats as fp64 scalars
    if TMA:
        # Device-side descriptors (A's and B's last dimensions contiguous, checked by the launcher).
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        if B_K_MAJOR:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1],
                                               block_shape=[BLOCK_N, BLOCK_K])
        else:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_bk, 1],
                                               block_shape=[BLOCK_K, BLOCK_N])
    else:
        a_desc = a_ptr
        b_desc = b_ptr
    if PERSISTENT:
        # A grid of at most one program per SM, each walking the tiles num_programs apart.
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile_id in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            fused_gemm_tile(tile_id, a_ptr, b_ptr, a_desc, b_desc, c_ptr, bias_ptr, p_ptr, q_ptr, seed_ptr,
                            M, N, K, R, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                            stride_pm, stride_pr, stride_qr, stride_qn, lora_scale, keep_threshold,
                            HAS_BIAS, DROPOUT, LOW_RANK_LAST, BLOCK_R, INT64, UPCAST, PRECISION, B_K_MAJOR, TMA,
                            BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    else:
        fused_gemm_tile(tl.program_id(0), a_ptr, b_ptr, a_desc, b_desc, c_ptr, bias_ptr, p_ptr, q_ptr, seed_ptr,
                        M, N, K, R, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                        stride_pm, stride_pr, stride_qr, stride_qn, lora_scale, keep_threshold,
                        HAS_BIAS, DROPOUT, LOW_RANK_LAST, BLOCK_R, INT64, UPCAST, PRECISION, B_K_MAJOR, TMA,
                        BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


def autotuned_gemm(fp32: bool, masked: bool, low_rank_last: bool = False, tma: bool = False):
    """The fused GEMM under ``triton.autotune``, keyed by (M bucket, N, K, B's layout, schedule), with the list
    for fp32 or 16-bit operands, masked low-rank term or not, schedule, and whether TMA can read the operands
    (one tuner, so one cache, per list)."""
    return _autotuner(gemm_configs(fp32, masked, low_rank_last, tma))


@lru_cache(maxsize=None)
def _autotuner(configs: tuple):
    # stride_bk tells the forward GEMM (B = Wᵀ, stride 1) from the dx GEMM (B = W) when their shapes coincide;
    # each schedule variant tunes on its own.
    return triton.autotune(configs=list(configs), key=["M_BUCKET", "N", "K", "stride_bk", "LOW_RANK_LAST"])(
        fused_gemm_kernel)


def gemm_arguments(*, a, b, c, bias, p, q, seed, M: int, N: int, K: int, R: int, a_strides, b_strides, c_strides,
                   p_strides, q_strides, lora_scale, keep_threshold: int, has_bias: bool, dropout: bool,
                   fp32_adapters: bool, int64: bool, upcast: bool, precision: str) -> dict:
    """The arguments every tiled GEMM kernel here takes (``fused_gemm_kernel``, DoRA's ``dora_gemm_kernel``), by
    name, from the operands of C = A·B (+ bias) + scale·keep ⊙ (P·Q).

    The one place that maps the operands onto the kernels' parameters: the launchers pass tensors (through
    ``gemm_operands``), and bench/compile_check.py passes pointer types and example sizes.  Strides are
    (rows, columns) pairs; B's and Q's are those of the K × N and R × N operands (a transposed view's strides
    for x Wᵀ)."""
    return dict(
        a_ptr=a, b_ptr=b, c_ptr=c, bias_ptr=bias, p_ptr=p, q_ptr=q, seed_ptr=seed,
        M=M, N=N, K=K, R=R,
        stride_am=a_strides[0], stride_ak=a_strides[1], stride_bk=b_strides[0], stride_bn=b_strides[1],
        stride_cm=c_strides[0], stride_cn=c_strides[1],
        stride_pm=p_strides[0], stride_pr=p_strides[1], stride_qr=q_strides[0], stride_qn=q_strides[1],
        lora_scale=lora_scale, keep_threshold=keep_threshold, M_BUCKET=m_bucket(M),
        HAS_BIAS=has_bias, DROPOUT=dropout,
        BLOCK_R=r_chunk(block_r(R), fp32_adapters), INT64=int64, UPCAST=upcast, PRECISION=precision,
    )


def fused_gemm_arguments(*, low_rank_last: bool, **operands) -> dict:
    """``fused_gemm_kernel``'s arguments: ``gemm_arguments(**operands)``, where the low-rank term goes, and whether
    B is contiguous along K (B = Wᵀ: a TMA config then reads W's rows)."""
    return dict(gemm_arguments(**operands), LOW_RANK_LAST=low_rank_last, B_K_MAJOR=operands["b_strides"][0] == 1)


def gemm_operands(a: Tensor, b: Tensor, c: Tensor, bias: Tensor | None, p: Tensor, q: Tensor, seed: Tensor | None,
                  lora_scale: float, dropout_p: float, also: tuple = ()) -> dict:
    """``gemm_arguments``' keywords for tensors: A (M, K), B (K, N), C (M, N), P (M, R), Q (R, N), any strides;
    ``also``: further operands the kernel reads or writes (for the 64-bit offset check)."""
    dropout = dropout_p > 0.0
    return dict(
        a=a, b=b, c=c, bias=bias if bias is not None else c, p=p, q=q, seed=seed if dropout else c,
        M=a.shape[0], N=b.shape[1], K=a.shape[1], R=p.shape[1], a_strides=a.stride(), b_strides=b.stride(),
        c_strides=c.stride(), p_strides=p.stride(), q_strides=q.stride(), lora_scale=float(lora_scale),
        keep_threshold=keep_threshold(dropout_p) if dropout else 0, has_bias=bias is not None, dropout=dropout,
        fp32_adapters=q.dtype == torch.float32, int64=needs_int64(a, b, c, *also), upcast=upcast(a, q),
        precision=gemm_precision(a.dtype),
    )


def launch_tiled_gemm(kernel, args: dict) -> None:
    """Launch a tiled GEMM kernel under autotuning (its config gives BLOCK_M, BLOCK_N): one program per C tile, or
    for a PERSISTENT config at most one per SM."""
    M, N = args["M"], args["N"]

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (min(tiles, num_sms()) if meta.get("PERSISTENT") else tiles,)

    launch(kernel)[grid](**args)


def launch_fused_gemm(a: Tensor, b: Tensor, bias: Tensor | None, p: Tensor, q: Tensor, seed: Tensor, lora_scale: float,
                      dropout_p: float, low_rank: str) -> Tensor:
    """C = A·B + bias + scale · keep ⊙ (P·Q), (M, N) in A's dtype, for A (M, K), B (K, N), P (M, R), Q (R, N), any
    strides (views: no copy).  The forward GEMM is A = x, B = Wᵀ, P = S, Q = the LoRA Bᵀ; the dx GEMM A = dy,
    B = W, P = dS, Q = the LoRA A, with the mask.  ``low_rank``: the term before ("prologue") or after
    ("epilogue") the main loop.  M > 0."""
    c = torch.empty((a.shape[0], b.shape[1]), device=a.device, dtype=a.dtype)
    args = fused_gemm_arguments(low_rank_last=low_rank == "epilogue",
                                **gemm_operands(a, b, c, bias, p, q, seed, lora_scale, dropout_p))
    tma = tma_readable(a, b)
    kernel = autotuned_gemm(a.dtype == torch.float32, args["DROPOUT"], args["LOW_RANK_LAST"], tma)
    if tma:  # its TMA configs build descriptors on the device, in scratch memory
        launch_with_scratch(a.device, launch_tiled_gemm, kernel, args)
    else:
        launch_tiled_gemm(kernel, args)
    return c

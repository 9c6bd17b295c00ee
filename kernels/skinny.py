"""The rank-r ("skinny") kernels: each reads its big M × D operand once.

rows_kernel — grid (cdiv(M, BLOCK_M), cdiv(R, BLOCK_R), splits); a program takes BLOCK_M rows, BLOCK_R rank
columns and one slice of D (cols_per_split wide, a BLOCK_D multiple), walking it in BLOCK_D steps:
    out[M, R]  = out_scale · (keep ⊙ X)[M, D] · Q[D, R]              (STORE_OUT; fp32 atomics when ATOMIC_OUT,
                                                                      needed when D is split, i.e. few rows)
    dq[D, R]  += dq_scale  · X[M, D]ᵀ · S[M, R]     fp32 atomics      (ACC_DQ)
  forward:  X = x,  Q = Aᵀ, out = S,  out_scale = 1/(1-p), keep mask on          (S = h Aᵀ)
  backward: X = dy, Q = B,  out = dS, out_scale = s/(1-p), dq = dB, dq_scale = s  (dS and dB from one read of dy)

cols_kernel — grid (cdiv(D, BLOCK_D), splits, cdiv(R, BLOCK_R)); program (d, j, ·) reduces rows
[j·rows_per_split, (j+1)·rows_per_split):
    out[R, D] (+)= out_scale · P[M, R]ᵀ · (keep ⊙ X)[M, D]    (fp32 atomics when ATOMIC, a store for one split)
  backward: X = x,  P = dS (already carrying s/(1-p)), out = dA, out_scale = 1, mask on   (dA = dSᵀ h)
            X = dy, P = S, out = dBᵀ, out_scale = s, no mask                            (dB = s·dyᵀ S, the
            "separate" dB schedule: no atomics, a second read of dy)

X is cast to the adapters' dtype (Q's / P's) before the dot, as the reference casts x to lora_A.dtype; BLOCK_R
is r padded to a power of two >= 16 for tl.dot (padded columns masked), capped by the launcher (configs.py) so
registers suffice: ranks above the cap take more than one program column and re-read X once per chunk.
Accumulation is fp32; INT64 and UPCAST as in gemm.py.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dropout import keep_mask, philox_key

__all__ = ["rows_kernel", "cols_kernel", "rows_arguments", "cols_arguments", "launch_options"]


@triton.jit
def rows_kernel(
    x_ptr, q_ptr, out_ptr, s_ptr, dq_ptr, seed_ptr,
    M, D, R, cols_per_split,
    stride_xm, stride_xd, stride_qd, stride_qr, stride_om, stride_or,
    stride_sm, stride_sr, stride_dqd, stride_dqr,
    out_scale, dq_scale, keep_threshold,
    DROPOUT: tl.constexpr, STORE_OUT: tl.constexpr, ATOMIC_OUT: tl.constexpr, ACC_DQ: tl.constexpr,
    BLOCK_R: tl.constexpr,
    INT64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Inductor passes Python floats as fp64 scalars: keep the arithmetic fp32
    out_scale, dq_scale = tl.cast(out_scale, tl.float32), tl.cast(dq_scale, tl.float32)
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = offs_m < M
    r_ok = offs_r < R
    rows = offs_m
    if INT64:
        rows = rows.to(tl.int64)

    d_lo = tl.program_id(2) * cols_per_split  # this program's slice of D: [d_lo, d_lo + cols_per_split) ∩ [0, D)
    d_len = D - d_lo  # columns left from d_lo (the slice's end is checked through the trip count)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + (d_lo + offs_d)[None, :] * stride_xd
    q_ptrs = q_ptr + (d_lo + offs_d)[:, None] * stride_qd + offs_r[None, :] * stride_qr
    dq_ptrs = dq_ptr + (d_lo + offs_d)[:, None] * stride_dqd + offs_r[None, :] * stride_dqr
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if DROPOUT:
        k0, k1 = philox_key(seed_ptr)
    if ACC_DQ:
        s_tile = tl.load(s_ptr + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                         mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        if UPCAST:
            s_tile = s_tile.to(tl.float32)
    for d in range(0, tl.cdiv(cols_per_split, BLOCK_D)):  # a launch-time trip count (program-independent)
        d_ok = offs_d < d_len - d * BLOCK_D
        x = tl.load(x_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        q = tl.load(q_ptrs, mask=d_ok[:, None] & r_ok[None, :], other=0.0)
        x = x.to(q.dtype)
        if UPCAST:
            x = x.to(tl.float32)
            q = q.to(tl.float32)
        if DROPOUT:  # x ⊙ m: a dropped element becomes x · 0, so a dropped NaN stays NaN
            keep = keep_mask(k0, k1, offs_m, d_lo + d * BLOCK_D, keep_threshold, BLOCK_M, BLOCK_D)
            x = tl.where(keep, x, x * 0.0)
        if STORE_OUT:
            acc = tl.dot(x, q, acc, input_precision=PRECISION)
        if ACC_DQ:
            part = tl.dot(tl.trans(x), s_tile.to(x.dtype), input_precision=PRECISION)
            tl.atomic_add(dq_ptrs, part * dq_scale, mask=d_ok[:, None] & r_ok[None, :], sem="relaxed")
            dq_ptrs += BLOCK_D * stride_dqd
        x_ptrs += BLOCK_D * stride_xd
        q_ptrs += BLOCK_D * stride_qd
    if STORE_OUT:
        out_ptrs = out_ptr + rows[:, None] * stride_om + offs_r[None, :] * stride_or
        out = acc * out_scale
        if ATOMIC_OUT:
            tl.atomic_add(out_ptrs, out, mask=row_ok[:, None] & r_ok[None, :], sem="relaxed")
        else:
            tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def cols_kernel(
    x_ptr, p_ptr, out_ptr, seed_ptr,
    M, D, R, rows_per_split,
    stride_xm, stride_xd, stride_pm, stride_pr, stride_or, stride_od,
    out_scale, keep_threshold,
    DROPOUT: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_R: tl.constexpr,
    INT64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    out_scale = tl.cast(out_scale, tl.float32)  # Inductor passes Python floats as fp64 scalars
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    d_ok = offs_d < D
    r_ok = offs_r < R
    cols = offs_d
    if INT64:
        cols = cols.to(tl.int64)
    m_lo = pid_s * rows_per_split

    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    if DROPOUT:
        k0, k1 = philox_key(seed_ptr)
    for i in range(0, tl.cdiv(rows_per_split, BLOCK_M)):  # a launch-time trip count (program-independent)
        offs_m = m_lo + i * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        rows = offs_m
        if INT64:
            rows = rows.to(tl.int64)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        p = tl.load(p_ptr + rows[:, None] * stride_pm + offs_r[None, :] * stride_pr,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        x = x.to(p.dtype)
        if UPCAST:
            x = x.to(tl.float32)
            p = p.to(tl.float32)
        if DROPOUT:  # x ⊙ m: a dropped element becomes x · 0, so a dropped NaN stays NaN
            x = tl.where(keep_mask(k0, k1, offs_m, pid_d * BLOCK_D, keep_threshold, BLOCK_M, BLOCK_D), x, x * 0.0)
        acc = tl.dot(tl.trans(p), x, acc, input_precision=PRECISION)

    out_ptrs = out_ptr + offs_r[:, None] * stride_or + offs_d[None, :] * stride_od
    out_mask = r_ok[:, None] & d_ok[None, :]
    acc = acc * out_scale
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=out_mask, sem="relaxed")
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def rows_arguments(*, x, q, out, s, dq, seed, M: int, D: int, R: int, cols_per_split: int, x_strides, q_strides,
                   out_strides, s_strides, dq_strides, out_scale, dq_scale, keep_threshold: int, dropout: bool,
                   store_out: bool, atomic_out: bool, acc_dq: bool, block_r: int, int64: bool, upcast: bool,
                   precision: str, blocks: dict) -> dict:
    """``rows_kernel``'s arguments by name: X (M, D), Q (D, R), out (M, R), S (M, R), dq (D, R); strides are (rows,
    columns) pairs ((0, 0) for an operand the flags leave unread); ``blocks`` gives BLOCK_M and BLOCK_D.  The
    launchers pass tensors, bench/compile_check.py pointer types and example sizes."""
    return dict(
        x_ptr=x, q_ptr=q, out_ptr=out, s_ptr=s, dq_ptr=dq, seed_ptr=seed, M=M, D=D, R=R, cols_per_split=cols_per_split,
        stride_xm=x_strides[0], stride_xd=x_strides[1], stride_qd=q_strides[0], stride_qr=q_strides[1],
        stride_om=out_strides[0], stride_or=out_strides[1], stride_sm=s_strides[0], stride_sr=s_strides[1],
        stride_dqd=dq_strides[0], stride_dqr=dq_strides[1],
        out_scale=out_scale, dq_scale=dq_scale, keep_threshold=keep_threshold,
        DROPOUT=dropout, STORE_OUT=store_out, ATOMIC_OUT=atomic_out, ACC_DQ=acc_dq, BLOCK_R=block_r,
        INT64=int64, UPCAST=upcast, PRECISION=precision, BLOCK_M=blocks["BLOCK_M"], BLOCK_D=blocks["BLOCK_D"],
    )


def cols_arguments(*, x, p, out, seed, M: int, D: int, R: int, rows_per_split: int, x_strides, p_strides, out_strides,
                   out_scale, keep_threshold: int, dropout: bool, atomic: bool, block_r: int, int64: bool, upcast: bool,
                   precision: str, blocks: dict) -> dict:
    """``cols_kernel``'s arguments by name: X (M, D), P (M, R), out (R, D); as ``rows_arguments``."""
    return dict(
        x_ptr=x, p_ptr=p, out_ptr=out, seed_ptr=seed, M=M, D=D, R=R, rows_per_split=rows_per_split,
        stride_xm=x_strides[0], stride_xd=x_strides[1], stride_pm=p_strides[0], stride_pr=p_strides[1],
        stride_or=out_strides[0], stride_od=out_strides[1], out_scale=out_scale, keep_threshold=keep_threshold,
        DROPOUT=dropout, ATOMIC=atomic, BLOCK_R=block_r, INT64=int64, UPCAST=upcast, PRECISION=precision,
        BLOCK_M=blocks["BLOCK_M"], BLOCK_D=blocks["BLOCK_D"],
    )


def launch_options(blocks: dict) -> dict:
    """The launch options (warps, pipeline stages) of a block choice from ``configs``."""
    return {k: blocks[k] for k in ("num_warps", "num_stages") if k in blocks}

"""Grouped (segmented) products for LoRA on many experts at once: rows sorted by expert, expert e owning rows
[starts[e], starts[e+1]), each with its own factors — one launch for every expert instead of one per expert.

segment_matmul_kernel — grid (E, cdiv(T, BLOCK_M), cdiv(N, BLOCK_N)); program (e, i, j) takes block i of
expert e's rows (it returns at once past the segment's end) and columns block j:
    C[rows of e] = scale · P[rows of e] · Q_e              P (T × D), Q_e (D × N) at q_ptr + e·stride_qe
  forward:  S = X · A_eᵀ (D = in, N = r),  U = s · S · B_eᵀ (D = r, N = out)
  backward: dS = s · dU · B_e (D = out, N = r),  dX = dS · A_e (D = r, N = in)

segment_reduce_kernel — grid (E, cdiv(D1, BLOCK_1), cdiv(D2, BLOCK_2)); program (e, i, j) reduces expert e's
rows in BLOCK_M steps:
    OUT_e = scale · P[rows of e]ᵀ · Q[rows of e]            (D1 × D2 per expert; zero for an expert without rows)
  backward: dB_e = s · dUᵀ · S (D1 = out, D2 = r),  dA_e = dSᵀ · X (D1 = r, D2 = in)

P is cast to Q's dtype before each dot (the adapters' dtype, as the other rank-r kernels); fp32 accumulation;
every operand through its strides; tails masked; INT64 for operands past 2^31 elements; UPCAST (interpreter
only) computes 16-bit operands in fp32.  ``starts`` (E + 1, int32) stays on the device: no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import launch, needs_int64, skinny_precision, upcast

__all__ = ["segment_matmul_kernel", "segment_reduce_kernel", "segment_matmul", "segment_reduce",
           "segment_matmul_arguments", "segment_reduce_arguments", "GROUPED_BLOCKS"]

GROUPED_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": 32, "num_warps": 4, "num_stages": 2}


@triton.jit
def segment_matmul_kernel(
    p_ptr, q_ptr, c_ptr, starts_ptr,
    N, D,
    stride_pm, stride_pd, stride_qe, stride_qd, stride_qn, stride_cm, stride_cn,
    scale,
    INT64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)
    expert = tl.program_id(0)
    start = tl.load(starts_ptr + expert)
    end = tl.load(starts_ptr + expert + 1)
    first = start + tl.program_id(1) * BLOCK_M
    if first < end:
        offs_m = first + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < end
        col_ok = offs_n < N
        rows = offs_m
        cols = offs_n
        q_base = q_ptr + expert * stride_qe
        if INT64:
            rows = rows.to(tl.int64)
            cols = cols.to(tl.int64)
            q_base = q_ptr + expert.to(tl.int64) * stride_qe
        p_ptrs = p_ptr + rows[:, None] * stride_pm + offs_d[None, :] * stride_pd
        q_ptrs = q_base + offs_d[:, None] * stride_qd + cols[None, :] * stride_qn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d in range(0, tl.cdiv(D, BLOCK_D)):
            d_left = D - d * BLOCK_D
            q = tl.load(q_ptrs, mask=(offs_d[:, None] < d_left) & col_ok[None, :], other=0.0)
            p = tl.load(p_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < d_left), other=0.0).to(q.dtype)
            if UPCAST:
                p = p.to(tl.float32)
                q = q.to(tl.float32)
            acc = tl.dot(p, q, acc, input_precision=PRECISION)
            p_ptrs += BLOCK_D * stride_pd
            q_ptrs += BLOCK_D * stride_qd
        acc = acc * scale
        tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def segment_reduce_kernel(
    p_ptr, q_ptr, out_ptr, starts_ptr,
    D1, D2,
    stride_pm, stride_p1, stride_qm, stride_q2, stride_oe, stride_o1, stride_o2,
    scale,
    INT64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_1: tl.constexpr, BLOCK_2: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)
    expert = tl.program_id(0)
    start = tl.load(starts_ptr + expert)
    end = tl.load(starts_ptr + expert + 1)
    offs_1 = tl.program_id(1) * BLOCK_1 + tl.arange(0, BLOCK_1)
    offs_2 = tl.program_id(2) * BLOCK_2 + tl.arange(0, BLOCK_2)
    ok_1 = offs_1 < D1
    ok_2 = offs_2 < D2
    acc = tl.zeros((BLOCK_1, BLOCK_2), dtype=tl.float32)
    for first in range(start, end, BLOCK_M):  # the expert's rows; none: the zero it stores
        offs_m = first + tl.arange(0, BLOCK_M)
        row_ok = offs_m < end
        rows = offs_m
        if INT64:
            rows = rows.to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * stride_qm + offs_2[None, :] * stride_q2,
                    mask=row_ok[:, None] & ok_2[None, :], other=0.0)
        p = tl.load(p_ptr + rows[:, None] * stride_pm + offs_1[None, :] * stride_p1,
                    mask=row_ok[:, None] & ok_1[None, :], other=0.0).to(q.dtype)
        if UPCAST:
            p = p.to(tl.float32)
            q = q.to(tl.float32)
        acc = tl.dot(tl.trans(p), q, acc, input_precision=PRECISION)
    out_base = out_ptr + expert * stride_oe
    if INT64:
        out_base = out_ptr + expert.to(tl.int64) * stride_oe
    tl.store(out_base + offs_1[:, None] * stride_o1 + offs_2[None, :] * stride_o2,
             (acc * scale).to(out_ptr.dtype.element_ty), mask=ok_1[:, None] & ok_2[None, :])


def segment_matmul_arguments(*, p, q, c, starts, N: int, D: int, p_strides, q_strides, c_strides, scale: float,
                             int64: bool, upcast: bool, precision: str) -> dict:
    """``segment_matmul_kernel``'s arguments by name; ``q_strides`` = (expert, d, n) of Q_e (D × N)."""
    return dict(p_ptr=p, q_ptr=q, c_ptr=c, starts_ptr=starts, N=N, D=D,
                stride_pm=p_strides[0], stride_pd=p_strides[1], stride_qe=q_strides[0], stride_qd=q_strides[1],
                stride_qn=q_strides[2], stride_cm=c_strides[0], stride_cn=c_strides[1], scale=scale,
                INT64=int64, UPCAST=upcast, PRECISION=precision,
                BLOCK_M=GROUPED_BLOCKS["BLOCK_M"], BLOCK_N=GROUPED_BLOCKS["BLOCK_N"], BLOCK_D=GROUPED_BLOCKS["BLOCK_D"])


def segment_reduce_arguments(*, p, q, out, starts, D1: int, D2: int, p_strides, q_strides, out_strides, scale: float,
                             int64: bool, upcast: bool, precision: str) -> dict:
    """``segment_reduce_kernel``'s arguments by name; ``out_strides`` = (expert, d1, d2)."""
    return dict(p_ptr=p, q_ptr=q, out_ptr=out, starts_ptr=starts, D1=D1, D2=D2,
                stride_pm=p_strides[0], stride_p1=p_strides[1], stride_qm=q_strides[0], stride_q2=q_strides[1],
                stride_oe=out_strides[0], stride_o1=out_strides[1], stride_o2=out_strides[2], scale=scale,
                INT64=int64, UPCAST=upcast, PRECISION=precision,
                BLOCK_M=GROUPED_BLOCKS["BLOCK_M"], BLOCK_1=GROUPED_BLOCKS["BLOCK_N"], BLOCK_2=GROUPED_BLOCKS["BLOCK_N"])


def _options() -> dict:
    return {k: GROUPED_BLOCKS[k] for k in ("num_warps", "num_stages")}


def segment_matmul(p: Tensor, q: Tensor, starts: Tensor, scale: float = 1.0, dtype: torch.dtype | None = None) -> Tensor:
    """scale · P[rows of e] · Q[e] for every expert e, (T × N) in ``dtype`` (Q's by default): P (T × D) rows sorted by
    expert, Q (E × D × N) any strides, ``starts`` (E + 1) int32."""
    T, D = p.shape
    E, _, N = q.shape
    out = torch.empty((T, N), device=p.device, dtype=dtype or q.dtype)
    if T == 0 or N == 0:
        return out
    args = segment_matmul_arguments(
        p=p, q=q, c=out, starts=starts, N=N, D=D, p_strides=p.stride(), q_strides=q.stride(), c_strides=out.stride(),
        scale=float(scale), int64=needs_int64(p, q, out), upcast=upcast(p, q),
        precision=skinny_precision(p.dtype, q.dtype))
    grid = (E, triton.cdiv(T, GROUPED_BLOCKS["BLOCK_M"]), triton.cdiv(N, GROUPED_BLOCKS["BLOCK_N"]))
    launch(segment_matmul_kernel)[grid](**args, **_options())
    return out


def segment_reduce(p: Tensor, q: Tensor, starts: Tensor, experts: int, scale: float = 1.0,
                   dtype: torch.dtype | None = None) -> Tensor:
    """scale · P[rows of e]ᵀ · Q[rows of e] for every expert e, (E × D1 × D2) in ``dtype`` (Q's by default): P
    (T × D1), Q (T × D2), rows sorted by expert, ``starts`` (E + 1) int32."""
    D1, D2 = p.shape[1], q.shape[1]
    out = torch.empty((experts, D1, D2), device=p.device, dtype=dtype or q.dtype)
    args = segment_reduce_arguments(
        p=p, q=q, out=out, starts=starts, D1=D1, D2=D2, p_strides=p.stride(), q_strides=q.stride(),
        out_strides=out.stride(), scale=float(scale), int64=needs_int64(p, q, out), upcast=upcast(p, q),
        precision=skinny_precision(p.dtype, q.dtype))
    grid = (experts, triton.cdiv(D1, GROUPED_BLOCKS["BLOCK_N"]), triton.cdiv(D2, GROUPED_BLOCKS["BLOCK_N"]))
    launch(segment_reduce_kernel)[grid](**args, **_options())
    return out

"""DoRA's kernels: the row norms from one read of W, and a GEMM that applies the magnitude scale in its epilogue.

DoRA (PEFT's definition, see ``fastlora.reference``): n_i = ‖W_i + s·(B A)_i‖ (detached), g = m / n, and with
h = (x ⊙ m_drop) / (1-p) (h = x without dropout) and S = h Aᵀ:

    z = h Wᵀ + s·S Bᵀ,    y = x Wᵀ + b + (g − 1) ⊙ (h Wᵀ) + g ⊙ s·S Bᵀ  =  x Wᵀ + b + (g − 1) ⊙ z + s·S Bᵀ
    (without dropout h = x and y = g ⊙ z + b)

    dz = g ⊙ dy,  dS = s·dz B / (1-p),  dB = s·dzᵀ S,  dA = dSᵀ (x ⊙ m_drop),
    dx = dy W + m_drop ⊙ ((g − 1) ⊙ dy W / (1-p) + dS A)      (without dropout: dx = dz W + dS A)

dora_norm_kernel — grid (cdiv(N, BLOCK_N), r chunks): n_i² = ‖W_i‖² + 2s·(W Aᵀ)_i · B_i + s²·B_i (A Aᵀ) B_iᵀ,
    each program walking its BLOCK_N rows of W once (‖W_i‖² and W Aᵀ from the same tiles); the r×r term comes
    in as a vector (N × r × r work, done by torch).  Ranks above the skinny kernels' cap (configs.SKINNY_R_MAX)
    take several program columns, whose partial sums torch adds.
dora_gemm_kernel — one program per C tile, as the fused LoRA GEMM (gemm.py), the low-rank tile seeding the
    accumulators.  Forward (A = x, B = Wᵀ, P = S, Q = Bᵀ of the LoRA B, scale s): the main loop multiplies
    each x tile by W twice with dropout, once as loaded and once masked (both base products from one read
    of x), and the epilogue writes y = acc + (g − 1) ⊙ z + b and z (in x's dtype, for dm); without dropout one
    product, y = g ⊙ z + b.  Backward (A = dy, B = W, P = dS, Q = A of the LoRA, scale 1): the dy tile is
    scaled by g in registers (one product) or, with dropout, used as loaded and scaled by g − 1 (two
    products), and the mask and 1/(1-p) are applied in the epilogue.
zero_magnitude_dm_kernel — dm = Σ_rows dy ⊙ z / n at the columns where m = 0, z recomputed: backward takes dm
    from the output y = g ⊙ z elsewhere (no dropout, no bias), and y holds nothing of z where g = 0.

The launchers take and return what ``fastlora.dora_ops`` needs; dm's reductions over rows are torch's, there.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backward import launch_dA, launch_dS_dB
from .common import (
    backward_operands, block_r, check_dtypes, dot_precision, empty_batch_grads, gemm_precision, launch, needs_int64,
    row_major, seed_arg, skinny_precision, upcast,
)
from .configs import INTERPRET, dora_gemm_configs, r_chunk, skinny_block_r
from .dropout import keep_mask, philox_key
from .forward import launch_S
from .gemm import (
    gemm_arguments, gemm_operands, launch_tiled_gemm, load_k_step, low_rank_tile, store_tile, tile_coordinates,
)

__all__ = ["dora_norm_kernel", "dora_gemm_kernel", "zero_magnitude_dm_kernel", "dora_norm_arguments",
           "dora_gemm_arguments", "zero_magnitude_dm_arguments", "dora_weight_norm", "dora_forward", "dora_backward",
           "zero_magnitude_dm"]


@triton.jit
def dora_norm_kernel(
    w_ptr, a_ptr, b_ptr, quad_ptr, out_ptr,
    N, K, R,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br, stride_oc, stride_on,
    lora_scale,
    FINAL: tl.constexpr, DOT_FP32: tl.constexpr, INT64: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[c, i] = [c = 0]·(‖W_i‖² + s²·quad_i) + 2s·(W Aᵀ)_i · B_i over rank chunk c; FINAL (one chunk):
    out[0, i] = n_i = sqrt(max(that, 0))."""
    lora_scale = tl.cast(lora_scale, tl.float32)
    chunk = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = chunk * BLOCK_R + tl.arange(0, BLOCK_R)
    n_ok = offs_n < N
    r_ok = offs_r < R
    rows = offs_n.to(tl.int64) if INT64 else offs_n
    w_ptrs = w_ptr + rows[:, None] * stride_wn + offs_k[None, :] * stride_wk
    a_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar  # Aᵀ's (BLOCK_K × BLOCK_R) tile
    sum_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    wa = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        w32 = w.to(tl.float32)
        sum_sq += tl.sum(w32 * w32, axis=1)
        if DOT_FP32 or UPCAST:  # W and A of different dtypes meet in fp32 (the 16-bit one is exact there)
            w = w32
            a = a.to(tl.float32)
        wa = tl.dot(w, a, wa, input_precision=PRECISION)
        w_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_ak
    b = tl.load(b_ptr + rows[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
    total = 2.0 * lora_scale * tl.sum(wa * b, axis=1)
    if chunk == 0:
        quad = tl.load(quad_ptr + offs_n, mask=n_ok, other=0.0)
        total += sum_sq + lora_scale * lora_scale * quad
    if FINAL:
        total = tl.sqrt_rn(tl.maximum(total, 0.0))  # IEEE-rounded, as torch's sqrt (tl.sqrt is approximate)
    tl.store(out_ptr + chunk * stride_oc + offs_n * stride_on, total, mask=n_ok)


@triton.jit
def dora_gemm_kernel(
    a_ptr, b_ptr, c_ptr, z_ptr, bias_ptr, p_ptr, q_ptr, g_ptr, seed_ptr,
    M, N, K, R,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_zm, stride_zn,
    stride_pm, stride_pr, stride_qr, stride_qn,
    lora_scale, dropout_p, keep_threshold, M_BUCKET,
    BACKWARD: tl.constexpr, DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr,
    BLOCK_R: tl.constexpr, INT64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C = A·B with DoRA's magnitude scale g (fp32, N entries forward, K backward) and mask (module docstring)."""
    lora_scale = tl.cast(lora_scale, tl.float32)  # Inductor passes Python floats as fp64 scalars
    keep_prob = 1.0 - tl.cast(dropout_p, tl.float32)
    offs_m, offs_n, rows, cols, pid_n = tile_coordinates(M, N, INT64, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)

    # The low-rank tile seeds the accumulators: forward, acc = x Wᵀ + s·S Bᵀ and acc_drop = (1-p)·z; backward
    # without dropout acc = dz W + dS A, with it acc = dy W and acc_drop = (g − 1) dy W + (1-p)·dS A.
    low_rank = low_rank_tile(p_ptr, q_ptr, seed_ptr, rows, cols, offs_m, pid_n, R, stride_pm, stride_pr,
                             stride_qr, stride_qn, lora_scale, keep_threshold,
                             False, BLOCK_R, UPCAST, PRECISION, BLOCK_M, BLOCK_N)
    if BACKWARD and DROPOUT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = low_rank
    if DROPOUT:
        acc_drop = low_rank * keep_prob
        k0, k1 = philox_key(seed_ptr)

    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a, b = load_k_step(a_ptrs, b_ptrs, offs_k, k_left, UPCAST)
        if BACKWARD:  # dy's columns scaled by g (or g − 1), rounded to dy's dtype as the reference's g ⊙ dy is
            g = tl.load(g_ptr + k * BLOCK_K + offs_k, mask=offs_k < k_left, other=0.0)
            if DROPOUT:
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
                a_scaled = (a.to(tl.float32) * (g - 1.0)[None, :]).to(a.dtype)
                acc_drop = tl.dot(a_scaled, b, acc_drop, input_precision=PRECISION)
            else:
                acc = tl.dot((a.to(tl.float32) * g[None, :]).to(a.dtype), b, acc, input_precision=PRECISION)
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            if DROPOUT:  # x ⊙ m: a dropped element becomes x · 0, so a dropped NaN stays NaN
                keep = keep_mask(k0, k1, offs_m, k * BLOCK_K, keep_threshold, BLOCK_M, BLOCK_K)
                acc_drop = tl.dot(tl.where(keep, a, a * 0.0), b, acc_drop, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if BACKWARD:
        if DROPOUT:
            masked = acc_drop / keep_prob
            keep = keep_mask(k0, k1, offs_m, pid_n * BLOCK_N, keep_threshold, BLOCK_M, BLOCK_N)
            acc += tl.where(keep, masked, masked * 0.0)
    else:
        g = tl.load(g_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
        if DROPOUT:
            z = acc_drop / keep_prob
            acc += (g - 1.0) * z
        else:
            z = acc
            acc = g * z
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        if STORE_Z:
            store_tile(z_ptr, z, offs_m, offs_n, M, N, stride_zm, stride_zn, INT64)
    store_tile(c_ptr, acc, offs_m, offs_n, M, N, stride_cm, stride_cn, INT64)


@triton.jit
def zero_magnitude_dm_kernel(
    dy_ptr, x_ptr, w_ptr, s_ptr, b_ptr, m_ptr, n_ptr, out_ptr,
    M, N, K, R,
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr,
    stride_bn, stride_br,
    lora_scale,
    INT64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[j] = Σ_t dy[t, j] · z[t, j] / n_j for the columns j with m_j = 0, z = x Wᵀ + s·S Bᵀ recomputed (the
    output y = g ⊙ z keeps nothing of z there), 0 for the others; a program whose BLOCK_N columns have no
    zero in m runs no loop, so the launch costs nothing when m has none (the usual case) and needs no host
    synchronisation to find out."""
    lora_scale = tl.cast(lora_scale, tl.float32)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    zero = (tl.load(m_ptr + offs_n, mask=n_ok, other=1.0) == 0.0) & n_ok
    blocks = tl.cdiv(M, BLOCK_M) * tl.max(zero.to(tl.int32), axis=0)  # 0 unless a column here has m = 0
    cols = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    if INT64:
        cols = cols.to(tl.int64)
    dm = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in range(0, blocks):
        offs_m = i * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = offs_m % M
        if INT64:
            rows = rows.to(tl.int64)
        z = low_rank_tile(s_ptr, b_ptr, s_ptr, rows, cols, offs_m, 0, R, stride_sm, stride_sr, stride_br, stride_bn,
                          lora_scale, 0, False, BLOCK_R, UPCAST, PRECISION, BLOCK_M, BLOCK_N)
        a_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
        b_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn  # Wᵀ's (BLOCK_K × BLOCK_N) tile
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            a, b = load_k_step(a_ptrs, b_ptrs, offs_k, K - k * BLOCK_K, UPCAST)
            z = tl.dot(a, b, z, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_xk
            b_ptrs += BLOCK_K * stride_wk
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=(offs_m < M)[:, None] & n_ok[None, :], other=0.0)
        dm += tl.sum(dy.to(tl.float32) * z, axis=0)
    norm = tl.load(n_ptr + offs_n, mask=n_ok, other=1.0)
    tl.store(out_ptr + offs_n, tl.where(zero, dm / norm, 0.0), mask=n_ok)


@lru_cache(maxsize=None)
def _autotuner(configs: tuple):
    # BACKWARD and DROPOUT in the key: forward and backward launches can share a shape, and both dropout
    # settings can share a config list; HAS_BIAS and STORE_Z change the epilogue's cost.
    return triton.autotune(configs=list(configs),
                           key=["M_BUCKET", "N", "K", "BACKWARD", "DROPOUT", "HAS_BIAS", "STORE_Z"])(
        dora_gemm_kernel)


def _norm_blocks(r_block: int, fp32_tiles: bool) -> dict:
    """Rows per program as the (rows × BLOCK_R) W Aᵀ accumulator allows; the K step by operand width."""
    if INTERPRET:
        return {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4}
    return {"BLOCK_N": max(16, min(64, 2048 // r_block)), "BLOCK_K": 32 if fp32_tiles else 64, "num_warps": 4}


def dora_norm_arguments(*, w, a, b, quad, out, N: int, K: int, R: int, w_strides, a_strides, b_strides, out_strides,
                        lora_scale, final: bool, dot_fp32: bool, int64: bool, upcast: bool, precision: str,
                        block_r: int, blocks: dict) -> dict:
    """``dora_norm_kernel``'s arguments by name (the launcher passes tensors, bench/compile_check.py pointer types
    and example sizes); W (N, K), A (r, K), B (N, r), the output (chunks, N); ``blocks`` as ``_norm_blocks``."""
    return dict(
        w_ptr=w, a_ptr=a, b_ptr=b, quad_ptr=quad, out_ptr=out, N=N, K=K, R=R,
        stride_wn=w_strides[0], stride_wk=w_strides[1], stride_ar=a_strides[0], stride_ak=a_strides[1],
        stride_bn=b_strides[0], stride_br=b_strides[1], stride_oc=out_strides[0], stride_on=out_strides[1],
        lora_scale=lora_scale, FINAL=final, DOT_FP32=dot_fp32, INT64=int64, UPCAST=upcast, PRECISION=precision,
        BLOCK_N=blocks["BLOCK_N"], BLOCK_K=blocks["BLOCK_K"], BLOCK_R=block_r,
    )


def dora_weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """n = ‖W + s·B A‖ per output row (N,), fp32, reading W once (no N × K temporary); no gradient."""
    N, K = weight.shape
    r = lora_A.shape[0]
    with torch.no_grad():
        A32, B32 = lora_A.float(), lora_B.float()
        quad = torch.mm(B32, torch.mm(A32, A32.t())).mul_(B32).sum(1)  # B_i (A Aᵀ) B_iᵀ
        sbr = skinny_block_r(r)
        chunks = triton.cdiv(r, sbr)
        out = torch.empty((chunks, N), device=weight.device, dtype=torch.float32)
        dot_fp32 = weight.dtype != lora_A.dtype
        precision = skinny_precision(weight.dtype, lora_A.dtype) if dot_fp32 else dot_precision()
        blocks = _norm_blocks(sbr, dot_fp32 or weight.dtype == torch.float32)
        if N > 0:
            args = dora_norm_arguments(
                w=weight, a=lora_A, b=lora_B, quad=quad, out=out, N=N, K=K, R=r, w_strides=weight.stride(),
                a_strides=lora_A.stride(), b_strides=lora_B.stride(), out_strides=out.stride(), lora_scale=float(scaling),
                final=chunks == 1, dot_fp32=dot_fp32, int64=needs_int64(weight), upcast=upcast(weight, lora_A),
                precision=precision, block_r=sbr, blocks=blocks)
            launch(dora_norm_kernel)[(triton.cdiv(N, blocks["BLOCK_N"]), chunks)](**args, num_warps=blocks["num_warps"])
        return out[0] if chunks == 1 else out.sum(0).clamp_min_(0.0).sqrt_()


def dora_gemm_arguments(*, z, z_strides, g, dropout_p: float, backward: bool, store_z: bool, **operands) -> dict:
    """``dora_gemm_kernel``'s arguments: the tiled GEMMs' ``gemm_arguments(**operands)`` and DoRA's own: z (forward,
    when ``store_z``), the magnitude scale g (fp32), p itself (the epilogue divides by 1-p) and the direction."""
    return dict(gemm_arguments(**operands), z_ptr=z, g_ptr=g, stride_zm=z_strides[0], stride_zn=z_strides[1],
                dropout_p=dropout_p, BACKWARD=backward, STORE_Z=store_z)


def _launch_gemm(a: Tensor, b: Tensor, c: Tensor, z: Tensor | None, bias: Tensor | None, P: Tensor, Q: Tensor,
                 g: Tensor, seed: Tensor, scaling: float, dropout_p: float, backward: bool) -> None:
    """C (and z) from DoRA's GEMM, C = A·B with the magnitude scale; A (M, K), B (K, N) views, any strides."""
    args = dora_gemm_arguments(
        z=z if z is not None else c, z_strides=z.stride() if z is not None else (0, 0), g=g,
        dropout_p=float(dropout_p), backward=backward, store_z=z is not None,
        **gemm_operands(a, b, c, bias, P, Q, seed, scaling, dropout_p, also=(z,)))
    dots = "16-bit" if a.dtype != torch.float32 else args["PRECISION"]
    launch_tiled_gemm(_autotuner(dora_gemm_configs(dots, args["DROPOUT"])), args)


def dora_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
    seed: Tensor | None, scaling: float, dropout_p: float, need_z: bool,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Return ``(y, S, z, n)``: y and z (M, N) in x's dtype (z None unless ``need_z``), S = h Aᵀ (M, r) in
    lora_A's dtype, the row norms n (N,) fp32.  x (M, K) any strides; seed as in ``lora_forward``."""
    check_dtypes(x, weight, lora_A, lora_B)
    x = row_major(x)
    M = x.shape[0]
    N, r = weight.shape[0], lora_A.shape[0]
    norm = dora_weight_norm(weight, lora_A, lora_B, scaling)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    z = torch.empty((M, N), device=x.device, dtype=x.dtype) if need_z else None
    if M == 0:
        return y, torch.empty((0, r), device=x.device, dtype=lora_A.dtype), z, norm
    seed = seed_arg(seed, dropout_p > 0.0, x)
    g = magnitude.detach().float() / norm
    S = launch_S(x, lora_A, seed, dropout_p)
    _launch_gemm(x, weight.t(), y, z, bias, S, lora_B.t(), g, seed, scaling, dropout_p, backward=False)
    return y, S, z, norm


def dora_backward(
    dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, S: Tensor, g: Tensor,
    seed: Tensor | None, scaling: float, dropout_p: float, need_dx: bool, need_dA: bool, need_dB: bool,
    db: str = "atomic",
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Return ``(dx, dA, dB)`` (None where not needed) in the dtypes of x, lora_A, lora_B, for g = m / n (N,)
    fp32.  dS and dB come from the LoRA kernel on dy with g folded into B's rows (dS = s·dy (g ⊙ B) / (1-p))
    and into dB's afterwards (dB = g ⊙ s·dyᵀ S): no g ⊙ dy tensor is formed."""
    dy, _, x = backward_operands(dy, x, weight, lora_A, lora_B)
    M, N = dy.shape
    if M == 0:
        return empty_batch_grads(x, N, lora_A, lora_B, need_dx, need_dA, need_dB)
    seed = seed_arg(seed, dropout_p > 0.0, S)
    need_dS = need_dx or need_dA
    B_scaled = (lora_B.float() * g[:, None]).to(lora_B.dtype) if need_dS else lora_B  # dS only reads B
    dS, dB = launch_dS_dB(dy, B_scaled, S, scaling, dropout_p, need_dS, need_dB, dB_dtype=torch.float32, db=db)
    if need_dB:  # scaled in fp32, rounded once (unscaled, a 16-bit dB could overflow where g is small)
        dB = (dB * g[:, None]).to(lora_B.dtype)
    dA = launch_dA(x, dS, seed, dropout_p, lora_A.dtype) if need_dA else None
    dx = None
    if need_dx:
        dx = torch.empty((M, x.shape[1]), device=dy.device, dtype=dy.dtype)
        _launch_gemm(dy, weight, dx, None, None, dS, lora_A, g, seed, 1.0, dropout_p, backward=True)
    return dx, dA, dB


# Blocks of the zero-magnitude pass: small (it runs only where m has a zero; elsewhere its programs exit).
ZERO_DM_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4}


def zero_magnitude_dm_arguments(*, dy, x, w, s, b, m, n, out, M: int, N: int, K: int, R: int, dy_strides, x_strides,
                                w_strides, s_strides, b_strides, lora_scale, int64: bool, upcast: bool, precision: str,
                                fp32_adapters: bool) -> dict:
    """``zero_magnitude_dm_kernel``'s arguments by name, its blocks ``ZERO_DM_BLOCKS``'; dy (M, N), x (M, K),
    W (N, K), S (M, r), B (N, r), m, n and the output (N,)."""
    return dict(
        dy_ptr=dy, x_ptr=x, w_ptr=w, s_ptr=s, b_ptr=b, m_ptr=m, n_ptr=n, out_ptr=out, M=M, N=N, K=K, R=R,
        stride_dym=dy_strides[0], stride_dyn=dy_strides[1], stride_xm=x_strides[0], stride_xk=x_strides[1],
        stride_wn=w_strides[0], stride_wk=w_strides[1], stride_sm=s_strides[0], stride_sr=s_strides[1],
        stride_bn=b_strides[0], stride_br=b_strides[1], lora_scale=lora_scale, INT64=int64, UPCAST=upcast,
        PRECISION=precision, BLOCK_R=r_chunk(block_r(R), fp32_adapters),
        **{k: ZERO_DM_BLOCKS[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")},
    )


def zero_magnitude_dm(dy: Tensor, x: Tensor, weight: Tensor, S: Tensor, lora_B: Tensor, magnitude: Tensor,
                      norm: Tensor, scaling: float) -> Tensor:
    """(N,) fp32: Σ_rows dy ⊙ z / n at the columns where m = 0, 0 elsewhere (``zero_magnitude_dm_kernel``).
    x and dy may have any strides (the kernel reads through them: no copy on a backward that usually finds
    no zero)."""
    check_dtypes(x, weight, S, lora_B)
    dy = dy if dy.dtype == x.dtype else dy.to(x.dtype)
    magnitude = magnitude.detach().contiguous()  # (the kernel reads m with stride 1)
    M, N = dy.shape
    out = torch.zeros(N, device=dy.device, dtype=torch.float32)
    if M == 0 or N == 0:
        return out
    args = zero_magnitude_dm_arguments(
        dy=dy, x=x, w=weight, s=S, b=lora_B, m=magnitude, n=norm, out=out, M=M, N=N, K=x.shape[1], R=S.shape[1],
        dy_strides=dy.stride(), x_strides=x.stride(), w_strides=weight.stride(), s_strides=S.stride(),
        b_strides=lora_B.stride(), lora_scale=float(scaling), int64=needs_int64(dy, x, weight),
        upcast=upcast(x, lora_B), precision=gemm_precision(x.dtype), fp32_adapters=lora_B.dtype == torch.float32)
    launch(zero_magnitude_dm_kernel)[(triton.cdiv(N, ZERO_DM_BLOCKS["BLOCK_N"]),)](
        **args, num_warps=ZERO_DM_BLOCKS["num_warps"])
    return out

"""DoRA as a registered op with autograd: ``fastlora::dora_linear`` and its backward.

The math is :func:`fastlora.torch_path.dora_forward` / ``dora_backward``.  On the kernel path (CUDA's default)
the DoRA kernels (``fastlora.kernels.dora``) compute the row norms from one read of W, and one GEMM per
direction applies the magnitude scale in its epilogue (forward) or to dy's tiles (dx), with dropout both base
products from one read of x (forward) and of dy (dx); S, dS, dB and dA come from the LoRA kernels.  The
"composed" schedule (``FASTLORA_KERNEL_VARIANTS=dora=composed``), kept for the GPU check to compare: without
dropout the LoRA kernels on dz = g ⊙ dy, the magnitude scale as torch passes; with dropout torch products and
the mask applied by :func:`fastlora.ops.keep_fn`.  dm = Σ_rows dy ⊙ z / n is a torch reduction on every
path (from y where z is not kept).  What backward keeps: ``x``, ``S``, the seed, the row norms n (N floats) and, when the magnitude is
trained, what dm needs: z (M × N); or, where the caller asks (``output_for_backward``: it will not change y in
place) and without dropout and bias, the output ``y`` itself (the next op may keep ``y`` anyway, an activation's
input does; where m = 0, which y = g ⊙ z says nothing about, the kernel path recomputes z's columns and the torch
path keeps z).

The ops are ``custom_op`` s (opaque to torch.compile, which calls them as they are); :func:`dora_linear`
is the entry point, calling them directly in eager mode as :func:`fastlora.ops.lora_linear` does.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastlora import torch_path
from fastlora.op_autograd import keep_needed, with_autograd
from fastlora.op_scalars import OpScalars
from fastlora.ops import keep_fn
from fastlora.schedules import Schedule


@torch.library.custom_op("fastlora::dora_linear", mutates_args=())
def dora_linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    seed: Optional[Tensor],
    scaling: float,
    dropout_p: float,
    schedule: str,
    keep_z: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """DoRA's (y, S, z, n) for a 2-D x; z comes back empty unless ``keep_z`` (backward then uses y).
    ``scaling``, ``dropout_p`` and ``schedule`` are an :class:`OpScalars`' fields."""
    return _dora_forward(x, weight, bias, lora_A, lora_B, magnitude, seed,
                         OpScalars.from_flat(scaling, dropout_p, schedule), keep_z)


@dora_linear_op.register_fake
def _dora_linear_fake(x, weight, bias, lora_A, lora_B, magnitude, seed, scaling, dropout_p, schedule, keep_z):
    acc = torch_path.accumulation_dtype(weight, lora_A)
    M, N = x.shape[0], weight.shape[0]
    return (x.new_empty((M, N)), x.new_empty((M, lora_A.shape[0]), dtype=lora_A.dtype),
            x.new_empty((M, N) if keep_z else (0,), dtype=_z_dtype(x, acc, Schedule.from_key(schedule))),
            x.new_empty((N,), dtype=acc))


def _z_dtype(x: Tensor, acc: torch.dtype, schedule: Schedule) -> torch.dtype:
    """The dtype z is kept in: the base's on the kernel path (its x Wᵀ is a product in that dtype, as in
    PEFT, and a 16-bit z halves what backward keeps), the accumulation dtype on the torch path."""
    return x.dtype if schedule.uses_kernels else acc


def _fused(schedule: Schedule) -> bool:
    """Whether the DoRA kernels run (a kernel schedule with the default dora="fused")."""
    return schedule.uses_kernels and schedule.dora == "fused"


def _dora_forward(x, weight, bias, lora_A, lora_B, magnitude, seed, scalars: OpScalars, keep_z):
    schedule, scaling, dropout_p = scalars.schedule, scalars.scaling, scalars.dropout_p
    if _fused(schedule):
        from fastlora.kernels import launchers as kernels

        y, S, z, norm = kernels.dora_forward(x, weight, bias, lora_A, lora_B, magnitude, seed, scaling, dropout_p,
                                             keep_z)
    elif schedule.uses_kernels and dropout_p == 0.0:
        y, S, z, norm = _dora_forward_kernels(x, weight, bias, lora_A, lora_B, magnitude, scaling, keep_z, schedule)
    else:
        y, S, z, norm = torch_path.dora_forward(
            x, weight, bias, lora_A, lora_B, magnitude, scaling, keep_fn(seed, dropout_p, schedule.uses_kernels),
            dropout_p, need_z=keep_z,
        )
    z_dtype = _z_dtype(x, norm.dtype, schedule)
    return y, S, (z.to(z_dtype) if keep_z else norm.new_empty(0, dtype=z_dtype)), norm


def _dora_forward_kernels(x, weight, bias, lora_A, lora_B, magnitude, scaling, need_z, schedule):
    """The composed schedule without dropout: S and z = x Wᵀ + s·S Bᵀ from the LoRA kernels, then y = g ⊙ z + b."""
    from fastlora.kernels import launchers as kernels

    norm = torch_path.dora_weight_norm(weight, lora_A, lora_B, scaling)
    g = torch_path.dora_scale(magnitude, norm)
    z, S = kernels.lora_forward(x, weight, None, lora_A, lora_B, None, scaling, 0.0, low_rank=schedule.low_rank,
                                base=schedule.base)
    y, z = torch_path.dora_output(z.to(norm.dtype), g, bias, x.dtype, need_z)  # z: the kernel's, or a copy
    return y, S, z, norm


@torch.library.custom_op("fastlora::dora_linear_backward", mutates_args=())
def dora_linear_backward_op(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    S: Tensor,
    z_or_y: Tensor,
    z_is_output: bool,
    norm: Tensor,
    seed: Optional[Tensor],
    scaling: float,
    dropout_p: float,
    schedule: str,
    need_dx: bool,
    need_dA: bool,
    need_dB: bool,
    need_dm: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dm), empty where not needed; ``z_or_y`` is z, or the output y when ``z_is_output``."""
    return _dora_backward_grads(dy, x, weight, lora_A, lora_B, magnitude, S, z_or_y, z_is_output, norm, seed,
                                OpScalars.from_flat(scaling, dropout_p, schedule), need_dx, need_dA, need_dB, need_dm)


@dora_linear_backward_op.register_fake
def _dora_linear_backward_fake(dy, x, weight, lora_A, lora_B, magnitude, S, z_or_y, z_is_output, norm, seed,
                               scaling, dropout_p, schedule, need_dx, need_dA, need_dB, need_dm):
    like = ((x, need_dx), (lora_A, need_dA), (lora_B, need_dB), (magnitude, need_dm))
    return tuple(t.new_empty(t.shape if need else (0,)) for t, need in like)


def _dora_backward_grads(dy, x, weight, lora_A, lora_B, magnitude, S, z_or_y, z_is_output, norm, seed,
                         scalars: OpScalars, need_dx, need_dA, need_dB, need_dm):
    schedule, scaling, dropout_p = scalars.schedule, scalars.scaling, scalars.dropout_p
    z, y = (None, z_or_y) if z_is_output else (z_or_y, None)
    if not schedule.uses_kernels:
        grads = torch_path.dora_backward(dy, x, weight, lora_A, lora_B, magnitude, S, z, norm, scaling,
                                        keep_fn(seed, dropout_p), dropout_p, need_dx, need_dA, need_dB, need_dm, y=y)
    else:
        from fastlora.kernels import launchers as kernels

        if _fused(schedule):
            dx, dA, dB = kernels.dora_backward(dy, x, weight, lora_A, lora_B, S, torch_path.dora_scale(magnitude, norm),
                                               seed, scaling, dropout_p, need_dx, need_dA, need_dB,
                                               db=schedule.db)
        elif dropout_p == 0.0:
            dx, dA, dB = _dora_backward_kernels(dy, x, weight, lora_A, lora_B, magnitude, S, norm, scaling,
                                                need_dx, need_dA, need_dB, schedule)
        else:
            dx, dA, dB, _ = torch_path.dora_backward(dy, x, weight, lora_A, lora_B, magnitude, S, z, norm, scaling,
                                                    keep_fn(seed, dropout_p, True), dropout_p, need_dx, need_dA,
                                                    need_dB, False)
        dm = None
        if need_dm:
            dm = torch_path.dora_magnitude_grad(dy, magnitude, norm, z, y)
            if y is not None:  # where m = 0, y = g ⊙ z keeps nothing of z: recomputed there, without a host sync
                at_zeros = kernels.zero_magnitude_dm(dy, x, weight, S, lora_B, magnitude, norm, scaling)
                dm = torch.where(magnitude.detach() == 0, at_zeros.to(dm.dtype), dm)
        grads = (dx, dA, dB, dm)
    like = (x, lora_A, lora_B, magnitude)
    return tuple(g if g is not None else t.new_empty(0) for g, t in zip(grads, like))


def _dora_backward_kernels(dy, x, weight, lora_A, lora_B, magnitude, S, norm, scaling, need_dx, need_dA, need_dB,
                           schedule):
    """The composed schedule without dropout: the LoRA backward kernels with dz = g ⊙ dy, given in the wider of the
    adapters' and the base's dtypes (dS and dB read it in the adapters' dtype, the dx GEMM in the base's), so
    neither product starts from a narrower rounding of dz than its own dtype."""
    from fastlora.kernels import launchers as kernels

    dz = dy.to(norm.dtype) * torch_path.dora_scale(magnitude, norm)
    wider = lora_A.dtype if lora_A.element_size() >= x.element_size() else x.dtype
    return kernels.lora_backward(dz.to(wider), x, weight, lora_A, lora_B, S, None, scaling, 0.0,
                                 need_dx, need_dA, need_dB, db=schedule.db, low_rank=schedule.low_rank,
                                 base=schedule.base)


def _dora_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, magnitude, seed, scalars, keep_z = inputs
    y, S, z, norm = output
    z_or_y = (z if keep_z else y) if ctx.needs_input_grad[5] else z.new_empty(0)
    ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, S, z_or_y, norm, seed)
    ctx.scalars, ctx.z_is_output = scalars, not keep_z


def _dora_backward(ctx, dy, _dS, _dz, _dnorm):
    x, weight, lora_A, lora_B, magnitude, S, z_or_y, norm, seed = ctx.saved_tensors
    need_dx, need_dW, need_db, need_dA, need_dB, need_dm = ctx.needs_input_grad[:6]
    dx = dW = db = dA = dB = dm = None
    if need_dx or need_dA or need_dB or need_dm:
        grads = ctx.backward_grads(dy, x, weight, lora_A, lora_B, magnitude, S, z_or_y, ctx.z_is_output, norm, seed,
                                   ctx.scalars, need_dx, need_dA, need_dB, need_dm)
        dx, dA, dB, dm = keep_needed(grads, (need_dx, need_dA, need_dB, need_dm))
    if need_dW:  # a trainable base: dW = (g ⊙ dy)ᵀ x, or with dropout dyᵀ x + ((g − 1) ⊙ dy)ᵀ h
        g = torch_path.dora_scale(magnitude, norm)
        dropout_p = ctx.scalars.dropout_p
        if dropout_p == 0.0 or seed is None:
            dW = torch.mm((dy.to(g.dtype) * g).t(), x.to(g.dtype))
        else:
            h = keep_fn(seed, dropout_p, ctx.scalars.uses_kernels)(
                x.to(g.dtype, copy=True, memory_format=torch.contiguous_format))
            dW = torch.addmm(torch.mm(dy.t().to(g.dtype), x.to(g.dtype)), (dy.to(g.dtype) * (g - 1.0)).t(), h,
                             alpha=1.0 / (1.0 - dropout_p))
        dW = dW.to(weight.dtype)
    if need_db:
        db = dy.sum(0).to(weight.dtype)
    return dx, dW, db, dA, dB, dm, None, None, None


_DORA_LINEAR = with_autograd(dora_linear_op, forward=_dora_forward, setup_context=_dora_setup_context,
                             backward=_dora_backward, backward_op=dora_linear_backward_op,
                             backward_grads=_dora_backward_grads, scalars_at=7)


def dora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    seed: Optional[Tensor],
    scalars: OpScalars,
    output_for_backward: bool = False,
) -> Tensor:
    """y of ``fastlora::dora_linear`` with autograd.  Backward needs z for dm only.  ``output_for_backward``:
    with no dropout and no bias, dm is computed from the output y instead of keeping z (its own M × N tensor),
    where y allows: on the kernel path always (the columns with m = 0, where y keeps nothing of z, are recomputed
    in backward), on the torch path when m has no zero, which eager mode reads (under torch.compile that path
    keeps z).  The caller then must not change y in place before backward (autograd refuses it, as for torch's
    ops that keep their output); a layer, whose output a model may change in place as a Linear's, keeps z."""
    keep_z = torch.is_grad_enabled() and magnitude.requires_grad
    if keep_z and output_for_backward and seed is None and bias is None:
        if scalars.uses_kernels:
            keep_z = False
        elif not torch.compiler.is_compiling():
            keep_z = not bool(magnitude.ne(0).all())
    return _DORA_LINEAR(x, weight, bias, lora_A, lora_B, magnitude, seed, scalars, keep_z)

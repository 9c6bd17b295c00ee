"""The registered PyTorch ops and their autograd.

``fastlora::lora_linear`` computes ``(y, S)`` (see :mod:`fastlora.reference` for the math) and
``fastlora::lora_linear_backward`` the gradients.  Both are ``torch.library.triton_op`` s, so
``torch.compile(fullgraph=True)`` traces into them: with ``use_kernels`` the body launches the Triton
kernels of :mod:`fastlora.kernels` through ``wrap_triton``; otherwise it runs the PyTorch reference
(the CPU backend).  The CPU branch lives in the op body rather than in ``register_kernel("cpu")``
because Inductor would otherwise analyse the Triton kernels on a machine with no GPU driver.

:func:`lora_linear` is the entry point: under ``torch.compile`` it calls the registered op; in eager
mode it runs the same forward, context and backward functions as an ``autograd.Function``, without the
op dispatch (~0.1 ms of Python per call and direction).

What autograd keeps for backward: ``x``, the rank-r ``S`` and the one-element ``seed`` the dropout
mask is regenerated from (plus references to the parameters).  Never the mask, never ``dropout(x)``.
On the CPU path the mask is applied by ``fastlora::cpu_zero_dropped_``, zeroing the dropped elements of
a fresh tensor in place (by index for rare drops, so no mask tensor is built at all).

``fastlora::dora_linear`` (and its backward) is DoRA (:func:`fastlora.reference.dora_forward`): its
products run through torch on every backend; with ``use_kernels`` the dropout mask is the kernels' Philox
mask, applied on the device by :func:`fastlora.kernels.zero_dropped_`, else the CPU generator's.  It keeps ``x``, ``S``, the seed, the row norms n (N floats) and, when the
magnitude is trained, what dm needs: the output ``y`` itself when that is enough (no dropout, no bias,
no zero in m; the next op may keep ``y`` anyway, an activation's input does), else z (M × N).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastlora import reference


@torch.library.custom_op("fastlora::cpu_zero_dropped_", mutates_args=("t",))
def cpu_zero_dropped_(t: Tensor, seed: Tensor, dropout_p: float) -> None:
    """Zero in place the elements of ``t`` that the CPU backend's dropout mask for ``seed`` drops (an
    opaque op: it owns a torch.Generator)."""
    reference.zero_dropped_(t, int(seed.item()), dropout_p)


def _keep(seed: Optional[Tensor], dropout_p: float, use_kernels: bool = False) -> reference.Keep:
    if seed is None or dropout_p == 0.0:
        return None

    def keep(t: Tensor) -> Tensor:
        if use_kernels:
            from fastlora import kernels

            return kernels.zero_dropped_(t, seed, dropout_p)
        cpu_zero_dropped_(t, seed, dropout_p)
        return t

    return keep


@torch.library.triton_op("fastlora::lora_linear", mutates_args=())
def lora_linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    seed: Optional[Tensor],
    scaling: float,
    dropout_p: float,
    use_kernels: bool,
) -> tuple[Tensor, Tensor]:
    """y = x Wᵀ + b + s·S Bᵀ and S = dropout(x) Aᵀ for a 2-D x; ``seed`` is None when there is no dropout."""
    return _forward(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, use_kernels)


@torch.library.triton_op("fastlora::lora_linear_backward", mutates_args=())
def lora_linear_backward_op(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    S: Tensor,
    seed: Optional[Tensor],
    scaling: float,
    dropout_p: float,
    use_kernels: bool,
    need_dx: bool,
    need_dA: bool,
    need_dB: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB); a gradient that is not needed comes back as an empty tensor (ops cannot return None)."""
    return _backward_grads(
        dy, x, weight, lora_A, lora_B, S, seed, scaling, dropout_p, use_kernels, need_dx, need_dA, need_dB
    )


def _forward(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, use_kernels):
    if use_kernels:
        from fastlora import kernels

        return kernels.lora_forward(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p)
    return reference.lora_forward(
        x, weight, bias, lora_A, lora_B, scaling, _keep(seed, dropout_p), dropout_p
    )


def _backward_grads(dy, x, weight, lora_A, lora_B, S, seed, scaling, dropout_p, use_kernels, need_dx, need_dA,
                    need_dB):
    if use_kernels:
        from fastlora import kernels

        grads = kernels.lora_backward(
            dy, x, weight, lora_A, lora_B, S, seed, scaling, dropout_p, need_dx, need_dA, need_dB
        )
    else:
        grads = reference.lora_backward(
            dy, x, weight, lora_A, lora_B, S, scaling, _keep(seed, dropout_p), dropout_p,
            need_dx, need_dA, need_dB,
        )
    like = (x, lora_A, lora_B)
    return tuple(g if g is not None else t.new_empty(0) for g, t in zip(grads, like))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, use_kernels = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], seed)
    ctx.scaling, ctx.dropout_p, ctx.use_kernels = scaling, dropout_p, use_kernels
    ctx.backward_grads = lora_linear_backward_op


def _backward(ctx, dy, _dS):
    x, weight, lora_A, lora_B, S, seed = ctx.saved_tensors
    need_dx, need_dW, need_db, need_dA, need_dB = ctx.needs_input_grad[:5]
    dx = dA = dB = dW = db = None
    if need_dx or need_dA or need_dB:
        dx, dA, dB = ctx.backward_grads(
            dy, x, weight, lora_A, lora_B, S, seed, ctx.scaling, ctx.dropout_p, ctx.use_kernels,
            need_dx, need_dA, need_dB,
        )
        dx, dA, dB = (g if need else None for g, need in ((dx, need_dx), (dA, need_dA), (dB, need_dB)))
    if need_dW:  # the base weight is meant to be frozen; when it is not, this plain matmul is the fall-back
        dW = torch.mm(dy.t().to(weight.dtype), x.to(weight.dtype))
    if need_db:
        db = dy.sum(0).to(weight.dtype)
    return dx, dW, db, dA, dB, None, None, None, None


lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerLoRALinear(torch.autograd.Function):
    """The same forward, context and backward as the registered op, called directly in eager mode.

    Dispatching a ``triton_op`` (and its generated autograd node) costs ~0.1 ms of Python per call in each
    direction, which is most of a small layer's time on CPU and of a launch on GPU.  Compiled code
    goes through the registered op instead (see :func:`lora_linear`).
    """

    forward = staticmethod(_forward)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1])
        ctx.backward_grads = _backward_grads

    backward = staticmethod(_backward)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    seed: Optional[Tensor],
    scaling: float,
    dropout_p: float,
    use_kernels: bool,
) -> Tensor:
    """y of ``fastlora::lora_linear`` with autograd: the registered op under torch.compile (it traces
    through it with no graph break), the same functions without the op dispatch in eager mode."""
    args = (x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, use_kernels)
    if torch.compiler.is_compiling():
        return lora_linear_op(*args)[0]
    return _EagerLoRALinear.apply(*args)[0]


# ---- DoRA --------------------------------------------------------------------------------------------


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
    use_kernels: bool,
    keep_z: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """DoRA's (y, S, z, n) for a 2-D x; z comes back empty unless ``keep_z`` (backward then uses y)."""
    return _dora_forward(x, weight, bias, lora_A, lora_B, magnitude, seed, scaling, dropout_p, use_kernels, keep_z)


@dora_linear_op.register_fake
def _dora_linear_fake(x, weight, bias, lora_A, lora_B, magnitude, seed, scaling, dropout_p, use_kernels, keep_z):
    acc = reference.accumulation_dtype(weight, lora_A)
    M, N = x.shape[0], weight.shape[0]
    return (x.new_empty((M, N)), x.new_empty((M, lora_A.shape[0]), dtype=lora_A.dtype),
            x.new_empty((M, N) if keep_z else (0,), dtype=acc), x.new_empty((N,), dtype=acc))


def _dora_forward(x, weight, bias, lora_A, lora_B, magnitude, seed, scaling, dropout_p, use_kernels, keep_z):
    y, S, z, norm = reference.dora_forward(
        x, weight, bias, lora_A, lora_B, magnitude, scaling, _keep(seed, dropout_p, use_kernels), dropout_p,
        need_z=keep_z,
    )
    return y, S, (z if keep_z else norm.new_empty(0)), norm


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
    use_kernels: bool,
    need_dx: bool,
    need_dA: bool,
    need_dB: bool,
    need_dm: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dm), empty where not needed; ``z_or_y`` is z, or the output y when ``z_is_output``."""
    return _dora_backward_grads(dy, x, weight, lora_A, lora_B, magnitude, S, z_or_y, z_is_output, norm, seed,
                                scaling, dropout_p, use_kernels, need_dx, need_dA, need_dB, need_dm)


@dora_linear_backward_op.register_fake
def _dora_linear_backward_fake(dy, x, weight, lora_A, lora_B, magnitude, S, z_or_y, z_is_output, norm, seed,
                               scaling, dropout_p, use_kernels, need_dx, need_dA, need_dB, need_dm):
    like = ((x, need_dx), (lora_A, need_dA), (lora_B, need_dB), (magnitude, need_dm))
    return tuple(t.new_empty(t.shape if need else (0,)) for t, need in like)


def _dora_backward_grads(dy, x, weight, lora_A, lora_B, magnitude, S, z_or_y, z_is_output, norm, seed, scaling,
                         dropout_p, use_kernels, need_dx, need_dA, need_dB, need_dm):
    z, y = (None, z_or_y) if z_is_output else (z_or_y, None)
    grads = reference.dora_backward(
        dy, x, weight, lora_A, lora_B, magnitude, S, z, norm, scaling, _keep(seed, dropout_p, use_kernels),
        dropout_p, need_dx, need_dA, need_dB, need_dm, y=y,
    )
    like = (x, lora_A, lora_B, magnitude)
    return tuple(g if g is not None else t.new_empty(0) for g, t in zip(grads, like))


def _dora_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, magnitude, seed, scaling, dropout_p, use_kernels, keep_z = inputs
    y, S, z, norm = output
    z_or_y = (z if keep_z else y) if ctx.needs_input_grad[5] else z.new_empty(0)
    ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, S, z_or_y, norm, seed)
    ctx.scaling, ctx.dropout_p, ctx.z_is_output, ctx.use_kernels = scaling, dropout_p, not keep_z, use_kernels
    ctx.backward_grads = dora_linear_backward_op


def _dora_backward(ctx, dy, _dS, _dz, _dnorm):
    x, weight, lora_A, lora_B, magnitude, S, z_or_y, norm, seed = ctx.saved_tensors
    need_dx, need_dW, need_db, need_dA, need_dB, need_dm = ctx.needs_input_grad[:6]
    dx = dW = db = dA = dB = dm = None
    if need_dx or need_dA or need_dB or need_dm:
        grads = ctx.backward_grads(dy, x, weight, lora_A, lora_B, magnitude, S, z_or_y, ctx.z_is_output, norm, seed,
                                   ctx.scaling, ctx.dropout_p, ctx.use_kernels, need_dx, need_dA, need_dB, need_dm)
        dx, dA, dB, dm = (g if need else None for g, need in zip(grads, (need_dx, need_dA, need_dB, need_dm)))
    if need_dW:  # a trainable base: dW = (g ⊙ dy)ᵀ x, or with dropout dyᵀ x + ((g − 1) ⊙ dy)ᵀ h
        g = reference.dora_scale(magnitude, norm)
        if ctx.dropout_p == 0.0 or seed is None:
            dW = torch.mm((dy.to(g.dtype) * g).t(), x.to(g.dtype))
        else:
            h = _keep(seed, ctx.dropout_p, ctx.use_kernels)(
                x.to(g.dtype, copy=True, memory_format=torch.contiguous_format))
            dW = torch.addmm(torch.mm(dy.t().to(g.dtype), x.to(g.dtype)), (dy.to(g.dtype) * (g - 1.0)).t(), h,
                             alpha=1.0 / (1.0 - ctx.dropout_p))
        dW = dW.to(weight.dtype)
    if need_db:
        db = dy.sum(0).to(weight.dtype)
    return dx, dW, db, dA, dB, dm, None, None, None, None, None


dora_linear_op.register_autograd(_dora_backward, setup_context=_dora_setup_context)


class _EagerDoRALinear(torch.autograd.Function):
    """The DoRA op's forward, context and backward called directly in eager mode (as :class:`_EagerLoRALinear`)."""

    forward = staticmethod(_dora_forward)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _dora_setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(*output[1:])
        ctx.backward_grads = _dora_backward_grads

    backward = staticmethod(_dora_backward)


def dora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    seed: Optional[Tensor],
    scaling: float,
    dropout_p: float,
    use_kernels: bool = False,
) -> Tensor:
    """y of ``fastlora::dora_linear`` with autograd.  In eager mode, with no dropout, no bias and no zero in
    the magnitude, backward computes dm from the output instead of keeping z, its own M × N tensor."""
    if torch.compiler.is_compiling():
        return dora_linear_op(x, weight, bias, lora_A, lora_B, magnitude, seed, scaling, dropout_p, use_kernels,
                              True)[0]
    keep_z = not (seed is None and bias is None and magnitude.requires_grad and bool(magnitude.ne(0).all()))
    args = (x, weight, bias, lora_A, lora_B, magnitude, seed, scaling, dropout_p, use_kernels, keep_z)
    return _EagerDoRALinear.apply(*args)[0]

"""The registered PyTorch ops and their autograd.

``fastlora::lora_linear`` computes ``(y, S)`` (see :mod:`fastlora.reference` for the math) and
``fastlora::lora_linear_backward`` the gradients.  Both are ``torch.library.triton_op`` s, so
``torch.compile(fullgraph=True)`` traces into them: on a kernel schedule the body launches the Triton
kernels of :mod:`fastlora.kernels` through ``wrap_triton``; otherwise it runs the torch path
(the CPU backend).  The CPU branch lives in the op body rather than in ``register_kernel("cpu")``
because Inductor would otherwise analyse the Triton kernels on a machine with no GPU driver.

:func:`lora_linear` is the entry point: under ``torch.compile`` it calls the registered op; in eager
mode it runs the same forward, context and backward functions as an ``autograd.Function``, without the
op dispatch (~0.1 ms of Python per call and direction).

What autograd keeps for backward: ``x``, the rank-r ``S`` and the one-element ``seed`` the dropout
mask is regenerated from (plus references to the parameters).  Never the mask, never ``dropout(x)``.
On the CPU path the mask is applied by :func:`fastlora.cpu_masks.zero_dropped_` (under ``torch.compile``
through the opaque op ``fastlora::cpu_zero_dropped_``), zeroing the dropped elements of a fresh tensor in
place (by index for rare drops, so no mask tensor is built at all); the torch path on a CUDA device applies
the kernels' Philox mask instead (:func:`kernel_masks_on`).  DoRA's op is
:mod:`fastlora.dora_ops`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastlora import cpu_masks, torch_path
from fastlora.op_autograd import keep_needed, with_autograd
from fastlora.op_scalars import OpScalars
from fastlora.schedules import triton_imports


@torch.library.custom_op("fastlora::cpu_zero_dropped_", mutates_args=("t",))
def cpu_zero_dropped_(t: Tensor, seed: Tensor, dropout_p: float) -> None:
    """Zero in place the elements of ``t`` that the CPU backend's dropout mask for ``seed`` drops (an
    opaque op: it owns a torch.Generator)."""
    cpu_masks.zero_dropped_(t, int(seed.item()), dropout_p)


def kernel_masks_on(t: Tensor) -> bool:
    """Whether the torch path applies the kernels' Philox mask to tensors on ``t``'s device rather than the CPU
    generator's: on a CUDA device where triton imports, where that is one launch with no host sync (the CPU
    generator's mask is drawn on the host and copied over) and the very mask the fused kernels draw for the same
    seed."""
    return t.is_cuda and triton_imports()


def keep_fn(seed: Optional[Tensor], dropout_p: float, philox: bool = False) -> torch_path.Keep:
    """The ``keep`` argument of the torch path's functions for the op's seed: None without dropout, else a
    function zeroing in place what the mask drops: the kernels' Philox mask with ``philox`` (a call on the
    kernels) or for a seed on a device of :func:`kernel_masks_on`, else the CPU generator's."""
    if seed is None or dropout_p == 0.0:
        return None
    philox = philox or kernel_masks_on(seed)

    def keep(t: Tensor) -> Tensor:
        if philox:
            from fastlora.kernels import launchers as kernels

            return kernels.zero_dropped_(t, seed, dropout_p)
        if type(t) is Tensor and not torch.compiler.is_compiling() and not torch.jit.is_tracing():
            # Eager: the function itself.  Dispatching the registered op costs ~50 µs of Python per call, as much
            # as drawing a small mask; tracing (torch.compile, export: a subclass such as a FakeTensor; jit.trace)
            # needs the op, so that the mask is drawn when the trace runs, not once into it.
            return cpu_masks.zero_dropped_(t, int(seed), dropout_p)
        cpu_zero_dropped_(t, seed, dropout_p)
        return t

    if not philox:  # the CPU mask's dropped positions, for products that take them as a correction
        keep.rare_drops = lambda M, K: cpu_masks.rare_dropped_positions(int(seed), M, K, dropout_p)
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
    schedule: str,
) -> tuple[Tensor, Tensor]:
    """y = x Wᵀ + b + s·S Bᵀ and S = dropout(x) Aᵀ for a 2-D x; ``seed`` is None when there is no dropout.
    ``scaling``, ``dropout_p`` and ``schedule`` are an :class:`OpScalars`' fields."""
    return _forward(x, weight, bias, lora_A, lora_B, seed, OpScalars.from_flat(scaling, dropout_p, schedule))


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
    schedule: str,
    need_dx: bool,
    need_dA: bool,
    need_dB: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB); a gradient that is not needed comes back as an empty tensor (ops cannot return None)."""
    return _backward_grads(dy, x, weight, lora_A, lora_B, S, seed, OpScalars.from_flat(scaling, dropout_p, schedule),
                           need_dx, need_dA, need_dB)


def _forward(x, weight, bias, lora_A, lora_B, seed, scalars: OpScalars):
    plan, scaling, dropout_p = scalars.schedule, scalars.scaling, scalars.dropout_p
    if plan.uses_kernels:
        from fastlora.kernels import launchers as kernels

        return kernels.lora_forward(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, low_rank=plan.low_rank,
                                    base=plan.base)
    return torch_path.lora_forward(x, weight, bias, lora_A, lora_B, scaling, keep_fn(seed, dropout_p), dropout_p)


def _backward_grads(dy, x, weight, lora_A, lora_B, S, seed, scalars: OpScalars, need_dx, need_dA, need_dB):
    plan, scaling, dropout_p = scalars.schedule, scalars.scaling, scalars.dropout_p
    if plan.uses_kernels:
        from fastlora.kernels import launchers as kernels

        grads = kernels.lora_backward(
            dy, x, weight, lora_A, lora_B, S, seed, scaling, dropout_p, need_dx, need_dA, need_dB,
            db=plan.db, low_rank=plan.low_rank, base=plan.base,
        )
    else:
        grads = torch_path.lora_backward(
            dy, x, weight, lora_A, lora_B, S, scaling, keep_fn(seed, dropout_p), dropout_p,
            need_dx, need_dA, need_dB,
        )
    like = (x, lora_A, lora_B)
    return tuple(g if g is not None else t.new_empty(0) for g, t in zip(grads, like))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, seed, scalars = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], seed)
    ctx.scalars = scalars


def _backward(ctx, dy, _dS):
    x, weight, lora_A, lora_B, S, seed = ctx.saved_tensors
    need_dx, need_dW, need_db, need_dA, need_dB = ctx.needs_input_grad[:5]
    dx = dA = dB = dW = db = None
    if need_dx or need_dA or need_dB:
        dx, dA, dB = keep_needed(ctx.backward_grads(
            dy, x, weight, lora_A, lora_B, S, seed, ctx.scalars, need_dx, need_dA, need_dB,
        ), (need_dx, need_dA, need_dB))
    if need_dW:  # the base weight is meant to be frozen; when it is not, this plain matmul is the fall-back
        dW = torch.mm(dy.t().to(weight.dtype), x.to(weight.dtype))
    if need_db:
        db = dy.sum(0).to(weight.dtype)
    return dx, dW, db, dA, dB, None, None


# lora_linear(x, weight, bias, lora_A, lora_B, seed, scalars) -> y, with autograd: the registered op under
# torch.compile, the same functions without the op dispatch in eager mode.
lora_linear = with_autograd(lora_linear_op, forward=_forward, setup_context=_setup_context, backward=_backward,
                            backward_op=lora_linear_backward_op, backward_grads=_backward_grads, scalars_at=6)

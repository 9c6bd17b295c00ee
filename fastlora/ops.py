"""The registered PyTorch ops and their autograd.

``fastlora::lora_linear`` computes ``(y, S)`` (see :mod:`fastlora.reference` for the math) and
``fastlora::lora_linear_backward`` the gradients.  Both are ``torch.library.triton_op`` s, so
``torch.compile(fullgraph=True)`` traces into them: with ``use_kernels`` the body launches the Triton
kernels of :mod:`fastlora.kernels` through ``wrap_triton``; otherwise it runs the PyTorch reference
(the CPU backend).  The CPU branch lives in the op body rather than in ``register_kernel("cpu")``
because Inductor would otherwise analyse the Triton kernels on a machine with no GPU driver.

What autograd keeps for backward: ``x``, the rank-r ``S`` and the one-element ``seed`` the dropout
mask is regenerated from (plus references to the parameters).  Never the mask, never ``dropout(x)``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastlora import reference


@torch.library.custom_op("fastlora::cpu_keep_mask", mutates_args=())
def cpu_keep_mask(seed: Tensor, rows: int, cols: int, dropout_p: float, dtype: torch.dtype) -> Tensor:
    """The CPU backend's 0/1 dropout keep mask for ``seed`` (an opaque op: it owns a torch.Generator)."""
    return reference.cpu_keep_mask(int(seed.item()), (rows, cols), dropout_p, dtype)


@cpu_keep_mask.register_fake
def _(seed, rows, cols, dropout_p, dtype):
    return seed.new_empty((rows, cols), dtype=dtype)


def _keep(seed: Optional[Tensor], x: Tensor, dropout_p: float, dtype: torch.dtype) -> Optional[Tensor]:
    if seed is None or dropout_p == 0.0:
        return None
    return cpu_keep_mask(seed, x.shape[0], x.shape[1], dropout_p, dtype)


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
    if use_kernels:
        from fastlora import kernels

        return kernels.lora_forward(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p)
    return reference.lora_forward(
        x, weight, bias, lora_A, lora_B, scaling, _keep(seed, x, dropout_p, lora_A.dtype), dropout_p
    )


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
    if use_kernels:
        from fastlora import kernels

        grads = kernels.lora_backward(
            dy, x, weight, lora_A, lora_B, S, seed, scaling, dropout_p, need_dx, need_dA, need_dB
        )
    else:
        grads = reference.lora_backward(
            dy, x, weight, lora_A, lora_B, S, scaling, _keep(seed, x, dropout_p, lora_A.dtype), dropout_p,
            need_dx, need_dA, need_dB,
        )
    like = (x, lora_A, lora_B)
    return tuple(g if g is not None else t.new_empty(0) for g, t in zip(grads, like))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, use_kernels = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], seed)
    ctx.scaling, ctx.dropout_p, ctx.use_kernels = scaling, dropout_p, use_kernels


def _backward(ctx, dy, _dS):
    x, weight, lora_A, lora_B, S, seed = ctx.saved_tensors
    need_dx, need_dW, need_db, need_dA, need_dB = ctx.needs_input_grad[:5]
    dx = dA = dB = dW = db = None
    if need_dx or need_dA or need_dB:
        dx, dA, dB = lora_linear_backward_op(
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

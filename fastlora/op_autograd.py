"""One way to give a registered fastlora op its autograd and its two entry points.

A fastlora op is registered once (``torch.library.triton_op`` or ``custom_op``), with a backward op beside it.
:func:`with_autograd` registers the op's autograd and builds its eager twin: an ``autograd.Function`` that runs
the same forward, context and backward functions without the op dispatch (dispatching a registered op and its
generated autograd node costs ~0.1 ms of Python per call and direction: most of a small layer's time on the
CPU, and of a launch on a GPU).  The :class:`OpWithAutograd` it returns is the entry point: under
``torch.compile`` the registered op (traced with no graph break), in eager mode the twin.

The backward function reads ``ctx.backward_grads``: the backward op when autograd runs the registered op, the
backward op's plain function in the eager twin.  Outputs after the first are never differentiated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from fastlora.op_scalars import OpScalars

__all__ = ["OpWithAutograd", "with_autograd", "keep_needed"]


@dataclass(frozen=True)
class OpWithAutograd:
    """A registered op with autograd and its eager twin; calling it returns the op's first output.  The call's
    arguments are the Python side's (the scalars one ``OpScalars``); the registered op gets them flattened."""

    op: Callable
    eager: type
    flatten: Callable[[tuple], tuple]

    def __call__(self, *args) -> Tensor:
        if torch.compiler.is_compiling():
            return self.op(*self.flatten(args))[0]
        return self.eager.apply(*args)[0]


def with_autograd(op, *, forward: Callable, setup_context: Callable, backward: Callable, backward_op: Callable,
                  backward_grads: Callable, scalars_at: int) -> OpWithAutograd:
    """Register ``backward`` as ``op``'s autograd and build its eager twin.

    ``forward``: the op's body as a plain function; ``setup_context(ctx, inputs, output)``: what backward keeps;
    ``backward(ctx, *grad_outputs)``: the gradients of the op's inputs, computed through ``ctx.backward_grads``,
    which is ``backward_op`` (the registered backward op) under the op and ``backward_grads`` (its plain
    function) in the twin.  These three see the Python side's arguments, an :class:`OpScalars` at position
    ``scalars_at``; the registered ops' schemas have its fields in its place (``OpScalars.flat``), and this
    function converts between the two."""
    width = OpScalars.width

    def flatten(args: tuple) -> tuple:
        return tuple(a for arg in args for a in (arg.flat() if isinstance(arg, OpScalars) else (arg,)))

    def unflatten(args: tuple) -> tuple:
        scalars = OpScalars.from_flat(*args[scalars_at:scalars_at + width])
        return (*args[:scalars_at], scalars, *args[scalars_at + width:])

    def op_setup_context(ctx, inputs, output):
        setup_context(ctx, unflatten(inputs), output)
        ctx.backward_grads = lambda *args: backward_op(*flatten(args))

    def op_backward(ctx, *grad_outputs):
        grads = backward(ctx, *grad_outputs)
        return (*grads[:scalars_at], *(None,) * width, *grads[scalars_at + 1:])

    op.register_autograd(op_backward, setup_context=op_setup_context)

    class EagerTwin(torch.autograd.Function):
        @staticmethod
        def forward(*args):
            return forward(*args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            setup_context(ctx, inputs, output)
            ctx.mark_non_differentiable(*output[1:])
            ctx.backward_grads = backward_grads

        @staticmethod
        def backward(ctx, *grad_outputs):
            return backward(ctx, *grad_outputs)

    name = getattr(op, "__name__", "op").removesuffix("_op")
    EagerTwin.__name__ = EagerTwin.__qualname__ = f"Eager_{name}"
    return OpWithAutograd(op, EagerTwin, flatten)


def keep_needed(grads, needs) -> tuple:
    """``grads`` with None where ``needs`` is False (a backward op returns empty tensors for those)."""
    return tuple(g if need else None for g, need in zip(grads, needs))

"""Running a model in another mode for a while (the data-driven initialisations' steps run it in eval or train
mode), and putting back the mode of every module as it was, submodules whose mode differed from the model's
included; and whether a transformers model recomputes activations in its backward pass."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

__all__ = ["in_mode", "activation_checkpointing_on"]


@contextlib.contextmanager
def in_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """``model.train(training)`` within the block; afterwards (also on an error) each module's own mode again."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.train(training)
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


def activation_checkpointing_on(model: nn.Module) -> bool:
    """Whether ``model`` (a transformers model) has activation checkpointing on: its ``is_activation_checkpointing``,
    or ``is_gradient_checkpointing`` where transformers predates the new name (reading the old one on a newer
    transformers warns); False for other models."""
    if hasattr(type(model), "is_activation_checkpointing") or "is_activation_checkpointing" in vars(model):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))

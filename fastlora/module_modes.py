"""Running a model in another mode for a while (the data-driven initialisations' steps run it in eval or train
mode), and putting back the mode of every module as it was, submodules whose mode differed from the model's
included."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

__all__ = ["in_mode"]


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

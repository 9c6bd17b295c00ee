"""A model's parameters under the names its module tree gives them.

torch's ``checkpoint_wrapper`` (and FSDP's wrapper) rename what ``named_parameters`` and ``state_dict`` yield: the
wrapper's own level is left out, while ``named_modules`` and ``get_submodule`` keep it.  Where the wrapper is the
model's root (a model wrapped whole), a parameter's name from ``named_parameters`` then no longer starts with its
module's name.  Code that joins the two names reads parameters from here.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

__all__ = ["named_parameters"]


def named_parameters(model: nn.Module, remove_duplicate: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """``model.named_parameters(remove_duplicate=...)`` as ``nn.Module`` defines it, whatever a wrapper overrides:
    each parameter named ``<its module's name in named_modules>.<its attribute>``."""
    seen: set[int] = set()
    for module_name, module in model.named_modules(remove_duplicate=remove_duplicate):
        for attribute, param in module._parameters.items():
            if param is None or (remove_duplicate and id(param) in seen):
                continue
            seen.add(id(param))
            yield (f"{module_name}.{attribute}" if module_name else attribute), param

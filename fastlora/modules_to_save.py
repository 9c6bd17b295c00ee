"""``ModulesToSaveWrapper``: a ``modules_to_save`` module as PEFT keeps it.

The original module stays, frozen, as ``original_module``; each adapter that saves the module has its
own trainable copy in ``modules_to_save[<adapter name>]``.  The forward uses the active adapter's copy,
or the original when adapters are disabled or the active adapter has no copy.  Other attributes
(``weight``, ...) are the module in use's.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

__all__ = ["ModulesToSaveWrapper", "MIXED_BATCH_MODULES"]

# The module kinds whose copies take a mixed batch (PEFT's list): dim 0 of their input is the batch's.
MIXED_BATCH_MODULES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class ModulesToSaveWrapper(nn.Module):
    def __init__(self, original: nn.Module, adapter_name: str, trainable: bool) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.original_module.requires_grad_(False)
        self.active_adapter = adapter_name
        self.adapter_enabled = True
        self.add_adapter(adapter_name, trainable)

    def add_adapter(self, adapter_name: str, trainable: bool) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module).requires_grad_(trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]

    def set_adapter(self, adapter_name: str) -> None:
        self.active_adapter = adapter_name

    @property
    def active_module(self) -> nn.Module:
        if self.adapter_enabled and self.active_adapter in self.modules_to_save:
            return self.modules_to_save[self.active_adapter]
        return self.original_module

    # A mixed batch's rows per adapter (name → row indices; ``"__base__"``'s rows are the others) and its number of
    # rows, set by PeftModel around a call with ``adapter_names=[...]``.
    row_adapters: dict[str, Tensor] | None = None
    row_count: int | None = None

    def forward(self, *args, **kwargs):
        if self.row_adapters is not None:
            return self.mixed_batch_forward(*args, **kwargs)
        return self.active_module(*args, **kwargs)

    def mixed_batch_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """PEFT's mixed batch over the copies: each row of ``x`` (dim 0) through its adapter's copy, and the rows of
        ``"__base__"``, or of an adapter without a copy here, through the original; each copy's gradient comes from
        its own rows only.  For the module kinds PEFT takes (:data:`MIXED_BATCH_MODULES`), whose dim 0 is the
        batch's."""
        if self.row_count is not None and x.shape[0] != self.row_count:  # PEFT's check, as the LoRA layers make it
            raise ValueError(f"Length of `adapter_names` should be the same as the number of inputs, but got "
                             f"{self.row_count} and {x.shape[0]} respectively.")
        groups = {name: rows.to(x.device) for name, rows in self.row_adapters.items()
                  if self.adapter_enabled and name in self.modules_to_save}
        taken = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for rows in groups.values():
            taken[rows] = True
        if not taken.all():
            groups[None] = (~taken).nonzero().flatten()  # the original's rows
        if len(groups) == 1:
            (name, _), = groups.items()
            return (self.original_module if name is None else self.modules_to_save[name])(x, *args, **kwargs)
        result = None
        for name, rows in groups.items():
            module = self.original_module if name is None else self.modules_to_save[name]
            out = module(x[rows], *args, **kwargs)
            if result is None:
                result = out.new_empty((x.shape[0], *out.shape[1:]))
            result[rows] = out.to(result.dtype)
        return result

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.active_module, name)

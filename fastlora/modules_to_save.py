"""``ModulesToSaveWrapper``: a ``modules_to_save`` module as PEFT keeps it.

The original module stays, frozen, as ``original_module``; each adapter that saves the module has its
own trainable copy in ``modules_to_save[<adapter name>]``.  The forward uses the active adapter's copy,
or the original when adapters are disabled or the active adapter has no copy.  Other attributes
(``weight``, ...) are the module in use's.
"""

from __future__ import annotations

import copy

from torch import nn

__all__ = ["ModulesToSaveWrapper"]


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

    def forward(self, *args, **kwargs):
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.active_module, name)

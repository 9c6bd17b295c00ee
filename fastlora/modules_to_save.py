"""``ModulesToSaveWrapper``: a ``modules_to_save`` module as PEFT keeps it.

The original module stays, frozen, as ``original_module``; each adapter that saves the module has its
own trainable copy in ``modules_to_save[<adapter name>]``.  The forward uses the active adapter's copy,
or the original when adapters are disabled or the active adapter has no copy.  Other attributes
(``weight``, ...) are the module in use's.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import Tensor, nn

__all__ = ["ModulesToSaveWrapper", "MIXED_BATCH_MODULES", "mixed_batch_groups", "by_row_groups"]

# The module kinds whose copies take a mixed batch (PEFT's list): dim 0 of their input is the batch's.
MIXED_BATCH_MODULES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def mixed_batch_groups(row_adapters: dict[str, list[int]], held, row_count: int) -> dict[str | None, Tensor]:
    """A mixed batch's rows as a wrapper takes them: adapter name → its batch rows, for the adapters in ``held``,
    and None → every other row (``"__base__"``'s, and those of adapters the wrapper does not hold); no empty group.
    Grouped on the host, once per call of the model rather than once per forward (generate calls it per token)."""
    groups = {name: rows for name, rows in row_adapters.items() if name in held}
    taken = {row for rows in groups.values() for row in rows}
    others = [row for row in range(row_count) if row not in taken]
    return {name: torch.tensor(rows) for name, rows in ({**groups, None: others}).items() if rows}


def by_row_groups(x: Tensor, groups: dict[str | None, Tensor], compute) -> Tensor:
    """``compute(name, x[rows])`` for each group of batch rows (dim 0), put back in the rows' order, in the dtype
    the outputs promote to (as PEFT's stack of rows does); each group's parameters get gradient from its own rows."""
    outputs = []
    for name, rows in groups.items():
        rows = rows.to(x.device, non_blocking=True)
        outputs.append((rows, compute(name, x[rows])))
    first = outputs[0][1]
    dtype = functools.reduce(torch.promote_types, (out.dtype for _, out in outputs))
    result = first.new_empty((x.shape[0], *first.shape[1:]), dtype=dtype)
    for rows, out in outputs:
        result[rows] = out.to(dtype)
    return result


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
        if adapter_name not in self.modules_to_save and hasattr(self.modules_to_save, adapter_name):
            # the copies live in an nn.ModuleDict under the adapter's name, as PEFT keeps them (and its files name them)
            raise ValueError(f"adapter name {adapter_name!r} is an attribute of torch's nn.ModuleDict, which holds "
                             f"each adapter's copy of a modules_to_save module under the adapter's name: choose "
                             f"another name")
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

    # A mixed batch's rows, set by PeftModel around a call with ``adapter_names=[...]`` (:meth:`use_rows`): the
    # module each group of rows goes through (an adapter's copy, or None: the original) and the number of rows.
    row_groups: dict[str | None, Tensor] | None = None
    row_count: int | None = None

    def use_rows(self, row_adapters: dict[str, list[int]] | None, row_count: int | None = None) -> None:
        """Take a mixed batch's rows (``row_adapters``: adapter name → its rows; the others, ``"__base__"``'s, go
        through the original, and so do an adapter's that has no copy here), or drop them (None)."""
        if row_adapters is None:
            self.row_groups = self.row_count = None
            return
        self.row_groups = mixed_batch_groups(row_adapters, self.modules_to_save, row_count)
        self.row_count = row_count

    def forward(self, *args, **kwargs):
        if self.row_groups is not None:
            return self.mixed_batch_forward(*args, **kwargs)
        return self.active_module(*args, **kwargs)

    def mixed_batch_forward(self, *args, **kwargs) -> Tensor:
        """PEFT's mixed batch over the copies: each row of the input (dim 0; positional, or PEFT's ``input=``)
        through its adapter's copy, the others through the original (:meth:`use_rows`); each copy's gradient comes
        from its own rows only.  For the module kinds PEFT takes (:data:`MIXED_BATCH_MODULES`), whose dim 0 is the
        batch's.  The outputs are put together in the dtype they promote to, as PEFT's stack of rows does."""
        args = list(args) if args else [kwargs.pop("input")]
        x = args[0]
        if self.row_count is not None and x.shape[0] != self.row_count:  # PEFT's check, as the LoRA layers make it
            raise ValueError(f"Length of `adapter_names` should be the same as the number of inputs, but got "
                             f"{self.row_count} and {x.shape[0]} respectively.")
        if not self.adapter_enabled or (len(self.row_groups) == 1 and None in self.row_groups):
            return self.original_module(*args, **kwargs)
        if len(self.row_groups) == 1:  # one copy takes every row
            (name,) = self.row_groups
            return self.modules_to_save[name](*args, **kwargs)
        return by_row_groups(x, self.row_groups, lambda name, rows: (
            self.original_module if name is None else self.modules_to_save[name])(rows, *args[1:], **kwargs))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.active_module, name)

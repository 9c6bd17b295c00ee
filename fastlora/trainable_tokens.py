"""PEFT's ``trainable_token_indices``: only the listed rows of an embedding table train (new tokens' rows, say),
the rest of the table staying frozen and bitwise unchanged.

:class:`TrainableTokensWrapper` holds the embedding as ``base_layer`` and, per adapter, the trained rows
``trainable_tokens_delta_<name>`` (len(indices) × dim, initialised from the table's rows, as PEFT) and their
original values.  Its output is the base module's with the table's listed rows replaced by the trained ones:

    y = embed(ids; W with W[indices] ← delta) · embed_scale

An output head tied to the table (``tie_word_embeddings``) is wrapped too, sharing the trained rows, so the head
reads the same table: y = h (W with W[indices] ← delta)ᵀ.  Merging writes the rows into the table, unmerging
puts the originals back.  PEFT's file key is ``<path>.token_adapter.trainable_tokens_delta`` (the tied head's
rows are the table's, saved once).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastlora.modules_to_save import by_row_groups, mixed_batch_groups

__all__ = ["TrainableTokensWrapper"]


class TrainableTokensWrapper(nn.Module):
    """The listed rows of an embedding table (or of a head tied to it), trained per adapter."""

    def __init__(self, base: nn.Module, tied_to: "TrainableTokensWrapper | None" = None) -> None:
        super().__init__()
        self.base_layer = base
        # a tied head reads its owner's rows; a list, so the owner is not registered as a submodule twice
        self._tied = [tied_to] if tied_to is not None else []
        self.token_indices: dict[str, list[int]] = {} if tied_to is None else tied_to.token_indices
        self.active_adapters: list[str] = [] if tied_to is None else list(tied_to.active_adapters)
        self.adapter_enabled = True
        self.merged_adapters: list[str] = []

    @property
    def owner(self) -> "TrainableTokensWrapper":
        return self._tied[0] if self._tied else self

    @property
    def is_tied(self) -> bool:
        return bool(self._tied)

    def add_adapter(self, adapter_name: str, indices: list[int], dtype: torch.dtype | None = None) -> None:
        """Rows ``indices`` of the table train for ``adapter_name``, starting from their current values, held in
        ``dtype`` (default: the table's; float32 beside a half-precision table under PEFT's
        ``autocast_adapter_dtype``, as PEFT holds them) and written into the table in its own dtype."""
        if not self.active_adapters:  # the first adapter added is active, as in a LoRA layer
            self.active_adapters = [adapter_name]
        if self.is_tied:
            return
        weight = self.base_layer.weight
        rows = weight.detach()[torch.tensor(indices, device=weight.device)].clone()
        self.token_indices[adapter_name] = list(indices)
        delta = nn.Parameter(rows.to(dtype or rows.dtype, copy=True))  # never the original rows' storage
        self.register_parameter(f"trainable_tokens_delta_{adapter_name}", delta)
        self.register_buffer(f"trainable_tokens_original_{adapter_name}", rows, persistent=False)

    def delete_adapter(self, adapter_name: str) -> None:
        if not self.is_tied:
            self.token_indices.pop(adapter_name, None)
            self._parameters.pop(f"trainable_tokens_delta_{adapter_name}", None)
            self._buffers.pop(f"trainable_tokens_original_{adapter_name}", None)
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    @property
    def adapter_names(self) -> list[str]:
        return list(self.owner.token_indices)

    def delta(self, adapter_name: str) -> nn.Parameter:
        return self.owner._parameters[f"trainable_tokens_delta_{adapter_name}"]

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        return [] if self.is_tied or adapter_name not in self.token_indices else [self.delta(adapter_name)]

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        self.active_adapters = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)

    def _held(self, names: list[str]) -> list[str]:
        held = [n for n in names if n in self.owner.token_indices]
        seen: set[int] = set()
        for name in held:  # PEFT's rule: overlapping rows of two adapters have no defined result
            rows = set(self.owner.token_indices[name])
            if seen & rows:
                raise ValueError(f"Token indices of adapter {name} are already defined and would result in undefined "
                                 f"merging behavior. Only disjunct token indices are currently supported.")
            seen |= rows
        return held

    def weight_with_rows(self, names: list[str]) -> Tensor:
        """The table with each adapter's trained rows in place of its listed rows (a new tensor)."""
        weight = self.base_layer.weight
        for name in names:
            index = torch.tensor(self.owner.token_indices[name], device=weight.device)
            weight = weight.index_copy(0, index, self.delta(name).to(weight))
        return weight

    @property
    def weight(self) -> Tensor:
        """The table the module computes with: the active adapters' trained rows in place (a new tensor, as PEFT's
        wrapper returns it), or the base table itself where none applies (disabled, merged, none active)."""
        names = self._applied()
        return self.weight_with_rows(names) if names else self.base_layer.weight

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or "_modules" not in self.__dict__ or "base_layer" not in self._modules:
                raise
        return getattr(self._modules["base_layer"], name)  # num_embeddings, padding_idx, embed_scale, ...

    def _applied(self) -> list[str]:
        return self._held(self.active_adapters) if self.adapter_enabled and not self.merged_adapters else []

    # A mixed batch's rows, set by PeftModel around a call with ``adapter_names=[...]`` (:meth:`use_rows`): the
    # adapter whose trained rows each group of batch rows reads (None: the table as it is) and the number of rows.
    row_groups: dict[str | None, Tensor] | None = None
    row_count: int | None = None

    def use_rows(self, row_adapters: dict[str, list[int]] | None, row_count: int | None = None) -> None:
        """Take a mixed batch's rows (adapter name → its batch rows; the others, ``"__base__"``'s or an adapter's
        without token rows here, read the table as it is), or drop them (None)."""
        if row_adapters is None:
            self.row_groups = self.row_count = None
            return
        self.row_groups = mixed_batch_groups(row_adapters, self.owner.token_indices, row_count)
        self.row_count = row_count

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.merged_adapters and not (self.adapter_enabled and self._held(self.active_adapters)):
            self.unmerge()  # merged while disabled, or while no adapter with rows here is active: PEFT's layer too
        if self.row_groups is not None and self.adapter_enabled:
            return self._mixed_batch_forward(x, *args, **kwargs)
        return self._forward_with(self._applied(), x, *args, **kwargs)

    def _mixed_batch_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """PEFT's mixed batch: each group of batch rows (dim 0) through the table with its adapter's trained rows in
        place (the others through the table as it is); each adapter's rows get gradient from its own batch rows."""
        if self.row_count is not None and x.shape[0] != self.row_count:
            raise ValueError(f"Length of `adapter_names` should be the same as the number of inputs, but got "
                             f"{self.row_count} and {x.shape[0]} respectively.")
        if len(self.row_groups) == 1:
            (name,) = self.row_groups
            return self._forward_with([] if name is None else [name], x, *args, **kwargs)
        return by_row_groups(x, self.row_groups, lambda name, rows: self._forward_with(
            [] if name is None else [name], rows, *args, **kwargs))

    def _forward_with(self, names: list[str], x: Tensor, *args, **kwargs) -> Tensor:
        if not names:
            return self.base_layer(x, *args, **kwargs)
        weight, base = self.weight_with_rows(names), self.base_layer
        if isinstance(base, nn.Embedding):
            out = F.embedding(x, weight, padding_idx=base.padding_idx, max_norm=base.max_norm,
                              norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
            scale = getattr(base, "embed_scale", None)
            return out * torch.as_tensor(scale, device=out.device).to(out.dtype) if scale is not None else out
        return F.linear(x, weight, getattr(base, "bias", None))

    @torch.no_grad()
    def merge(self, adapter_names: list[str], safe_merge: bool = False) -> None:
        names = [n for n in self._held(list(dict.fromkeys(self.merged_adapters + adapter_names)))
                 if n not in self.merged_adapters]
        if self.is_tied or not names:  # the table is shared: its owner writes the rows once
            self.merged_adapters.extend(names)
            return
        merged = self.weight_with_rows(names)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {names} seems to be broken")
        self.base_layer.weight.copy_(merged)
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if not self.is_tied:
                weight = self.base_layer.weight
                index = torch.tensor(self.token_indices[name], device=weight.device)
                weight.index_copy_(0, index, self._buffers[f"trainable_tokens_original_{name}"].to(weight))

    def to_base(self) -> nn.Module:
        return self.base_layer

"""The bookkeeping of a layer whose factors of an adapter are another layer's, transposed: a head tied to the input
embeddings (``ensure_weight_tying``, :mod:`fastlora.weight_tying`).  The owner (the embeddings' layer) holds the
factors and their merge state; the head holds Parameters over the same storage, ``A_head = B_ownerᵀ`` and
``B_head = A_ownerᵀ``, and merges and unmerges through the owner, so the shared table takes the update once.

:class:`TiedFactors` is a mixin of :class:`fastlora.LoRALinear`: ``lora_factors``, ``adapter_settings`` and
``merged_adapters`` are the layer's.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

__all__ = ["TiedFactors"]


class TiedFactors:
    """Tied adapters' bookkeeping for a LoRA layer (see the module docstring)."""

    @property
    def tied_adapters(self) -> dict[str, "TiedFactors"]:
        """Adapter name → the layer whose factors this layer's are the transposes of (a head tied to the input
        embeddings, see :mod:`fastlora.weight_tying`); that layer's merge state is this adapter's."""
        return self.__dict__.setdefault("_tied_adapters", {})  # a plain dict: the owner is not a submodule here

    @property
    def tied_heads(self) -> list["TiedFactors"]:
        """The layers whose factors of some adapter are this layer's, transposed (the owner's side of
        :attr:`tied_adapters`)."""
        return self.__dict__.setdefault("_tied_heads", [])

    def tie_factors(self, adapter_name: str, owner: "TiedFactors", lora_A: nn.Parameter, lora_B: nn.Parameter) -> None:
        """Hold ``lora_A`` / ``lora_B`` (views of ``owner``'s factors) as ``adapter_name``'s factors."""
        for param, held in zip((lora_A, lora_B), self.lora_factors(adapter_name)):
            if param.shape != held.shape:
                raise ValueError(f"tied factors of shape {tuple(param.shape)} for {tuple(held.shape)}")
        self._parameters[f"lora_A_{adapter_name}"], self._parameters[f"lora_B_{adapter_name}"] = lora_A, lora_B
        self.tied_adapters[adapter_name] = owner
        if not any(head is self for head in owner.tied_heads):
            owner.tied_heads.append(self)

    def reshare_tied_factors(self) -> None:
        """Point the tied adapters' factors at their owner's storage again (each parameter is moved, cast or copied
        on its own: ``to()``, ``half()``, a deep copy), and those of the heads tied to this layer."""
        for name, owner in self.tied_adapters.items():
            if name in owner.adapter_settings:
                A, B = self.lora_factors(name)
                owner_A, owner_B = owner.lora_factors(name)
                A.data, B.data = owner_B.data.t(), owner_A.data.t()
        for head in self.tied_heads:
            if head is not self and any(owner is self for owner in head.tied_adapters.values()):
                head.reshare_tied_factors()

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        if self.tied_adapters or self.tied_heads:
            self.reshare_tied_factors()
        return result

    def merged_by_owner(self) -> list[str]:
        """The tied adapters merged, by their owner, into the table this layer shares."""
        return [name for name, owner in self.tied_adapters.items() if name in owner.merged_adapters]

    def _tied_to_merge(self, adapter_names: Iterable[str] | None) -> dict["TiedFactors", list[str]]:
        """Owner → the tied adapters among ``adapter_names`` (default: the active ones) it has not merged."""
        names = self.active_held() if adapter_names is None else list(adapter_names)
        owners: dict[TiedFactors, list[str]] = {}
        for name in dict.fromkeys(names):
            owner = self.tied_adapters.get(name)
            if owner is not None and name not in owner.merged_adapters:
                owners.setdefault(owner, []).append(name)
        return owners

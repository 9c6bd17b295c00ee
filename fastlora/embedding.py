"""LoRA on an embedding table (``nn.Embedding`` and its subclasses, such as Gemma's scaled word embeddings), as
PEFT's ``lora.Embedding`` computes it:

    y = embed(ids) + scaling · (A[:, ids]ᵀ Bᵀ) · embed_scale

with A (r × num_embeddings) and B (embedding_dim × r), PEFT's ``lora_embedding_A`` / ``lora_embedding_B``;
``embed_scale`` is the base module's own (Gemma's √dim), 1 where it has none.  As in PEFT, no dropout is applied
(an id lookup has no input activations to drop), a new adapter starts with A = 0 and B normal (False: both
normal), and the update merges into the table as W ← W + scaling · (B A)ᵀ.

:class:`LoRAEmbedding` holds the embedding module as ``base_layer`` (a subclass keeps its forward and its
``embed_scale``) and reuses :class:`fastlora.LoRALinear`'s adapter bookkeeping, seeing the table through the
linear view W = weightᵀ (embedding_dim × num_embeddings): A and B then have a Linear's shapes, and merging is a
Linear's, written back transposed.  A tied output head shares the table, so a merge changes it as it does in
PEFT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastlora.adapter_settings import AdapterSettings
from fastlora.layer import LoRALinear, _draw_device
from fastlora.weight_inits import mica_factors

__all__ = ["LoRAEmbedding"]


class LoRAEmbedding(LoRALinear):
    """An embedding table with LoRA adapters (see the module docstring for the math)."""

    # PEFT's file keys for this kind's factors (a Linear's are lora_A.weight / lora_B.weight)
    PEFT_FACTOR_KEYS = ("lora_embedding_A", "lora_embedding_B")

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, adapter_name: str, settings: AdapterSettings, init_lora_weights,
                       adapter_dtype: torch.dtype | None, backend: str = "auto") -> "LoRAEmbedding":
        """Wrap ``embedding`` (kept as ``base_layer``, its table frozen)."""
        cls._check_settings(settings)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = embedding.num_embeddings, embedding.embedding_dim
        layer.base_layer = embedding
        embedding.weight.requires_grad_(False)
        layer._init_adapter_state(backend)
        layer.add_adapter(adapter_name, settings, init_lora_weights=init_lora_weights, adapter_dtype=adapter_dtype)
        return layer

    @staticmethod
    def _check_settings(settings: AdapterSettings) -> None:
        for name in ("use_dora", "lora_bias"):
            if getattr(settings, name):
                raise ValueError(f"{name}=True on an embedding target is not supported by fastlora")

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> None:
        return None

    def add_adapter(self, adapter_name: str, settings: AdapterSettings, *, init_lora_weights=True,
                    adapter_dtype: torch.dtype | None = None) -> None:
        self._check_settings(settings)
        super().add_adapter(adapter_name, settings, init_lora_weights=init_lora_weights, adapter_dtype=adapter_dtype)

    def check_weight_init(self, init: str, r: int) -> None:  # the others (LoftQ too) give the default one here
        if init == "mica" and r > min(self.weight.shape):
            raise ValueError(f"MiCA requires `r` <= min(num_embeddings, embedding_dim) but got r={r} for an embedding "
                             f"layer with weight shape {tuple(self.weight.shape)} (max usable r is "
                             f"{min(self.weight.shape)}).")

    WEIGHT_INITS_CHANGE_BASE = False

    def init_from_weight(self, init: str, adapter_name: str, loftq_config: dict | None = None,
                         factors=None) -> None:
        """Nothing: an embedding keeps the default initialisation for those, as PEFT's embedding layer does."""
        self.check_weight_init(init, self.adapter_settings[adapter_name].r)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights=True, adapter_name: str | None = None,
                              loftq_config: dict | None = None) -> None:
        """PEFT's embedding initialisation, drawn as PEFT draws it (on the default device, in its order, so a seeded
        run starts from PEFT's values): A and B ~ N(0, 1) at creation; then A = 0 and B ~ N(0, 1) again (True,
        "gaussian", and the other initialisations from the base weight, as PEFT's embedding layer takes them),
        MiCA's factors of the table (B its r minor left singular vectors, A = 0), or the creation's values
        (False)."""
        if self.weight.device.type == "meta":
            return
        lora_A, lora_B = self.lora_factors(adapter_name)
        A, B = torch.randn(lora_A.shape, device=_draw_device()), torch.randn(lora_B.shape, device=_draw_device())
        if init_lora_weights == "mica":
            self.check_weight_init("mica", lora_A.shape[0])
            A, B = mica_factors(self.base_weight().to(torch.float32), lora_A.shape[0])
        elif init_lora_weights is not False:
            A.zero_()
            nn.init.normal_(B)
        self._hold(lora_A, A)
        self._hold(lora_B, B)

    def base_weight(self) -> Tensor:
        return self.weight.t()

    def _store_base_weight(self, weight: Tensor) -> None:
        self.weight.copy_(weight.t())

    def base_forward(self, x: Tensor) -> Tensor:
        return self.base_layer(x)

    def to_base(self) -> nn.Module:
        return self.base_layer

    def _embed_scale(self) -> Tensor | None:
        """The base module's own output scale (a scalar), where it has one."""
        scale = getattr(self.base_layer, "embed_scale", None)
        if scale is None:
            return None
        scale = torch.as_tensor(scale, device=self.weight.device)
        if scale.numel() != 1:
            raise ValueError(f"embed_scale of {type(self.base_layer).__name__} must be a scalar, got shape "
                             f"{tuple(scale.shape)}")
        return scale

    def adapted_forward(self, x: Tensor, names: list[str]) -> Tensor:
        result = self.base_forward(x)
        dtype = result.dtype
        for name in names:  # the active adapters' updates add up, as PEFT's
            result = result + self.adapter_update(x, name)
        return result.to(dtype)

    def rows_update(self, x: Tensor, rows: Tensor, name: str) -> Tensor:
        return self.adapter_update(x.index_select(0, rows), name)  # token ids: a gather costs nothing to keep

    def adapter_update(self, x: Tensor, name: str) -> Tensor:
        """scaling · (A[:, ids]ᵀ Bᵀ) · embed_scale for adapter ``name``, in the adapters' dtype."""
        lora_A, lora_B = self.lora_factors(name)
        base, scale = self.base_layer, self._embed_scale()
        rows = F.embedding(x, lora_A.t(), padding_idx=base.padding_idx, max_norm=base.max_norm,
                           norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
        update = (rows @ lora_B.t()) * self.adapter_settings[name].scaling
        return update * scale.to(update.dtype) if scale is not None else update

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{name}: r={s.r}, lora_alpha={s.lora_alpha}" for name, s in self.adapter_settings.items())
        return f"adapters={{{adapters}}}, active={self.active_adapter!r}, merged={self.merged_adapters}"

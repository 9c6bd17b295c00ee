"""``LoRALinear``: an ``nn.Linear`` that owns its LoRA factors and calls :func:`fastlora.lora_linear`."""

from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastlora.functional import BACKENDS, lora_linear

__all__ = ["LoRALinear"]


def _check_hparams(r, lora_alpha, lora_dropout, init_lora_weights, backend) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be an integer >= 1, got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not lora_alpha > 0:
        raise ValueError(f"lora_alpha must be a number > 0, got {lora_alpha!r}")
    if not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    if init_lora_weights not in (True, False, "gaussian"):
        raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


class LoRALinear(nn.Linear):
    """y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ with W, b frozen and A (r × in), B (out × r) trained.

    ``weight`` and ``bias`` keep ``nn.Linear``'s names, so a base checkpoint loads unchanged; ``lora_A``
    and ``lora_B`` are Parameters of this module itself (no submodules), so FSDP / ZeRO-3 gather them
    with the layer.  ``scaling`` = lora_alpha / r, or lora_alpha / sqrt(r) with ``use_rslora``.
    Dropout acts on the LoRA branch only, in training mode only.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: Union[bool, str] = True,
        adapter_dtype: torch.dtype | None = None,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        _check_hparams(r, lora_alpha, lora_dropout, init_lora_weights, backend)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.weight.requires_grad_(False)  # the base is frozen, as after from_linear; unfreeze to train it
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._add_lora(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, adapter_dtype, backend)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: Union[bool, str] = True,
        adapter_dtype: torch.dtype | None = None,
        backend: str = "auto",
    ) -> "LoRALinear":
        """Wrap ``linear``: its weight and bias are shared (not copied) and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        _check_hparams(r, lora_alpha, lora_dropout, init_lora_weights, backend)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias
        linear.weight.requires_grad_(False)
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        layer._add_lora(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, adapter_dtype, backend)
        return layer

    def _add_lora(self, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, adapter_dtype, backend):
        self.r, self.lora_alpha, self.lora_dropout = r, lora_alpha, float(lora_dropout)
        self.use_rslora, self.backend = use_rslora, backend
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        factory = {"device": self.weight.device, "dtype": adapter_dtype or self.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.merged = False
        self.adapter_enabled = True
        self.reset_lora_parameters(init_lora_weights)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: Union[bool, str] = True) -> None:
        """PEFT's initialisations: True → A kaiming-uniform(a=√5), B = 0; "gaussian" → A ~ N(0, std=1/r), B = 0;
        False → both kaiming-uniform (a non-zero update from the start, for tests)."""
        if self.weight.device.type == "meta":
            return
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> Tensor:
        """scaling · B A in float32 (out × in)."""
        return torch.mm(self.lora_B.float(), self.lora_A.float()).mul_(self.scaling)

    @torch.no_grad()
    def merge(self) -> None:
        """W ← round(W + scaling · B A), summed in float32 and rounded once to W's dtype."""
        if self.merged:
            return
        self.weight.copy_(self.weight.float().add_(self.delta_weight()))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← round(W − scaling · B A): W back to within one rounding of its value before merge()."""
        if not self.merged:
            return
        self.weight.copy_(self.weight.float().sub_(self.delta_weight()))
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or not self.adapter_enabled:
            return F.linear(x, self.weight, self.bias)
        return lora_linear(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, self.lora_dropout,
            training=self.training, backend=self.backend,
        )

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this layer's weight and bias (as they are: merged or not)."""
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha}, "
            f"lora_dropout={self.lora_dropout}, scaling={self.scaling:g}, merged={self.merged}"
        )

"""Which kind of base layer a module is, and how that kind is adapted: an ordered list of dispatchers.

Each :class:`BaseKind` claims the modules it adapts and builds the adapted layer around one (sharing the
module's parameters, never copying them); the first kind in :data:`DISPATCHERS` that claims a module wins.
A module no kind claims is refused, with the reason when it is a kind fastlora knows it does not adapt yet (a
4-bit or 8-bit quantized Linear, GPT-2's Conv1D, an embedding, ...).  A new base kind is one new module with
its adapted layer and one entry here.  The adapted layer supplies the base's part of the LoRA layer by
overriding :class:`fastlora.LoRALinear`'s base methods: its sizes (``in_features``, ``out_features``),
``base_weight()`` (the out × in view the torch path and the kernels read, never a copy), ``base_forward(x)``
(the base alone: merged, disabled), ``_store_base_weight(W)`` (merge and unmerge), and ``to_base()`` (unload).

    dense Linear   torch.nn.Linear with a floating-point weight             → fastlora.LoRALinear
    Conv1D         transformers' Conv1D (GPT-2), weight stored in × out     → fastlora.conv1d.LoRAConv1D
    quantized      bitsandbytes' Linear4bit / Linear8bitLt (QLoRA)          → fastlora.quantized.LoRAQuantizedLinear
    torchao        nn.Linear with a torchao-quantized weight (not int4)     → fastlora.torchao_linear.LoRATorchaoLinear
    Embedding      torch.nn.Embedding and its subclasses                    → fastlora.embedding.LoRAEmbedding
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from fastlora.adapter_settings import AdapterSettings
from fastlora.conv1d import LoRAConv1D, is_conv1d
from fastlora.embedding import LoRAEmbedding
from fastlora.layer import LoRALinear, computes_as_linear
from fastlora.quantized import LoRAQuantizedLinear, is_bnb_linear, quantized_refusal
from fastlora.torchao_linear import LoRATorchaoLinear, give_requantization, is_torchao_linear, torchao_refusal

__all__ = ["BaseKind", "DISPATCHERS", "ADAPTED_TYPES", "kind_of", "refusal", "sizes", "is_adapted",
           "is_conv1d_target", "is_linear_like", "dispatches_itself", "QUANTIZED_LINEAR", "EMBEDDING", "peft_factor_keys"]


@dataclass(frozen=True)
class BaseKind:
    """One kind of base layer: ``claims(module)`` says whether a module is of this kind; ``sizes(module)`` its
    (in_features, out_features); ``adapt(module, adapter_name, settings, init_lora_weights, adapter_dtype)``
    returns the adapted layer, of ``adapted_type``; ``linear_like``: matched by ``target_modules="all-linear"``;
    ``settle(model, layer)``, where given, gives a layer just put into ``model`` what it reads from the model."""

    name: str
    claims: Callable[[nn.Module], bool]
    sizes: Callable[[nn.Module], tuple[int, int]]
    adapt: Callable[..., nn.Module]
    adapted_type: type
    linear_like: bool = True
    settle: Optional[Callable[[nn.Module, nn.Module], None]] = None


def _is_quantized(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module).__module__.split(".")[0] == "bitsandbytes"
            or (isinstance(weight, torch.Tensor) and not weight.is_floating_point())
            or hasattr(weight, "quant_state") or dispatches_itself(weight))


def dispatches_itself(weight) -> bool:
    """Whether ``weight`` is a tensor subclass computing through a dispatch of its own (torchao's quantized weights,
    which report a float dtype): the kernels and merges read a weight's elements, which such a tensor does not
    hold.  torch's own subclasses are read through their operations and are not: DTensor (a sharded weight), and
    the fake and functional tensors of tracing (a model built under FakeTensorMode to size it)."""
    if not isinstance(weight, torch.Tensor) or type(weight) in (torch.Tensor, nn.Parameter):
        return False
    if type(weight).__torch_dispatch__ is torch.Tensor.__torch_dispatch__:
        return False
    return not type(weight).__module__.startswith("torch.")


def _adapt_dense(module: nn.Linear, adapter_name: str, settings: AdapterSettings, init_lora_weights,
                 adapter_dtype: torch.dtype) -> LoRALinear:
    return LoRALinear.wrapping(module, adapter_name, settings, init_lora_weights, adapter_dtype)


DENSE_LINEAR = BaseKind(
    "dense Linear",
    claims=lambda m: isinstance(m, nn.Linear) and not isinstance(m, LoRALinear) and not _is_quantized(m)
    and computes_as_linear(m),
    sizes=lambda m: (m.in_features, m.out_features),
    adapt=_adapt_dense,
    adapted_type=LoRALinear,
)

CONV1D = BaseKind(
    "Conv1D",
    claims=lambda m: is_conv1d(m) and not _is_quantized(m),
    sizes=lambda m: tuple(m.weight.shape),  # stored in × out
    adapt=lambda module, adapter_name, settings, init_lora_weights, adapter_dtype: LoRAConv1D.from_conv1d(
        module, adapter_name, settings, init_lora_weights, adapter_dtype),
    adapted_type=LoRAConv1D,
)

QUANTIZED_LINEAR = BaseKind(
    "quantized Linear (bitsandbytes 4-bit / 8-bit)",
    claims=lambda m: is_bnb_linear(m) and not isinstance(m, LoRALinear) and quantized_refusal(m) is None,
    sizes=lambda m: (m.in_features, m.out_features),
    adapt=lambda module, adapter_name, settings, init_lora_weights, adapter_dtype: LoRAQuantizedLinear.from_quantized(
        module, adapter_name, settings, init_lora_weights, adapter_dtype),
    adapted_type=LoRAQuantizedLinear,
)

TORCHAO_LINEAR = BaseKind(
    "torchao-quantized Linear",
    claims=lambda m: is_torchao_linear(m) and torchao_refusal(m) is None,
    sizes=lambda m: (m.in_features, m.out_features),
    adapt=lambda module, adapter_name, settings, init_lora_weights, adapter_dtype: LoRATorchaoLinear.from_quantized(
        module, adapter_name, settings, init_lora_weights, adapter_dtype),
    adapted_type=LoRATorchaoLinear,
    settle=give_requantization,  # the model's torchao configuration, to quantize a merged weight again
)

EMBEDDING = BaseKind(
    "Embedding",
    claims=lambda m: isinstance(m, nn.Embedding) and not _is_quantized(m),
    sizes=lambda m: (m.num_embeddings, m.embedding_dim),
    adapt=lambda module, adapter_name, settings, init_lora_weights, adapter_dtype: LoRAEmbedding.from_embedding(
        module, adapter_name, settings, init_lora_weights, adapter_dtype),
    adapted_type=LoRAEmbedding,
    linear_like=False,
)

DISPATCHERS: list[BaseKind] = [DENSE_LINEAR, CONV1D, QUANTIZED_LINEAR, TORCHAO_LINEAR, EMBEDDING]
ADAPTED_TYPES: tuple[type, ...] = tuple(kind.adapted_type for kind in DISPATCHERS)

# Kinds fastlora recognises and does not adapt yet: (test, what the user is told).
_NOT_YET = [
    (lambda m: dispatches_itself(getattr(m, "weight", None)),
     lambda m: f"its weight is a {type(m.weight).__name__}, a tensor subclass with operations of its own, whose "
               f"elements fastlora's LoRA layer cannot read: not adapted (fastlora's quantized bases are "
               f"bitsandbytes' Linear4bit and Linear8bitLt, and Linears with torchao's quantized weights)"),
    (_is_quantized, "a quantized layer of a kind fastlora does not adapt (it adapts bitsandbytes' Linear4bit "
                    "and Linear8bitLt)"),
    (lambda m: isinstance(m, nn.Linear) and not computes_as_linear(m),
     "an nn.Linear subclass with a forward of its own, which fastlora's LoRA layer (x Wᵀ + b + the update) would "
     "not reproduce: not adapted"),
    (lambda m: isinstance(m, nn.MultiheadAttention), "an nn.MultiheadAttention: not adapted"),
    (lambda m: isinstance(m, nn.modules.conv._ConvNd), "a convolution: not adapted"),
]


def kind_of(module: nn.Module) -> BaseKind | None:
    """The first kind of :data:`DISPATCHERS` that claims ``module`` (None when none does)."""
    return next((kind for kind in DISPATCHERS if kind.claims(module)), None)


def refusal(module: nn.Module) -> str:
    """Why ``module`` is not adapted: the known kind it is, or the kinds fastlora adapts."""
    if is_bnb_linear(module) and (reason := quantized_refusal(module)) is not None:  # adapted once it is None
        return reason
    if is_torchao_linear(module) and (reason := torchao_refusal(module)) is not None:
        return reason
    for matches, reason in _NOT_YET:
        if matches(module):
            return reason(module) if callable(reason) else reason
    return f"not a kind fastlora adapts ({', '.join(kind.name for kind in DISPATCHERS)})"


def sizes(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a base layer of a kind fastlora adapts, or of an adapted layer."""
    if is_adapted(module):
        return module.in_features, module.out_features
    return kind_of(module).sizes(module)


def is_conv1d_target(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' Conv1D, adapted or not."""
    return isinstance(module, LoRAConv1D) or is_conv1d(module)


def peft_factor_keys(module: nn.Module) -> tuple[str, str]:
    """PEFT's file keys (after the module's path) for A and B of a base layer's kind, or of an adapted layer."""
    adapted = type(module) if is_adapted(module) else kind_of(module).adapted_type
    return getattr(adapted, "PEFT_FACTOR_KEYS", ("lora_A.weight", "lora_B.weight"))


def is_adapted(module: nn.Module) -> bool:
    """Whether ``module`` is one of fastlora's adapted layers."""
    return isinstance(module, ADAPTED_TYPES)


def is_linear_like(module: nn.Module) -> bool:
    """What ``target_modules="all-linear"`` matches: modules of a linear-like kind, adapted or not, and the other
    Linears, quantized or computing a forward of their own (PEFT matches them; they are then refused by name)."""
    kind = kind_of(module) or _adapted_kind(module)
    if kind is not None:
        return kind.linear_like
    return isinstance(module, nn.Linear) and (_is_quantized(module) or not computes_as_linear(module))


def _adapted_kind(module: nn.Module) -> BaseKind | None:
    """The kind whose adapted layer ``module`` is (the most derived one: an adapted embedding is an embedding's)."""
    for cls in type(module).__mro__:
        for kind in DISPATCHERS:
            if kind.adapted_type is cls:
                return kind
    return None

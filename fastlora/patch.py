"""``patch_peft``: run an existing PEFT model's LoRA ``nn.Linear`` layers through fastlora's fused op.

For users who keep their ``peft.PeftModel`` (built with PEFT's ``get_peft_model`` or loaded with
``PeftModel.from_pretrained``): each PEFT ``lora.Linear`` that fastlora can run gets, on that instance
only, a ``forward`` that computes ``base_layer(x) + scaling · B(A(dropout(x)))`` with
:func:`fastlora.lora_linear` — the same math, with fastlora's saved activations (x, S and a seed) and,
on CUDA, its kernels.  PEFT's bitsandbytes 4-bit and 8-bit LoRA layers (QLoRA) keep bitsandbytes' product
and get the term added into its output (:func:`fastlora.quantized.plus_low_rank`, on the torch path on every
device), with the same saving.  PEFT's modules, parameter names, ``state_dict``, ``save_pretrained`` output,
merging and ``disable_adapter`` are untouched: whenever a call is outside what the op covers (adapters
disabled or merged, several active adapters, ``adapter_names=`` per row), the layer runs PEFT's own
forward.  No class of PEFT or transformers is modified; ``unpatch_peft`` removes the per-instance
forwards.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from torch import Tensor, nn

from fastlora.functional import BACKENDS, lora_linear
from fastlora.base_kinds import dispatches_itself
from fastlora.quantized import is_bnb_linear, plus_low_rank

__all__ = ["patch_peft", "unpatch_peft", "PatchReport"]

_MARK = "_fastlora_patch"


@dataclass
class PatchReport:
    """Which PEFT LoRA layers run through fastlora, and why each other one does not.

    :func:`patch_peft` returns one; ``str(report)`` is a summary line and one line per layer left to PEFT.

    Args:
        patched (list[str]): the qualified names of the layers whose forward now runs through fastlora's op
            (each still runs PEFT's forward for a call the op does not cover).
        skipped (dict[str, str]): each PEFT LoRA layer left to PEFT, by qualified name, with the reason.

    PEFT equivalent: none — it reports on :func:`patch_peft`, which has no PEFT counterpart.

    Example:
        >>> import peft, torch
        >>> from fastlora import patch_peft, unpatch_peft
        >>> base = torch.nn.Sequential(torch.nn.Linear(16, 16))
        >>> peft_model = peft.get_peft_model(base, peft.LoraConfig(target_modules=["0"]))
        >>> report = patch_peft(peft_model)
        >>> report.patched, report.skipped
        (['base_model.model.0'], {})
        >>> print(report)
        fastlora runs 1 PEFT LoRA layer(s); 0 left to PEFT
    """

    patched: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"fastlora runs {len(self.patched)} PEFT LoRA layer(s); {len(self.skipped)} left to PEFT"]
        lines += [f"  {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


def _static_reason(layer) -> str | None:
    """Why ``layer`` (a PEFT LoRA layer) can never run through fastlora's op, or None."""
    import peft

    quantized = type(layer).__module__ == "peft.tuners.lora.bnb" and is_bnb_linear(layer.base_layer)
    if not isinstance(layer, peft.tuners.lora.layer.Linear) and not quantized:
        return f"{type(layer).__name__} is not PEFT's LoRA nn.Linear layer (or its bitsandbytes 4-bit / 8-bit one)"
    base = layer.base_layer
    if type(base) is not nn.Linear and not quantized:
        return f"base layer is {type(base).__name__}, not a plain nn.Linear or a bitsandbytes Linear (wrapped)"
    if dispatches_itself(getattr(base, "weight", None)):
        return (f"base layer's weight is a {type(base.weight).__name__}, a tensor subclass with operations of its "
                f"own (torchao's quantized weights), which the fused op does not read")
    if _has_hooks(base):
        return "base layer has forward hooks (e.g. accelerate offloading) that the fused op would bypass"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out=True"
    for name in layer.active_adapters:
        if name in layer.lora_variant:
            return f"adapter {name!r} is a LoRA variant ({type(layer.lora_variant[name]).__name__}, e.g. DoRA)"
        if name in layer.lora_B and layer.lora_B[name].bias is not None:
            return f"adapter {name!r} has lora_bias"
        if name in layer.lora_dropout and not isinstance(layer.lora_dropout[name], (nn.Dropout, nn.Identity)):
            return f"adapter {name!r} uses {type(layer.lora_dropout[name]).__name__} as dropout"
    return None


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"))


def _call_reason(layer, kwargs) -> str | None:
    """Why this call must go to PEFT's forward, or None when fastlora's op computes it."""
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "adapter merged"
    if kwargs.get("adapter_names") is not None:
        return "adapter_names= (a different adapter per row)"
    if len(layer.active_adapters) != 1:
        return f"{len(layer.active_adapters)} active adapters"
    name = layer.active_adapters[0]
    if name not in layer.lora_A:
        return f"no adapter {name!r} in this layer"
    if name in layer.lora_variant:
        return f"adapter {name!r} is a LoRA variant ({type(layer.lora_variant[name]).__name__}, e.g. DoRA)"
    if layer.lora_B[name].bias is not None:
        return f"adapter {name!r} has lora_bias"
    if any(_has_hooks(m) for m in (layer.base_layer, layer.lora_A[name], layer.lora_B[name])):
        return "a forward hook (added after patching, e.g. by accelerate) that the fused op would bypass"
    dropout = layer.lora_dropout[name]
    if not isinstance(dropout, (nn.Dropout, nn.Identity)):
        return f"adapter {name!r} uses {type(dropout).__name__} as dropout"
    if set(kwargs) - {"adapter_names"}:
        return f"extra arguments {sorted(kwargs)}"
    return None


def _fused_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
    patch = self.__dict__[_MARK]
    if args or _call_reason(self, kwargs) is not None:
        return type(self).forward(self, x, *args, **kwargs)  # PEFT's own forward
    name = self.active_adapters[0]
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    base = self.base_layer
    if is_bnb_linear(base):  # bitsandbytes' product, then the term added into it (as fastlora's QLoRA layer)
        return plus_low_rank(base(x), x, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], p,
                             self.training and dropout.training, patch.backend)
    return lora_linear(
        x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], p,
        training=self.training and dropout.training, backend=patch.backend,
    )


@dataclass
class _Patch:
    backend: str


def patch_peft(peft_model: nn.Module, backend: str = "auto") -> PatchReport:
    """Route every PEFT LoRA ``nn.Linear`` layer (dense or bitsandbytes 4-bit / 8-bit) of ``peft_model`` that
    fastlora can run through fastlora's op (per instance; see the module docstring).  Returns a
    :class:`PatchReport`: the layers patched and, for each LoRA layer left to PEFT, why.  Patching twice is
    harmless; ``unpatch_peft`` undoes it.

    Args:
        peft_model (nn.Module): a model built or loaded with PEFT (``peft.get_peft_model``,
            ``peft.PeftModel.from_pretrained``), or any module holding PEFT LoRA layers; patched in place.
        backend (str): the op's backend for the patched layers: ``"auto"`` (the Triton kernels for CUDA
            tensors, the PyTorch path otherwise), ``"torch"`` or ``"triton"``, as :func:`fastlora.lora_linear`;
            patching again changes it.  Default "auto".

    Raises ImportError when PEFT is not installed and ValueError when the model holds no PEFT LoRA layer.

    PEFT equivalent: none — PEFT has no switch for another forward; this keeps the model a PEFT model and
    replaces only the forward of its ``peft.tuners.lora.Linear`` instances (and of its bitsandbytes ones).

    Example:
        >>> import peft, torch
        >>> from fastlora import patch_peft, unpatch_peft
        >>> base = torch.nn.Sequential(torch.nn.Linear(16, 16))
        >>> peft_model = peft.get_peft_model(base, peft.LoraConfig(target_modules=["0"]))
        >>> print(patch_peft(peft_model))
        fastlora runs 1 PEFT LoRA layer(s); 0 left to PEFT
        >>> peft_model(torch.randn(2, 16)).shape   # through fastlora's op
        torch.Size([2, 16])
        >>> unpatch_peft(peft_model)
        1
    """
    try:
        import peft
    except ImportError:
        raise ImportError("patch_peft needs PEFT installed (pip install peft)") from None
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"patch_peft needs a torch.nn.Module (a PEFT model), got {type(peft_model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    report = PatchReport()
    for name, module in peft_model.named_modules():
        if not isinstance(module, peft.tuners.lora.layer.LoraLayer):
            continue
        reason = _static_reason(module)
        if reason is not None:
            report.skipped[name] = reason
            continue
        if _MARK in module.__dict__:
            module.__dict__[_MARK].backend = backend
        else:
            module.__dict__[_MARK] = _Patch(backend=backend)
            # a partial of a module-level function, so a patched model still pickles (torch.save)
            module.forward = functools.partial(_fused_forward, module)
        report.patched.append(name)
    if not report.patched and not report.skipped:
        raise ValueError("patch_peft found no PEFT LoRA layer in the model")
    return report


def unpatch_peft(peft_model: nn.Module) -> int:
    """Remove the forwards ``patch_peft`` put on the layers of ``peft_model``; returns how many.

    The layers run PEFT's own forward again; a model that was never patched is left as it is (returns 0).

    Args:
        peft_model (nn.Module): the model given to :func:`patch_peft`.

    PEFT equivalent: none — it undoes :func:`patch_peft`, which has no PEFT counterpart.

    Example:
        >>> import peft, torch
        >>> from fastlora import patch_peft, unpatch_peft
        >>> base = torch.nn.Sequential(torch.nn.Linear(16, 16))
        >>> peft_model = peft.get_peft_model(base, peft.LoraConfig(target_modules=["0"]))
        >>> print(patch_peft(peft_model))
        fastlora runs 1 PEFT LoRA layer(s); 0 left to PEFT
        >>> unpatch_peft(peft_model), unpatch_peft(peft_model)
        (1, 0)
    """
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"unpatch_peft needs the model given to patch_peft (a torch.nn.Module), got "
                        f"{type(peft_model).__name__}")
    count = 0
    for module in peft_model.modules():
        if _MARK in module.__dict__:
            del module.__dict__[_MARK]
            del module.__dict__["forward"]
            count += 1
    return count

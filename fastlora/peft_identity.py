"""A ``PeftModel`` that PEFT-aware tools recognise as a PEFT model.

transformers' Trainer, accelerate and TRL decide how to treat a model with ``isinstance(model,
peft.PeftModel)``: only then does the Trainer read the wrapped model's forward signature (to keep the
dataset's columns and find the labels), save checkpoints and ``save_model()`` output as adapter folders,
and reload adapters on ``resume_from_checkpoint`` and ``load_best_model_at_end``.  Where PEFT is
installed, ``get_peft_model`` returns this subclass, so those tools work unchanged.

Every behaviour is fastlora's: ``PeftModel`` comes first in the method order, and each public method
of ``PeftModel`` that fastlora does not implement raises ``NotImplementedError`` naming itself instead
of running PEFT's code on a model PEFT did not build.  Nothing in PEFT is modified.
"""

from __future__ import annotations

import peft
from torch import nn

__all__ = ["peft_compatible_class"]

_BUILT: dict[type, type] = {}


def peft_compatible_class(lora_model: type) -> type:
    """The subclass of ``lora_model`` (fastlora's ``PeftModel``) and ``peft.PeftModel``, built once.

    It is built from the class it is given, so this module imports nothing of fastlora's and the model
    module imports it, not the other way round.  Its home is ``lora_model``'s module, as
    ``PeftCompatibleLoraModel`` (which that module provides on access, so pickle finds it by name)."""
    klass = _BUILT.get(lora_model)
    if klass is None:
        klass = type("PeftCompatibleLoraModel", (lora_model, peft.PeftModel), {
            "__module__": lora_model.__module__, "__qualname__": "PeftCompatibleLoraModel",
            "__doc__": "fastlora's ``PeftModel``, an instance of ``peft.PeftModel`` for the tools that check."})
        for name, member in _refusals(lora_model):
            setattr(klass, name, member)
        _BUILT[lora_model] = klass
    return klass


def _refusals(lora_model: type):
    """(name, member) for each public method or property of ``PeftModel`` that ``lora_model`` lacks."""
    seen = set()
    for klass in peft.PeftModel.__mro__:
        if klass in (nn.Module, object):
            continue
        for name, value in vars(klass).items():
            if name.startswith("__") or hasattr(lora_model, name) or name in seen:
                continue
            if isinstance(value, property):
                seen.add(name)
                yield name, _missing_property(name)
            elif callable(value) or isinstance(value, (classmethod, staticmethod)):
                seen.add(name)
                yield name, _not_implemented(name)


def _not_implemented(name: str):
    def method(self, *args, **kwargs):
        raise NotImplementedError(f"{name} is a method of PEFT's PeftModel that fastlora's PeftModel does not implement")

    method.__name__ = method.__qualname__ = name
    return method


def _missing_property(name: str) -> property:
    def get(self):
        raise AttributeError(f"{name} is an attribute of PEFT's PeftModel that fastlora's PeftModel does not have")

    return property(get)

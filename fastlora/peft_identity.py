"""A ``LoraModel`` that PEFT-aware tools recognise as a PEFT model.

transformers' Trainer, accelerate and TRL decide how to treat a model with ``isinstance(model,
peft.PeftModel)``: only then does the Trainer read the wrapped model's forward signature (to keep the
dataset's columns and find the labels), save checkpoints and ``save_model()`` output as adapter folders,
and reload adapters on ``resume_from_checkpoint`` and ``load_best_model_at_end``.  Where PEFT is
installed, ``get_peft_model`` returns this subclass, so those tools work unchanged.

Every behaviour is fastlora's: ``LoraModel`` comes first in the method order, and each public method
of ``PeftModel`` that fastlora does not implement raises ``NotImplementedError`` naming itself instead
of running PEFT's code on a model PEFT did not build.  Nothing in PEFT is modified.
"""

from __future__ import annotations

import peft
from torch import nn

from fastlora.model import LoraModel

__all__ = ["PeftCompatibleLoraModel"]


class PeftCompatibleLoraModel(LoraModel, peft.PeftModel):
    """fastlora's ``LoraModel``, an instance of ``peft.PeftModel`` for the tools that check."""


def _not_implemented(name: str):
    def method(self, *args, **kwargs):
        raise NotImplementedError(f"{name} is a method of PEFT's PeftModel that fastlora's LoraModel does not implement")

    method.__name__ = method.__qualname__ = name
    return method


def _missing_property(name: str) -> property:
    def get(self):
        raise AttributeError(f"{name} is an attribute of PEFT's PeftModel that fastlora's LoraModel does not have")

    return property(get)


for _klass in peft.PeftModel.__mro__:
    if _klass in (nn.Module, object):
        continue
    for _name, _value in vars(_klass).items():
        if _name.startswith("__") or hasattr(LoraModel, _name) or _name in vars(PeftCompatibleLoraModel):
            continue
        if isinstance(_value, property):
            setattr(PeftCompatibleLoraModel, _name, _missing_property(_name))
        elif callable(_value) or isinstance(_value, (classmethod, staticmethod)):
            setattr(PeftCompatibleLoraModel, _name, _not_implemented(_name))

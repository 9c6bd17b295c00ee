"""Triton kernels and their launchers (imported as ``fastlora.kernels``; imports only torch and triton).

``lora_forward`` / ``lora_backward`` are the launchers ``fastlora.ops`` calls inside its ``triton_op`` bodies;
``dropout.keep_mask`` is the Philox keep mask both directions regenerate.
"""

from .backward import lora_backward
from .forward import lora_forward

__all__ = ["lora_forward", "lora_backward"]

"""fastlora: LoRA layers with fused Triton kernels and a lean PyTorch reference path.

Importing fastlora registers its torch ops (``torch.ops.fastlora.*``) and nothing else: triton is
imported only when a kernel is first launched.
"""

from fastlora.config import LoraConfig, TaskType
from fastlora.functional import lora_linear
from fastlora.layer import LoRALinear
from fastlora.model import LoraModel, get_peft_model

__all__ = ["LoRALinear", "LoraConfig", "TaskType", "lora_linear", "get_peft_model", "LoraModel"]
__version__ = "0.1.0"

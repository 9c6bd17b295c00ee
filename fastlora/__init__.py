"""fastlora: LoRA layers with fused Triton kernels and a lean PyTorch path.

Importing fastlora registers its torch ops (``torch.ops.fastlora.*``) and nothing else: triton is
imported only when a kernel is first launched.
"""

from fastlora._version import __version__
from fastlora.auto import (AutoPeftModel, AutoPeftModelForCausalLM, AutoPeftModelForFeatureExtraction,
                           AutoPeftModelForQuestionAnswering, AutoPeftModelForSeq2SeqLM,
                           AutoPeftModelForSequenceClassification, AutoPeftModelForTokenClassification)
from fastlora.injection import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from fastlora.model_files import load_peft_weights
from fastlora.config import LoraConfig, PeftConfig, PeftType, TaskType, UnsupportedFeatureError
from fastlora.eva import get_eva_state_dict, initialize_lora_eva_weights
from fastlora.functional import lora_linear
from fastlora.corda import preprocess_corda
from fastlora.init_configs import CordaConfig, EvaConfig, LoftQConfig, LoraGAConfig
from fastlora.kbit import prepare_model_for_kbit_training
from fastlora.layer import LoraLayer, LoRALinear
from fastlora.loftq import replace_lora_weights_loftq
from fastlora.lora_ga import preprocess_loraga
from fastlora.model import (LoraModel, PeftModel, PeftModelForCausalLM, PeftModelForFeatureExtraction,
                            PeftModelForQuestionAnswering, PeftModelForSeq2SeqLM, PeftModelForSequenceClassification,
                            PeftModelForTokenClassification, get_peft_model)
from fastlora.precision import cast_mixed_precision_params
from fastlora.status import get_layer_status, get_model_status
from fastlora.patch import PatchReport, patch_peft, unpatch_peft

__all__ = [
    "LoRALinear", "LoraConfig", "TaskType", "lora_linear", "get_peft_model", "LoraModel", "PeftModel",
    "get_peft_model_state_dict", "set_peft_model_state_dict", "UnsupportedFeatureError",
    "patch_peft", "unpatch_peft", "PatchReport", "prepare_model_for_kbit_training", "__version__",
    "PeftConfig", "LoraLayer", "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification", "AutoPeftModelForTokenClassification",
    "AutoPeftModelForQuestionAnswering", "AutoPeftModelForFeatureExtraction", "LoftQConfig",
    "replace_lora_weights_loftq", "PeftType", "load_peft_weights", "cast_mixed_precision_params",
    "get_layer_status", "get_model_status", "PeftModelForCausalLM", "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification", "PeftModelForTokenClassification", "PeftModelForQuestionAnswering",
    "PeftModelForFeatureExtraction", "LoraGAConfig", "EvaConfig", "preprocess_loraga",
    "get_eva_state_dict", "initialize_lora_eva_weights", "CordaConfig", "preprocess_corda", "inject_adapter_in_model",
]

"""TRL's trainers with fastlora's LoRA: ``SFTTrainer``, ``DPOTrainer``, ``GRPOTrainer``, ``KTOTrainer``,
``RLOOTrainer`` and ``RewardTrainer`` that take a :class:`fastlora.LoraConfig` as ``peft_config``.

TRL accepts only a ``peft.PeftConfig`` there and builds the adapted model with ``peft.get_peft_model``, that is
with PEFT's layers.  Each trainer here is TRL's, subclassed: given fastlora's config, it builds the model as TRL
would (a model id loaded by TRL's own ``create_model_from_path`` with the same ``model_init_kwargs`` and
``quantization_config``, after TRL's ``set_seed(args.seed)``), adapts it with :func:`fastlora.get_peft_model`,
and hands TRL the adapted model with no ``peft_config``.  fastlora's model is an instance of
``peft.PeftModel``, so TRL treats it as the PEFT model it would have built: input gradients for gradient
checkpointing, QLoRA's bf16 adapters, the adapter-only checkpoints, the reference adapter of DPO-style trainers
(a copy of the adapter being trained: TRL's own copy picks tensors by PEFT's parameter names, so the trainers here
copy it).  Given a ``peft.PeftConfig`` (or none), a trainer here is TRL's own, but for that copy.

    from fastlora import LoraConfig                 # was: from peft import LoraConfig
    from fastlora.trl_trainers import SFTTrainer    # was: from trl import SFTTrainer

TRL's ``disable_dropout`` (on by default for DPO) reaches fastlora's LoRA dropout too: TRL zeroes ``nn.Dropout``
modules, and fastlora keeps each adapter's rate in its layers, which the trainers here set to 0.  Nothing in TRL
or PEFT is modified.  TRL's chat-template cloning (``chat_template_path``) adds tokens after the
model is built and makes their rows trainable by editing the PEFT config it is given: with fastlora's config it
is refused (give ``trainable_token_indices`` in the config and set the tokenizer's chat template yourself).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import warnings

import trl
from transformers import AutoModelForSequenceClassification, set_seed
from trl.trainer.utils import create_model_from_path

from fastlora.config import LoraConfig
from fastlora.layer import LoRALinear
from fastlora.model import REFERENCE_ADAPTER_WARNING, PeftModel, get_peft_model

__all__ = ["SFTTrainer", "DPOTrainer", "GRPOTrainer", "KTOTrainer", "RLOOTrainer", "RewardTrainer",
           "with_fastlora_lora"]


def _adapted_model(trainer_class: type, bound: inspect.BoundArguments, config: LoraConfig):
    """The model TRL would build from ``bound``'s arguments, adapted by fastlora (TRL's steps before its
    ``get_peft_model``: the seed, then the model from its id)."""
    arguments = bound.arguments
    model, args = arguments["model"], arguments.get("args")
    if getattr(args, "chat_template_path", None) is not None:
        raise ValueError("chat_template_path with fastlora's LoraConfig: TRL adds the template's tokens after the "
                         "model is adapted; add them to the tokenizer and resize the model yourself, name their rows "
                         "in LoraConfig(trainable_token_indices=...), and leave chat_template_path unset")
    set_seed(getattr(args, "seed", 42))  # TrainingArguments' default seed when args is None
    if isinstance(model, str):
        init_kwargs = dict(getattr(args, "model_init_kwargs", None) or {})
        quantization_config = arguments.get("quantization_config")
        if quantization_config is not None:
            if "quantization_config" in init_kwargs:
                raise ValueError("quantization_config is set both as a trainer argument and in args.model_init_kwargs")
            init_kwargs["quantization_config"] = quantization_config
            arguments["quantization_config"] = None  # applied here; TRL would warn that the model is already built
        if args is not None and args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
            init_kwargs["device_map"] = None
        init_kwargs.setdefault("trust_remote_code", getattr(args, "trust_remote_code", False))
        if args is not None:
            args.model_init_kwargs = None  # applied here; TRL warns when they come with a built model
        architecture = None
        if issubclass(trainer_class, trl.RewardTrainer):  # TRL's reward models have one output
            architecture = AutoModelForSequenceClassification
            init_kwargs.setdefault("num_labels", 1)
        model = create_model_from_path(model, architecture, **init_kwargs)
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    plugin = getattr(args, "deepspeed_plugin", None)
    # TRL's rule: under ZeRO-3 a non-quantized model keeps its adapters in the base's dtype (one dtype per
    # partitioned group)
    keep_dtype = plugin is not None and getattr(plugin, "zero_stage", None) == 3 and not quantized
    return get_peft_model(model, config, autocast_adapter_dtype=not keep_dtype)


# TRL's trainers whose loss reads the output head's weight directly (a fused log-probability), which an adapter on
# the head would not reach: TRL refuses PEFT's adapters there.
_HEAD_WEIGHT_LOSS = (trl.SFTTrainer, trl.DPOTrainer, trl.GRPOTrainer, trl.KTOTrainer, trl.RLOOTrainer)


def _check_no_adapter_on_the_head(trainer_class: type, model) -> None:
    """TRL's refusal of an adapter on ``lm_head``, for fastlora's layers (TRL looks for PEFT's)."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if issubclass(trainer_class, _HEAD_WEIGHT_LOSS) and isinstance(model, PeftModel) and isinstance(head, LoRALinear):
        raise ValueError("Applying a PEFT adapter to `lm_head` is not supported: the log-probabilities are computed "
                         "from `lm_head.weight` directly, so the adapter would never be trained. Remove `'lm_head'` "
                         "from your `target_modules` (with ensure_weight_tying, the embeddings' adapter is the "
                         "head's too: leave the embeddings out as well).")


def _copy_into_a_new_reference_adapter(model: PeftModel, adapters_before: set[str]) -> None:
    """TRL's DPO, KTO, GRPO and RLOO trainers, handed an adapted model and no reference model, add a frozen adapter
    "ref" with "default"'s config and copy "default"'s values into it, picking them by PEFT's parameter names
    (``...lora_A.default.weight``), which fastlora's layers do not have: "ref" would keep a fresh initialization
    instead of the adapter being trained (a trained adapter's reference would be wrong, silently).  Copy them as
    TRL means to: every tensor of "default"'s adapter file (factors, DoRA magnitudes, modules_to_save copies,
    token rows, biases)."""
    if "ref" in model.peft_config and "ref" not in adapters_before and "default" in adapters_before:
        model.load_adapter_tensors(model.adapter_tensors("default", None, False), "ref", False)


def _disable_lora_dropout(model) -> None:
    """TRL's ``disable_dropout`` (DPO's default) sets ``p = 0`` on every ``nn.Dropout``, PEFT's LoRA dropout
    included; fastlora's LoRA dropout is each adapter's rate, which is set to 0 here likewise (the configs keep
    their value, as PEFT's do)."""
    for _, layer in getattr(model, "lora_layers", lambda: [])():
        for name, settings in list(layer.adapter_settings.items()):
            if settings.lora_dropout:
                layer.adapter_settings[name] = dataclasses.replace(settings, lora_dropout=0.0)


def with_fastlora_lora(trainer_class: type) -> type:
    """``trainer_class`` (a TRL trainer whose constructor takes ``model`` and ``peft_config``) taking fastlora's
    :class:`fastlora.LoraConfig` as ``peft_config``; every other argument is the TRL trainer's own."""
    signature = inspect.signature(trainer_class.__init__)

    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        config = bound.arguments.get("peft_config")
        adapted_here = isinstance(config, LoraConfig)
        if adapted_here:
            bound.arguments["model"] = _adapted_model(trainer_class, bound, config)
            bound.arguments["peft_config"] = None
        model = bound.arguments.get("model")
        try:
            _check_no_adapter_on_the_head(trainer_class, model)
        except ValueError:
            if adapted_here:
                model.unload()  # the model given, as it was
            raise
        adapters_before = set(model.peft_config) if isinstance(model, PeftModel) else None
        with warnings.catch_warnings():  # the reference adapter is copied below
            warnings.filterwarnings("ignore", message=re.escape(REFERENCE_ADAPTER_WARNING[:40]))
            trainer_class.__init__(*bound.args, **bound.kwargs)
        if adapters_before is not None:
            _copy_into_a_new_reference_adapter(model, adapters_before)
        if getattr(bound.arguments.get("args"), "disable_dropout", False):
            _disable_lora_dropout(self.model)

    __init__.__signature__ = signature
    __init__.__doc__ = trainer_class.__init__.__doc__
    return type(trainer_class.__name__, (trainer_class,), {
        "__init__": __init__, "__module__": __name__, "__qualname__": trainer_class.__name__,
        "__doc__": f"TRL's ``{trainer_class.__name__}``, taking :class:`fastlora.LoraConfig` as ``peft_config`` "
                   f"(see :mod:`fastlora.trl_trainers`)."})


SFTTrainer = with_fastlora_lora(trl.SFTTrainer)
DPOTrainer = with_fastlora_lora(trl.DPOTrainer)
GRPOTrainer = with_fastlora_lora(trl.GRPOTrainer)
KTOTrainer = with_fastlora_lora(trl.KTOTrainer)
RLOOTrainer = with_fastlora_lora(trl.RLOOTrainer)
RewardTrainer = with_fastlora_lora(trl.RewardTrainer)

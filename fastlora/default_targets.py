"""The modules a config adapts when it names none: per architecture (``model.config.model_type``), the
projections PEFT adapts by default, so that ``LoraConfig(r=8)`` without ``target_modules`` means what it means
in PEFT.  An architecture outside the table is refused with the names the user can choose from."""

from __future__ import annotations

from torch import nn

from fastlora.conv1d import is_conv1d

__all__ = ["DEFAULT_TARGETS", "DEFAULT_TARGET_PATTERNS", "default_target_modules", "has_default_targets"]

_QV = ["q_proj", "v_proj"]
_FUSED_QKV = ["query_key_value"]

# model_type → target_modules
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(["llama", "llama4", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                     "stablelm", "opt", "gptj", "gpt_neo", "bart"], _QV),
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    **dict.fromkeys(["gpt_neox", "falcon", "RefinedWeb", "RefinedWebModel", "bloom", "chatglm"], _FUSED_QKV),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["c_attn"]),
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mpt": ["Wqkv"],
    **dict.fromkeys(["t5", "mt5"], ["q", "v"]),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "layoutlm"], ["query", "value"]),
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}
# model_type → a target_modules regex (the language model's projections of a multimodal model)
DEFAULT_TARGET_PATTERNS: dict[str, str] = {"gemma4": r".*language_model\..*\.(q_proj|v_proj)"}


def has_default_targets(model: nn.Module) -> bool:
    """Whether ``model``'s architecture has default targets."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type in DEFAULT_TARGETS or model_type in DEFAULT_TARGET_PATTERNS


def default_target_modules(model: nn.Module) -> list[str] | str:
    """The default targets of ``model``'s architecture; ValueError naming the model's Linear and Conv1D modules
    (the names ``target_modules`` can take) when the architecture has none."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[model_type])
    if model_type in DEFAULT_TARGET_PATTERNS:
        return DEFAULT_TARGET_PATTERNS[model_type]
    linear_like = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                          if isinstance(module, nn.Linear) or is_conv1d(module)})
    raise ValueError(
        f"target_modules is not set and fastlora has no default targets for "
        f"{'model_type ' + repr(model_type) if model_type else type(model).__name__}: name them in LoraConfig("
        f"target_modules=[...]) or use 'all-linear'; this model's Linear and Conv1D modules are named "
        f"{', '.join(linear_like) or 'nothing'}")

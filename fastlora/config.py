"""``LoraConfig`` and ``TaskType``: PEFT's names and meanings, validated in one place."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Optional, Union

__all__ = ["LoraConfig", "TaskType"]


class TaskType(str, enum.Enum):
    """PEFT's task types (the same string values, so configs round-trip through JSON)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


_BIAS_MODES = ("none", "all", "lora_only")
_INIT_MODES = (True, False, "gaussian")

# Fields of PEFT's LoraConfig that select features fastlora does not implement, with the value that
# means "feature off".  An adapter_config.json that turns one on is refused instead of silently misread.
_UNSUPPORTED_IF_SET = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layer_replication": None,
    "use_qalora": False,
    "lora_bias": False,
}


@dataclass(frozen=True)
class LoraConfig:
    """LoRA settings, field for field PEFT's ``LoraConfig`` for the features fastlora supports.

    ``target_modules``: a list of module names (exact, or a dotted suffix of the qualified name), a
    regex string (full match on the qualified name) or ``"all-linear"`` (every ``nn.Linear`` but the
    output head).  ``scaling`` = lora_alpha / r, or lora_alpha / sqrt(r) with ``use_rslora``.
    """

    task_type: Optional[Union[TaskType, str]] = None
    target_modules: Optional[Union[list[str], str]] = None
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    inference_mode: bool = False
    bias: str = "none"
    use_rslora: bool = False
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    autocast_adapter_dtype: bool = True
    base_model_name_or_path: Optional[str] = None
    peft_type: str = field(default="LORA", init=False)

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if isinstance(self.task_type, str) and not isinstance(self.task_type, TaskType):
            try:
                put("task_type", TaskType(self.task_type))
            except ValueError:
                raise ValueError(
                    f"task_type must be one of {[t.value for t in TaskType]} or None, got {self.task_type!r}"
                ) from None
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be an integer >= 1, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be a number > 0, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in _BIAS_MODES:
            raise ValueError(f"bias must be one of {_BIAS_MODES}, got {self.bias!r}")
        if self.init_lora_weights not in _INIT_MODES:
            raise ValueError(f"init_lora_weights must be one of {_INIT_MODES}, got {self.init_lora_weights!r}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                value = sorted(value)
                put(name, value)
            if value is not None and not isinstance(value, str):
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise TypeError(f"{name} must be a string or a list of strings, got {value!r}")
        if self.target_modules is None or (isinstance(self.target_modules, list) and not self.target_modules):
            raise ValueError(
                "target_modules must name the modules to adapt (a list of names, a regex or 'all-linear'); "
                "fastlora has no per-architecture defaults"
            )
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            put("layers_to_transform", [self.layers_to_transform])
        if self.layers_to_transform is not None and not all(
            isinstance(i, int) and i >= 0 for i in self.layers_to_transform
        ):
            raise ValueError(f"layers_to_transform must be layer indices >= 0, got {self.layers_to_transform!r}")
        if isinstance(self.layers_pattern, str):
            put("layers_pattern", [self.layers_pattern])
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save):
                raise TypeError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
            put("modules_to_save", list(self.modules_to_save))

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def replace(self, **changes: Any) -> "LoraConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """PEFT's adapter_config.json content (keys sorted when written)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["task_type"] = self.task_type.value if self.task_type is not None else None
        for name in ("target_modules", "exclude_modules"):
            if isinstance(out[name], list):
                out[name] = sorted(out[name])
        out.pop("autocast_adapter_dtype")
        out.update(_UNSUPPORTED_IF_SET)  # written as PEFT writes them: each feature off
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        """Read a PEFT ``adapter_config.json``; refuse features fastlora does not implement."""
        if data.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"not a LoRA adapter: peft_type is {data.get('peft_type')!r}")
        for key, off in _UNSUPPORTED_IF_SET.items():
            if key in data and data[key] not in (off, None):
                raise ValueError(f"adapter config sets {key}={data[key]!r}, which fastlora does not support")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{key: value for key, value in data.items() if key in names})

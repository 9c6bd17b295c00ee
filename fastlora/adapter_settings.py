"""One adapter's hyper-parameters and the rule for adapter names: plain data, below the layers and the config
that both use them."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

__all__ = ["AdapterSettings", "check_adapter_name", "plain_number"]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plain_number(value):
    """A number of another library (numpy's int64 or float32, as sweeps and optuna hand them) as Python's int or
    float, so that checks, arithmetic and JSON take it as PEFT's would; anything else unchanged."""
    if isinstance(value, bool) or type(value) in (int, float):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


# The name mixed-adapter batches use for rows that take the base model alone (PEFT's).
RESERVED_ADAPTER_NAMES = frozenset({"__base__"})
# The largest rank accepted, the kernels' 32-bit index range (the factors' memory runs out long before).
MAX_RANK = 2**31 - 1
# A file name's limit on common file systems: a non-default adapter is saved in a folder named after it.
MAX_ADAPTER_NAME_BYTES = 255


def check_adapter_name(name) -> None:
    """An adapter name becomes part of parameter names and, when saved, a folder name inside the save directory:
    a non-empty string without '.', without a path separator (so no absolute path either) or control character,
    not only white space, not reserved (``"__base__"``), at most 255 bytes in UTF-8."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {name!r}")
    if "/" in name or "\\" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError(f"adapter_name must not hold a path separator or a control character, got {name!r}: it "
                         f"names a folder inside the save directory")
    if not name.strip():
        raise ValueError(f"adapter_name must not be white space only, got {name!r}")
    if name in RESERVED_ADAPTER_NAMES:
        raise ValueError(f"adapter_name {name!r} is reserved (it marks rows that take the base model alone)")
    if len(name.encode("utf-8")) > MAX_ADAPTER_NAME_BYTES:
        raise ValueError(f"adapter_name is {len(name.encode('utf-8'))} bytes long; a saved adapter's folder name "
                         f"allows {MAX_ADAPTER_NAME_BYTES}")


@dataclass(frozen=True)
class AdapterSettings:
    """One adapter's hyper-parameters.  ``scaling`` = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA;
    ``use_dora``: a DoRA adapter (a trained magnitude per output feature, see :func:`fastlora.lora_linear`);
    ``lora_bias``: a trained bias on B, so the update is scaling · ((dropout(x) Aᵀ) Bᵀ + b_B);
    ``frozen_lora_B``: B keeps its initial values, only A trains (MiCA's adapters)."""

    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    frozen_lora_B: bool = False

    def __post_init__(self) -> None:
        for name in ("r", "lora_alpha", "lora_dropout"):
            object.__setattr__(self, name, plain_number(getattr(self, name)))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be an integer >= 1, got {self.r!r}")
        if self.r > MAX_RANK:
            raise ValueError(f"r must be at most {MAX_RANK}, got {self.r!r}")
        if not _is_number(self.lora_alpha) or not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be a finite number > 0, got {self.lora_alpha!r}")
        if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        for name in ("use_rslora", "use_dora", "lora_bias", "frozen_lora_B"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

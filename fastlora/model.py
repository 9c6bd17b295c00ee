"""``get_peft_model`` / ``LoraModel``: pick the target ``nn.Linear`` s by qualified name, swap them for
``LoRALinear``, freeze the rest; merge, unload, disable; PEFT-format save and load.

Every check runs on a plan before the model is touched, and a failure while applying the plan puts
the model back as it was: a failed ``get_peft_model`` or ``from_pretrained`` changes nothing.
"""

from __future__ import annotations

import contextlib
import copy
import re
from typing import Iterator

import torch
from torch import nn

from fastlora.config import LoraConfig
from fastlora.layer import LoRALinear

__all__ = ["get_peft_model", "LoraModel", "ModulesToSaveWrapper", "plan_targets"]

_WIDE_ADAPTER_DTYPES = (torch.float16, torch.bfloat16)

# PEFT's task heads: its SEQ_CLS and TOKEN_CLS models add ``classifier`` and ``score`` to modules_to_save,
# its QUESTION_ANS model ``qa_outputs``.  The ones a model lacks are skipped (a Llama has ``score``, a
# BERT ``classifier``); any other modules_to_save entry must match a module.
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


def _task_heads(config: LoraConfig) -> tuple[str, ...]:
    return _TASK_HEADS.get(config.task_type.value if config.task_type is not None else "", ())


def with_task_heads(config: LoraConfig) -> LoraConfig:
    """``config`` with its task's heads added to ``modules_to_save``, as PEFT's task models do."""
    heads = [h for h in _task_heads(config) if h not in (config.modules_to_save or [])]
    return config.replace(modules_to_save=list(config.modules_to_save or []) + heads) if heads else config


def _under_modules_to_save(name: str, config: LoraConfig) -> bool:
    """PEFT's guard: no adapter on a modules_to_save module or inside one."""
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in config.modules_to_save or [])


class ModulesToSaveWrapper(nn.Module):
    """A ``modules_to_save`` module as PEFT keeps it: the original, frozen, and a trainable copy,
    ``modules_to_save["default"]``, which the forward uses.  ``LoraModel.disable_adapter`` switches to the
    original; ``merge_and_unload`` and ``unload`` keep the copy.  Other attributes (``weight``, ...) are
    the active module's."""

    def __init__(self, original: nn.Module, trainable: bool) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict({"default": copy.deepcopy(original)})
        self.original_module.requires_grad_(False)
        self.modules_to_save["default"].requires_grad_(trainable)
        self.adapter_enabled = True

    @property
    def active_module(self) -> nn.Module:
        return self.modules_to_save["default"] if self.adapter_enabled else self.original_module

    def forward(self, *args, **kwargs):
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save", "adapter_enabled"):
                raise
            return getattr(self.active_module, name)


def _name_matches(name: str, patterns: list[str] | str) -> bool:
    """PEFT's rule: a string is a regex matched in full; a list entry matches exactly or as a dotted suffix."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _layer_index(name: str, layers_pattern: list[str] | None) -> int | None:
    pattern = "|".join(re.escape(p) for p in layers_pattern) if layers_pattern else r"[^.]+"
    found = re.search(rf"(?:^|\.)(?:{pattern})\.(\d+)(?:\.|$)", name)
    return int(found.group(1)) if found else None


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def plan_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Qualified names of the modules ``config`` adapts, checked: each is an ``nn.Linear`` not yet adapted.

    Raises ValueError when nothing matches (naming a few Linear modules that do exist) and TypeError when
    a matched module is not an ``nn.Linear``.
    """
    head = _output_head(model)
    targets, not_linear, saved_instead = [], [], []
    for name, module in model.named_modules():
        if not name:
            continue
        if config.target_modules == "all-linear":
            if not isinstance(module, nn.Linear) or module is head:
                continue
        elif not _name_matches(name, config.target_modules):
            continue
        if config.exclude_modules is not None and _name_matches(name, config.exclude_modules):
            continue
        if _under_modules_to_save(name, config):
            saved_instead.append(name)
            continue
        if config.layers_to_transform is not None:
            if _layer_index(name, config.layers_pattern) not in config.layers_to_transform:
                continue
        if isinstance(module, LoRALinear):
            raise ValueError(f"module {name!r} is already a LoRALinear: the model already has an adapter")
        if not isinstance(module, nn.Linear):
            not_linear.append(f"{name} ({type(module).__name__})")
            continue
        targets.append(name)
    if not_linear:
        raise TypeError(
            f"target_modules={config.target_modules!r} matched modules that are not nn.Linear: "
            f"{', '.join(not_linear[:5])}; fastlora adapts nn.Linear layers only"
        )
    if not targets:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no module of the model"
            + (" (after exclude_modules / layers_to_transform)" if config.exclude_modules or config.layers_to_transform else "")
            + (f" outside modules_to_save (which PEFT never adapts; matched there: {', '.join(saved_instead[:4])})"
               if saved_instead else "")
            + f"; nn.Linear modules it has include: {', '.join(linears[:6]) or 'none'}"
        )
    return targets


def _plan_modules_to_save(model: nn.Module, config: LoraConfig) -> list[str]:
    """Qualified names of the modules to wrap in a ``ModulesToSaveWrapper``: the outermost match of each
    entry (exact name or dotted suffix).  An entry that matches nothing is an error, but for task heads."""
    found = set()
    for wanted in config.modules_to_save or []:
        matches = {n for n, _ in model.named_modules() if n and _name_matches(n, [wanted])}
        if not matches and wanted not in _task_heads(config):
            raise ValueError(f"modules_to_save entry {wanted!r} matches no module of the model")
        found |= matches
    for name in found:
        if isinstance(model.get_submodule(name), (LoRALinear, ModulesToSaveWrapper)):
            raise ValueError(f"modules_to_save module {name!r} is already adapted: the model already has an adapter")
    return sorted(n for n in found if not any(n.startswith(other + ".") for other in found))


def _adapter_dtype(linear: nn.Linear, config: LoraConfig) -> torch.dtype:
    # PEFT's autocast_adapter_dtype: half-precision bases get float32 adapters.
    dtype = linear.weight.dtype
    return torch.float32 if config.autocast_adapter_dtype and dtype in _WIDE_ADAPTER_DTYPES else dtype


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _apply(model: nn.Module, config: LoraConfig, targets: list[str], to_save: list[str]) -> None:
    """Swap and freeze; on any error put every module and requires_grad flag back."""
    originals = {name: model.get_submodule(name) for name in [*targets, *to_save]}
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for name in targets:
            linear = originals[name]
            _set_module(model, name, LoRALinear.from_linear(
                linear, r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights,
                adapter_dtype=_adapter_dtype(linear, config),
            ))
        for name, param in model.named_parameters():
            is_lora = name.endswith(".lora_A") or name.endswith(".lora_B")
            param.requires_grad_(is_lora and not config.inference_mode)
        trainable = []
        if config.bias == "all":
            trainable += [p for n, p in model.named_parameters() if n == "bias" or n.endswith(".bias")]
        elif config.bias == "lora_only":
            trainable += [m.bias for m in model.modules() if isinstance(m, LoRALinear) and m.bias is not None]
        for param in trainable:
            param.requires_grad_(not config.inference_mode)
        for name in to_save:
            _set_module(model, name, ModulesToSaveWrapper(originals[name], trainable=not config.inference_mode))
    except BaseException:
        for name, linear in originals.items():
            _set_module(model, name, linear)
        for param, flag in flags.items():
            param.requires_grad_(flag)
        raise


def get_peft_model(model: nn.Module, config: LoraConfig) -> "LoraModel":
    """Adapt ``model`` in place as PEFT's ``get_peft_model`` does and return it wrapped in a ``LoraModel``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a fastlora.LoraConfig, got {type(config).__name__}")
    config = with_task_heads(config)
    targets = plan_targets(model, config)
    to_save = _plan_modules_to_save(model, config)
    _apply(model, config, targets, to_save)
    return LoraModel(model, config, to_save)


class LoraModel(nn.Module):
    """A model with LoRA adapters.  Attribute access falls through to the wrapped model, so ``generate``,
    ``config`` and HF Trainer keep working; ``model`` is the wrapped model itself."""

    def __init__(self, model: nn.Module, config: LoraConfig, modules_to_save: list[str] = ()) -> None:
        super().__init__()
        self.model = model
        self.peft_config = config
        self.modules_to_save = list(modules_to_save)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def lora_layers(self) -> Iterator[tuple[str, LoRALinear]]:
        for name, module in self.model.named_modules():
            if isinstance(module, LoRALinear):
                yield name, module

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, as PEFT returns them."""
        params = list(self.model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def merge_adapter(self) -> None:
        for _, layer in self.lora_layers():
            layer.merge()

    def unmerge_adapter(self) -> None:
        for _, layer in self.lora_layers():
            layer.unmerge()

    def wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        for name, module in self.model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield name, module

    def _replace_lora_layers(self, merge: bool) -> nn.Module:
        for name, layer in list(self.lora_layers()):
            if merge:
                layer.merge()
            else:
                layer.unmerge()
            _set_module(self.model, name, layer.to_linear())
        for name, wrapper in list(self.wrappers()):  # PEFT keeps the trained copy either way
            _set_module(self.model, name, wrapper.modules_to_save["default"])
        return self.model

    def merge_and_unload(self) -> nn.Module:
        """Fold every adapter into its base weight (float32 sum, one rounding) and return the plain model."""
        return self._replace_lora_layers(merge=True)

    def unload(self) -> nn.Module:
        """Drop the adapters without merging and return the plain model with its original weights."""
        return self._replace_lora_layers(merge=False)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within the block the model computes its base outputs (merged adapters are unmerged first, and
        ``modules_to_save`` modules are their originals)."""
        layers = [layer for _, layer in self.lora_layers()] + [wrapper for _, wrapper in self.wrappers()]
        for layer in layers:
            if isinstance(layer, LoRALinear):
                layer.unmerge()
            layer.adapter_enabled = False
        try:
            yield
        finally:
            for layer in layers:
                layer.adapter_enabled = True

    def save_pretrained(self, save_directory: str) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` in PEFT's format, atomically."""
        from fastlora.adapters import save_adapter

        save_adapter(self, save_directory)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, is_trainable: bool = False) -> "LoraModel":
        """Load a PEFT-format adapter (saved by fastlora or PEFT) onto ``model``; checks every tensor first."""
        from fastlora.adapters import load_adapter

        return load_adapter(model, model_id, is_trainable=is_trainable)

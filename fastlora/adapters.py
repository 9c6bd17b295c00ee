"""PEFT-format adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's with the adapter name stripped: ``base_model.model.<module path>.lora_A.weight`` (r × in)
and ``.lora_B.weight`` (out × r); with ``bias`` set, an adapted layer's bias is ``<path>.base_layer.bias``
and any other bias ``<path>.bias``; a ``modules_to_save`` module's parameters (its trained copy's) are
``<path>.<param>``.

Saving writes each file under a temporary name, flushes it to disk and renames it over the old one,
so a crash never leaves a half-written file where a good one was.  Loading reads and checks every
tensor against the model (names, shapes, rank) before anything in the model changes.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from fastlora.config import LoraConfig
from fastlora.model import (
    LoraModel, ModulesToSaveWrapper, _plan_modules_to_save, get_peft_model, plan_targets, with_task_heads,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``path``: readers see the old file or the new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _bias_keys(model: nn.Module, config: LoraConfig, targets: list[str], to_save: list[str]) -> dict[str, str]:
    """file key → parameter name in the model, for the biases the config trains (a modules_to_save module's
    bias is saved with the rest of that module)."""
    if config.bias == "none":
        return {}
    wanted = set(targets) if config.bias == "lora_only" else None
    out = {}
    for module_name, module in model.named_modules():
        if any(module_name == n or module_name.startswith(n + ".") for n in to_save):
            continue
        bias = getattr(module, "bias", None)
        if not isinstance(bias, torch.Tensor) or (wanted is not None and module_name not in wanted):
            continue
        prefix = f"{module_name}." if module_name else ""
        file_path = f"{prefix}base_layer.bias" if module_name in targets else f"{prefix}bias"
        out[PREFIX + file_path] = f"{prefix}bias"
    return out


def _expected(model: nn.Module, config: LoraConfig, targets: list[str], to_save: list[str]):
    """file key → (parameter name in the adapted model, expected shape)."""
    out = {}
    for name in targets:
        linear = model.get_submodule(name)
        out[f"{PREFIX}{name}.lora_A.weight"] = (f"{name}.lora_A", (config.r, linear.in_features))
        out[f"{PREFIX}{name}.lora_B.weight"] = (f"{name}.lora_B", (linear.out_features, config.r))
    params = dict(model.named_parameters())
    for key, param_name in _bias_keys(model, config, targets, to_save).items():
        out[key] = (param_name, tuple(params[param_name].shape))
    for name in to_save:
        module, prefix = model.get_submodule(name), name
        if isinstance(module, ModulesToSaveWrapper):  # the adapted model: the trained copy
            module, prefix = module.modules_to_save["default"], f"{name}.modules_to_save.default"
        for pname, p in module.named_parameters():
            out[f"{PREFIX}{name}.{pname}"] = (f"{prefix}.{pname}", tuple(p.shape))
    return out


def save_adapter(lora_model: LoraModel, save_directory: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    model, config = lora_model.model, lora_model.peft_config
    targets = [name for name, _ in lora_model.lora_layers()]
    params = dict(model.named_parameters())
    # One contiguous copy of each tensor: safetensors refuses shared storage (tied weights) and views.
    tensors = {
        key: params[param_name].detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
        for key, (param_name, _) in _expected(model, config, targets, lora_model.modules_to_save).items()
    }
    config_json = json.dumps(config.replace(inference_mode=True).to_dict(), indent=2, sort_keys=True)
    _atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config_json + "\n"))


def read_adapter(directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read and parse both files; a missing, unreadable or corrupt file raises ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ValueError(f"adapter file {path} does not exist")
    try:
        config = LoraConfig.from_dict(json.loads(config_path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from None
    except TypeError as err:
        raise ValueError(f"{config_path} has an invalid field: {err}") from None
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{weights_path} is not a readable safetensors file: {err}") from None
    return config, tensors


def _peft_bias_aliases(model: nn.Module, config: LoraConfig, to_save: list[str]) -> dict[str, str | None]:
    """Extra keys PEFT writes with ``bias="all"``: every key naming a bias, so a modules_to_save module's
    biases also stand as ``<path>.modules_to_save.<param>`` (its trained copy's: alias → the key it repeats)
    and ``<path>.original_module.<param>`` (the frozen original's: alias → None, not loaded)."""
    if config.bias != "all":
        return {}
    out = {}
    for name in to_save:
        module = model.get_submodule(name)
        if isinstance(module, ModulesToSaveWrapper):
            module = module.modules_to_save["default"]
        for pname, _ in module.named_parameters():
            if "bias" in pname:
                out[f"{PREFIX}{name}.modules_to_save.{pname}"] = f"{PREFIX}{name}.{pname}"
                out[f"{PREFIX}{name}.original_module.{pname}"] = None
    return out


def _check_tensors(expected, tensors: dict[str, torch.Tensor], directory, aliases=None) -> None:
    aliases = aliases or {}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - set(aliases))
    problems = []
    for alias, key in aliases.items():
        if key is not None and alias in tensors and key in tensors and not torch.equal(tensors[alias], tensors[key]):
            problems.append(f"{alias} and {key} hold different values")
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:4])}" + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""))
    if unexpected:
        problems.append(f"keys the model has no place for: {', '.join(unexpected[:4])}" + (f" (+{len(unexpected) - 4} more)" if len(unexpected) > 4 else ""))
    for key in sorted(set(expected) & set(tensors)):
        shape = tuple(tensors[key].shape)
        if shape != expected[key][1]:
            problems.append(f"{key} has shape {shape}, the model needs {expected[key][1]} (wrong rank or a different base model?)")
            break
    if problems:
        raise ValueError(f"adapter in {directory} does not match the model: " + "; ".join(problems))


def load_adapter(model: nn.Module, directory: str | os.PathLike, is_trainable: bool = False) -> LoraModel:
    config, tensors = read_adapter(directory)
    config = with_task_heads(config.replace(inference_mode=not is_trainable))
    targets = plan_targets(model, config)
    to_save = _plan_modules_to_save(model, config)
    _check_tensors(_expected(model, config, targets, to_save), tensors, directory,
                   _peft_bias_aliases(model, config, to_save))
    lora_model = get_peft_model(model, config)
    expected = _expected(model, config, targets, to_save)  # parameter names in the adapted model
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, (param_name, _) in expected.items():
            params[param_name].copy_(tensors[key])
    if not is_trainable:
        lora_model.eval()
    return lora_model

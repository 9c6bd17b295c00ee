"""PEFT-format adapter files: ``adapter_config.json`` + ``adapter_model.safetensors`` (or PEFT's older
``adapter_model.bin``).

Keys are PEFT's with the adapter name stripped: ``base_model.model.<module path>.lora_A.weight`` (r × in)
and ``.lora_B.weight`` (out × r), and with DoRA ``.lora_magnitude_vector`` (out); with ``bias`` set, an adapted layer's bias is ``<path>.base_layer.bias``
and any other bias ``<path>.bias``; a ``modules_to_save`` module's parameters (its trained copy's) are
``<path>.<param>``.  In the model, adapter ``name``'s factors are the parameters ``<path>.lora_A_<name>``
and ``<path>.lora_B_<name>`` (and ``<path>.lora_magnitude_vector_<name>``), and its modules_to_save copy is ``<path>.modules_to_save.<name>``.
A module inside torch's activation-checkpointing or FSDP wrapper has the wrapper's level in its name
(``layers.0._checkpoint_wrapped_module.mlp``); file keys leave it out, as the wrappers' own state dicts do, so a
file saved from a wrapped model loads onto the plain one and back (:func:`file_path`, :func:`with_model_paths`).

Saving writes each file under a temporary name, flushes it to disk and renames it over the old one,
so a crash never leaves a half-written file where a good one was.  Loading reads and checks every
tensor against the model (names, shapes, rank) before anything in the model changes.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from fastlora.module_names import named_parameters
from fastlora.base_kinds import is_adapted, kind_of, peft_factor_keys, sizes as base_sizes
from fastlora.targets import plan_trainable_tokens
from fastlora.config import CONFIG_NAME, LoraConfig
from fastlora.files import atomic_write, atomic_write_text
from fastlora.hub import resolve_file
from fastlora.layer import LoRALinear
from fastlora.modules_to_save import ModulesToSaveWrapper
from fastlora.quantized import is_bnb_linear
from fastlora.parameter_lora import LoRAParameter, ParameterTarget, owner_of, parameter_sizes, plan_parameter_targets

__all__ = [
    "CONFIG_NAME", "WEIGHTS_NAME", "WEIGHTS_BIN_NAME", "PREFIX", "expected_tensors", "embedding_modules", "embedding_tables", "peft_bias_aliases",
    "with_bias_spellings", "check_tensors", "write_adapter", "read_adapter", "read_weights", "file_path",
    "with_model_paths", "adapted_module_paths",
]

WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

# file key → (parameter name in the adapted model, shape)
Expected = dict[str, tuple[str, tuple[int, ...]]]

# The levels torch's checkpoint_wrapper and FSDP (version 1) add to the names of what they wrap.
_WRAPPER_LEVELS = frozenset({"_checkpoint_wrapped_module", "_fsdp_wrapped_module"})


def file_path(name: str) -> str:
    """A module or parameter name (or a file key) as adapter files write it: without torch's wrapper levels."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_LEVELS)


def adapted_module_paths(tensors: Mapping[str, torch.Tensor]) -> set[str]:
    """The paths of the modules whose LoRA tensors ``tensors`` hold (keys ``<path>.lora_...``, with or without
    ``base_model.model.``)."""
    return {key.removeprefix(PREFIX).rsplit(".lora_", 1)[0] for key in tensors if ".lora_" in key}


def with_model_paths(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (file keys, with or without ``base_model.model.``) under ``model``'s names: the wrapper levels
    the model's names have are put in (``layers.0.mlp`` → ``layers.0._checkpoint_wrapped_module.mlp``), and
    those a key has that the model's names lack are taken out (a file written with them)."""
    wrapped = {}
    for name, _ in model.named_modules():  # parents first: a wrapper's inner module overwrites the wrapper
        if file_path(name) != name:
            wrapped[file_path(name)] = name
    out = {}
    for key, tensor in tensors.items():
        prefix = PREFIX if key.startswith(PREFIX) else ""
        path = file_path(key[len(prefix):])
        parts = path.split(".")
        for end in range(len(parts) - 1, 0, -1):  # the longest module path the key starts with
            head = ".".join(parts[:end])
            if head in wrapped:
                path = wrapped[head] + path[len(head):]
                break
        out[prefix + path] = tensor
    return out


def _bias_keys(model: nn.Module, config: LoraConfig, targets: list[str], to_save: list[str],
               parameter_targets: list[ParameterTarget]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """file key → (parameter name once the model is adapted, shape), for the biases the config trains (a
    modules_to_save module's bias is saved with the rest of that module; ``parameter_targets``: the config's
    :func:`plan_parameter_targets`)."""
    if config.bias == "none":
        return {}
    # PEFT names the bias of every LoRA layer ``base_layer.bias``, whichever adapter made the layer
    targets = sorted(set(targets) | {n for n, m in model.named_modules() if isinstance(m, LoRALinear)})
    # a module whose parameters target_parameters adapts sits under one LoRAParameter per parameter (PEFT's
    # ParamWrapper): its bias is <owner>.base_layer(.base_layer…).bias once the model is adapted
    under_parameter_layers = {target.owner: target.owner + ".base_layer" * target.count
                              for target in parameter_targets}
    # (a quantized layer's bias is its base layer's: <target>.base_layer.bias, as PEFT's layers hold it too)
    wanted = set(targets) | {f"{t}.base_layer" for t in targets} | set(under_parameter_layers) \
        if config.bias == "lora_only" else None
    # another adapter's copies are its own; the original beside them is the module this adapter computes with
    others = {n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)} - set(to_save)
    out = {}
    for module_name, module in model.named_modules():
        if any(module_name == n or module_name.startswith(n + ".") for n in to_save) or any(
                module_name == n or (module_name.startswith(n + ".") and not module_name.startswith(n + ".original_module"))
                for n in others):
            continue
        bias = module._parameters.get("bias")
        if not isinstance(bias, torch.Tensor) or (wanted is not None and module_name not in wanted):
            continue
        prefix = f"{module_name}." if module_name else ""
        if module_name in under_parameter_layers:  # not adapted yet: its LoRAParameter layers will hold it
            path = f"{under_parameter_layers[module_name]}.bias"
            out[PREFIX + path] = (path, tuple(bias.shape))
            continue
        file_path = f"{prefix}base_layer.bias" if module_name in targets else f"{prefix}bias"
        # a target not adapted yet whose adapted layer will hold it as base_layer: its bias is found there
        held = module_name in targets and not is_adapted(module) and kind_of(module).adapted_type.HOLDS_BASE_LAYER
        out[PREFIX + file_path] = (file_path if held else f"{prefix}bias", tuple(bias.shape))
    return out


def expected_tensors(model: nn.Module, config: LoraConfig, targets: list[str], to_save: list[str],
                     adapter_name: str) -> Expected:
    """Every tensor an adapter file for ``config`` on ``model`` holds: file key → (parameter name once the model
    is adapted, shape).  Works on the model before or after adaptation (``targets`` are base layers of a kind
    fastlora adapts, or adapted layers; ``to_save`` plain modules or ModulesToSaveWrappers)."""
    out = {}
    for name in targets:
        in_features, out_features = base_sizes(model.get_submodule(name))
        r = config.settings_for(name).r  # rank_pattern's, where a key matches
        key_A, key_B = peft_factor_keys(model.get_submodule(name))
        out[f"{PREFIX}{name}.{key_A}"] = (f"{name}.lora_A_{adapter_name}", (r, in_features))
        out[f"{PREFIX}{name}.{key_B}"] = (f"{name}.lora_B_{adapter_name}", (out_features, r))
        if config.use_dora:
            out[f"{PREFIX}{name}.lora_magnitude_vector"] = (f"{name}.lora_magnitude_vector_{adapter_name}",
                                                            (out_features,))
        if config.lora_bias:
            out[f"{PREFIX}{name}.lora_B.bias"] = (f"{name}.lora_bias_{adapter_name}", (out_features,))
    parameter_targets = plan_parameter_targets(model, config)
    for target in parameter_targets:
        layer_path = target.layer_path
        experts, in_features, out_features, _ = parameter_sizes(*_owner_and_parameter(model, target))
        r = experts * config.settings_for(target.key).r
        out[f"{PREFIX}{layer_path}.lora_A.weight"] = (f"{layer_path}.lora_A_{adapter_name}", (r, in_features))
        out[f"{PREFIX}{layer_path}.lora_B.weight"] = (f"{layer_path}.lora_B_{adapter_name}", (out_features, r))
    for name, rows in plan_trainable_tokens(model, config, targets).items():
        dim = getattr(model.get_submodule(name), "base_layer", model.get_submodule(name)).weight.shape[1]
        out[f"{PREFIX}{name}.token_adapter.trainable_tokens_delta"] = (
            f"{name}.trainable_tokens_delta_{adapter_name}", (len(rows), dim))
    out.update(_bias_keys(model, config, targets, to_save, parameter_targets))
    for name in to_save:
        module = model.get_submodule(name)
        if isinstance(module, ModulesToSaveWrapper):
            module = module.original_module
        for pname, p in named_parameters(module):
            out[f"{PREFIX}{name}.{pname}"] = (f"{name}.modules_to_save.{adapter_name}.{pname}", tuple(p.shape))
    return out


def _owner_and_parameter(model: nn.Module, target: ParameterTarget) -> tuple[nn.Module, torch.Tensor]:
    owner = owner_of(model.get_submodule(target.owner))
    return owner, getattr(owner, target.parameter)


def embedding_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the model's input and output embeddings, each module once."""
    found: list[tuple[str, nn.Module]] = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        get = getattr(model, getter, None)
        try:
            module = get() if callable(get) else None
        except (AttributeError, NotImplementedError, TypeError):
            module = None
        if module is None or any(module is m for _, m in found):
            continue
        name = next((n for n, m in model.named_modules() if m is module), None)
        if name:
            found.append((name, module))
    return found



def _targeted_tables(model: nn.Module, targets: list[str]):
    """(name, module, the layer holding the table's weight: the module or its base layer) of each target that is
    the model's input or output embeddings (an embedding table, a Linear head)."""
    embeddings = [module for _, module in embedding_modules(model)]
    for name in targets:
        module = model.get_submodule(name)
        if any(module is e for e in embeddings):
            yield name, module, getattr(module, "base_layer", module) if is_adapted(module) else module


def embedding_tables(model: nn.Module, targets: list[str]) -> Expected:
    """The weights of the targets that are the model's input or output embeddings (an embedding table, a Linear
    head), under the keys PEFT saves them with beside the adapter (``<path>.base_layer.weight``; PEFT's
    ``save_embedding_layers``): file key → (parameter once adapted, shape).  PEFT loads them into the model when
    a file holds them, so a resized vocabulary travels.  A quantized table: :func:`quantized_tables`."""
    out = {}
    for name, module, holder in _targeted_tables(model, targets):
        if is_bnb_linear(holder):
            continue
        if is_adapted(module):
            holds = module is not holder
        else:  # a base layer before adaptation: where its adapted kind will keep the weight
            holds = kind_of(module) is not None and getattr(kind_of(module).adapted_type, "PEFT_FACTOR_KEYS", None) is not None
        param = f"{name}.base_layer.weight" if holds else f"{name}.weight"
        if holder.weight.is_floating_point():
            out[f"{PREFIX}{name}.base_layer.weight"] = (param, tuple(holder.weight.shape))
    return out


def quantized_tables(model: nn.Module, targets: list[str]) -> dict[str, torch.Tensor]:
    """The state of each targeted output head that bitsandbytes quantized (where ``llm_int8_skip_modules`` leaves
    it quantized), under the keys PEFT saves it with beside the adapter: its packed weight and quantization state
    (``<path>.base_layer.weight``, ``....weight.absmax``, ``....weight.quant_state.bitsandbytes__nf4``, ...)."""
    return {key: value for name, _, holder in _targeted_tables(model, targets) if is_bnb_linear(holder)
            for key, value in holder.state_dict(prefix=f"{PREFIX}{name}.base_layer.").items()}


def without_quantized_tables(model: nn.Module, targets: list[str], tensors: dict[str, torch.Tensor],
                             where) -> dict[str, torch.Tensor]:
    """``tensors`` without the tables a file holds for targeted heads where the file's or the model's head is
    quantized (:func:`quantized_tables`): such a head is the frozen base's, never trained, so the model keeps its
    own.  Silently where the file's is the model's own (packed codes and scales, byte for byte; its recorded dtype
    aside) or the model's head is not quantized (a QLoRA adapter served on the full-precision model); with a
    warning where the model's quantized head is another."""
    out = dict(tensors)
    for name, _, holder in _targeted_tables(model, targets):
        prefix = f"{PREFIX}{name}.base_layer."
        keys = [key for key in tensors if key.startswith(prefix) and key != prefix + "bias"]
        in_file = any(key != prefix + "weight" for key in keys) or (
            prefix + "weight" in tensors and not tensors[prefix + "weight"].is_floating_point())
        in_model = is_bnb_linear(holder)
        if not keys or not (in_file or in_model):
            continue
        for key in keys:
            del out[key]
        own = {key: value for key, value in holder.state_dict(prefix=prefix).items()
               if ".quant_state." not in key and not key.endswith("weight_format")} if in_model else {}
        if any(key not in tensors or not _same_bytes(tensors[key], value) for key, value in own.items()):
            warnings.warn(f"the adapter in {where} holds a quantized {name} that is not the model's own: the model "
                          f"keeps its own (a frozen base layer is not part of the adapter)", UserWarning, stacklevel=4)
    return out


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtypes, shapes and bytes (a 4-bit weight stored in a float dtype holds NaN patterns)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dim() else torch.equal(a, b)


def adapter_targets(model: nn.Module, adapter_name: str, config: LoraConfig) -> tuple[list[str], list[str]]:
    """(LoRA layers holding ``adapter_name``, modules_to_save wrappers with a copy for it) of an adapted model;
    not the parameter layers ``config.target_parameters`` made (they have their own plan), but those its
    ``target_modules`` named, which hold it on the parameter another adapter's target_parameters adapts."""
    by_parameters = {target.layer_path for target in plan_parameter_targets(model, config)}
    layers = [n for n, m in model.named_modules() if isinstance(m, LoRALinear) and adapter_name in m.adapter_settings
              and not (isinstance(m, LoRAParameter) and n in by_parameters)]
    wrappers = [n for n, m in model.named_modules()
                if isinstance(m, ModulesToSaveWrapper) and adapter_name in m.modules_to_save]
    return layers, wrappers


def peft_bias_aliases(model: nn.Module, config: LoraConfig, to_save: list[str]) -> dict[str, str | None]:
    """Extra keys PEFT writes with ``bias="all"``: every key naming a bias, so a modules_to_save module's
    biases also stand as ``<path>.modules_to_save.<param>`` (its trained copy's: alias → the key it repeats)
    and ``<path>.original_module.<param>`` (the frozen original's: alias → None, not loaded)."""
    if config.bias != "all":
        return {}
    out = {}
    for name in to_save:
        module = model.get_submodule(name)
        if isinstance(module, ModulesToSaveWrapper):
            module = module.original_module
        for pname, _ in named_parameters(module):
            if "bias" in pname:
                out[f"{PREFIX}{name}.modules_to_save.{pname}"] = f"{PREFIX}{name}.{pname}"
                out[f"{PREFIX}{name}.original_module.{pname}"] = None
    return out


def other_layers_biases(model: nn.Module, expected: Expected, tensors: Mapping[str, torch.Tensor],
                        where) -> dict[str, None]:
    """The biases a file holds that are not this adapter's, as keys to accept and leave unloaded (alias → None, as
    :func:`check_tensors` takes them): PEFT's ``bias="lora_only"`` writes the bias of every LoRA layer of the model
    it saved from, another adapter's layers included, and its ``bias="all"`` every bias, other adapters'
    modules_to_save copies' included.  A layer's bias other than the model's own (the model's rounded to the
    file's dtype) is named in a warning: the model keeps its own, as PEFT's loading does for a layer that is not
    a LoRA layer."""
    out: dict[str, None] = {}
    differing = []
    for key, value in tensors.items():
        if key in expected or not key.startswith(PREFIX) or not key.endswith(".bias"):
            continue
        path = key[len(PREFIX): -len(".bias")].removesuffix(".base_layer")
        if ".modules_to_save." in f".{path}." or ".original_module." in f".{path}.":
            out[key] = None  # another adapter's copy of a saved module, or the frozen original
            continue
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        bias = getattr(getattr(module, "base_layer", module), "bias", None)
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != tuple(value.shape):
            continue
        out[key] = None
        if bias.device.type != "meta" and value.device.type != "meta" and not torch.equal(
                value.to(bias.device), bias.detach().to(value.dtype)):
            differing.append(path)
    if differing:
        warnings.warn(f"the adapter in {where} holds biases of {differing[:3]}{' and more' if len(differing) > 3 else ''}, "
                      f"layers it does not adapt, that differ from the model's: the model keeps its own",
                      UserWarning, stacklevel=4)
    return out


def without_other_layers_missing_biases(expected: Expected, tensors: Mapping[str, torch.Tensor], config: LoraConfig,
                                        targets: list[str]) -> Expected:
    """``expected`` without the ``bias="lora_only"`` keys of LoRA layers that are not this adapter's targets (another
    adapter's) where the file lacks them: such a file was saved before those layers were LoRA layers, and PEFT
    loads it (the model keeps those biases)."""
    if config.bias != "lora_only":
        return expected
    own = {f"{PREFIX}{name}.base_layer.bias" for name in targets}
    return {key: value for key, value in expected.items()
            if key in tensors or key in own or not key.endswith(".base_layer.bias")}


def with_bias_spellings(expected: Expected, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with each expected bias key filled from another spelling when only that one is there: PEFT
    writes ``<path>.base_layer.bias`` for every LoRA layer of the model it saved from, which another adapter may
    have made a LoRA layer, ``<path>.original_module.bias`` for a module another adapter saves whole, and
    ``<path>.bias`` for the rest."""
    def stem(key: str) -> str:  # the bias's module as the model without adapters names it
        return re.sub(r"\.(?:base_layer|original_module)(?=\.)", "", key)

    out = dict(tensors)
    spellings: dict[str, list[str]] = {}
    for key in tensors:
        if key.endswith(".bias") and key not in expected:
            spellings.setdefault(stem(key), []).append(key)
    for key in expected:
        if not key.endswith(".bias") or key in out:
            continue
        other = next((k for k in spellings.get(stem(key), []) if k in out), None)
        if other is not None:
            out[key] = out.pop(other)
    return out


def check_tensors(expected: Expected, tensors: Mapping[str, torch.Tensor], where, aliases=None) -> None:
    """Raise ValueError listing every way ``tensors`` fail to match ``expected`` (missing or extra keys, a
    wrong shape, an alias that disagrees with the key it repeats)."""
    aliases = aliases or {}
    missing = sorted(map(file_path, set(expected) - set(tensors)))  # named as files name them
    unexpected = sorted(map(file_path, set(tensors) - set(expected) - set(aliases)))
    problems = []
    for alias, key in aliases.items():
        if key is not None and alias in tensors and key in tensors and not torch.equal(tensors[alias], tensors[key]):
            problems.append(f"{file_path(alias)} and {file_path(key)} hold different values")
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:4])}" + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""))
    if unexpected:
        problems.append(f"keys the model has no place for: {', '.join(unexpected[:4])}" + (f" (+{len(unexpected) - 4} more)" if len(unexpected) > 4 else ""))
    for key in sorted(set(expected) & set(tensors)):
        if not isinstance(tensors[key], torch.Tensor) or not tensors[key].is_floating_point():
            problems.append(f"{file_path(key)} is not a floating-point tensor")
            break
        shape = tuple(tensors[key].shape)
        if shape != expected[key][1]:
            problems.append(f"{file_path(key)} has shape {shape}, the model needs {expected[key][1]} (wrong rank or a "
                            f"different base model?)")
            break
    if problems:
        raise ValueError(f"adapter in {where} does not match the model: " + "; ".join(problems))


def write_adapter(directory: str | os.PathLike, config: LoraConfig, tensors: dict[str, torch.Tensor],
                  safe_serialization: bool = True) -> None:
    """Write ``adapter_model.safetensors`` (or ``adapter_model.bin``) and ``adapter_config.json``, each
    atomically, weights first; ``tensors`` are copied to contiguous CPU tensors."""
    directory = Path(directory)
    if directory.is_file():
        raise ValueError(f"save directory {str(directory)!r} is a file, not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    # One contiguous copy of each tensor: safetensors refuses shared storage (tied weights) and views.
    tensors = {
        key: t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format) for key, t in tensors.items()
    }
    if safe_serialization:
        from safetensors.torch import save_file

        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    else:
        atomic_write(directory / WEIGHTS_BIN_NAME, lambda tmp: torch.save(tensors, tmp))
    atomic_write_text(directory / CONFIG_NAME, config.to_json())


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.name.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from None
    try:  # weights_only: a pickle that is not plain tensors is refused, not executed
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises many types for a bad file
        raise ValueError(f"{path} is not a readable PyTorch weights file: {type(err).__name__}: {err}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise ValueError(f"{path} does not hold a dict of tensors")
    return data


def read_adapter(model_id: str | os.PathLike, **hub_kwargs) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read and parse an adapter from a directory or a Hub repository: its config, then its weights
    (``adapter_model.safetensors``, else ``adapter_model.bin``).  Anything missing, unreadable or corrupt
    raises ValueError naming it."""
    if not isinstance(model_id, (str, os.PathLike)):
        raise TypeError(f"an adapter is read from a folder or a Hub repository id (a str or a path), got {model_id!r}")
    config_path = resolve_file(model_id, CONFIG_NAME, **hub_kwargs)
    if config_path is None:
        raise ValueError(f"adapter file {CONFIG_NAME} does not exist in {str(model_id)!r}")
    read: list[dict[str, torch.Tensor]] = []  # the weights, where the config needs them to be read

    def amend(data: dict) -> dict:
        if not _layer_filter_peft_refuses(data):
            return data
        read.append(read_weights(model_id, **hub_kwargs))
        return _with_layers_named(data, read[0], model_id)

    config = LoraConfig.from_file(config_path, amend)  # the config first: its errors are named first
    return config, read[0] if read else read_weights(model_id, **hub_kwargs)


def _layer_filter_peft_refuses(data: dict) -> bool:
    """Whether a config's content pairs ``layers_to_transform`` with a regex, or holds a ``layers_pattern`` alone."""
    targets, layers, pattern = (data.get(k) for k in ("target_modules", "layers_to_transform", "layers_pattern"))
    return (isinstance(targets, str) and (layers is not None or pattern is not None)) or bool(pattern and layers is None)


def _with_layers_named(data: dict, tensors: Mapping[str, torch.Tensor], where) -> dict:
    """A config an earlier fastlora wrote with a layer filter PEFT's rules refuse (``layers_to_transform`` beside a
    regex, a ``layers_pattern`` alone), read as naming in full the modules its tensors adapt, with a warning."""
    targets, layers, pattern = (data.get(k) for k in ("target_modules", "layers_to_transform", "layers_pattern"))
    held = sorted(map(file_path, adapted_module_paths(tensors)))
    warnings.warn(f"the adapter in {str(where)!r} names its modules with target_modules={targets!r}, "
                  f"layers_to_transform={layers!r}, layers_pattern={pattern!r}, which PEFT's rules refuse (an earlier "
                  f"fastlora wrote it): read as the {len(held)} modules its tensors adapt", UserWarning, stacklevel=4)
    return {**data, "target_modules": held, "layers_to_transform": None, "layers_pattern": None}


def read_weights(model_id: str | os.PathLike, **hub_kwargs) -> dict[str, torch.Tensor]:
    """An adapter's tensors (``adapter_model.safetensors``, else ``adapter_model.bin``) under its file keys, on the
    CPU, from a directory or a Hub repository; ValueError where the file is missing, unreadable or corrupt."""
    weights_path = (resolve_file(model_id, WEIGHTS_NAME, missing_ok=True, **hub_kwargs)
                    or resolve_file(model_id, WEIGHTS_BIN_NAME, **hub_kwargs))
    if weights_path is None:
        raise ValueError(f"adapter file {WEIGHTS_NAME} (or {WEIGHTS_BIN_NAME}) does not exist in {str(model_id)!r}")
    return _load_weights(weights_path)

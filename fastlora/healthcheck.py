"""A report on an adapted model before training (``PeftModel.healthcheck()`` / ``print_healthcheck()``), with PEFT
0.22's fields and findings: the adapter state summed up from :mod:`fastlora.status`, the environment, the model's
dtypes and devices, and the states a training run should not start in (adapters disabled, merged or frozen, layers
that disagree, implausibly few or many trainable parameters, a freshly initialised task head that the adapter
would not save).  The report is JSON-serialisable."""

from __future__ import annotations

import platform
from collections import Counter
from typing import Any

import torch
from torch import nn

from fastlora._version import __version__, installed_version
from fastlora.module_modes import activation_checkpointing_on
from fastlora.modules_to_save import ModulesToSaveWrapper
from fastlora.status import get_layer_status, get_model_status
from fastlora.targets import TASK_HEAD_NAMES

__all__ = ["healthcheck", "format_healthcheck"]

# The config fields the report repeats, per adapter.
_CONFIG_FIELDS = ("task_type", "inference_mode", "target_modules", "target_parameters", "modules_to_save",
                  "layers_to_transform", "layers_pattern")
# transformers' task classes, whose head a checkpoint of another class lacks.
_TASK_CLASS_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")


def _finding(code: str, severity: str, message: str) -> dict[str, str]:
    return {"code": code, "severity": severity, "message": message}


def _json(value: Any) -> Any:
    """``value`` as JSON holds it: containers element by element (a set sorted), an enum by its value, else str."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(key): _json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)):
        items = [_json(item) for item in value]
        return sorted(items) if isinstance(value, set) else items
    if hasattr(value, "value"):
        return _json(value.value)
    return str(value)


def _environment() -> dict[str, Any]:
    return {"python_version": platform.python_version(), "platform": platform.platform(),
            "fastlora_version": __version__, "peft_version": installed_version("peft"),
            "torch_version": torch.__version__, "transformers_version": installed_version("transformers"),
            "accelerate_version": installed_version("accelerate"), "cuda_version": torch.version.cuda}


def _runtime(model: nn.Module, base: nn.Module) -> dict[str, Any]:
    dtypes: Counter = Counter()
    devices = set()
    for param in base.parameters():
        dtypes[str(param.dtype).replace("torch.", "")] += param.numel()
        devices.add(param.device.type)
    device_map = getattr(base, "hf_device_map", None)
    return {
        "model_name_or_path": getattr(getattr(base, "config", None), "_name_or_path", None),
        "model_type": getattr(getattr(base, "config", None), "model_type", None),
        "revision": getattr(getattr(base, "config", None), "_commit_hash", None),
        "training": model.training,
        "activation_checkpointing": activation_checkpointing_on(base),
        "parameter_dtypes": dict(sorted(dtypes.items())),
        "parameter_devices": sorted(devices),
        "hf_device_map_devices": None if device_map is None else sorted({str(d) for d in device_map.values()}),
        "quantization": {"is_loaded_in_4bit": bool(getattr(base, "is_loaded_in_4bit", False)),
                         "is_loaded_in_8bit": bool(getattr(base, "is_loaded_in_8bit", False)),
                         "method": _json(getattr(base, "quantization_method", None))},
    }


def _parameter_findings(trainable: int, total: int, least: int, most_percent: float) -> list[dict[str, str]]:
    if trainable < least:
        return [_finding("TOO_FEW_TRAINABLE_PARAMETERS", "error",
                         f"The model should have at least {least} trainable parameter(s).")]
    percent = 100 * trainable / total
    if percent > most_percent:
        return [_finding("HIGH_TRAINABLE_PARAMETER_FRACTION", "warning",
                         f"{percent:.2f}% of model parameters are trainable; expected no more than {most_percent}% "
                         f"for PEFT training.")]
    return []


def _state_findings(status) -> list[dict[str, str]]:
    """What the adapter state says: layers that disagree are errors; disabled, merged or frozen adapters warnings."""
    found = []
    if status.enabled == "irregular":
        found.append(_finding("IRREGULAR_ADAPTER_ENABLED_STATE", "error", "Adapter layers are not consistently enabled."))
    elif not status.enabled:
        found.append(_finding("ADAPTERS_DISABLED", "warning", "All adapter layers are disabled."))
    if status.active_adapters == "irregular":
        found.append(_finding("IRREGULAR_ACTIVE_ADAPTERS", "error", "Active adapters differ across adapter layers."))
    if status.merged_adapters == "irregular":
        found.append(_finding("IRREGULAR_MERGED_ADAPTERS", "error", "Merged adapters differ across adapter layers."))
    elif status.merged_adapters:
        names = ", ".join(f"'{name}'" for name in status.merged_adapters)
        found.append(_finding("MERGED_ADAPTERS", "warning",
                              f"Adapter(s) {names} is/are merged; unmerge them before training."))
    if "irregular" in status.requires_grad.values():
        found.append(_finding("IRREGULAR_REQUIRES_GRAD", "error", "Adapter parameters do not consistently have "
                              "requires_grad set across adapter layers."))
    elif isinstance(status.active_adapters, list):
        frozen = [name for name in status.active_adapters if status.requires_grad.get(name) is False]
        if frozen:
            found.append(_finding("ACTIVE_ADAPTERS_NOT_TRAINABLE", "warning",
                                  f"Active adapter(s) {', '.join(frozen)} are not trainable."))
    return found


def _unsaved_new_heads(base: nn.Module) -> list[str]:
    """The task heads a transformers task model initialised afresh (its class is not among the checkpoint's
    ``config.architectures``) that no ``modules_to_save`` copy saves with the adapter."""
    name = type(base).__name__
    architectures = getattr(getattr(base, "config", None), "architectures", None)
    if not name.endswith(_TASK_CLASS_SUFFIXES) or not architectures or name in architectures:
        return []
    return [child for child, module in base.named_children()
            if child in TASK_HEAD_NAMES and not isinstance(module, ModulesToSaveWrapper)]


def healthcheck(model: nn.Module, min_trainable_params: int = 1, max_trainable_params_percent: float = 50) -> dict:
    """The report of ``model`` (a fastlora ``PeftModel``, or a module :func:`fastlora.inject_adapter_in_model`
    adapted in place): PEFT 0.22's ``healthcheck()`` fields.

    ``is_ready`` is False where a finding is an error; ``findings`` lists each with its code, severity and
    message.  An empty list means no suspicious adapter state was found, not that training will succeed.
    """
    status = get_model_status(model)
    layers = get_layer_status(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # or adapted in place
    findings = _parameter_findings(status.trainable_params, status.total_params, min_trainable_params,
                                   max_trainable_params_percent)
    findings += _state_findings(status)
    heads = _unsaved_new_heads(base)
    if heads:
        findings.append(_finding("TASK_HEAD_NOT_SAVED", "warning", (
            f"The task head {', '.join(repr(h) for h in heads)} was newly initialized when the base model was loaded "
            f"but is not in `modules_to_save`, so it is not saved with the adapter. Loading the adapter later gives a "
            f"different random head. Set `task_type` in the PEFT config or add the head to `modules_to_save`.")))
    layer_types = {adapter: dict(Counter(layer.module_type for layer in layers
                                         if adapter in layer.available_adapters).most_common())
                   for adapter in status.available_adapters}
    return {
        "is_ready": not any(finding["severity"] == "error" for finding in findings),
        "environment": _environment(),
        "summary": {
            "model_id": getattr(getattr(model, "config", None), "name_or_path", "other"),
            "base_model_type": status.base_model_type, "adapter_model_type": status.adapter_model_type,
            "peft_types": status.peft_types, "trainable_params": status.trainable_params,
            "total_params": status.total_params,
            "trainable_percent": 100 * status.trainable_params / status.total_params,
            "num_adapter_layers": status.num_adapter_layers, "adapter_layer_types": layer_types,
        },
        "adapter_configurations": {
            adapter: {field: _json(getattr(config, field)) for field in _CONFIG_FIELDS
                      if getattr(config, field, None) is not None}
            for adapter, config in getattr(model, "peft_config", {}).items()},
        "model_runtime": _runtime(model, base),
        "adapter_state": {field: getattr(status, field) for field in (
            "enabled", "active_adapters", "merged_adapters", "requires_grad", "available_adapters", "devices",
            "quantization_backend")},
        "findings": findings,
    }


def format_healthcheck(report: dict, sep: str = ", ", indent: str = "  ") -> str:
    """:func:`healthcheck`'s ``report`` as a few lines to read: the model, the environment, the runtime, the
    parameters, the adapter state, the layer types per adapter, and the findings (where there are any)."""
    summary, state = report["summary"], report["adapter_state"]
    environment, runtime = report["environment"], report["model_runtime"]

    def names(value) -> str:  # a list of adapters, or "irregular"
        return value if isinstance(value, str) else ", ".join(value) or "none"

    lines = [
        "fastlora healthcheck",
        f"Model:\n{indent}" + sep.join((
            f"ID: {summary['model_id']}", f"type: {summary['base_model_type']}",
            "adapters: " + ", ".join(f"{name} ({kind})" for name, kind in summary["peft_types"].items()))),
        f"Environment:\n{indent}" + sep.join((
            f"fastlora: {environment['fastlora_version']}", f"peft: {environment['peft_version']}",
            f"transformers: {environment['transformers_version']}", f"torch: {environment['torch_version']}",
            f"Python: {environment['python_version']}")),
        f"Runtime:\n{indent}" + sep.join((
            f"training: {runtime['training']}", f"devices: {', '.join(runtime['parameter_devices'])}",
            "dtypes: " + ", ".join(f"{dtype}={count:,}" for dtype, count in runtime["parameter_dtypes"].items()),
            f"activation checkpointing: {runtime['activation_checkpointing']}")),
        f"Parameters:\n{indent}" + sep.join((
            f"trainable: {summary['trainable_params']:,}", f"total: {summary['total_params']:,}",
            f"percent trainable: {summary['trainable_percent']:.4f}%",
            f"adapter layers: {summary['num_adapter_layers']}")),
        f"State:\n{indent}" + sep.join((
            f"adapter is enabled: {state['enabled']}", f"active: {names(state['active_adapters'])}",
            f"merged: {names(state['merged_adapters'])}")),
        "Layer types:",
    ]
    for adapter, counts in summary["adapter_layer_types"].items():
        lines += [f"{indent}{adapter}:", f"{indent * 2}" + sep.join(f"{kind}={n}" for kind, n in counts.items())]
    if report["findings"]:
        lines.append("Findings:")
        lines += [f"{indent}{finding['severity'].upper()}: {finding['message']}" for finding in report["findings"]]
    return "\n".join(lines)

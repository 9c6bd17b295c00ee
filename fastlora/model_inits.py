"""The model-level steps of initialisations that read or change the base weights (PiSSA, OLoRA, LoftQ, LoRA-GA,
CorDA; :mod:`fastlora.weight_inits` has the math), LoRA-GA's and CorDA's from what their data-driven step
(:mod:`fastlora.lora_ga`, :mod:`fastlora.corda`) left on the target modules.

The layers are built first, with the values PEFT's constructors draw; :func:`init_from_weights` then checks that
every layer accepts the initialisation before any base weight changes, so a refusal leaves the model as it was.
"""

from __future__ import annotations

import warnings
from typing import Callable

from torch import Tensor, nn

from fastlora.module_names import named_parameters
from fastlora.config import LoraConfig, UnsupportedFeatureError
from fastlora.conv1d import is_conv1d
from fastlora.corda import EIGENS_ATTRIBUTE, corda_eigens
from fastlora.lora_ga import GRADIENT_ATTRIBUTE, lora_ga_gradients

__all__ = ["init_from_weights", "data_driven_sources", "forget_sources", "warn_of_lora_ga_without_gradients"]


def init_from_weights(model: nn.Module, config: LoraConfig, adapter_name: str, targets: list[str],
                       undo: Callable[[], None], drawn: dict[str, tuple[Tensor, Tensor]]) -> None:
    """Give the new adapter's layers PiSSA, OLoRA, LoftQ, LoRA-GA or CorDA factors (``drawn``: those computed as
    the layers were built, from the random generator or a data-driven step's results), once every layer has
    accepted the initialisation (else ``undo`` and raise, the model unchanged).  They change the base weights,
    which other adapters and modules sharing a weight (a head tied to the embeddings) see too: said with a
    warning."""
    init = config.init_lora_weights
    layers = {name: model.get_submodule(name) for name in targets}
    try:
        for layer in layers.values():
            layer.check_weight_init(init, layer.adapter_settings[adapter_name].r)
        layers = {name: layer for name, layer in layers.items() if layer.WEIGHT_INITS_CHANGE_BASE}
        _check_no_weight_shared_by_targets(init, layers)
        shared = _sharing_a_weight(model, layers)
        if config.layer_replication and shared:
            target, other = next(iter(shared.items()))
            raise ValueError(f"init_lora_weights={init!r} changes the base weight of {target}, which {other} (a copy "
                             f"of the same layer under layer_replication, not adapted) computes with too: that copy "
                             f"would compute with the residual and the model would no longer start at the base's "
                             f"outputs; use True, False, 'gaussian', 'orthogonal' or 'mica' there")
    except BaseException:
        undo()
        raise
    others = sorted({other for layer in layers.values() for other in layer.adapter_names if other != adapter_name})
    if others:
        warnings.warn(f"init_lora_weights={init!r} changes the base weights of the layers it adapts, under the "
                      f"adapters {others} as well: their outputs change", UserWarning, stacklevel=4)
    if shared:
        warnings.warn(f"init_lora_weights={init!r} changes the base weights of {sorted(shared)[:3]}, which "
                      f"{sorted(set(shared.values()))[:3]} share (tied): their outputs change too",
                      UserWarning, stacklevel=4)
    done = []
    try:
        for name, layer in layers.items():
            layer.init_from_weight(init, adapter_name, loftq_config=config.loftq_config or None,
                                   factors=drawn.get(name))
            done.append(name)
    except BaseException as exc:
        undo()
        if not done:
            raise
        raise RuntimeError(f"init_lora_weights={init!r} failed on {name} ({type(exc).__name__}: {exc}); the adapter was "
                           f"removed, but the base weights of {done[:3]}{' and more' if len(done) > 3 else ''} "
                           f"already hold the initialisation's residual: reload the model") from exc


def data_driven_sources(config: LoraConfig, modules: dict[str, nn.Module]) -> dict[str, object]:
    """Target name → what a data-driven step left on that module for ``config``'s initialisation to start from:
    LoRA-GA's estimated gradient (a target without one starts as True, as in PEFT), CorDA's kept directions (every
    Linear and Conv1D target needs them: PEFT's error otherwise).  Checked before anything changes."""
    init = config.init_lora_weights
    if init == "lora_ga":
        gradients = lora_ga_gradients(modules)
        if gradients and config.lora_ga_config is None:
            raise ValueError("lora_ga_config must be provided when init_lora_weights='lora_ga'. Please pass "
                             "lora_ga_config=LoraGAConfig(...) to LoraConfig.")
        return gradients
    if init == "corda":
        if config.target_parameters:
            raise UnsupportedFeatureError("init_lora_weights='corda' with target_parameters: CorDA decomposes the "
                                          "weights of Linear and Conv1D layers; adapt the parameters in another "
                                          "adapter")
        eigens = corda_eigens(modules)
        missing = [name for name, module in modules.items()
                   if name not in eigens and (isinstance(module, nn.Linear) or is_conv1d(module))]
        if missing:
            raise ValueError(f"`eigens` attribute not found for layer {missing[0]!r}"
                             f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}, please run "
                             f"`preprocess_corda` first")
        return eigens
    return {}


def forget_sources(config: LoraConfig, modules: dict[str, nn.Module]) -> None:
    """Drop what :func:`data_driven_sources` found on ``modules``, once used (PEFT drops it too)."""
    attribute = {"lora_ga": GRADIENT_ATTRIBUTE, "corda": EIGENS_ATTRIBUTE}.get(config.init_lora_weights)
    for module in modules.values():
        if attribute is not None and hasattr(module, attribute):
            delattr(module, attribute)


def _check_no_weight_shared_by_targets(init, layers: dict[str, nn.Module]) -> None:
    """ValueError where two targets compute with one weight (copies of one layer, as layer_replication makes them):
    each would take its residual from the weight in turn, and the model would no longer compute the base's outputs
    (PEFT's does that silently)."""
    seen: dict[int, str] = {}
    for name, layer in layers.items():
        other = seen.setdefault(layer.weight.data_ptr(), name) if layer.weight.numel() else name
        if other != name:
            raise ValueError(f"init_lora_weights={init!r} changes the base weight, which {other} and {name} share "
                             f"(copies of one layer, as layer_replication makes them): each would subtract its own "
                             f"part from it and the model would no longer start at the base's outputs; use True, "
                             f"False, 'gaussian', 'orthogonal' or 'mica' there")


def _sharing_a_weight(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, str]:
    """Target name → the name of a parameter outside the targets holding the same storage as its weight."""
    owners = {layer.weight.data_ptr(): name for name, layer in layers.items() if layer.weight.numel()}
    out = {}
    for param_name, param in named_parameters(model, remove_duplicate=False):
        owner = owners.get(param.data_ptr()) if param.numel() else None
        if owner is not None and not any(param_name.startswith(n + ".") for n in layers):
            out[owner] = param_name
    return out


def warn_of_lora_ga_without_gradients(config: LoraConfig, modules: list[nn.Module], stacklevel: int = 3) -> None:
    """A new LoRA-GA adapter (not one loaded from a file) on ``modules``, none of which holds the gradient
    :func:`fastlora.preprocess_loraga` estimates.  (EVA's step, :func:`fastlora.initialize_lora_eva_weights`,
    comes after ``get_peft_model``: until then the adapter is PEFT's before that step, A as drawn, B = 0.)"""
    init = config.init_lora_weights
    if init == "lora_ga" and not lora_ga_gradients(dict(enumerate(modules))):
        warnings.warn("init_lora_weights='lora_ga': no target layer holds the gradient preprocess_loraga(model, "
                      "config, train_step) estimates (call it before get_peft_model); the adapter starts as "
                      "init_lora_weights=True", UserWarning, stacklevel=stacklevel)

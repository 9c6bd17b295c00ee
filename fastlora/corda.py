"""CorDA's data-driven step (Yang et al. 2024, "context-oriented decomposition adaptation"): decompose each target
weight along the directions its inputs use, before ``get_peft_model``.

:func:`preprocess_corda` runs the caller's ``run_model`` and accumulates each target layer's input covariance C
(each call's rows x scaled by 1 / max(x), then xᵀx, averaged over the calls).  With C damped until it inverts
cleanly (C + δ·mean(diag C)·I, δ = 0.01 doubled until ‖C C⁻¹ − I‖ < 0.05), the SVD  W C = U S Vᵀ  gives the
decomposition W = U S (C⁻¹ V)ᵀ; each target keeps r of its directions as ``module.eigens`` (PEFT's attribute:
``U_WC``, ``S_WC``, ``V_WC`` = C⁻¹ V): the first r ("ipm") or the last r ("kpm").  ``get_peft_model`` with
``init_lora_weights="corda"`` then starts each layer from them (:func:`fastlora.weight_inits.corda_factors`),
leaves W − scaling · B A as the base weight and drops them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from fastlora.config import LoraConfig
from fastlora.conv1d import is_conv1d
from fastlora.base_kinds import sizes
from fastlora.files import save_tensors, saved_tensors
from fastlora.module_modes import in_mode
from fastlora.targets import full_precision_linear_targets

__all__ = ["preprocess_corda", "CordaEigens", "EIGENS_ATTRIBUTE", "corda_eigens"]

EIGENS_ATTRIBUTE = "eigens"
_PARTS = ("S_WC", "U_WC", "V_WC")
# the damping doubles from 0.01 at most this often (to about 1e16 times the mean diagonal)
_MOST_DAMPINGS = 60


@dataclass
class CordaEigens:
    """A layer's kept CorDA directions: ``U_WC`` (out × r), ``S_WC`` (r), ``V_WC`` (in × r, C⁻¹ V)."""

    S_WC: Tensor
    U_WC: Tensor
    V_WC: Tensor


def corda_eigens(modules: dict[str, nn.Module]) -> dict[str, object]:
    """Name → the decomposition :func:`preprocess_corda` (or PEFT's) left on that module, for those holding one."""
    return {name: getattr(module, EIGENS_ATTRIBUTE) for name, module in modules.items()
            if all(isinstance(getattr(getattr(module, EIGENS_ATTRIBUTE, None), part, None), Tensor)
                   for part in _PARTS)}


@torch.no_grad()
def preprocess_corda(model: nn.Module, lora_config: LoraConfig, run_model: Optional[Callable[[], None]] = None,
                     hooked_model: Optional[nn.Module] = None) -> None:
    """Decompose each Linear / Conv1D layer ``lora_config`` targets along its inputs' covariance, for
    ``get_peft_model(model, lora_config)`` with ``init_lora_weights="corda"`` to start from (see the module
    docstring).  ``lora_config.corda_config`` says how: ``corda_method``, and the cache and covariance files.

    Args:
        model (nn.Module): the model, not yet adapted, in full precision (quantized layers are refused).
        lora_config (LoraConfig): the config ``get_peft_model`` will get (its ranks, rank_pattern included).
        run_model (Callable[[], None] | None): runs the model on calibration samples (forward passes; the model is
            in eval mode meanwhile, and back in its mode afterwards).  Not needed where the cache file or the
            covariance file exists.
        hooked_model (nn.Module | None): another model with the same layer names to run instead (the covariances
            are taken from its layers).  Default: ``model``.

    PEFT equivalent: ``peft.tuners.lora.corda.preprocess_corda``; the files are PEFT's (``torch.save`` of
    ``{"<name>.eigens.S_WC": ...}``, and of ``{"<name>": covariance}``), written atomically.

    Example:
        >>> from fastlora import CordaConfig, LoraConfig, get_peft_model, preprocess_corda
        >>> config = LoraConfig(target_modules=["q_proj", "v_proj"], r=8, init_lora_weights="corda",
        ...                     corda_config=CordaConfig(corda_method="ipm"))
        >>> preprocess_corda(model, config, run_model=lambda: [model(**batch) for batch in samples])  # doctest: +SKIP
        >>> model = get_peft_model(model, config)  # doctest: +SKIP
    """
    settings = lora_config.corda_config
    if settings is None:
        raise ValueError("If you want to use CorDA, please initialize the LoraConfig with init_lora_weights='corda' "
                         "and corda_config=CordaConfig(...).")
    modules = full_precision_linear_targets(model, lora_config, "CorDA")
    cache_file = settings["cache_file"]
    cache = saved_tensors(cache_file, next(iter(modules.values())).weight.device)
    if cache is not None:
        eigens = _from_cache(cache, cache_file, modules)
    else:
        covariances = _covariances(model, modules, lora_config, run_model, hooked_model)
        eigens = {}
        for name, module in _progress(modules.items(), settings["verbose"]):
            rank = lora_config.settings_for(name).r
            eigens[name] = _kept(_decomposition(module, covariances[name]), rank, settings["corda_method"],
                                 module.weight.device)
        if cache_file is not None:
            save_tensors(cache_file, {f"{name}.{EIGENS_ATTRIBUTE}.{part}": getattr(value, part)
                                      for name, value in eigens.items() for part in _PARTS})
    for name, value in eigens.items():
        setattr(modules[name], EIGENS_ATTRIBUTE, value)


def _covariances(model, modules, config: LoraConfig, run_model, hooked_model) -> dict[str, Tensor]:
    """Each target's mean input covariance: from the covariance file where it exists, else measured by running
    ``run_model`` (and written to the file where one is named)."""
    path = config.corda_config["covariance_file"]
    stored = saved_tensors(path, next(iter(modules.values())).weight.device)
    if stored is not None:
        missing = [name for name in modules if name not in stored]
        if missing:
            raise ValueError(f"the covariance file {path!r} holds nothing for {missing[:3]}: it was written for other "
                             f"target modules (delete it to measure again)")
        wrong = [name for name, module in modules.items() if stored[name].shape != (sizes(module)[0],) * 2]
        if wrong:
            raise ValueError(f"the covariance file {path!r} holds covariances of other sizes for {wrong[:3]}: it was "
                             f"written for another model")
        return {name: stored[name] for name in modules}
    if run_model is None:
        raise ValueError("run_model must be specified when covariance file and cache file aren't built.")
    hooked = hooked_model if hooked_model is not None else model
    absent = [name for name in modules if not _has_submodule(hooked, name)]
    if absent:
        raise ValueError(f"hooked_model has no layer named {absent[0]!r}: it must have the model's layer names")
    hooked_modules = {name: hooked.get_submodule(name) for name in modules}
    sums, calls = dict.fromkeys(modules, 0), dict.fromkeys(modules, 0)
    keep_dtype = config.corda_config["use_float16_for_covariance"]

    def accumulate(name: str):
        def hook(module, args, output) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])
            if not keep_dtype:
                x = x.float()
            x = x / torch.max(x).abs()
            if not torch.isfinite(x).all():
                raise ValueError(f"Invalid value found in the input of {name}, please check your input data.")
            product = x.t().matmul(x)
            if not torch.isfinite(product).all():  # a 16-bit covariance (use_float16_for_covariance) can overflow
                raise ValueError(f"Invalid value found in the covariance of {name}'s inputs (an overflow: leave "
                                 f"use_float16_for_covariance off, or pass fewer samples per call)")
            sums[name] = sums[name] + product
            calls[name] += 1
        return hook

    handles = [module.register_forward_hook(accumulate(name)) for name, module in hooked_modules.items()]
    try:
        with in_mode(hooked, training=False):
            run_model()
    finally:
        for handle in handles:
            handle.remove()
    unreached = [name for name in modules if not calls[name]]
    if unreached:
        raise ValueError(f"run_model did not run {unreached[:3]}{' and more' if len(unreached) > 3 else ''}: CorDA "
                         f"needs the inputs of every layer it adapts")
    covariances = {name: sums[name] / calls[name] for name in modules}
    if path is not None:
        save_tensors(path, covariances)
    return covariances


def _decomposition(module: nn.Module, covariance: Tensor) -> CordaEigens:
    """U, S and C⁻¹ V of W C = U S Vᵀ (W out × in, float32), C damped until it inverts cleanly."""
    weight = module.weight.data.float()
    if is_conv1d(module):
        weight = weight.T
    covariance = covariance.float()
    if not torch.isfinite(covariance).all():
        raise ValueError("Invalid value found in covariance (NaN or Inf): please check the input data or the "
                         "covariance file")
    identity = torch.eye(covariance.size(0), device=covariance.device)
    damp = 0.01
    for _ in range(_MOST_DAMPINGS):
        damped = covariance + torch.diag(torch.ones(covariance.size(0), device=covariance.device)
                                         * torch.mean(torch.diag(covariance)) * damp)
        inverse = torch.linalg.inv(damped)
        if torch.dist(damped @ inverse, identity).item() < 0.05:
            break
        damp *= 2
    else:
        raise ValueError(f"the covariance of this layer's inputs cannot be inverted, even damped by {damp / 2:g} times "
                         f"its mean diagonal: the calibration samples are too few or too alike")
    U, S, Vh = torch.linalg.svd(weight @ damped, full_matrices=False)
    return CordaEigens(S_WC=S, U_WC=U, V_WC=(Vh @ inverse).transpose(0, 1))


def _kept(eigens: CordaEigens, rank: int, method: str, device: torch.device) -> CordaEigens:
    """The r leading directions ("ipm") or the r trailing ones ("kpm")."""
    if rank > eigens.S_WC.size(0):
        raise ValueError(f"CorDA with r={rank} on a layer of rank {eigens.S_WC.size(0)}: the rank can be at most "
                         f"min(in_features, out_features)")
    kept = slice(None, rank) if method == "ipm" else slice(eigens.S_WC.size(0) - rank, None)
    return CordaEigens(S_WC=eigens.S_WC[kept].clone(), U_WC=eigens.U_WC[:, kept].clone().to(device),
                       V_WC=eigens.V_WC[:, kept].clone().to(device))


def _from_cache(cache: dict, path: str, modules: dict[str, nn.Module]) -> dict[str, CordaEigens]:
    eigens = {}
    for name, module in modules.items():
        keys = [f"{name}.{EIGENS_ATTRIBUTE}.{part}" for part in _PARTS]
        if not all(key in cache for key in keys):
            raise ValueError(f"the CorDA cache file {path!r} holds nothing for {name!r}: it was written for "
                             f"other target modules (delete it to decompose again)")
        eigens[name] = CordaEigens(*(cache[key] for key in keys))
    return eigens


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _progress(items, verbose: bool):
    if not verbose:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(list(items), desc="Collecting eigens")

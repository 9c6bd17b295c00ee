"""The settings of PEFT's initialisations that take their own sub-config: LoftQ (``loftq_config``), LoRA-GA
(``lora_ga_config``), EVA (``eva_config``) and CorDA (``corda_config``).  Each is a dataclass as in PEFT; a
:class:`fastlora.LoraConfig` keeps it as the plain dict PEFT's ``adapter_config.json`` holds, checked here."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

from fastlora.weight_inits import LORA_GA_DIRECTIONS, LORA_GA_SCALES

__all__ = ["LoftQConfig", "LoraGAConfig", "EvaConfig", "CordaConfig", "CORDA_METHODS", "checked_loftq_config",
           "checked_lora_ga_config", "checked_eva_config", "checked_corda_config"]

CORDA_METHODS = ("ipm", "kpm")


@dataclass
class LoftQConfig:
    """LoftQ's settings for ``LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(...))``.

    Args:
        loftq_bits (int): quantize with 4 bits (NF4) or 8 (int8, per row).  Default 4.
        loftq_iter (int): how many times quantization and the low-rank fit alternate.  Default 1.

    PEFT equivalent: ``peft.LoftQConfig``.

    Example:
        >>> from fastlora import LoftQConfig, LoraConfig
        >>> config = LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights="loftq",
        ...                     loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=2))
        >>> config.loftq_config
        {'loftq_bits': 4, 'loftq_iter': 2}
    """

    loftq_bits: int = 4
    loftq_iter: int = 1


def checked_loftq_config(init, value) -> dict:
    """``loftq_config`` as a plain dict (PEFT's form in adapter_config.json): required by ``init_lora_weights="loftq"``
    and checked; ignored with PEFT's warning otherwise."""
    if isinstance(value, LoftQConfig):
        value = dataclasses.asdict(value)
    if init != "loftq":
        if value:
            warnings.warn("`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'.",
                          UserWarning, stacklevel=5)
        return {}
    if not value:
        raise ValueError("`loftq_config` must be specified when `init_lora_weights` is 'loftq'.")
    if not isinstance(value, dict) or set(value) - {"loftq_bits", "loftq_iter"}:
        raise ValueError(f"loftq_config must be a LoftQConfig or a dict of loftq_bits and loftq_iter, got {value!r}")
    checked = {"loftq_bits": value.get("loftq_bits", 4), "loftq_iter": value.get("loftq_iter", 1)}
    if checked["loftq_bits"] not in (4, 8) or isinstance(checked["loftq_bits"], bool):
        raise ValueError(f"loftq_config: loftq_bits must be 4 (NF4) or 8 (int8), got {checked['loftq_bits']!r}")
    if not isinstance(checked["loftq_iter"], int) or isinstance(checked["loftq_iter"], bool) or checked["loftq_iter"] < 1:
        raise ValueError(f"loftq_config: loftq_iter must be an integer >= 1, got {checked['loftq_iter']!r}")
    return checked


@dataclass
class LoraGAConfig:
    """LoRA-GA's settings for ``LoraConfig(init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(...))``: how
    the directions of the estimated gradient's SVD are shared between A and B, and how B is scaled (the math is in
    :mod:`fastlora.weight_inits`).

    Args:
        direction (str): ``"ArB2r"`` (A the first r directions, B the next r), ``"A2rBr"`` (the reverse),
            ``"ArBr"`` (A the odd ones, B the even ones) or ``"random"`` (r of the 2r, drawn).  Default "ArB2r".
        scale (str): ``"stable"`` (B times out^¼ / √stable_gamma), ``"weight_svd"`` (B times W's largest singular
            value over its own first), ``"gd_scale"`` (A and B divided by the adapter's scaling) or ``"unit"``.
            Default "stable".
        stable_gamma (int): γ of the stable scale.  Default 16.

    PEFT equivalent: ``peft.LoraGAConfig``.

    Example:
        >>> from fastlora import LoraConfig, LoraGAConfig
        >>> config = LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights="lora_ga",
        ...                     lora_ga_config=LoraGAConfig(direction="ArB2r", scale="stable"))
        >>> config.lora_ga_config
        {'direction': 'ArB2r', 'scale': 'stable', 'stable_gamma': 16}
    """

    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: int = 16


@dataclass
class EvaConfig:
    """EVA's settings for ``LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(...))`` (used by
    :func:`fastlora.initialize_lora_eva_weights`).

    Args:
        rho (float): a layer's rank can grow to round(r · rho) where its inputs explain more variance (≥ 1;
            1: no redistribution).  Default 2.0.
        tau (float): a component has converged once the cosine similarity between two consecutive estimates
            reaches tau (0 to 1).  Default 0.99.
        use_label_mask (bool): leave out the positions whose label is ``label_mask_value``.  Default True.
        label_mask_value (int): see ``use_label_mask``.  Default -100.
        whiten (bool): divide each component by the square root of its singular value.  Default False.
        adjust_scaling_factors (bool): a layer whose rank changed gets lora_alpha · new_r / r, so that its scaling
            stays alpha / r.  Default True.

    PEFT equivalent: ``peft.EvaConfig``.

    Example:
        >>> from fastlora import EvaConfig, LoraConfig
        >>> config = LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights="eva",
        ...                     eva_config=EvaConfig(rho=1.5))
        >>> config.eva_config["rho"], config.eva_config["tau"]
        (1.5, 0.99)
    """

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True


@dataclass
class CordaConfig:
    """CorDA's settings for ``LoraConfig(init_lora_weights="corda", corda_config=CordaConfig(...))`` (used by
    :func:`fastlora.preprocess_corda`).

    Args:
        cache_file (str | None): where the decomposition of each layer is kept (PEFT's format): read when it
            exists, written otherwise.  Default None.
        covariance_file (str | None): where the layers' input covariances are kept (as large as the model): read
            when it exists, written otherwise; reusable for another rank.  Default None.
        corda_method (str): ``"ipm"`` (instruction-previewed: the adapter starts from the r leading directions of
            W C, C the inputs' covariance) or ``"kpm"`` (knowledge-preserved: the r trailing ones, keeping what
            the inputs use most in the frozen weight).  Default "ipm".
        verbose (bool): show the decompositions' progress (needs tqdm).  Default False.
        use_float16_for_covariance (bool): accumulate the covariance in the inputs' own dtype instead of float32
            (half the memory, less accurate).  Default False.
        prune_temporary_fields (bool): PEFT's switch for dropping its intermediate module attributes; fastlora
            keeps none on the modules either way.  Default True.

    PEFT equivalent: ``peft.CordaConfig``.

    Example:
        >>> from fastlora import CordaConfig, LoraConfig
        >>> config = LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights="corda",
        ...                     corda_config=CordaConfig(corda_method="kpm"))
        >>> config.corda_config["corda_method"]
        'kpm'
    """

    cache_file: Any = None
    covariance_file: Any = None
    corda_method: str = "ipm"
    verbose: bool = False
    use_float16_for_covariance: bool = False
    prune_temporary_fields: bool = True


def _as_dict(value: Any, config_class: type, field_name: str) -> dict:
    """A sub-config as the dict a file holds, from its dataclass (fastlora's or PEFT's, by field names) or a dict;
    PEFT's defaults fill what is missing, and a field the dataclass lacks is refused."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if not isinstance(value, dict):
        raise ValueError(f"{field_name} must be a {config_class.__name__} or a dict of its fields, got {value!r}")
    names = [f.name for f in dataclasses.fields(config_class)]
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ValueError(f"{field_name}: unknown field(s) {unknown}; {config_class.__name__} has {names}")
    return {**dataclasses.asdict(config_class()), **value}


def checked_lora_ga_config(init, value) -> dict | None:
    """``lora_ga_config`` as a checked dict, or None where not given (PEFT keeps None: LoRA-GA then refuses to
    start from a gradient)."""
    if value is None:
        return None
    checked = _as_dict(value, LoraGAConfig, "lora_ga_config")
    if checked["direction"] not in LORA_GA_DIRECTIONS:
        raise ValueError(f"lora_ga_config: direction must be one of {LORA_GA_DIRECTIONS}, got {checked['direction']!r}")
    if checked["scale"] not in LORA_GA_SCALES:
        raise ValueError(f"lora_ga_config: scale must be one of {LORA_GA_SCALES}, got {checked['scale']!r}")
    gamma = checked["stable_gamma"]
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma <= 0:
        raise ValueError(f"lora_ga_config: stable_gamma must be a positive number, got {gamma!r}")
    return checked


def _for_its_init(init, value, own_init: str, config_class: type, field_name: str, name: str) -> dict | None:
    """A sub-config that belongs to ``own_init`` as a dict, as PEFT takes it: its defaults, with PEFT's warning,
    where that initialisation is asked for without one; kept but said to be ignored where another one is."""
    if value is None:
        if init != own_init:
            return None
        warnings.warn(f"`init_lora_weights` is '{own_init}' but `{field_name}` is not specified. Using default {name} "
                      f"config.", UserWarning, stacklevel=6)
        return dataclasses.asdict(config_class())
    if init != own_init:
        warnings.warn(f"`{field_name}` specified but will be ignored when `init_lora_weights` is not '{own_init}'.",
                      UserWarning, stacklevel=6)
    return _as_dict(value, config_class, field_name)


def checked_eva_config(init, value) -> dict | None:
    """``eva_config`` as a checked dict (see :func:`_for_its_init`)."""
    checked = _for_its_init(init, value, "eva", EvaConfig, "eva_config", "EVA")
    if checked is None:
        return None
    rho, tau = checked["rho"], checked["tau"]
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or rho < 1.0:
        raise ValueError(f"eva_config: `rho` must be >= 1.0, got {rho!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau <= 1.0:
        raise ValueError(f"eva_config: `tau` must be between 0.0 and 1.0, got {tau!r}")
    return checked


def checked_corda_config(init, value) -> dict | None:
    """``corda_config`` as a checked dict (see :func:`_for_its_init`), its file paths as strings."""
    checked = _for_its_init(init, value, "corda", CordaConfig, "corda_config", "CorDA")
    if checked is None:
        return None
    if checked["corda_method"] not in CORDA_METHODS:
        raise ValueError(f"corda_config: corda_method must be 'ipm' or 'kpm', got {checked['corda_method']!r}")
    for name in ("cache_file", "covariance_file"):
        if checked[name] is not None:
            checked[name] = str(checked[name])
    return checked

"""Targets written for a mixture-of-experts model before transformers 5 fused its experts, as PEFT reads them.

transformers 5 stores the experts of Mixtral, Qwen3-MoE, DeepSeek-V3 and their relatives as 3-D parameters of one
module (``experts.gate_up_proj``, ``experts.down_proj``) where version 4 had one ``nn.Linear`` per expert and
projection (``w1`` / ``w3`` / ``w2``, or ``gate_proj`` / ``up_proj`` / ``down_proj``), and the router ``gate`` is no
longer a Linear.  PEFT rewrites a config for these architectures so that it means what it meant on version 4 (as
0.22 does; 0.21 moved every such name to ``target_parameters``, without its prefix, and left Qwen2-MoE as it was):

* the expert projections and the router named in ``target_modules`` (``"all-linear"`` names all of them) move to
  ``target_parameters`` (``gate_up_proj``, ``down_proj``, ``gate.weight``, a prefix kept: ``layers.0.gate`` becomes
  ``layers.0.gate.weight``); a name whose modules are all still Linear layers (a shared expert's ``down_proj``)
  stays in ``target_modules``, and names the fused parameter too where the model has one beside them;
* the two projections fused into ``gate_up_proj`` must be named together, and their parameter then gets rank 2r
  and alpha 2·lora_alpha (``rank_pattern`` / ``alpha_pattern``), so each half keeps r and the scaling.

fastlora rewrites the config as PEFT 0.22 does, so the same script adapts the same weights, and writes the same
adapter_config.json.  Adapter files of per-expert (version 4) weights are not converted: loading one is refused
with what to do (:func:`check_not_per_expert`).
"""

from __future__ import annotations

import re
from typing import Callable

from torch import nn

from fastlora.module_names import named_parameters
from fastlora.config import LoraConfig

__all__ = ["FUSED_EXPERT_NAMES", "for_fused_experts", "check_not_per_expert"]

_MIXTRAL = {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"}
_QWEN2_MOE = {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}

# model_type → {version-4 module name → the version-5 parameter it became}
FUSED_EXPERT_NAMES: dict[str, dict[str, str]] = {
    **dict.fromkeys(["mixtral", "minimax", "minimax_m2"], _MIXTRAL),
    **dict.fromkeys(["qwen2_moe", "afmoe", "beam", "cohere2_moe", "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1",
                     "ernie4_5_moe", "exaone_moe", "flex_olmo", "glm4_moe", "glm4_moe_lite", "glm4v_moe", "glm_moe_dsa",
                     "hunyuan_v1_moe", "longcat_flash", "mellum", "olmoe", "qwen3_moe", "qwen3_next", "qwen3_omni_moe",
                     "qwen3_omni_moe_text", "qwen3_omni_moe_thinker", "sarvam_mla", "solar_open"], _QWEN2_MOE),
}


def _fused_into(names: dict[str, str]) -> dict[str, list[str]]:
    """version-5 parameter → the version-4 names fused into it (those with more than one)."""
    out: dict[str, list[str]] = {}
    for old, new in names.items():
        out.setdefault(new, []).append(old)
    return {new: olds for new, olds in out.items() if len(olds) > 1}


def _names(name: str, entry: str) -> bool:
    """Whether ``entry`` names ``name``: the name itself or a dotted suffix of it, as PEFT matches targets."""
    return name == entry or name.endswith("." + entry)


def _resolved_string(config: LoraConfig, model: nn.Module, names: dict[str, str],
                     all_linear_names: Callable[[], list[str]]) -> set[str]:
    """A string ``target_modules`` as the version-4 leaf names it targets: ``"all-linear"`` the Linear layers' and
    every expert projection and router; a regex the leaves of the modules and parameters it matches, plus each
    version-4 name whose reconstructed key (``<experts module>.<name>``) it matches."""
    if config.target_modules == "all-linear":
        return {name.rsplit(".", 1)[-1] for name in all_linear_names()} | set(names)
    pattern = config.target_modules
    keys = [n for n, _ in model.named_modules()] + [n for n, _ in named_parameters(model)]
    matched = {key.rsplit(".", 1)[-1] for key in keys if re.fullmatch(pattern, key)}
    holders: dict[str, set[str]] = {}
    for key, _ in named_parameters(model):
        holder, _, leaf = key.rpartition(".")
        holders.setdefault(leaf, set()).add(holder)
    for old, new in names.items():
        if old not in matched and any(re.fullmatch(pattern, f"{h}.{old}") for h in holders.get(new, ())):
            matched.add(old)
    return matched


def for_fused_experts(config: LoraConfig, model: nn.Module, all_linear_names: Callable[[], list[str]]) -> LoraConfig:
    """``config`` rewritten for a model whose experts transformers 5 fused (see the module docstring); unchanged for
    other models.  ``all_linear_names()`` lists the modules ``"all-linear"`` matches.  ValueError when one of two
    fused projections is named without the other."""
    names = FUSED_EXPERT_NAMES.get(getattr(getattr(model, "config", None), "model_type", None))
    if names is None or config.target_modules is None:
        return config
    targets = config.target_modules
    if isinstance(targets, str):
        targets = _resolved_string(config, model, names, all_linear_names)
        if not targets:
            return config
    parameters = set(config.target_parameters or [])
    remaining, named, added = set(), set(), set()
    modules = [(n, m) for n, m in model.named_modules() if n]
    # parameters only target_parameters reach: those a module other than a Linear holds itself (the fused experts)
    outside_linears = [re.sub(r"\.base_layer(?=\.)", "", f"{n}.{p}") for n, m in modules if not isinstance(m, nn.Linear)
                       for p, _ in m.named_parameters(recurse=False)]
    for target in targets:
        old = next((o for o in names if _names(target, o)), None)
        if old is None:
            remaining.add(target)
            continue
        parameter = target[: len(target) - len(old)] + names[old]  # its prefix kept: layers.0.gate → layers.0.gate.weight
        matched = [m for n, m in modules if _names(n, target)]
        if matched and all(isinstance(m, nn.Linear) for m in matched):
            # still Linear layers on this model (a shared expert's down_proj): adapted as modules, and the
            # parameter of the same name (the routed experts' down_proj beside them) too where there is one
            remaining.add(target)
            if not any(_names(h, parameter) for h in outside_linears):
                continue
        parameters.add(parameter)
        named.add(old)
        added.add(parameter)
    rank_pattern, alpha_pattern = dict(config.rank_pattern), dict(config.alpha_pattern)
    for new, olds in _fused_into(names).items():
        present = [o for o in olds if o in named]
        if present and len(present) < len(olds):
            raise ValueError(f"target_modules names {', '.join(present)} without {', '.join(sorted(set(olds) - set(present)))}: "
                             f"on this model (transformers 5) they are fused into one parameter, {new}; name both")
        if present:
            rank_pattern[rf".*\.{re.escape(new)}"] = config.r * len(olds)
            alpha_pattern[rf".*\.{re.escape(new)}"] = config.lora_alpha * len(olds)
    # of the parameters named here, those this model has (a table entry for a projection it lacks is left out)
    held = {re.sub(r"\.base_layer(?=\.)", "", n) for n, p in named_parameters(model) if p.dim() >= 2}
    added -= set(config.target_parameters or [])
    parameters -= {p for p in added if not any(_names(h, p) for h in held)}
    if not remaining and not parameters:
        return config
    return config.replace(target_modules=sorted(remaining), target_parameters=sorted(parameters) or None,
                          rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


def check_not_per_expert(model: nn.Module, keys, where) -> None:
    """ValueError, naming what to do, where an adapter file holds per-expert weights (``...experts.3.w1.lora_A...``,
    written on transformers 4) for a model whose experts transformers 5 fused: fastlora does not convert them."""
    names = FUSED_EXPERT_NAMES.get(getattr(getattr(model, "config", None), "model_type", None))
    if names is None:
        return
    per_expert = re.compile(r"\.experts\.\d+\.(" + "|".join(map(re.escape, names)) + r")\.")
    found = next((key for key in keys if per_expert.search(key)), None)
    if found is not None:
        raise ValueError(f"adapter in {where} holds per-expert weights written on transformers 4 ({found}); on this "
                         f"model (transformers 5) each projection of the experts is one fused parameter, and fastlora "
                         f"does not convert such files: load the adapter once with PEFT (which converts it) and save it "
                         f"again, then load that")

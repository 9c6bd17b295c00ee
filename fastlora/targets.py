"""Which modules a ``LoraConfig`` adapts and which it saves whole: PEFT's matching rules, checked.

Everything here reads the model and changes nothing, so every check runs before the model is touched.
"""

from __future__ import annotations

import warnings

import re

from torch import nn

from fastlora.module_names import named_parameters
from fastlora.base_kinds import dispatches_itself, is_adapted, is_conv1d_target, is_linear_like, kind_of, refusal
from fastlora.config import LoraConfig, UnsupportedFeatureError, as_list, pattern_key
from fastlora.fused_experts import FUSED_EXPERT_NAMES, for_fused_experts
from fastlora.layer import LoRALinear
from fastlora.modules_to_save import ModulesToSaveWrapper
from fastlora.parameter_lora import LoRAParameter, plan_parameter_targets, wrapped_by_parameter_layers
from fastlora.quantized import is_bnb_linear
from fastlora.trainable_tokens import TrainableTokensWrapper
from fastlora.weight_tying import tied_heads, tied_with_input_embeddings, with_weight_tying

__all__ = ["plan_targets", "plan_modules_to_save", "with_task_heads", "task_heads", "saved_whole", "TASK_HEAD_NAMES"]

# PEFT's task heads: its SEQ_CLS and TOKEN_CLS models add ``classifier``, ``score`` and ``pre_classifier`` (the
# freshly initialised layer before DistilBERT's classifier) to modules_to_save, its QUESTION_ANS model
# ``qa_outputs``.  The ones a model lacks are skipped (a Llama has ``score``, a BERT ``classifier``); any other
# modules_to_save entry must match a module.
_CLASSIFIER_HEADS = ("classifier", "score", "pre_classifier")
_TASK_HEADS = {"SEQ_CLS": _CLASSIFIER_HEADS, "TOKEN_CLS": _CLASSIFIER_HEADS, "QUESTION_ANS": ("qa_outputs",)}
TASK_HEAD_NAMES = tuple(dict.fromkeys(head for heads in _TASK_HEADS.values() for head in heads))  # every task's


def task_heads(config: LoraConfig) -> tuple[str, ...]:
    """The modules_to_save entries PEFT's model for ``config.task_type`` adds (none a model lacks is an error)."""
    return _TASK_HEADS.get(config.task_type.value if config.task_type is not None else "", ())


def with_task_heads(config: LoraConfig, model: nn.Module | None = None) -> LoraConfig:
    """``config`` with its task's heads added to ``modules_to_save``, as PEFT's task models do, and, given the
    ``model``, as PEFT completes it for that model: its architecture's default ``target_modules`` when the config
    names none, the targets of a mixture-of-experts model whose experts transformers 5 stores as parameters
    rewritten (:mod:`fastlora.fused_experts`), and a head tied to the input embeddings taken out for the
    embeddings under ``ensure_weight_tying`` (:mod:`fastlora.weight_tying`)."""
    heads = [h for h in task_heads(config) if h not in (config.modules_to_save or [])]
    if heads:
        config = config.replace(modules_to_save=list(config.modules_to_save or []) + heads)
    if model is None:
        return config
    if config.target_modules is None:
        from fastlora.default_targets import default_target_modules, has_default_targets

        fused_experts = getattr(getattr(model, "config", None), "model_type", None) in FUSED_EXPERT_NAMES
        if config.target_parameters and fused_experts:
            # PEFT rewrites such a model's config for its fused experts before it fills in defaults, and that turns
            # no target_modules into none at all: only the target_parameters are adapted (written as [])
            config = config.replace(target_modules=[])
        elif not config.target_parameters or has_default_targets(model):  # PEFT fills them beside target_parameters
            # (a config naming nothing at all on such a model takes the defaults, where PEFT's rewrite refuses it)
            defaults = default_target_modules(model)
            if isinstance(defaults, str) and (config.layers_to_transform is not None or config.layers_pattern):
                raise ValueError(f"layers_to_transform with this architecture's default targets, a regex ({defaults!r}, "
                                 f"which layers_to_transform cannot filter): name the modules in target_modules")
            config = config.replace(target_modules=defaults)
    return with_weight_tying(for_fused_experts(config, model, lambda: _all_linear(model)), model)


def _all_linear(model: nn.Module) -> list[str]:
    """The modules ``target_modules="all-linear"`` matches: the linear-like layers but the output head."""
    head = output_head(model)
    return [name for name, module in _named_modules_outside_wrappers(model)
            if name and is_linear_like(module) and not _is_head(module, head) and not isinstance(module, LoRAParameter)]


def saved_whole(name: str, entries: list[str] | None, by_ending: bool = False) -> bool:
    """Whether a modules_to_save entry matches the module ``name``: the name itself or a dotted suffix of it
    (``"norm"`` matches ``model.norm``, not ``input_layernorm``), as PEFT matches entries since 0.22.  With
    ``by_ending``, PEFT 0.21's rule, kept for the files written under it: every name that ends with the entry
    (``"norm"`` matches ``input_layernorm`` too)."""
    return any(name.endswith(m) if by_ending else (name == m or name.endswith("." + m)) for m in entries or [])


def _under_modules_to_save(name: str, config: LoraConfig, by_ending: bool = False) -> bool:
    """No adapter on a modules_to_save module or inside one: the module or one of its parents matched as
    :func:`plan_modules_to_save` matches them.  (PEFT's own guard matches whole dotted names, as the default rule
    does; under ``by_ending`` it may put an adapter inside a module it then saves whole, with ``"attn"`` say:
    fastlora never does, and warns where it leaves out a target PEFT would adapt.)"""
    parents = [name[:i] for i, c in enumerate(name) if c == "."] + [name]
    return any(saved_whole(parent, config.modules_to_save, by_ending) for parent in parents)


def _name_matches(name: str, patterns: list[str] | str) -> bool:
    """PEFT's rule: a string is a regex matched in full; a list entry matches exactly or as a dotted suffix."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _outside_the_layers(name: str, config: LoraConfig) -> bool:
    """Whether ``layers_to_transform`` leaves the module ``name`` out, as PEFT applies it: to the modules a
    ``target_modules`` entry matches as a dotted suffix (one naming the module in full is taken as it is), an
    empty list leaving none out."""
    if isinstance(config.target_modules, str) or name in config.target_modules:
        return False
    return outside_layers_to_transform(name, config)


def outside_layers_to_transform(name: str, config: LoraConfig) -> bool:
    """Whether the module ``name`` lies outside the layers ``layers_to_transform`` lists (none when it is empty)."""
    indices = [] if config.layers_to_transform is None else as_list(config.layers_to_transform)
    return bool(indices) and _layer_index(name, config.layers_pattern) not in indices


def _layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    pattern = "|".join(re.escape(p) for p in as_list(layers_pattern)) if layers_pattern else r"[^.]+"
    found = re.search(rf"(?:^|\.)(?:{pattern})\.(\d+)(?:\.|$)", name)
    return int(found.group(1)) if found else None


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output head (``get_output_embeddings()``), None when it has none."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def _is_head(module: nn.Module, head: nn.Module | None) -> bool:
    """Whether ``module`` is the output head ``head``, or the layer inside it where trainable token rows wrap it."""
    return head is not None and (module is head or (isinstance(head, TrainableTokensWrapper) and module is head.base_layer))


def _named_modules_outside_wrappers(model: nn.Module):
    """``model.named_modules()`` without what lies inside a ``ModulesToSaveWrapper`` (the original and the
    adapters' copies), which PEFT never adapts or wraps again, nor the base layer an adapted layer holds (a
    quantized base's), which a new adapter reaches through that layer."""
    wrappers = []
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in wrappers):
            continue
        if isinstance(module, ModulesToSaveWrapper) or getattr(type(module), "HOLDS_BASE_LAYER", False):
            wrappers.append(name)
        yield name, module


def plan_targets(model: nn.Module, config: LoraConfig, adapter_name: str | None = None,
                 by_ending: bool = False) -> list[str]:
    """Qualified names of the modules ``config`` adapts, checked: each is of a kind fastlora adapts
    (:mod:`fastlora.base_kinds`); none inside a modules_to_save module (``by_ending``: see :func:`saved_whole`).

    With ``adapter_name`` None (a model without adapters) an existing ``LoRALinear`` is an error; otherwise
    a ``LoRALinear`` target gains the new adapter, and one that already holds ``adapter_name`` is an error.
    Raises ValueError when nothing matches (naming a few Linear modules that do exist) and TypeError when
    a matched module is of no kind fastlora adapts (naming it and why).
    """
    if not config.target_modules and config.target_parameters:  # None or []: only target_parameters
        return []
    head = output_head(model)
    how, embedding, tied = tied_heads(config, model)
    heads = tied if how == "target_modules" else []  # adapted last, sharing the embeddings' adapter (PEFT's order)
    saved_tied = tied if how == "modules_to_save" else []  # computing with the embeddings' copy
    targets, not_linear, saved_instead = [], [], []
    saved_by_others = []  # modules another adapter saves whole that target_modules names
    parameter_owners = None  # the modules this config's target_parameters adapt: planned once, where needed
    for name, module in _named_modules_outside_wrappers(model):
        if isinstance(module, ModulesToSaveWrapper) and name and config.target_modules != "all-linear" and \
                _name_matches(name, config.target_modules) and not _under_modules_to_save(name, config, by_ending):
            saved_by_others.append(name)
        if not name or name in heads or isinstance(module, ModulesToSaveWrapper) or wrapped_by_parameter_layers(
                model, name) or (isinstance(module, LoRAParameter) and config.target_modules == "all-linear"):
            continue  # a tied head has the plan below; a parameter's layer its own, but named it takes the adapter
            # (the module under it, a target, would get a layer between it and the parameter's; PEFT leaves it too)
        if config.target_modules == "all-linear":
            if not is_linear_like(module) or _is_head(module, head):
                continue
        elif not _name_matches(name, config.target_modules):
            continue
        if config.exclude_modules is not None and _name_matches(name, config.exclude_modules):
            continue
        if _under_modules_to_save(name, config, by_ending):
            saved_instead.append(name)
            continue
        if _outside_the_layers(name, config):
            continue
        if name in saved_tied:  # PEFT fails here with a TypeError from inside its wrapper
            raise ValueError(f"target_modules matched {name}, which ensure_weight_tying ties to the copy of {embedding} "
                             f"that modules_to_save trains: it cannot also take an adapter; leave it out of "
                             f"target_modules")
        if isinstance(module, LoRAParameter):  # on its parameter, as PEFT's ParamWrapper takes it: refusals first
            if parameter_owners is None:
                parameter_owners = {target.owner for target in plan_parameter_targets(model, config)}
            if name in parameter_owners:
                continue  # this config's target_parameters adapt it too (PEFT's rewrite of expert names)
            LoRAParameter.check_settings(
                config.settings_for(name), f"target_modules matched {name}, whose {module.parameter_name} another "
                f"adapter adapts through target_parameters: the adapter joins it there, which",
                otherwise=f"leave {name} out of target_modules")
        if is_adapted(module):
            if adapter_name is None:
                raise ValueError(f"module {name!r} is already a LoRALinear: the model already has an adapter")
            if adapter_name in module.adapter_settings:
                raise ValueError(f"module {name!r} already has an adapter named {adapter_name!r}")
        elif kind_of(module) is None:
            not_linear.append(f"{name} ({type(module).__name__}: {refusal(module)})")
            continue
        targets.append(name)
    if not_linear:
        raise TypeError(
            f"target_modules={config.target_modules!r} matched modules that are not nn.Linear layers fastlora "
            f"adapts: {'; '.join(not_linear[:5])}. Leave them out of target_modules (exclude_modules can)"
        )
    if not targets and config.target_parameters:  # PEFT's warning; the parameters are checked on their own
        warnings.warn(f"target_modules={config.target_modules} were set but no module was matched.", RuntimeWarning,
                      stacklevel=3)
        return []
    if not targets:
        linears = [n for n, m in model.named_modules() if is_linear_like(m) and not n.endswith(".base_layer")]
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no module of the model"
            + (" (after exclude_modules / layers_to_transform)"
               if config.exclude_modules is not None or config.layers_to_transform is not None else "")
            + (f" outside modules_to_save (which PEFT never adapts; matched there: {', '.join(saved_instead[:4])})"
               if saved_instead else "")
            + f"; the Linear and Conv1D modules it has include: {', '.join(linears[:6]) or 'none'}"
        )
    if config.target_modules == "all-linear" and not config.target_parameters:
        _warn_fused_experts(model)
    for name in heads:
        module = model.get_submodule(name)
        if isinstance(module, ModulesToSaveWrapper):
            raise ValueError(f"ensure_weight_tying: {name} is saved whole (modules_to_save) by another adapter, so it "
                             f"cannot share the adapter of {embedding}; tie both adapters the same way")
        if is_adapted(module) and adapter_name in module.adapter_settings:
            raise ValueError(f"module {name!r} already has an adapter named {adapter_name!r}")
        if not is_adapted(module) and kind_of(module) is None:
            raise TypeError(f"ensure_weight_tying: the head {name} tied to {embedding} ({type(module).__name__}) is "
                            f"not a layer fastlora adapts: {refusal(module)}")
        targets.append(name)
    if saved_by_others:  # PEFT raises here (a LoRA layer cannot wrap its copies); the other modules are adapted
        warnings.warn(f"target_modules matched {saved_by_others[:3]}{' ...' if len(saved_by_others) > 3 else ''}, "
                      f"which another adapter saves whole (modules_to_save): not adapted (a module is trained whole "
                      f"or through an adapter, not both)", UserWarning, stacklevel=3)
    # PEFT's own guard matches whole dotted names: only PEFT 0.21's rule for modules_to_save leaves it any
    peft_adapts = [n for n in saved_instead if not _under_modules_to_save(n, config)]
    if peft_adapts:
        warnings.warn(f"target_modules matched {peft_adapts[:3]}{' ...' if len(peft_adapts) > 3 else ''}, inside "
                      f"modules the modules_to_save entries {config.modules_to_save} save whole: fastlora trains "
                      f"them whole, without an adapter (PEFT would put one inside the module it saves)", UserWarning,
                      stacklevel=3)
    return targets


def _warn_fused_experts(model: nn.Module) -> None:
    """"all-linear" adapts Linear layers; a mixture-of-experts block whose experts are stored as 3-D parameters
    (transformers' fused experts: ``experts.gate_up_proj``, ``experts.down_proj``) has none there.  PEFT, for some
    of these architectures (Mixtral, Qwen3-MoE), also adapts those parameters and the router's ``gate.weight``
    through ``target_parameters``: say so rather than differ silently."""
    fused = sorted({name.rsplit(".", 1)[0] for name, p in named_parameters(model)
                    if p.dim() >= 3 and ".experts." in f".{name}"})
    if fused:
        warnings.warn(
            f"target_modules='all-linear' adapts the Linear layers only: the experts stored as parameters in "
            f"{fused[0]}{' and %d more' % (len(fused) - 1) if len(fused) > 1 else ''} are left frozen; name them in "
            f"target_parameters (e.g. target_parameters=['experts.gate_up_proj', 'experts.down_proj']) to adapt "
            f"them", UserWarning, stacklevel=4)


# PEFT records a target_modules list of this many names or more by the dotted suffixes that pick the same modules
_NAMES_TO_CONDENSE = 20


def with_targets_recorded(model: nn.Module, config: LoraConfig, targets: list[str]) -> LoraConfig:
    """``config`` as PEFT records it (in ``peft_config`` and in the saved ``adapter_config.json``):
    ``target_modules="all-linear"`` replaced by the names of the modules it adapts, and a list of 20 names or
    more by the shortest dotted suffixes that pick the same modules of ``model`` (:func:`shortest_suffixes`; not
    beside ``layers_to_transform``, which names in full escape).  ``model`` is the model before adaptation."""
    modules = config.target_modules
    if isinstance(modules, str) and modules.lower() == "all-linear" and targets:
        config = config.replace(target_modules=sorted(targets))
    names = config.target_modules
    if isinstance(names, list) and len(names) >= _NAMES_TO_CONDENSE and config.layers_to_transform is None:
        endings = tuple("." + name for name in names)
        others = [n for n in _names_on_a_fresh_model(model) if n not in names and not n.endswith(endings)]
        condensed = shortest_suffixes(names, others)
        if len(condensed) < len(names):
            config = config.replace(target_modules=condensed)
    return config


def names_the_same_modules(model: nn.Module, first, second) -> bool:
    """Whether two ``target_modules`` values pick the same modules of ``model`` (equal values, or lists whose
    entries match the same names: a list in full and its shortest suffixes)."""
    if first == second:
        return True
    if not isinstance(first, list) or not isinstance(second, list):
        return False
    names = [name for name, _ in model.named_modules() if name]
    return {n for n in names if _name_matches(n, first)} == {n for n in names if _name_matches(n, second)}


def _names_on_a_fresh_model(model: nn.Module) -> list[str]:
    """The module names of ``model``, and each as the model without adapters names it (no ``original_module`` or
    ``modules_to_save.<adapter>`` level of a saved module, no ``base_layer`` level of an adapted one): a
    condensed target list must pick the same modules there, where a file is loaded."""
    out = []
    for name, _ in model.named_modules():
        out.append(name)
        fresh = re.sub(r"\.modules_to_save\.[^.]+(?=\.|$)|\.original_module(?=\.|$)|\.base_layer(?=\.|$)", "", name)
        if fresh != name:
            out.append(fresh)
    return list(dict.fromkeys(out))


def shortest_suffixes(targets: list[str], others: list[str]) -> list[str]:
    """Dotted suffixes that match every name in ``targets`` and no name in ``others`` (PEFT's matching: the name
    itself or a suffix after a dot), chosen as PEFT chooses them: the targets visited in the order of their
    suffixes, each taking its shortest suffix no other name ends with, unless one already taken covers it."""
    def suffixes(name: str) -> list[str]:  # shortest first
        parts = name.split(".")
        return [".".join(parts[start:]) for start in range(len(parts) - 1, -1, -1)]

    taken_by_others = {suffix for name in others for suffix in suffixes(name)}
    chosen: set[str] = set()
    for name, candidates in sorted(((name, suffixes(name)) for name in set(targets)), key=lambda item: item[1]):
        for suffix in candidates:
            if suffix in chosen or suffix in taken_by_others:
                continue
            if not any(name.endswith("." + taken) for taken in chosen):
                chosen.add(suffix)
            break
    return sorted(chosen) if chosen else sorted(set(targets))


def settle_fan_in_fan_out(model: nn.Module, config: LoraConfig, targets: list[str]) -> LoraConfig:
    """``config`` with ``fan_in_fan_out`` as adapting ``targets`` leaves it in PEFT: visiting the targets in order,
    a Conv1D (weight stored in × out) sets it True and a Linear sets it False, each with PEFT's warning when it
    was the other way.  A Conv1D layer an earlier adapter made a LoRA layer gains the adapter as it is, leaving a
    False alone, as in PEFT (such a file loads with PEFT's correcting warning); a Linear one still sets False,
    where PEFT would record a True that no model's Linear layers load.  fastlora reads each layer's layout from
    its kind; the flag is what the file records."""
    import warnings

    flag = config.fan_in_fan_out
    for name in targets:
        conv1d = is_conv1d_target(model.get_submodule(name))
        if conv1d and is_adapted(model.get_submodule(name)):
            continue
        if conv1d and not flag:
            warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. "
                          "Setting fan_in_fan_out to True.", UserWarning, stacklevel=3)
            flag = True
        elif not conv1d and flag:
            warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                          "Setting fan_in_fan_out to False.", UserWarning, stacklevel=3)
            flag = False
    return config if flag == config.fan_in_fan_out else config.replace(fan_in_fan_out=flag)


def plan_modules_to_save(model: nn.Module, config: LoraConfig, adapter_name: str | None = None,
                         by_ending: bool = False) -> list[str]:
    """Qualified names of the modules ``config`` saves whole: the outermost match of each entry, an entry matching
    the name itself or a dotted suffix, as PEFT matches them (``"norm"`` takes ``model.norm``, not each layer's
    ``input_layernorm``; ``by_ending``: see :func:`saved_whole`).  An entry that matches nothing is an error, but
    for task heads.  A match that is already a ``ModulesToSaveWrapper`` gains a copy for ``adapter_name`` (an error
    when ``adapter_name`` is None); one holding an adapted layer, or quantized weights, is an error."""
    found = set()
    for wanted in config.modules_to_save or []:
        matches = {n for n, _ in _named_modules_outside_wrappers(model) if n and saved_whole(n, [wanted], by_ending)}
        if not matches and wanted not in task_heads(config):
            raise ValueError(f"modules_to_save entry {wanted!r} matches no module of the model")
        found |= matches
    how, _, tied = tied_heads(config, model)
    if how == "modules_to_save":  # trained as the embeddings' copy (:mod:`fastlora.weight_tying`)
        found |= set(tied)
    for name in sorted(found):
        module = model.get_submodule(name)
        if is_adapted(module) or (isinstance(module, ModulesToSaveWrapper) and adapter_name is None):
            raise ValueError(f"modules_to_save module {name!r} is already adapted: the model already has an adapter")
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            raise ValueError(f"modules_to_save module {name!r} already has a copy for adapter {adapter_name!r}")
        inner = [m for m in module.modules() if m is not module]
        if isinstance(module, TrainableTokensWrapper) or any(
                isinstance(m, (LoRALinear, ModulesToSaveWrapper, TrainableTokensWrapper)) for m in inner):
            raise ValueError(f"modules_to_save module {name!r} holds another adapter's layers: it cannot be saved "
                             f"whole beside them; leave it out of modules_to_save")
        quantized = [m for m in (module, *inner) if is_bnb_linear(m)] or [
            p for p in module.parameters() if not p.is_floating_point() or dispatches_itself(p)]
        if quantized:
            raise TypeError(f"modules_to_save module {name!r} ({type(module).__name__}) holds quantized weights "
                            f"({type(quantized[0]).__name__}), which cannot be trained: leave it out of "
                            f"modules_to_save, or load the model with that module unquantized (BitsAndBytesConfig's "
                            f"llm_int8_skip_modules)")
    return sorted(n for n in found if not any(n.startswith(other + ".") for other in found))


def warn_of_patterns(config: LoraConfig, targets: list[str]) -> None:
    """Warn, as PEFT does, of ``rank_pattern`` / ``alpha_pattern`` keys that match no target (ignored).  (Where
    several keys match a target, the first in the dict's order decides, as in PEFT; adapter_config.json keeps
    that order.)"""
    for name in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, name)
        unmatched = sorted(key for key in patterns if not any(pattern_key({key: None}, t) for t in targets))
        if unmatched:
            warnings.warn(f"The following {name} keys did not match any targeted module or parameter and were "
                          f"ignored: {unmatched}.", RuntimeWarning, stacklevel=5)


def plan_trainable_tokens(model: nn.Module, config: LoraConfig, targets: list[str]) -> dict[str, list[int]]:
    """Module name → the token rows ``trainable_token_indices`` trains: a list names the input embeddings' rows, a
    dict maps module names (exact or dotted suffix) to rows.  Checked: each module an embedding table not also
    adapted by target_modules, each row inside its table."""
    tokens = config.trainable_token_indices
    if tokens is None:
        return {}
    if isinstance(tokens, dict):
        wanted = tokens
    else:
        get = getattr(model, "get_input_embeddings", None)
        embedding = get() if callable(get) else None
        name = next((n for n, m in model.named_modules() if embedding is not None and m is embedding), None)
        if name is None:
            raise ValueError("trainable_token_indices as a list needs a model with get_input_embeddings(); name the "
                             "embedding module instead: trainable_token_indices={'<module name>': [...]}")
        wanted = {name: tokens}
    plan = {}
    for key, rows in wanted.items():
        matches = [n for n, _ in _named_modules_outside_wrappers(model) if n and _name_matches(n, [key])]
        if not matches:
            raise ValueError(f"trainable_token_indices names {key!r}, which matches no module of the model")
        for name in matches:
            module = model.get_submodule(name)
            table = getattr(getattr(module, "base_layer", module), "weight", None)
            if name in targets or is_adapted(module) or not isinstance(getattr(module, "base_layer", module),
                                                                      (nn.Embedding, nn.Linear)):
                raise TypeError(f"trainable_token_indices on {name} ({type(module).__name__}): it must be an embedding "
                                f"table that target_modules does not adapt (or such a Linear, an output head)")
            bad = [i for i in rows if i >= table.shape[0]]
            if bad:
                raise ValueError(f"trainable_token_indices for {name}: token ids {bad[:5]} are outside its "
                                 f"{table.shape[0]} rows")
            plan[name] = list(rows)
    plan = _with_tied_heads_sharing_rows(model, config, plan)
    _check_no_adapted_head_reads_the_rows(model, plan, targets)
    _check_rows_not_saved_whole(model, config, plan)
    return plan


def _check_rows_not_saved_whole(model: nn.Module, config: LoraConfig, plan: dict[str, list[int]]) -> None:
    """A table whose rows train (or a head tied to it, reading them) that ``modules_to_save`` also trains whole:
    the two cannot both hold (PEFT takes the config and then fails in every forward): refused, before anything
    changes."""
    embedding, tied = tied_with_input_embeddings(model)
    readers = set(plan) | (set(tied) if embedding in plan else set())
    whole = sorted(name for name in readers if saved_whole(name, config.modules_to_save or []))
    if whole:
        raise ValueError(f"trainable_token_indices trains rows of {whole[0] if whole[0] in plan else embedding}, which "
                         f"modules_to_save={config.modules_to_save} also trains whole"
                         f"{'' if whole[0] in plan else f' (as {whole[0]}, tied to it)'}: train the whole table "
                         f"(modules_to_save) or its listed rows (trainable_token_indices), not both")


def _check_no_adapted_head_reads_the_rows(model: nn.Module, plan: dict[str, list[int]], targets: list[str]) -> None:
    """A head tied to a table whose rows train would read the trained rows; where the head also has a LoRA
    adapter (this one's or another's), it would have to add it on top of the rows, which fastlora's layers do not
    combine: refused, before anything changes."""
    embedding, tied = tied_with_input_embeddings(model)
    if embedding not in plan:
        return
    adapted = [head for head in tied if head not in plan and (head in targets or is_adapted(model.get_submodule(head)))]
    if adapted:
        raise UnsupportedFeatureError(
            f"trainable_token_indices trains rows of {embedding}, which {adapted[0]} shares (tie_word_embeddings), and "
            f"{adapted[0]} has a LoRA adapter{' here' if adapted[0] in targets else ''}: fastlora does not combine "
            f"trained token rows and a LoRA adapter on one layer (PEFT adds the adapter to the head reading the rows). "
            f"Leave {adapted[0]} out of target_modules (it still reads the trained rows)")


def _with_tied_heads_sharing_rows(model: nn.Module, config: LoraConfig, plan: dict[str, list[int]]
                                  ) -> dict[str, list[int]]:
    """``plan`` without the heads tied to the input embeddings that list the embeddings' own rows (they share the
    embeddings' trained rows, as PEFT ties them); a tied head with other rows trains its own, untied, and is an
    error under ``ensure_weight_tying`` (PEFT's)."""
    embedding, tied = tied_with_input_embeddings(model)
    listed = [name for name in tied if name in plan]
    if embedding not in plan or not listed:
        return plan
    if all(plan[name] == plan[embedding] for name in listed):
        return {name: rows for name, rows in plan.items() if name not in listed}
    if config.ensure_weight_tying:
        conflicting = ", ".join(f"{name}: {plan[name]}" for name in [embedding, *listed])
        raise ValueError(f"Cannot ensure weight tying when different token indices are specified for tied layers. "
                         f"Conflicting layers: {conflicting}. Please use the same indices for all tied layers or set "
                         f"ensure_weight_tying=False.")
    return plan


def full_precision_linear_targets(model: nn.Module, config: LoraConfig, method: str) -> dict[str, nn.Module]:
    """Name → module of the Linear and Conv1D layers ``config`` adapts in ``model`` (not yet adapted), as
    ``get_peft_model`` will find them, for a data-driven initialisation (``method``: "LoRA-GA", "CorDA") that reads
    full-precision weights: a quantized one is refused, as PEFT refuses it; ValueError where none is matched."""
    config = with_task_heads(config, model)
    modules = {name: model.get_submodule(name) for name in plan_targets(model, config)}
    modules = {name: module for name, module in modules.items()
               if isinstance(module, nn.Linear) or is_conv1d_target(module)}
    for name, module in modules.items():
        if hasattr(module, "quant_state") or not module.weight.dtype.is_floating_point:
            raise ValueError(f"{method} does not support quantized models. Found quantized module: '{name}'. "
                             f"{method} reads the full-precision weights: run it on the model loaded unquantized")
    if not modules:
        raise ValueError(f"No supported layers found for {method} initialization: {method} adapts nn.Linear and "
                         f"Conv1D layers, and target_modules matched none")
    return modules

"""Adapting a model's modules in place for one adapter, and undoing it: each target swapped for its base kind's
adapted layer (or given the adapter where it has one), each ``modules_to_save`` module wrapped with a copy, each
table with trainable token rows wrapped, heads tied to the input embeddings tied.  :func:`adapt_modules` returns an
``undo`` that puts every module, adapter and ``requires_grad`` flag back, and calls it itself when a step fails, so
that ``get_peft_model``, ``add_adapter`` and ``load_adapter`` change nothing when they fail.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from fastlora.base_kinds import is_adapted, kind_of
from fastlora.config import LoraConfig
from fastlora.layer import LoRALinear
from fastlora.model_inits import data_driven_sources, forget_sources, init_from_weights
from fastlora.modules_to_save import ModulesToSaveWrapper
from fastlora.parameter_lora import add_parameter_adapters, parameter_chain, plan_parameter_targets
from fastlora.targets import output_head, plan_trainable_tokens, warn_of_patterns
from fastlora.trainable_tokens import TrainableTokensWrapper
from fastlora.weight_inits import draws_from_the_generator, is_weight_init
from fastlora.weight_tying import is_embedding, tie_copies, tie_targets, tied_heads

__all__ = ["adapt_modules", "adapter_dtype", "base_dtype", "set_module"]

_WIDE_ADAPTER_DTYPES = (torch.float16, torch.bfloat16)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified name ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def adapter_dtype(dtype: torch.dtype, autocast_adapter_dtype: bool) -> torch.dtype:
    """The dtype of a new adapter's factors beside a base weight of ``dtype`` (PEFT's autocast_adapter_dtype:
    half-precision bases get float32 adapters)."""
    if not dtype.is_floating_point:  # a quantized base: float32 adapters, as PEFT creates them
        return torch.float32
    return torch.float32 if autocast_adapter_dtype and dtype in _WIDE_ADAPTER_DTYPES else dtype


def base_dtype(module: nn.Module) -> torch.dtype:
    """The dtype PEFT gives a layer's adapters before ``autocast_adapter_dtype``: its weight's, but a 4-bit layer's
    compute dtype (whatever dtype holds its packed codes; torch's default dtype where it has none)."""
    base = getattr(module, "base_layer", module)
    if hasattr(base, "compute_dtype"):  # bitsandbytes' Linear4bit
        return base.compute_dtype or torch.get_default_dtype()
    return module.weight.dtype


def adapt_modules(model: nn.Module, config: LoraConfig, adapter_name: str, targets: list[str], to_save: list[str],
                  autocast_adapter_dtype: bool, values_from_file: bool = False) -> Callable[[], None]:
    """Give ``adapter_name`` to every target (swapping each base layer for its kind's adapted layer) and a copy of
    every ``to_save`` module.  Returns ``undo``, which puts every module object, adapter and requires_grad
    flag back as they were; an error part way through calls it before raising.  ``values_from_file``: the
    adapter's values are copied in next, so MiCA's decomposition is not computed (nor refused on a quantized
    base) only to be overwritten."""
    tokens = plan_trainable_tokens(model, config, targets)  # checked before anything changes
    how, embedding, heads = tied_heads(config, model)  # heads sharing the embeddings' adapter or copy
    # (an encoder-decoder's other embedding tables computing with the table take adapters of their own, as in PEFT)
    tied_heads_adapted = [h for h in heads if how == "target_modules" and h in targets and not is_embedding(
        model.get_submodule(h))]
    parameters = plan_parameter_targets(model, config, targets)
    owners = list(dict.fromkeys(target.owner for target in parameters))
    if set(owners) & set(targets):
        raise ValueError(f"target_parameters and target_modules both adapt {sorted(set(owners) & set(targets))[:3]}; "
                         f"adapt the layer or its parameters, not both")
    warn_of_patterns(config, [*targets, *(target.key for target in parameters)])
    head = output_head(model)
    head_name = next((n for n, m in model.named_modules() if head is not None and m is head), None)
    head_table = getattr(getattr(head, "base_layer", head), "weight", None)  # a wrapper's computed .weight is a copy
    tied = {name for name in tokens if head_name is not None and head_name not in tokens and head_table is getattr(
        getattr(model.get_submodule(name), "base_layer", model.get_submodule(name)), "weight", False)}
    originals = {name: model.get_submodule(name)
                 for name in [*targets, *to_save, *tokens, *owners, *([head_name] if tied else [])]}
    flags = {p: p.requires_grad for p in model.parameters()}

    def undo() -> None:
        for name, module in originals.items():
            set_module(model, name, module)
            layers = parameter_chain(module) or [module]  # the nested layers of a module's parameters, or the module
            if isinstance(module, LoRALinear):
                for layer in layers:
                    if adapter_name in layer.adapter_settings:
                        layer.delete_adapter(adapter_name)
            elif isinstance(module, (ModulesToSaveWrapper, TrainableTokensWrapper)):
                module.delete_adapter(adapter_name)
        for param, flag in flags.items():
            param.requires_grad_(flag)

    # PiSSA, OLoRA, LoftQ, LoRA-GA and CorDA change the base weights, which undo() cannot put back: the layers are
    # built with the values PEFT's constructors draw (what "eva" leaves before its own step: A as drawn, B = 0), and
    # take the initialisation once every other step has succeeded and every layer has accepted it.  The factors
    # that draw from the random generator are drawn as each layer is built, in PEFT's order of draws; those from a
    # data-driven step's results (LoRA-GA's gradients, CorDA's decompositions) are computed then too.
    init = config.init_lora_weights
    sources = data_driven_sources(config, {name: originals[name] for name in targets})
    from_weights = list(sources) if init in ("lora_ga", "corda") \
        else targets if is_weight_init(init) and init not in ("orthogonal", "mica") else []
    factors = {}
    try:
        # the parameters' factors drawn first, then the modules', then the tied heads': PEFT's order, and so its
        # draws; the parameters' layers go in last, around their modules as adapted (a target inside one included)
        new_layers = add_parameter_adapters(model, config, adapter_name, parameters,
                                            lambda weight: adapter_dtype(weight.dtype, autocast_adapter_dtype))
        for name in targets:
            module = originals[name]
            dtype = adapter_dtype(base_dtype(module), autocast_adapter_dtype)
            settings = config.settings_for(name)
            # CorDA's layers all start from their decomposition; an embedding target takes True's values, as PEFT's
            # a head sharing the embeddings' adapter is drawn as constructed, then initialised once tied
            creation_init = "eva" if name in from_weights or (init == "mica" and values_from_file) \
                else True if init == "corda" else False if name in tied_heads_adapted else init
            if is_adapted(module):
                module.add_adapter(adapter_name, settings, init_lora_weights=creation_init, adapter_dtype=dtype)
            else:  # plan_targets checked that a kind claims it
                kind = kind_of(module)
                set_module(model, name, kind.adapt(module, adapter_name, settings, creation_init, dtype))
                if kind.settle is not None:
                    kind.settle(model, model.get_submodule(name))
            layer = model.get_submodule(name)
            if name in from_weights and (draws_from_the_generator(init) or name in sources) \
                    and layer.WEIGHT_INITS_CHANGE_BASE:
                factors[name] = layer.init_factors(init, adapter_name, sources.get(name), config.lora_ga_config)
        if tied_heads_adapted:
            tie_targets(model, config, adapter_name, embedding, tied_heads_adapted)
        for owner, layer in new_layers.items():
            set_module(model, owner, layer)
        for name in to_save:
            module = originals[name]
            if isinstance(module, ModulesToSaveWrapper):
                module.add_adapter(adapter_name, trainable=False)
            else:
                set_module(model, name, ModulesToSaveWrapper(module, adapter_name, trainable=False))
        if how == "modules_to_save":
            tie_copies(model, adapter_name, embedding, [h for h in heads if h in to_save])
        for name, rows in tokens.items():
            module = originals[name]
            wrapper = module if isinstance(module, TrainableTokensWrapper) else TrainableTokensWrapper(module)
            table = getattr(wrapper.base_layer, "weight", None)
            wrapper.add_adapter(adapter_name, rows,
                                None if table is None else adapter_dtype(table.dtype, autocast_adapter_dtype))
            set_module(model, name, wrapper)
            if name in tied and not isinstance(originals[head_name], TrainableTokensWrapper):
                set_module(model, head_name, TrainableTokensWrapper(originals[head_name], tied_to=wrapper))
    except BaseException:
        undo()
        raise
    for name in targets:  # LoRALinear.from_linear froze each new target's weight and bias: keep what they were
        if not isinstance(originals[name], LoRALinear):
            for param in originals[name].parameters(recurse=False):
                param.requires_grad_(flags[param])
    if from_weights:
        init_from_weights(model, config, adapter_name, from_weights, undo, factors)
    forget_sources(config, {name: originals[name] for name in sources})  # used: PEFT drops them too
    return undo

"""EVA (Explained Variance Adaptation, Paischer et al. 2024): A starts as the leading principal directions of each
layer's inputs, and the ranks move to the layers whose inputs those directions explain best.

:func:`get_eva_state_dict` runs batches through the model (its adapters off) and fits an incremental PCA
(:mod:`fastlora.incremental_pca`) to each target layer's inputs, with round(r · rho) components, until the
components the layer needs have converged (cosine similarity with the previous batch's ≥ tau).  Layers reading
the same input (q, k and v projections) share one fit.  After each batch the budget of Σ r ranks goes to the
components with the largest explained-variance ratios over all layers.  :func:`initialize_lora_eva_weights`
gives each layer A = its first r' components (r' its share of the budget; B = 0, so the output is unchanged), a
layer whose share is 0 loses its adapter, ``lora_alpha`` follows r' where ``adjust_scaling_factors`` says so,
and the config records the new ranks in ``rank_pattern`` / ``alpha_pattern``, as PEFT's do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from copy import deepcopy
from itertools import cycle
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastlora.adapt_modules import set_module
from fastlora.config import LoraConfig
from fastlora.conv1d import is_conv1d
from fastlora.embedding import LoRAEmbedding
from fastlora.incremental_pca import IncrementalPCA
from fastlora.init_configs import EvaConfig
from fastlora.layer import LoRALinear
from fastlora.module_modes import in_mode
from fastlora.parameter_lora import LoRAParameter
from fastlora.targets import plan_targets, shortest_suffixes, with_task_heads

__all__ = ["get_eva_state_dict", "initialize_lora_eva_weights", "forward_fn_dict",
           "prepare_model_inputs_fn_language_modeling", "prepare_layer_inputs_fn_language_modeling"]

# a PeftModel's module names start with this; EVA state dicts are keyed either way
_PEFT_PREFIX = "base_model.model."
# rho above this is capped at (the model's largest dimension) / r
_RHO_CEILING = 1000
# from this many target names on, the config records the shortest suffixes that name them
_FEW_TARGETS = 20
# a fit still moving after this many passes over the dataloader is stopped
_MOST_PASSES = 100


def forward_fn_dict(model: nn.Module, inputs: Mapping):
    """The default forward: ``model(**inputs)``."""
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input: Mapping, peft_config: LoraConfig) -> Tensor:
    """(k × 2) indices (batch row, position) of the tokens whose inputs EVA fits: those the attention mask keeps,
    and with ``eva_config["use_label_mask"]`` and labels per token, whose label is not ``label_mask_value``."""
    if not isinstance(model_input, Mapping):
        raise TypeError("When using `prepare_model_inputs_fn_language_modeling` inputs must be a dictionary")
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    eva = _eva_settings(peft_config)
    # labels mask tokens where they are per token (a sequence classifier's are not)
    if eva["use_label_mask"] and "labels" in model_input and model_input["labels"].shape == mask.shape:
        mask = torch.logical_and(mask, model_input["labels"] != eva["label_mask_value"])
    return mask.nonzero()


def prepare_layer_inputs_fn_language_modeling(layer_input, model_input: Tensor, layer_name: str) -> Tensor:
    """The layer's input rows at the token indices :func:`prepare_model_inputs_fn_language_modeling` chose."""
    return _first_tensor(layer_input, layer_name)[model_input.T.unbind()]


def _eva_settings(config: LoraConfig) -> dict:
    """The config's EVA settings, EvaConfig's defaults where it has none (a config of another initialisation)."""
    return config.eva_config or dataclasses.asdict(EvaConfig())


def _first_tensor(layer_input, layer_name: str) -> Tensor:
    if isinstance(layer_input, (tuple, list)):
        layer_input = layer_input[0]
    if not isinstance(layer_input, Tensor):
        raise TypeError(f"unsupported input type {type(layer_input)} for prepare_layer_inputs_fn in layer "
                        f"{layer_name}, please provide a custom prepare_layer_inputs_fn")
    return layer_input


def _every_row(layer_input, model_input, layer_name: str) -> Tensor:
    """prepare_layer_inputs_fn=None: every row of the input, all leading dimensions flattened."""
    x = _first_tensor(layer_input, layer_name)
    return x.view(-1, x.size(-1)) if x.ndim > 2 else x


class _InputHook:
    """A forward hook that reads a layer's input as EVA fits it (one row per token, gathered over the ranks of a
    distributed run)."""

    def __init__(self, name: str, prepare: Optional[Callable], gather: bool):
        self.name, self.gather = name, gather
        self.prepare = prepare if prepare is not None else _every_row
        self.model_input = None

    def rows(self, layer_input) -> Tensor:
        with torch.no_grad():
            x = self.prepare(layer_input, self.model_input, self.name)
        if not (self.gather and dist.is_available() and dist.is_initialized()):
            return x
        counts = torch.empty(dist.get_world_size(), dtype=torch.long, device=x.device)
        dist.all_gather_into_tensor(counts, torch.tensor([x.shape[0]], device=x.device))
        padded = x.new_zeros((int(counts.max()), *x.shape[1:]))
        padded[:x.shape[0]] = x
        gathered = [torch.zeros_like(padded) for _ in range(len(counts))]
        dist.all_gather(gathered, padded.contiguous())
        return torch.cat([rows[:count] for rows, count in zip(gathered, counts.tolist())], dim=0)


class _Fingerprint(_InputHook):
    """Records a digest of the layer's input, to find layers that read the same input."""

    def __call__(self, module, args, output) -> None:
        rows = self.rows(args).detach().contiguous().cpu()
        self.digest = (rows.dtype, tuple(rows.shape), hashlib.sha256(rows.view(torch.uint8).numpy()).hexdigest())


class _PrincipalDirections(_InputHook):
    """Fits the layer's inputs batch by batch and tracks which components have converged."""

    def __init__(self, name: str, prepare: Optional[Callable], gather: bool, n_components: int, tau: float):
        super().__init__(name, prepare, gather)
        self.n_components, self.tau = n_components, tau
        self.pca = IncrementalPCA(n_components)
        self.converged = torch.zeros((n_components,), dtype=torch.bool)

    def __call__(self, module, args, output) -> None:
        with torch.no_grad():
            previous = self.pca.components_.clone() if self.pca.fitted else None
            rows = self.rows(args)
            if rows.size(0) < self.n_components:  # too few tokens in this batch to fit this many components
                return
            self.pca.partial_fit(rows.to(torch.float32))
            if previous is not None:
                self.converged = torch.nn.functional.cosine_similarity(self.pca.components_, previous) >= self.tau


def _model_device(model: nn.Module) -> torch.device | None:
    devices = list({p.device for p in model.parameters() if p.device.type != "meta"})
    if len(devices) > 1:
        warnings.warn(f"Could not determine device, model has multiple devices: {devices}", UserWarning, stacklevel=4)
        return None
    return devices[0] if devices else None


def _to_device(inputs, device):
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _to_device(v, device) for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_device(v, device) for v in inputs)
    warnings.warn(f"input of type {type(inputs)} could not be moved to the correct device", UserWarning, stacklevel=4)
    return inputs


def _eva_layers(model: nn.Module, adapter_name: str) -> Iterable[tuple[str, LoRALinear]]:
    """The layers of a PeftModel EVA fits: Linear-like LoRA layers holding ``adapter_name`` (not embeddings, not
    target_parameters adapters)."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) and not isinstance(module, (LoRAEmbedding, LoRAParameter)) \
                and adapter_name in module.adapter_settings:
            yield name, module


def _plain_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """The Linear and Conv1D layers ``config`` will adapt, in a model without adapters."""
    config = with_task_heads(config, model)
    return [name for name in plan_targets(model, config)
            if isinstance(model.get_submodule(name), nn.Linear) or is_conv1d(model.get_submodule(name))]


@torch.no_grad()
def get_eva_state_dict(model: nn.Module, dataloader: Iterable, peft_config: Optional[LoraConfig] = None,
                       forward_fn: Optional[Callable] = forward_fn_dict,
                       prepare_model_inputs_fn: Optional[Callable] = prepare_model_inputs_fn_language_modeling,
                       prepare_layer_inputs_fn: Union[Callable, dict[str, Callable], None] =
                       prepare_layer_inputs_fn_language_modeling,
                       adapter_name: str = "default", gather_distributed_inputs: bool = True,
                       show_progress_bar: bool = True) -> dict[str, Tensor]:
    """The EVA components of each target layer: layer name → A (r' × in), r' its share of the rank budget.

    Args:
        model (nn.Module): a fastlora ``PeftModel`` (its adapter's layers are fitted, with the adapters off), or a
            model without adapters (then ``peft_config`` says which layers).
        dataloader (Iterable): batches, cycled until every layer's needed components have converged.
        peft_config (LoraConfig | None): required for a model without adapters.  Default: the adapter's.
        forward_fn (Callable): ``forward_fn(model, batch)`` runs a batch.  Default ``model(**batch)``.
        prepare_model_inputs_fn (Callable | None): ``fn(batch, peft_config)`` → what the layer hooks get (default:
            the indices of the tokens the attention mask and labels keep); None: the batch itself.
        prepare_layer_inputs_fn (Callable | dict | None): ``fn(layer_input, model_input, layer_name)`` → the
            rows to fit (n × in), or a dict of those by layer name; None: every row of the input.
        adapter_name (str): the adapter whose config and layers are used.  Default "default".
        gather_distributed_inputs (bool): in a torch.distributed run, fit the rows of every rank.  Default True.
        show_progress_bar (bool): show the number of converged layers (needs tqdm).  Default True.

    PEFT equivalent: ``peft.get_eva_state_dict`` (the same math and the same numbers).

    Example:
        >>> from fastlora import LoraConfig, get_eva_state_dict, get_peft_model, initialize_lora_eva_weights
        >>> config = LoraConfig(target_modules=["q_proj", "v_proj"], r=8, init_lora_weights="eva")
        >>> components = get_eva_state_dict(base_model, dataloader, config)  # doctest: +SKIP
        >>> model = get_peft_model(base_model, config)  # doctest: +SKIP
        >>> initialize_lora_eva_weights(model, eva_state_dict=components)  # doctest: +SKIP
    """
    is_peft_model = hasattr(model, "peft_config")
    if peft_config is None:
        if not is_peft_model:
            raise ValueError("peft_config is required if model is not a PeftModel")
        peft_config = model.peft_config[adapter_name]
    if is_peft_model:
        layers = dict(_eva_layers(model, adapter_name))
        ranks = {name: layer.adapter_settings[adapter_name].r for name, layer in layers.items()}
        context = model.disable_adapter()
    else:
        layers = {name: model.get_submodule(name) for name in _plain_targets(model, peft_config)}
        ranks = {name: peft_config.settings_for(name).r for name in layers}
        context = nullcontext()
    with context:
        return _fit(model, dataloader, peft_config, layers, ranks, forward_fn, prepare_model_inputs_fn,
                    prepare_layer_inputs_fn, gather_distributed_inputs, show_progress_bar)


def _fit(model, dataloader, config: LoraConfig, layers: dict[str, nn.Module], layer_ranks: dict[str, int], forward_fn,
         prepare_model_inputs_fn, prepare_layer_inputs_fn, gather: bool, show_progress_bar: bool) -> dict[str, Tensor]:
    if len(dataloader) == 0:
        raise ValueError("dataloader is empty")
    if not layers:
        raise ValueError("EVA found no Linear or Conv1D layer to fit: the config targets none")
    if gather and dist.is_available() and dist.is_initialized():
        warnings.warn("torch.distributed is initialized and `gather_distributed_inputs` is True, therefore EVA "
                      "initialization will gather tensors from all ranks. Ensure the model does not receive the same "
                      "inputs on different ranks.", UserWarning, stacklevel=4)
    eva = _eva_settings(config)
    rho = eva["rho"]
    if rho > _RHO_CEILING:
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // config.r)
    per_layer_fn = dict(prepare_layer_inputs_fn) if isinstance(prepare_layer_inputs_fn, Mapping) else None
    device = _model_device(model)
    try:
        with in_mode(model, training=False):
            return _fit_in_eval_mode(model, dataloader, config, layers, layer_ranks, forward_fn,
                                     prepare_model_inputs_fn, prepare_layer_inputs_fn, per_layer_fn, gather,
                                     show_progress_bar, rho, eva, device)
    finally:
        for module in layers.values():  # whatever happened, no hook of EVA's stays behind
            for key in [k for k, hook in module._forward_hooks.items() if isinstance(hook, _InputHook)]:
                del module._forward_hooks[key]


def _fit_in_eval_mode(model, dataloader, config, layers, layer_ranks, forward_fn, prepare_model_inputs_fn,
                      prepare_layer_inputs_fn, per_layer_fn, gather, show_progress_bar, rho, eva,
                      device) -> dict[str, Tensor]:
    def hook_inputs(batch):
        batch = _to_device(batch, device) if device is not None else batch
        return batch, (prepare_model_inputs_fn(batch, config) if prepare_model_inputs_fn is not None
                       else deepcopy(batch))

    # one batch through fingerprint hooks finds the layers that read the same input
    batch, hook_input = hook_inputs(next(iter(dataloader)))
    budget, max_components, fingerprints = 0, {}, {}
    for name, module in layers.items():
        fn = per_layer_fn.pop(name, None) if per_layer_fn is not None else prepare_layer_inputs_fn
        fingerprints[name] = _Fingerprint(name, fn, gather)
        fingerprints[name].model_input = hook_input
        fingerprints[name].handle = module.register_forward_hook(fingerprints[name])
        max_components[name] = round(layer_ranks[name] * rho)
        budget += layer_ranks[name]
    if per_layer_fn:
        raise ValueError(f"prepare_layer_inputs_fn is a mapping but the following module names were not found in the "
                         f"model: {per_layer_fn.keys()}")
    forward_fn(model, batch)
    for hook in fingerprints.values():
        hook.handle.remove()
    unused = [name for name, hook in fingerprints.items() if not hasattr(hook, "digest")]
    if unused:
        raise ValueError(f"forward_fn did not run {unused[:3]}{' and more' if len(unused) > 3 else ''} on the first "
                         f"batch: EVA fits the inputs of every layer the adapter targets")
    groups: dict = {}
    for name, hook in fingerprints.items():
        groups.setdefault(hook.digest, []).append(name)
    follows = {name: names[0] for names in groups.values() for name in names[1:]}  # follower → the layer fitted
    for names in groups.values():
        widest = max(max_components[n] for n in names)
        for n in names:
            max_components[n] = widest

    hooks, handles = {}, {}
    for name, fingerprint in fingerprints.items():
        if name not in follows:
            hooks[name] = _PrincipalDirections(name, fingerprint.prepare, gather, max_components[name],
                                               eva["tau"])
            handles[name] = layers[name].register_forward_hook(hooks[name])
    fitted_by = {**{name: name for name in hooks}, **follows}

    batches = iter(cycle(dataloader))
    progress = _progress(batches) if show_progress_bar and (not dist.is_initialized() or dist.get_rank() == 0) else None
    done = dict.fromkeys(hooks, False)
    ranks, runs = dict(max_components), 0
    for batch in (progress if progress is not None else batches):
        batch, hook_input = hook_inputs(batch)
        for name, hook in hooks.items():
            converged = bool(torch.all(hook.converged[:ranks[name]]))
            if not done[name] and converged:
                handles[name].remove()
                handles[name], done[name] = None, True
                continue
            if done[name] and not converged:  # the layer's share grew past what has converged
                handles[name] = layers[name].register_forward_hook(hook)
                done[name] = False
            hook.model_input = hook_input
        if progress is not None:
            settled = list(done.values()) + [done[v] for v in follows.values()]
            progress.set_description(f"{sum(settled)}/{len(settled)} layers have converged")
        if all(done.values()):
            break
        forward_fn(model, batch)
        if all(hook.pca.fitted for hook in hooks.values()):
            ranks = _shares(hooks, fitted_by, follows, budget, max_components)
        runs += 1
        _check_progress(hooks, done, runs, len(dataloader), eva["tau"])

    components = {}
    for name, rank in ranks.items():
        hook = hooks[fitted_by[name]]
        if not torch.all(hook.converged[:rank]):
            raise ValueError(f"Layer {name} has not converged but was assigned rank {rank}")
        u = hook.pca.components_[:rank]
        if eva["whiten"]:
            u = u / hook.pca.singular_values_[:rank].sqrt().reshape(-1, 1)
        components[name] = u if device is None else u.to(device)
    return components


def _check_progress(hooks: dict, done: dict, runs: int, batches_per_pass: int, tau: float) -> None:
    """Stop a fit that cannot end (PEFT's goes on for ever): after a whole pass over the dataloader, a layer that
    no batch could fit (fewer kept tokens than its components); after ``_MOST_PASSES`` passes, layers whose
    components still move more than tau allows."""
    if runs % batches_per_pass:
        return
    unfitted = [name for name, hook in hooks.items() if not hook.pca.fitted]
    if unfitted:
        hook = hooks[unfitted[0]]
        raise ValueError(f"no batch of the dataloader gives {unfitted[:3]} the {hook.n_components} rows (tokens the "
                         f"masks keep) that fitting {hook.n_components} components needs: use larger batches, or a "
                         f"smaller r or rho")
    if runs >= _MOST_PASSES * batches_per_pass:
        moving = [name for name, finished in done.items() if not finished]
        raise ValueError(f"EVA's components of {moving[:3]} did not converge in {_MOST_PASSES} passes over the "
                         f"dataloader (tau={tau}): use a lower tau, or more varied batches")


def _progress(batches):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(batches, position=0, leave=False)


def _shares(hooks, fitted_by, follows, budget: int, max_components: dict) -> dict[str, int]:
    """Each layer's share of the rank budget: the ``budget`` largest explained-variance ratios over every layer
    (a layer reading another's input counts that layer's ratios), a layer fitted for others getting the largest
    share among them."""
    ratios = {name: hook.pca.explained_variance_ratio_[:max_components[name]] for name, hook in hooks.items()}
    owners, values = zip(*[(layer, value) for layer, fitted in fitted_by.items() for value in ratios[fitted]])
    order = torch.stack(values).argsort(descending=True)
    counts = Counter(owners[i] for i in order[:budget])
    shares = {layer: counts.get(layer, 0) for layer in fitted_by}
    for follower, fitted in follows.items():
        if shares[fitted] < shares[follower]:
            shares[fitted], shares[follower] = shares[follower], shares[fitted]
    return shares


@torch.no_grad()
def initialize_lora_eva_weights(model: nn.Module, dataloader: Optional[Iterable] = None,
                                eva_state_dict: Optional[dict] = None,
                                forward_fn: Optional[Callable] = forward_fn_dict,
                                prepare_model_inputs_fn: Optional[Callable] = prepare_model_inputs_fn_language_modeling,
                                prepare_layer_inputs_fn: Union[Callable, dict[str, Callable], None] =
                                prepare_layer_inputs_fn_language_modeling,
                                adapter_name: str = "default", gather_distributed_inputs: bool = True,
                                show_progress_bar: bool = True) -> nn.Module:
    """Give the adapter EVA's values: each layer's A = its EVA components (computed from ``dataloader`` by
    :func:`get_eva_state_dict`, or given as ``eva_state_dict``, keyed by layer name with or without the
    ``base_model.model.`` prefix), B = 0, so the model's output is unchanged.  A layer whose share of the rank budget
    differs from its r is rebuilt at the new rank (``lora_alpha`` scaled by new_r / r where ``adjust_scaling_factors``
    says so); one whose share is 0 loses the adapter; layers EVA does not fit (embeddings, target_parameters) start
    again as ``init_lora_weights=True``, with a warning.  The adapter's config then records the new ranks and
    alphas in ``rank_pattern`` / ``alpha_pattern`` and the layers still adapted in ``target_modules``, so its files
    load as PEFT's.  Everything is checked before the model changes.

    Args:
        model (PeftModel): a model from ``get_peft_model`` with ``init_lora_weights="eva"`` and one active adapter.
        dataloader (Iterable | None): batches for :func:`get_eva_state_dict`; required without ``eva_state_dict``.
        eva_state_dict (dict | None): components computed before (PEFT's or fastlora's).  Default None.
        forward_fn (Callable): as for :func:`get_eva_state_dict`.
        prepare_model_inputs_fn (Callable | None): as for :func:`get_eva_state_dict`.
        prepare_layer_inputs_fn (Callable | dict | None): as for :func:`get_eva_state_dict`.
        adapter_name (str): the adapter to initialise.  Default "default".
        gather_distributed_inputs (bool): as for :func:`get_eva_state_dict`.  Default True.
        show_progress_bar (bool): as for :func:`get_eva_state_dict`.  Default True.

    Returns:
        the model, initialised in place.

    PEFT equivalent: ``peft.initialize_lora_eva_weights``.

    Example:
        >>> from fastlora import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights
        >>> config = LoraConfig(target_modules=["q_proj", "v_proj"], r=8, init_lora_weights="eva",
        ...                     eva_config=EvaConfig(rho=2.0))
        >>> model = get_peft_model(base_model, config)  # doctest: +SKIP
        >>> initialize_lora_eva_weights(model, dataloader)  # doctest: +SKIP
    """
    if not hasattr(model, "peft_config"):
        raise ValueError("model must be a PeftModel")
    if len(model.active_adapters) > 1:
        raise ValueError("`initialize_lora_eva_weights` currently only works with a single active adapter")
    if adapter_name not in model.peft_config:
        raise ValueError(f"the model has no adapter {adapter_name!r}; it has {list(model.peft_config)}")
    if model.peft_config[adapter_name].init_lora_weights != "eva":
        raise ValueError("`initialize_lora_eva_weights` can only be used with `init_lora_weights='eva'`")
    merged = [name for name, layer in model.lora_layers(adapter_name) if adapter_name in layer.merged_adapters]
    if merged:
        raise ValueError(f"adapter {adapter_name!r} is merged into {merged[:3]}: unmerge it first")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("dataloader is required if eva_state_dict is not provided")
        eva_state_dict = get_eva_state_dict(model, dataloader, forward_fn=forward_fn,
                                            prepare_model_inputs_fn=prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn=prepare_layer_inputs_fn, adapter_name=adapter_name,
                                            gather_distributed_inputs=gather_distributed_inputs,
                                            show_progress_bar=show_progress_bar)
    _load(model, eva_state_dict, adapter_name)
    return model


def _load(model: nn.Module, eva_state_dict: dict, adapter_name: str) -> None:
    config = model.peft_config[adapter_name]
    base = model.get_base_model()
    layers = {name: layer for name, layer in base.named_modules()  # target_parameters' layers keep their values
              if isinstance(layer, LoRALinear) and not isinstance(layer, LoRAParameter)
              and adapter_name in layer.adapter_settings}
    fitted = dict(_eva_layers(base, adapter_name))
    components = {key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key: value
                  for key, value in eva_state_dict.items()}
    unknown = sorted(set(components) - set(fitted))
    if unknown:
        raise ValueError(f"eva_state_dict has components for {unknown[:3]}{' and more' if len(unknown) > 3 else ''}, "
                         f"which are not layers of the adapter {adapter_name!r} that EVA fits (its Linear and Conv1D "
                         f"layers)")
    for name, value in components.items():
        if not isinstance(value, Tensor) or value.ndim != 2 or value.shape[1] != fitted[name].in_features:
            raise ValueError(f"eva_state_dict[{name!r}] must be a (rank × {fitted[name].in_features}) tensor, got "
                             f"{tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}")
    eva = _eva_settings(config)
    plan, rank_pattern, alpha_pattern, kept, restarted, removed = {}, {}, {}, [], [], []
    for name, layer in layers.items():
        settings = layer.adapter_settings[adapter_name]
        if name not in components:
            plan[name] = (settings, True, None)
            restarted.append(name)
            new_rank, alpha = settings.r, settings.lora_alpha
        else:
            new_rank, alpha = components[name].shape[0], settings.lora_alpha
            if new_rank == 0:
                plan[name] = None
                removed.append(name)
                continue
            if new_rank != settings.r and eva["adjust_scaling_factors"]:
                alpha *= new_rank / settings.r
            plan[name] = (dataclasses.replace(settings, r=new_rank, lora_alpha=alpha), "eva", components[name])
            kept.append(name)
        if new_rank != config.r:
            rank_pattern[name] = new_rank
        if alpha != config.lora_alpha:
            alpha_pattern[name] = alpha
    targets = kept + restarted
    if len(targets) >= _FEW_TARGETS:
        others = [n for n, m in base.named_modules() if n and n not in layers] + removed
        targets = shortest_suffixes(targets, others)
    new_config = config.replace(target_modules=targets, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)

    for name, step in plan.items():
        layer = layers[name]
        if step is None:
            if len(layer.adapter_names) > 1:  # the layer's other adapters stay, as inactive as they were
                active = list(layer.active_adapters)
                layer.delete_adapter(adapter_name)
                layer.set_adapter(active)
            else:
                set_module(base, name, layer.to_base())
            continue
        settings, init, value = step
        if settings != layer.adapter_settings[adapter_name] or init is True:
            _restart(layer, adapter_name, settings, init)
        if value is not None:
            layer.lora_factors(adapter_name)[0].copy_(value)
    model.peft_config[adapter_name] = new_config
    if restarted:
        warnings.warn(f"the following layers were initialized with init_lora_weights=True because they were not "
                      f"found in the eva state_dict: {restarted}\nEVA fits Linear and Conv1D layers (not embeddings)",
                      UserWarning, stacklevel=3)
    parameters = sorted({name for name, layer in base.named_modules()
                         if isinstance(layer, LoRAParameter) and adapter_name in layer.adapter_settings})
    if parameters:
        warnings.warn(f"EVA does not fit target_parameters adapters: those on {parameters[:3]} keep the values they "
                      f"were created with (A as drawn, B = 0)", UserWarning, stacklevel=3)


def _restart(layer: LoRALinear, adapter_name: str, settings, init) -> None:
    """The adapter made again with ``settings`` and ``init``, drawn as PEFT's update_layer draws it, in the dtype
    it had, trainable as it was, the layer's active adapters unchanged."""
    A = layer.lora_factors(adapter_name)[0]
    dtype, trainable, active = A.dtype, A.requires_grad, list(layer.active_adapters)
    layer.delete_adapter(adapter_name)
    layer.add_adapter(adapter_name, settings, init_lora_weights=init, adapter_dtype=dtype)
    layer.set_adapter(active)
    for param in layer.adapter_parameters(adapter_name):
        param.requires_grad_(trainable)

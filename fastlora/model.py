"""``get_peft_model`` / ``PeftModel``: PEFT's model-level API over ``LoRALinear`` layers.

``get_peft_model`` swaps the target ``nn.Linear`` s for ``LoRALinear``, wraps ``modules_to_save`` modules,
freezes the rest and returns a ``PeftModel``, laid out as PEFT's: the adapted model is
``model.base_model.model`` and attribute access falls through to it.  A model holds named adapters
(``peft_config`` maps each name to its config); one is active, or several (their updates add up).

Every check runs before the model is touched, and a failure while applying a change puts the model
back as it was (:mod:`fastlora.adapt_modules`): a failed ``get_peft_model``, ``add_adapter`` or ``load_adapter``
changes nothing.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from fastlora.module_names import named_parameters
from fastlora.adapt_modules import adapt_modules, set_module
from fastlora.adapter_settings import check_adapter_name
from fastlora.config import LoraConfig, PeftType
from fastlora.healthcheck import format_healthcheck, healthcheck
from fastlora.layer import LoRALinear
from fastlora.layer_replication import layers_replicated, shared_parameters, unshare_parameters
from fastlora.model_files import AdapterFilesMixin
from fastlora.model_inits import warn_of_lora_ga_without_gradients
from fastlora.module_modes import activation_checkpointing_on
from fastlora.modules_to_save import MIXED_BATCH_MODULES, ModulesToSaveWrapper
from fastlora.status import get_layer_status, get_model_status
from fastlora.targets import (plan_modules_to_save, plan_targets, settle_fan_in_fan_out, with_targets_recorded,
                              with_task_heads)
from fastlora.trainable_tokens import TrainableTokensWrapper
from fastlora.weight_tying import retie

__all__ = ["get_peft_model", "PeftModel", "LoraModel", "LoraTuner"]

# TRL's DPO, KTO, GRPO and RLOO trainers make their reference adapter this way, then copy "default" into it by PEFT's
# parameter names (fastlora.trl_trainers' trainers copy it themselves, without this warning).
REFERENCE_ADAPTER_WARNING = (
    "add_adapter('ref', <the 'default' adapter's config>) is how TRL's DPO, KTO, GRPO and RLOO trainers make the "
    "reference adapter of a model handed to them already adapted; TRL then copies 'default' into it by PEFT's "
    "parameter names, which fastlora's layers do not have, so 'ref' keeps a fresh initialization (a wrong reference "
    "for a trained adapter).  Build the trainer from fastlora.trl_trainers (same class names), which copies it")


def _names_given(adapter_names, caller: str) -> list[str]:
    """One adapter name or a list (tuple) of them, as a list; anything else a TypeError naming ``caller``."""
    names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
        raise TypeError(f"{caller} takes an adapter name or a list of adapter names, got {adapter_names!r}")
    return list(names)


def _wrapper_adapter(wrapper: ModulesToSaveWrapper, active: list[str]) -> str:
    """The adapter a modules_to_save wrapper serves among the active ones: the one holding a copy (PEFT's rule;
    set_adapter refuses two), else the first (the wrapper then runs its original module)."""
    return next((name for name in active if name in wrapper.modules_to_save), active[0])


def _holds_adapter(model: nn.Module, adapter_name: str) -> bool:
    """Whether a layer or wrapper of ``model`` holds ``adapter_name``."""
    for module in model.modules():
        if isinstance(module, LoRALinear) and adapter_name in module.adapter_settings:
            return True
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            return True
        if isinstance(module, TrainableTokensWrapper) and adapter_name in module.token_indices:
            return True
    return False


def _check_model_and_config(model, config) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"peft_config must be a fastlora.LoraConfig, got {type(config).__name__}")


def lora_model_class() -> type:
    """``PeftModel``, or where PEFT is installed its subclass that HF Trainer, accelerate and TRL recognise as
    a PEFT model (see :mod:`fastlora.peft_identity`)."""
    try:
        from fastlora.peft_identity import peft_compatible_class
    except ImportError:
        return PeftModel
    return peft_compatible_class(PeftModel)


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: Optional[str] = None,
                   low_cpu_mem_usage: bool = False) -> "PeftModel":
    """Adapt ``model`` in place as PEFT's ``get_peft_model`` does and return it wrapped in a ``PeftModel``.

    ``autocast_adapter_dtype`` (default True): float16/bfloat16 bases get float32 adapters.  ``revision`` is
    recorded in the config.  ``low_cpu_mem_usage`` is accepted; the adapters are created at once either way.
    ``mixed=True`` (PEFT's mixed adapter types) is not supported.

    The target ``nn.Linear`` modules are replaced by :class:`fastlora.LoRALinear` in place; everything but
    the adapter (and the biases ``bias`` names, and the ``modules_to_save`` copies) is frozen.  Every check
    runs before the model is touched: on an error the model is left as it was.

    Args:
        model (nn.Module): the model to adapt, changed in place; it must not hold an adapter yet (add more
            with ``PeftModel.add_adapter`` or ``load_adapter``).
        peft_config (LoraConfig): the adapter's :class:`fastlora.LoraConfig`.
        adapter_name (str): the adapter's name: a non-empty string without ".", a path separator or a control
            character, not "__base__", at most 255 bytes.  Default "default".
        mixed (bool): PEFT's mixed adapter types; True raises NotImplementedError.  Default False.
        autocast_adapter_dtype (bool): float16 / bfloat16 base layers get float32 adapters (when the
            config's ``autocast_adapter_dtype`` is True as well).  Default True.
        revision (str | None): the base model's revision, recorded in the config.
        low_cpu_mem_usage (bool): accepted for PEFT's signature; the adapters are created at once either way.

    Returns the :class:`PeftModel` (where PEFT is installed, an instance of ``peft.PeftModel`` too, so
    transformers' Trainer, accelerate and TRL treat it as a PEFT model).

    PEFT equivalent: ``peft.get_peft_model``.

    Example:
        >>> import torch
        >>> from fastlora import LoraConfig, get_peft_model
        >>> base = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> model = get_peft_model(base, LoraConfig(target_modules=["0"], r=4))
        >>> model.print_trainable_parameters()
        trainable params: 192 || all params: 868 || trainable%: 22.1198
        >>> type(model.base_model.model[0]).__name__
        'LoRALinear'
    """
    if mixed:
        raise NotImplementedError("get_peft_model(mixed=True): mixing adapter types (PeftMixedModel) is not supported by fastlora")
    _check_model_and_config(model, peft_config)
    check_adapter_name(adapter_name)
    config = with_task_heads(peft_config, model)
    if revision is not None:
        if config.revision is not None and config.revision != revision:
            warnings.warn(f"peft config has already set base model revision to {config.revision}, overwriting with "
                          f"revision {revision}", UserWarning, stacklevel=2)
        config = config.replace(revision=revision)
    name = model.__dict__.get("name_or_path") or None  # "" for a model built from a config: no checkpoint to name
    if name is not None and config.base_model_name_or_path != name:  # the adapter's base is this model, as in PEFT
        if config.base_model_name_or_path is not None:
            warnings.warn(f"The PEFT config's `base_model_name_or_path` was renamed from "
                          f"'{config.base_model_name_or_path}' to '{name}'. Please ensure that the correct base model "
                          f"is loaded when loading this checkpoint.", UserWarning, stacklevel=2)
        config = config.replace(base_model_name_or_path=name)
    with layers_replicated(model, config.layer_replication):  # the stack the adapter is planned on, undone on error
        plan = _plan_new(model, config)
        warn_of_lora_ga_without_gradients(config, [model.get_submodule(name) for name in plan[0]])
        return _build(model, config, adapter_name, autocast_adapter_dtype and config.autocast_adapter_dtype, plan)[0]


def _plan_new(model: nn.Module, config: LoraConfig, by_ending: bool = False) -> tuple[list[str], list[str]]:
    """(targets, modules_to_save) for the first adapter of ``model``, which must have none yet (``by_ending``:
    how modules_to_save entries match, :func:`fastlora.targets.saved_whole`)."""
    if any(isinstance(m, (LoRALinear, ModulesToSaveWrapper, TrainableTokensWrapper)) for m in model.modules()):
        raise ValueError("the model already has an adapter: use add_adapter() or load_adapter() on its PeftModel "
                         "to add another (on a module inject_adapter_in_model adapted, inject_adapter_in_model(config, "
                         "module, name) adds one)")
    return plan_targets(model, config, by_ending=by_ending), plan_modules_to_save(model, config, by_ending=by_ending)


def _build(model: nn.Module, config: LoraConfig, adapter_name: str, autocast_adapter_dtype: bool,
           plan: tuple[list[str], list[str]], values_from_file: bool = False
           ) -> tuple["PeftModel", Callable[[], None]]:
    """Adapt and wrap ``model`` along a checked ``plan``; returns the PeftModel and the ``undo`` of the adaptation."""
    targets, to_save = plan
    config = with_targets_recorded(model, settle_fan_in_fan_out(model, config, targets), targets)
    undo = adapt_modules(model, config, adapter_name, targets, to_save, autocast_adapter_dtype, values_from_file)
    try:
        lora_model = lora_model_class()(model, config, adapter_name)
        lora_model._mark_trainable(adapter_name)
    except BaseException:
        undo()
        raise
    return lora_model, undo


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    """The batch size of a model call: the first dimension of input_ids, inputs_embeds, ``inputs`` (generate's
    name for its first argument) or the first argument."""
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), kwargs.get("inputs"), args[0] if args else None):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def _parameter_count(param: nn.Parameter) -> int:
    if type(param).__name__ == "Params4bit":  # bitsandbytes packs two 4-bit values per byte of its storage
        return param.numel() * 2 * param.element_size()
    return param.numel()


class _AdapterNames(list):
    """A list of adapter names that can also be called: PEFT reads ``model.active_adapters``, transformers
    calls ``model.active_adapters()``."""

    def __call__(self) -> list[str]:
        return list(self)


class LoraTuner(nn.Module):
    """PEFT's ``base_model`` level: holds the adapted model as ``model``.  The adapter methods PEFT users call
    at this level (``model.base_model.merge_and_unload()``, ``.set_adapter(...)``, ...) are the owning
    ``PeftModel``'s; any other attribute falls through to the adapted model."""

    _OWNER_METHODS = frozenset({
        "peft_config", "active_adapter", "active_adapters", "set_adapter", "add_adapter", "delete_adapter",
        "merge_adapter", "unmerge_adapter", "merge_and_unload", "unload", "disable_adapter_layers",
        "enable_adapter_layers", "set_requires_grad", "add_weighted_adapter", "prefix",
    })

    def __init__(self, model: nn.Module, owner: "PeftModel") -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "_owner", owner)  # not a submodule: no cycle in the module tree

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__().copy()
        state.pop("_owner", None)  # the owner re-links itself when it is copied or unpickled
        return state

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            if name in LoraTuner._OWNER_METHODS:
                owner = self.__dict__.get("_owner")
                if owner is None:
                    raise AttributeError(f"{name}: this base_model was copied without its PeftModel, which holds "
                                         f"the adapters' state; copy the PeftModel instead")
                return getattr(owner, name)
            return getattr(self.model, name)


class PeftModel(AdapterFilesMixin, nn.Module):
    """A model with LoRA adapters, laid out as PEFT's ``PeftModel``: ``base_model.model`` is the adapted
    model, and attribute access falls through to it (``generate``, ``config``, ...).

    Build one with :func:`fastlora.get_peft_model` (a new adapter) or ``PeftModel.from_pretrained(model,
    adapter_dir_or_hub_id)`` (a saved PEFT-format adapter); the constructor only wraps a model whose layers
    already hold the adapter.  ``peft_config`` maps each adapter's name to its config; one adapter is active
    (``set_adapter``), or several (``base_model.set_adapter([...])``), and ``adapter_names=`` picks one per
    row of a batch.  PEFT's methods:
    ``add_adapter``, ``load_adapter``, ``set_adapter``, ``delete_adapter``, ``save_pretrained``,
    ``push_to_hub``, ``merge_adapter`` / ``unmerge_adapter``, ``merge_and_unload``, ``unload``,
    ``disable_adapter()`` (a context manager), ``print_trainable_parameters``.  ``fastlora.LoraModel``, this
    class's name in earlier fastlora releases, is the same class.

    Args:
        model (nn.Module): the adapted model (its target layers already :class:`fastlora.LoRALinear`
            holding the adapter).
        config (LoraConfig): the adapter's config.
        adapter_name (str): the adapter's name.  Default "default".

    PEFT equivalent: ``peft.PeftModel`` (``get_peft_model`` and ``from_pretrained`` return a subclass that
    is an instance of ``peft.PeftModel`` where PEFT is installed).  Not ``peft.LoraModel``, which is
    PEFT's ``base_model`` level (here ``model.base_model``).

    Example:
        >>> import tempfile, torch
        >>> from fastlora import LoraConfig, PeftModel, get_peft_model
        >>> model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 16)), LoraConfig(target_modules=["0"]))
        >>> model.active_adapter, list(model.peft_config)
        ('default', ['default'])
        >>> with tempfile.TemporaryDirectory() as directory:
        ...     model.save_pretrained(directory)   # adapter_config.json, adapter_model.safetensors, README.md
        ...     loaded = PeftModel.from_pretrained(torch.nn.Sequential(torch.nn.Linear(16, 16)), directory)
        >>> loaded.training   # is_trainable=False (the default): frozen and in eval mode
        False
        >>> plain = loaded.merge_and_unload()   # the plain nn.Sequential, adapter folded into the weight
        >>> type(plain[0]).__name__
        'Linear'
    """

    prefix = "lora_"

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> None:
        if not _holds_adapter(model, adapter_name):  # PEFT's constructor adapts the model itself; this one wraps
            raise TypeError(f"PeftModel(model, config) wraps a model whose layers already hold adapter "
                            f"{adapter_name!r}, and this one holds none: adapt it with "
                            f"fastlora.get_peft_model(model, config), or load a saved adapter with "
                            f"PeftModel.from_pretrained(model, path)")
        nn.Module.__init__(self)  # not super(): a subclass may add PEFT's PeftModel behind this class
        self.base_model = LoraTuner(model, self)
        self._peft_config: dict[str, LoraConfig] = {adapter_name: config}
        self._active_adapters = [adapter_name]  # several when set so at the base_model level, as in PEFT
        self.adapters_enabled = True

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        """Each adapter's config, by adapter name (PEFT's layout)."""
        return self._peft_config

    @peft_config.setter
    def peft_config(self, value: dict[str, LoraConfig]) -> None:
        if not isinstance(value, dict) or not all(isinstance(c, LoraConfig) for c in value.values()):
            raise TypeError("peft_config must be a dict of adapter name -> fastlora.LoraConfig")
        self._peft_config = value

    def __setstate__(self, state) -> None:
        if "_active_adapter" in state and "_active_adapters" not in state:  # pickled with one active adapter
            state["_active_adapters"] = [state.pop("_active_adapter")]
        super().__setstate__(state)
        object.__setattr__(self.base_model, "_owner", self)
        retie(self)  # unpickled or deep-copied, each factor has storage of its own

    @staticmethod
    def _plan_new(model: nn.Module, config: LoraConfig, by_ending: bool = False) -> tuple[list[str], list[str]]:
        return _plan_new(model, config, by_ending)

    @classmethod
    def _adapt(cls, model: nn.Module, config: LoraConfig, adapter_name: str, autocast_adapter_dtype: bool,
               plan: tuple[list[str], list[str]]) -> tuple["PeftModel", Callable[[], None]]:
        """Adapt ``model`` as ``get_peft_model`` along a checked plan, for a file's values; returns the model and
        an ``undo``."""
        return _build(model, config, adapter_name, autocast_adapter_dtype and config.autocast_adapter_dtype, plan,
                      values_from_file=True)

    def __getattr__(self, name: str):
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args, **kwargs):
        """The adapted model's forward.  ``adapter_names=[...]`` (PEFT's mixed batch): one adapter name per row of
        the batch, ``"__base__"`` for the base model; unlike PEFT, also in training mode, each row's loss then
        training only its own adapter."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            return self.base_model(*args, **kwargs)
        with self._rows_use(adapter_names, _batch_size(args, kwargs)):
            return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """The adapted model's ``generate``; ``adapter_names=[...]`` as in ``forward`` (one per input row)."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            return self.get_base_model().generate(*args, **kwargs)
        model = self.get_base_model()
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise NotImplementedError("generate(adapter_names=...) on an encoder-decoder model is not supported by "
                                      "fastlora (its encoder and decoder see different numbers of rows)")
        batch = _batch_size(args, kwargs)
        settings = kwargs.get("generation_config") or getattr(model, "generation_config", None)

        def setting(name):  # the call's value, else the generation config's
            value = kwargs.get(name)
            return value if value is not None else getattr(settings, name, None)

        copies = max(int(setting("num_beams") or 1), int(setting("num_return_sequences") or 1))
        if batch is not None and len(adapter_names) == batch and copies > 1:  # rows repeated per beam / sequence
            adapter_names = [name for name in adapter_names for _ in range(copies)]
            batch *= copies
        with self._rows_use(adapter_names, batch, expanded_ok=True):
            return self.get_base_model().generate(*args, **kwargs)

    @contextlib.contextmanager
    def _rows_use(self, adapter_names, batch: int | None, expanded_ok: bool = False):
        """Every LoRA layer and modules_to_save wrapper computes a mixed batch (``adapter_names[i]`` for row i) inside
        the block; PEFT's checks first: a list of known names (or "__base__") as long as the batch, no merged
        adapter, no DoRA adapter, modules_to_save of the kinds PEFT takes."""
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"adapter_names must be a list of adapter names, one per row, got {adapter_names!r}")
        names = list(adapter_names)
        if batch is not None and len(names) != batch:
            raise ValueError(f"Length of `adapter_names` should be the same as the number of inputs, but got "
                             f"{len(names)} and {batch} respectively.")
        unknown = sorted({n for n in names if n != "__base__" and n not in self.peft_config})
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
        if any(layer.merged for _, layer in self.lora_layers()):
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                             "`unmerge_adapter` first.")
        tokens = [wrapper for _, wrapper in self.token_wrappers()]
        if any(wrapper.merged_adapters for wrapper in tokens):
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                             "`unmerge_adapter` first.")
        wrappers = [wrapper for _, wrapper in self.wrappers()]
        odd = sorted({type(w.original_module).__name__ for w in wrappers
                      if not isinstance(w.original_module, MIXED_BATCH_MODULES)})
        if odd and self.adapters_enabled:  # disabled, every row computes the base model (PEFT's wrappers check later)
            raise TypeError(f"Mixed batching is only supported for the following modules: "
                            f"{', '.join(m.__name__ for m in MIXED_BATCH_MODULES)}.  (modules_to_save holds {odd})")
        base = self.get_base_model()
        if self.training and torch.is_grad_enabled() and activation_checkpointing_on(base):
            # checkpointing recomputes the forward in backward, after this block has reset the rows' adapters
            raise NotImplementedError("adapter_names in training with gradient checkpointing is not supported by "
                                      "fastlora: the recomputed forward would not see the rows' adapters")
        dora = sorted({n for n in names if n != "__base__" and self.peft_config[n].use_dora})
        if dora:
            raise ValueError(f"Cannot pass `adapter_names` when DoRA is enabled.  (DoRA adapters {dora}: a mixed batch "
                             f"takes LoRA adapters only, as in PEFT)")
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(names):
            groups.setdefault(name, []).append(row)
        rows = {name: torch.tensor(index) for name, index in groups.items() if name != "__base__"}
        layers = [layer for _, layer in self.lora_layers()]
        for layer in layers:
            layer.row_adapters = rows
            layer.row_count = len(names)
        for wrapper in [*wrappers, *tokens]:
            wrapper.use_rows({name: index for name, index in groups.items() if name != "__base__"}, len(names))
        try:
            yield
        finally:
            for layer in layers:
                layer.row_adapters = layer.row_count = None
            for wrapper in [*wrappers, *tokens]:
                wrapper.use_rows(None)

    # ---- what PEFT users read ---------------------------------------------------------------------

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    @property
    def _active_adapter(self) -> str:
        return self._active_adapters[0]

    @property
    def active_adapter(self) -> str:
        """The (first) active adapter."""
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters (one, unless several were set at the base_model level); also callable, as
        transformers' method of the same name."""
        return _AdapterNames(self._active_adapters)

    @property
    def active_peft_config(self) -> LoraConfig:
        return self.peft_config[self._active_adapter]

    @property
    def peft_type(self) -> PeftType:
        return PeftType.LORA

    @property
    def _is_prompt_learning(self) -> bool:
        """PEFT's attribute on its models, which helper code reads: LoRA is no prompt-learning method."""
        return False

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        """The modules_to_save entries of every adapter's config (None when there are none), as PEFT's attribute."""
        names = {m for config in self.peft_config.values() for m in config.modules_to_save or []}
        return names or None

    @property
    def base_model_torch_dtype(self) -> Optional[torch.dtype]:
        return getattr(self.get_base_model(), "dtype", None)

    @property
    def has_active_enabled_adapter(self) -> bool:
        return self.adapters_enabled and any(
            any(name in layer.adapter_settings for name in self._active_adapters) for _, layer in self.lora_layers())

    def lora_layers(self, adapter_name: Optional[str] = None) -> Iterator[tuple[str, LoRALinear]]:
        """(qualified name, layer) of every LoRALinear (holding ``adapter_name``, when given)."""
        for name, module in self.get_base_model().named_modules():
            if isinstance(module, LoRALinear) and (adapter_name is None or adapter_name in module.adapter_settings):
                yield name, module

    def token_wrappers(self) -> Iterator[tuple[str, TrainableTokensWrapper]]:
        """(qualified name, wrapper) of every embedding table (or tied head) with trainable token rows."""
        for name, module in self.get_base_model().named_modules():
            if isinstance(module, TrainableTokensWrapper):
                yield name, module

    def wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        for name, module in self.get_base_model().named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield name, module

    def get_layer_status(self) -> list:
        """Each adapter layer's state: :func:`fastlora.get_layer_status`."""
        return get_layer_status(self)

    def get_model_status(self):
        """The model's adapter state in one summary: :func:`fastlora.get_model_status`."""
        return get_model_status(self)

    def healthcheck(self, min_trainable_params: int = 1, max_trainable_params_percent: float = 50) -> dict:
        """A JSON-serialisable report on the model before training, PEFT 0.22's: the adapter state, environment,
        dtypes and devices, and ``findings`` (each with a code, "warning" or "error", and a message) for adapters
        disabled, merged, frozen or inconsistent across layers, fewer than ``min_trainable_params`` trainable
        parameters (an error) or more than ``max_trainable_params_percent`` percent (a warning), and a newly
        initialised task head that the adapter would not save.  ``is_ready`` is False where a finding is an error.
        See :mod:`fastlora.healthcheck`."""
        return healthcheck(self, min_trainable_params, max_trainable_params_percent)

    def print_healthcheck(self, sink: Callable[[str], Any] = print, min_trainable_params: int = 1,
                          max_trainable_params_percent: float = 50, **format_kwargs: Any) -> None:
        """:meth:`healthcheck`'s report as a few lines, passed to ``sink`` (``print``, ``logger.info``, ...);
        ``format_kwargs`` (``sep``, ``indent``) go to :func:`fastlora.healthcheck.format_healthcheck`."""
        sink(format_healthcheck(self.healthcheck(min_trainable_params, max_trainable_params_percent), **format_kwargs))

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, as PEFT returns them: a 4-bit parameter (two values per byte of its
        packed storage) counts 2 · its storage's bytes per element."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(_parameter_count(p) for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ---- trainable flags (PEFT's rules, operation by operation) -----------------------------------

    def _adapter_parameters(self, adapter_name: str, frozen_too: bool = False) -> Iterator[nn.Parameter]:
        """``adapter_name``'s trained LoRA factors (and DoRA magnitudes) and modules_to_save copies; with
        ``frozen_too``, the factors it keeps frozen as well (MiCA's B)."""
        for _, layer in self.lora_layers(adapter_name):
            yield from (layer.adapter_tensors if frozen_too else layer.adapter_parameters)(adapter_name)
        for _, wrapper in self.wrappers():
            if adapter_name in wrapper.modules_to_save:
                yield from wrapper.modules_to_save[adapter_name].parameters()
        for _, tokens in self.token_wrappers():
            yield from tokens.adapter_parameters(adapter_name)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Turn gradients of the given adapters' parameters (factors and modules_to_save copies) on or off."""
        names = _names_given(adapter_names, "set_requires_grad")
        if not isinstance(requires_grad, bool):
            raise TypeError(f"set_requires_grad: requires_grad must be True or False, got {requires_grad!r}")
        self._check_adapter_names(names)
        for name in names:
            for param in self._adapter_parameters(name, frozen_too=not requires_grad):
                param.requires_grad_(requires_grad)

    def _mark_trainable(self, adapter_name: str) -> None:
        """After ``get_peft_model``: everything frozen but the adapter, the biases its ``bias`` setting names
        and its modules_to_save copies; the adapter and copies frozen too in inference mode (PEFT keeps the
        biases trainable even then)."""
        config = self.peft_config[adapter_name]
        model = self.get_base_model()
        model.requires_grad_(False)
        if config.bias == "all":
            self._mark_biases(adapter_name)
        elif config.bias == "lora_only":
            for _, layer in self.lora_layers(adapter_name):
                if layer.bias is not None:
                    layer.bias.requires_grad_(True)
        self.set_requires_grad(adapter_name, not config.inference_mode)

    def _activate(self, adapter_names: list[str], trainable: bool, unmerge: bool = True) -> None:
        """Point every layer and modules_to_save wrapper at ``adapter_names``; their parameters get
        ``requires_grad=trainable``, every other adapter's False (PEFT's ``set_adapter``).  ``unmerge``: a merged
        model is unmerged first, with PEFT's warning (not where the layers are only enabled again)."""
        if unmerge:
            self._unmerge_to_set_adapters(stacklevel=4)
        for _, layer in self.lora_layers():
            layer.set_adapter(adapter_names)
        for _, wrapper in self.wrappers():
            wrapper.set_adapter(_wrapper_adapter(wrapper, adapter_names))
        for _, tokens in self.token_wrappers():
            tokens.set_adapter(adapter_names)
        for name in self.peft_config:
            for param in self._adapter_parameters(name, frozen_too=True):
                param.requires_grad_(False)
            if trainable and name in adapter_names:
                for param in self._adapter_parameters(name):
                    param.requires_grad_(True)

    def _unmerge_to_set_adapters(self, stacklevel: int = 3) -> None:
        """PEFT's unmerge, with its warning, of a merged model whose active adapters are set: by ``set_adapter``,
        and at the end of ``add_adapter`` and of ``load_adapter`` of a new adapter (which set them again)."""
        if any(layer.merged for _, layer in self.lora_layers()):
            warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.", UserWarning,
                          stacklevel=stacklevel)
            self.unmerge_adapter()

    def _set_active_adapters(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """PEFT's ``base_model.set_adapter``: one adapter or several, whose updates add up in every layer; each
        trains (unless ``inference_mode``).  Checked before anything changes."""
        names = list(dict.fromkeys(_names_given(adapter_names, "set_adapter")))
        if not names:
            raise ValueError("set_adapter needs at least one adapter name")
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter {unknown[0]} not found; this model has {list(self.peft_config)}")
        for _, tokens in self.token_wrappers():  # overlapping trained rows have no defined result: said now
            tokens._held(names)
        for wrapper_name, wrapper in self.wrappers():  # one copy of a module serves a forward (PEFT's check)
            held = [n for n in names if n in wrapper.modules_to_save]
            if len(held) > 1:
                raise ValueError(f"Only one adapter can be set at a time for {wrapper_name} (modules_to_save of "
                                 f"{held}), got {len(held)}")
        self._active_adapters = names
        self._activate(names, trainable=not inference_mode)
        # inference_mode pauses the adapters' dropout, and their modules_to_save copies' training mode, until the
        # next train() / eval(); without it they follow the model's mode again (PEFT's set_training)
        for _, layer in self.lora_layers():
            held = {n for n in names if n in layer.adapter_settings}
            layer.dropout_paused = layer.dropout_paused | held if inference_mode else layer.dropout_paused - held
        for _, wrapper in self.wrappers():
            for name in names:
                if name in wrapper.modules_to_save:
                    wrapper.modules_to_save[name].train(wrapper.training and not inference_mode)

    # ---- merge / unload / disable -----------------------------------------------------------------

    def _check_adapter_names(self, adapter_names) -> list[str]:
        if adapter_names is not None and (not isinstance(adapter_names, (list, tuple))  # a str too (PEFT's message)
                                          or not all(isinstance(name, str) for name in adapter_names)):
            raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
        names = list(self._active_adapters) if adapter_names is None else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter name(s) {unknown}; this model has {list(self.peft_config)}")
        return names

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Fold the adapters (default: the active one) into the base weights: float32 sum, one rounding (a
        quantized weight: adapter by adapter, requantized after each, as PEFT's bitsandbytes layers merge).
        ``safe_merge``: first check every merged weight for NaN/Inf and refuse (ValueError) leaving the model
        unmerged."""
        names = self._check_adapter_names(adapter_names)
        if self._replicated and shared_parameters(self.get_base_model()):  # PEFT's refusal (which PEFT never makes)
            raise ValueError("Cannot merge LORA layers when base model layers are replicated: the copies share their "
                             "base weights, each with an adapter of its own (merge_and_unload gives each its own "
                             "weights first)")
        layers = [layer for _, layer in self.lora_layers()]
        already = sorted({n for layer in layers for n in layer.merged_adapters})
        if already and all(n in already for n in names):
            warnings.warn("All adapters are already merged, nothing to do.", UserWarning, stacklevel=2)
            return
        if already:
            warnings.warn(f"Already following adapters were merged {','.join(already)}. "
                          f"You are now additionally merging {','.join(names)}.", UserWarning, stacklevel=2)
        for name, layer in self.lora_layers():  # a bias on B needs a base bias to merge into: checked in every layer first
            held = [n for n in names if n in layer.adapter_settings and layer.lora_bias(n) is not None]
            if held and layer.bias is None:
                raise RuntimeError(f"cannot merge adapter(s) {held} with lora_bias=True into {name}: the base layer has "
                                   f"no bias; nothing was merged")
        for name, layer in self.lora_layers():  # what a merge would damage (a quantized weight; with safe_merge,
            held = [n for n in names if n in layer.adapter_settings]  # NaN/Inf anywhere): every layer first
            problem = layer.merge_problem(held, safe_merge, name) if held else None
            if problem is not None:
                raise ValueError(problem)
        for layer in layers:
            layer.merge([n for n in names if n in layer.adapter_settings])
        for _, tokens in self.token_wrappers():  # the trained token rows written into their tables
            tokens.merge(names, safe_merge)

    def unmerge_adapter(self) -> None:
        """Take the merged adapters back out of the base weights (to within one rounding)."""
        layers = [layer for _, layer in self.lora_layers()]
        tokens = [wrapper for _, wrapper in self.token_wrappers()]
        if not any(layer.merged for layer in layers) and not any(t.merged_adapters for t in tokens):
            warnings.warn("Already unmerged. Nothing to do.", UserWarning, stacklevel=2)
        for layer in layers:
            layer.unmerge()
        for wrapper in tokens:
            wrapper.unmerge()

    @property
    def _replicated(self) -> bool:
        return any(config.layer_replication for config in self.peft_config.values())

    def _replace_lora_layers(self, merge: bool, safe_merge: bool = False,
                             adapter_names: Optional[list[str]] = None) -> nn.Module:
        kept = {name: self._copy_kept(wrapper, merge, adapter_names) for name, wrapper in self.wrappers()}  # checked first
        if merge:
            # replicated layers: a standalone model of the new depth, each layer its own merged weights
            share_again = unshare_parameters(self.get_base_model()) if self._replicated else None
            try:
                self.merge_adapter(safe_merge=safe_merge, adapter_names=adapter_names)
            except BaseException:
                if share_again is not None:
                    share_again()
                raise
        model = self.get_base_model()
        for name, layer in reversed(list(self.lora_layers())):  # nested layers (a module's parameters) inside out
            if not merge:
                layer.unmerge()
            set_module(model, name, layer.to_base())
        for name, module in kept.items():
            set_module(model, name, module)
        for name, tokens in list(self.token_wrappers()):
            if not merge:
                tokens.unmerge()
            set_module(model, name, tokens.to_base())
        return model

    @staticmethod
    def _copy_kept(wrapper: ModulesToSaveWrapper, merge: bool, adapter_names: Optional[list[str]]) -> nn.Module:
        """The module that replaces a modules_to_save wrapper when the adapters are dropped, as PEFT picks it: the
        original without a merge; with one, the active adapter's trained copy, or, given ``adapter_names``, the copy
        of the one of them that has one here (the original where none has; ValueError where several have)."""
        if not merge:
            return wrapper.original_module
        if adapter_names is None:  # the active adapter's, merged even while the adapters are disabled
            adapter_names = [wrapper.active_adapter]
        held = [n for n in adapter_names if n in wrapper.modules_to_save]
        if len(held) > 1:
            raise ValueError(f"adapters {held} each hold a copy of one modules_to_save module: merging them would "
                             f"keep only one; merge one of them (nothing was merged)")
        return wrapper.modules_to_save[held[0]] if held else wrapper.original_module

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None) -> nn.Module:
        """Fold the adapters (default: the active one) into their base weights (float32 sum, one rounding) and
        return the plain model; each modules_to_save module becomes the trained copy of the adapter merged (the
        original where it has none).  ``progressbar`` is accepted for PEFT's signature (merging is quick)."""
        return self._replace_lora_layers(merge=True, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Drop the adapters without merging and return the plain model: its original weights and original
        modules_to_save modules (as PEFT's ``unload`` since 0.22)."""
        return self._replace_lora_layers(merge=False)

    def _set_adapters_enabled(self, enabled: bool) -> None:
        """PEFT's switch: disabling unmerges and freezes every adapter; enabling re-activates the active adapter
        with gradients on (whatever they were before)."""
        self.adapters_enabled = enabled
        for _, layer in self.lora_layers():
            if not enabled:
                layer.unmerge()
            layer.adapter_enabled = enabled
        for _, wrapper in self.wrappers():
            wrapper.adapter_enabled = enabled
        for _, tokens in self.token_wrappers():
            if not enabled:
                tokens.unmerge()
            tokens.adapter_enabled = enabled
        if enabled:  # (a merged adapter stays merged, as in PEFT)
            self._activate(self._active_adapters, trainable=True, unmerge=False)
        else:
            for name in self.peft_config:
                self.set_requires_grad(name, False)

    def disable_adapter_layers(self) -> None:
        """The model computes its base outputs until ``enable_adapter_layers()`` (merged adapters are
        unmerged first, and modules_to_save modules are their originals)."""
        self._set_adapters_enabled(False)

    def enable_adapter_layers(self) -> None:
        self._set_adapters_enabled(True)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within the block the model computes its base outputs (merged adapters are unmerged first, and
        ``modules_to_save`` modules are their originals)."""
        was_enabled = self.adapters_enabled
        self._set_adapters_enabled(False)
        try:
            yield
        finally:
            self._set_adapters_enabled(was_enabled)

    # transformers' own PEFT-integration names (PreTrainedModel's PeftAdapterMixin), which attribute access
    # would otherwise reach on the wrapped model and let it add PEFT layers behind fastlora's back.
    def enable_adapters(self) -> None:
        """transformers' name for ``enable_adapter_layers()``."""
        self.enable_adapter_layers()

    def disable_adapters(self) -> None:
        """transformers' name for ``disable_adapter_layers()``."""
        self.disable_adapter_layers()

    def get_adapter_state_dict(self, adapter_name: Optional[str] = None,
                               state_dict: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
        """transformers' name for ``adapter_tensors()``: the adapter's tensors under PEFT's file keys."""
        return self.adapter_tensors(adapter_name, state_dict)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: Optional[int] = None,
                             svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
                             svd_driver: Optional[str] = None, density: Optional[float] = None,
                             majority_sign_method: str = "total") -> None:
        """Add ``adapter_name``, combined from ``adapters`` with ``weights`` (PEFT's method, PEFT's math: see
        :mod:`fastlora.weighted_adapters`).  ``combination_type``: "cat", "linear", "ties", "dare_linear",
        "dare_ties", "magnitude_prune" (equal ranks) or their "_svd" forms and "svd" (the combined delta weights
        truncated to ``svd_rank``); ``density`` for the pruning types; ``majority_sign_method`` "total" or
        "frequency" for the ties types.  The new adapter is frozen and not active; a name that exists already
        changes nothing.  DoRA, lora_bias and target_parameters adapters are refused."""
        from fastlora.weighted_adapters import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
                             svd_full_matrices, svd_driver, density, majority_sign_method)

    def enable_peft_hotswap(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("enable_peft_hotswap: adapter hot-swapping (transformers' PEFT integration) is not "
                                  "supported by fastlora; use load_adapter() and set_adapter()")

    # ---- named adapters ---------------------------------------------------------------------------

    def _mark_biases(self, adapter_name: str) -> None:
        """``bias="all"``: every bias the adapter computes with trains, not those of the originals of the modules it
        holds a copy of (PEFT's) nor those of other adapters' copies."""
        skipped = []
        for name, wrapper in self.wrappers():
            if adapter_name in wrapper.modules_to_save:
                skipped.append(f"{name}.original_module.")
            skipped += [f"{name}.modules_to_save.{other}." for other in wrapper.modules_to_save if other != adapter_name]
        for name, param in named_parameters(self.get_base_model()):
            if (name == "bias" or name.endswith(".bias")) and not name.startswith(tuple(skipped)):
                param.requires_grad_(True)

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add a new adapter, as PEFT's ``add_adapter``: not made active (``set_adapter`` switches to it) and
        frozen; the other adapters keep their gradients flags."""
        if isinstance(adapter_name, LoraConfig):
            raise TypeError("add_adapter(adapter_name, peft_config): the name comes first (PEFT's order; "
                            "transformers' add_adapter(config, name) order is not accepted)")
        _check_model_and_config(self.get_base_model(), peft_config)
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name {adapter_name!r} already exists.")
        config = with_task_heads(peft_config, self.get_base_model())
        self._check_second_adapter(config)
        if adapter_name == "ref" and peft_config is self.peft_config.get("default"):
            warnings.warn(REFERENCE_ADAPTER_WARNING, UserWarning, stacklevel=2)
        model = self.get_base_model()
        targets = plan_targets(model, config, adapter_name)
        to_save = plan_modules_to_save(model, config, adapter_name)
        warn_of_lora_ga_without_gradients(config, [model.get_submodule(name) for name in targets], stacklevel=3)
        self._add_planned(adapter_name, config, targets, to_save, autocast_adapter_dtype)
        self._unmerge_to_set_adapters()

    def _check_not_merged(self, adapter_name: str) -> None:
        if any(adapter_name in layer.merged_adapters for _, layer in self.lora_layers()):
            raise ValueError(f"adapter {adapter_name!r} is merged into the base weights: unmerge_adapter() before "
                             f"giving it new values (unmerging would subtract the new values, not the merged ones)")

    def _check_second_adapter(self, config: LoraConfig) -> None:
        """PEFT's rule: biases are shared by every adapter, so at most one adapter of a model may train them.  A
        second adapter is built on the layer stack the first replicated (``layer_replication``), and must say so."""
        first = next(iter(self.peft_config.values()), None)
        if first is not None and (config.layer_replication or None) != (first.layer_replication or None):
            raise ValueError(f"layer_replication={config.layer_replication!r} for a new adapter of a model whose layers "
                             f"are {'replicated as ' + repr(first.layer_replication) if first.layer_replication else 'not replicated'}: "
                             f"every adapter of a model adapts the same stack of layers")
        if sum(c.bias != "none" for c in [*self.peft_config.values(), config]) > 1:
            raise ValueError("LoraModel supports only 1 adapter with bias. When using multiple adapters, set bias "
                             "to 'none' for all adapters.")
        adapted = {frozenset(c.target_parameters) for c in [*self.peft_config.values(), config] if c.target_parameters}
        if len(adapted) > 1:
            raise ValueError(f"When using multiple adapters with `target_parameters`, all adapters must target the same "
                             f"set of parameters, but got {sorted(config.target_parameters or [])} for the new adapter "
                             f"and {sorted(next(iter(adapted - {frozenset(config.target_parameters or [])}), []))} "
                             f"for another")

    def _add_planned(self, adapter_name: str, config: LoraConfig, targets: list[str], to_save: list[str],
                     autocast_adapter_dtype: bool, values_from_file: bool = False) -> Callable[[], None]:
        """Inject a planned adapter (frozen, not active); returns the ``undo`` that removes it again."""
        config = with_targets_recorded(self.get_base_model(), settle_fan_in_fan_out(self.get_base_model(), config, targets),
                                       targets)
        flags = {param: param.requires_grad for param in self.get_base_model().parameters()}
        undo_inject = adapt_modules(self.get_base_model(), config, adapter_name, targets, to_save,
                                    autocast_adapter_dtype and config.autocast_adapter_dtype, values_from_file)
        self.peft_config[adapter_name] = config
        for _, layer in self.lora_layers(adapter_name):
            layer.set_adapter(self._active_adapters)  # a layer new to the model points at the model's adapters
            layer.adapter_enabled = self.adapters_enabled
        for _, wrapper in self.wrappers():
            wrapper.set_adapter(_wrapper_adapter(wrapper, self._active_adapters))
            wrapper.adapter_enabled = self.adapters_enabled
        for _, tokens in self.token_wrappers():
            tokens.set_adapter(self._active_adapters)
            tokens.adapter_enabled = self.adapters_enabled
        for param, flag in flags.items():  # what the model had trains as before, inside a module the adapter
            param.requires_grad_(flag)       # wraps too (a bias an active adapter trains, its token rows)
        self.set_requires_grad(adapter_name, False)

        def undo() -> None:
            undo_inject()
            del self.peft_config[adapter_name]

        return undo

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the active adapter: the one the forward uses.  Its parameters get
        ``requires_grad=not inference_mode``, every other adapter's False (PEFT's rule); with ``inference_mode`` its
        dropout is off, even in training mode, until the next ``train()`` or ``eval()`` (as PEFT since 0.22)."""
        if isinstance(adapter_name, (list, tuple)):  # PEFT takes a list at the base_model level; so does fastlora here
            self._set_active_adapters(list(adapter_name), inference_mode)
            return
        if not isinstance(adapter_name, str):
            raise TypeError(f"set_adapter takes an adapter name (or a list of them), got {adapter_name!r}")
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} not found; this model has {list(self.peft_config)}")
        self._set_active_adapters(adapter_name, inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter.  Deleting the active one activates (and unfreezes) the alphabetically first that
        remains, as PEFT does; the last adapter cannot be deleted (``unload()`` removes it)."""
        if not isinstance(adapter_name, str):
            raise TypeError(f"delete_adapter takes one adapter name, got {adapter_name!r}")
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist; this model has {list(self.peft_config)}")
        if len(self.peft_config) == 1:
            raise ValueError(f"adapter {adapter_name!r} is the model's only adapter; unload() removes it")
        if any(adapter_name in layer.merged_adapters for _, layer in self.lora_layers()):
            raise ValueError(f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them first.")
        model = self.get_base_model()
        for name, layer in reversed(list(self.lora_layers(adapter_name))):  # nested layers inside out
            layer.delete_adapter(adapter_name)
            if not layer.adapter_settings:
                set_module(model, name, layer.to_base())
        for name, wrapper in list(self.wrappers()):
            wrapper.delete_adapter(adapter_name)
            if not len(wrapper.modules_to_save):
                set_module(model, name, wrapper.original_module)
        for name, tokens in list(self.token_wrappers()):
            tokens.delete_adapter(adapter_name)
            if not tokens.adapter_names:
                set_module(model, name, tokens.to_base())
        del self.peft_config[adapter_name]
        if adapter_name in self._active_adapters and len(self._active_adapters) > 1:
            self._set_active_adapters([n for n in self._active_adapters if n != adapter_name])
        elif adapter_name in self._active_adapters:
            new = sorted(self.peft_config)[0]
            warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to {new}.",
                          UserWarning, stacklevel=2)
            self.set_adapter(new)

    # ---- what transformers' Trainer calls ---------------------------------------------------------

    def gradient_checkpointing_enable(self, *args, **kwargs) -> None:
        """The wrapped model's gradient checkpointing, with its input embeddings' output requiring grad (as
        PEFT does), so reentrant checkpointing still sends gradients to the adapters (transformers 5 does
        this itself for token-input models; 4.x only for its own PEFT integration)."""
        self.get_base_model().gradient_checkpointing_enable(*args, **kwargs)
        enable = getattr(self.get_base_model(), "enable_input_require_grads", None)
        if callable(enable):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                enable()


def __getattr__(name: str):
    """``PeftCompatibleLoraModel`` (see :mod:`fastlora.peft_identity`) on first access, so that a model pickled in
    one process unpickles in another before anything there called ``get_peft_model``."""
    if name == "PeftCompatibleLoraModel":
        return lora_model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The name this class had in earlier fastlora releases (it plays PEFT's PeftModel, not peft.LoraModel, which is
# the ``base_model`` level): kept so existing imports and pickles keep working.
LoraModel = PeftModel


# PEFT's task classes: fastlora's PeftModel serves every task (the config's task_type says which), so a script
# calling PeftModelForCausalLM.from_pretrained(...) gets it.
PeftModelForCausalLM = PeftModelForSeq2SeqLM = PeftModelForSequenceClassification = PeftModel
PeftModelForTokenClassification = PeftModelForQuestionAnswering = PeftModelForFeatureExtraction = PeftModel

"""Adapter files on a ``PeftModel``: save, load, push, and the adapter's tensors under PEFT's keys.

:class:`AdapterFilesMixin` gives ``PeftModel`` PEFT's ``save_pretrained``, ``from_pretrained``,
``load_adapter``, ``push_to_hub`` and ``create_or_update_model_card``; the file format itself is
:mod:`fastlora.peft_format`, where adapters come from :mod:`fastlora.hub`.
:func:`get_peft_model_state_dict` and :func:`set_peft_model_state_dict` are PEFT's functions of the
same names for fastlora models (PEFT's own select tensors by visiting PEFT's layer classes, so they see
nothing in a fastlora model).
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from fastlora.module_names import named_parameters
from fastlora import base_kinds, hub, peft_format
from fastlora.config import LoraConfig
from fastlora.adapter_settings import check_adapter_name
from fastlora.fused_experts import check_not_per_expert
from fastlora.layer_replication import layers_replicated
from fastlora.targets import (names_the_same_modules, outside_layers_to_transform, plan_modules_to_save, plan_targets,
                              plan_trainable_tokens, saved_whole, task_heads, with_task_heads)
from fastlora.weight_tying import untied_where_the_file_is, without_tied_head_factors
from fastlora.trainable_tokens import TrainableTokensWrapper
from fastlora.weight_conversion import converted_for_the_original_weight
from fastlora.vocabulary_tables import (check_vocabulary_size, untargeted_embeddings, untargeted_tables,
                                        vocabulary_resized)

__all__ = ["AdapterFilesMixin", "load_peft_weights"]


class AdapterFilesMixin:
    """PEFT's file methods, for ``PeftModel`` (which provides ``peft_config``, ``active_peft_config``,
    ``get_base_model``, ``set_requires_grad``, the checks ``_check_adapter_names``, ``_check_not_merged`` and
    ``_check_second_adapter``, ``_add_planned``, and the constructors ``_plan_new`` and ``_adapt``)."""

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     torch_device: Optional[str] = None, autocast_adapter_dtype: bool = True,
                     ephemeral_gpu_offload: bool = False, low_cpu_mem_usage: bool = False,
                     key_mapping: Optional[dict] = None, **kwargs: Any) -> None:
        """Load a PEFT-format adapter (a directory or a Hub repository id) as ``adapter_name``, as PEFT does:

        * a new name adds the adapter, not active; trainable with ``is_trainable=True``, frozen otherwise;
        * an existing name gets the file's values in place (same Parameters, flags and config), which is how
          transformers' Trainer resumes from a checkpoint and restores the best one.

        ``is_trainable=False`` puts the model in eval mode.  Every tensor is checked before anything changes.
        ``torch_device`` is accepted for PEFT's signature (values land on each layer's device), and so are
        ``device_map`` and accelerate's offload options (see :func:`_placement_options`)."""
        if key_mapping:
            raise NotImplementedError("load_adapter(key_mapping=...): remapping base-model keys is not supported by fastlora")
        check_adapter_name(adapter_name)
        _placement_options(self.get_base_model(), kwargs)
        hub_kwargs = _hub_kwargs(kwargs, "load_adapter")
        file_config, tensors = peft_format.read_adapter(model_id, **hub_kwargs)
        model = self.get_base_model()
        tensors = peft_format.with_model_paths(model, tensors)
        if adapter_name in self.peft_config:
            config = self.peft_config[adapter_name]
            with warnings.catch_warnings():  # the config's warnings were given when the adapter was made
                warnings.simplefilter("ignore")
                file_config = with_task_heads(file_config, self.get_base_model())
            _check_same_adapter(model, adapter_name, config, file_config)
            self._check_not_merged(adapter_name)
            targets, to_save = peft_format.adapter_targets(model, adapter_name, config)
            expected, tensors = _checked(model, config, targets, to_save, adapter_name, tensors, model_id)
            _copy_values(model, expected, tensors, restore_on_error=True)
        else:
            config = untied_where_the_file_is(with_task_heads(file_config.replace(inference_mode=not is_trainable),
                                                              self.get_base_model()), self.get_base_model(), tensors)
            config = _without_entries_matching_nothing(model, config, tensors, model_id)
            self._check_second_adapter(config)
            def checked(targets, to_save):
                return _checked(model, config, targets, to_save, adapter_name, tensors, model_id)

            targets, to_save = _planned_for_file(lambda rule: (
                plan_targets(model, config, adapter_name, rule), plan_modules_to_save(model, config, adapter_name, rule)),
                config, tensors, checked)
            targets, config = _without_layers_the_file_lacks(config, targets, tensors, model_id)
            expected, tensors = checked(targets, to_save)
            undo = self._add_planned(adapter_name, config, targets, to_save, autocast_adapter_dtype,
                                     values_from_file=True)
            try:
                _copy_values(model, expected, tensors)
            except BaseException:
                undo()
                raise
            self._unmerge_to_set_adapters()
            if is_trainable:
                self.set_requires_grad(adapter_name, True)
        if not is_trainable:
            self.eval()

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[LoraConfig] = None,
                        autocast_adapter_dtype: bool = True, ephemeral_gpu_offload: bool = False,
                        low_cpu_mem_usage: bool = False, key_mapping: Optional[dict] = None,
                        torch_device: Optional[str] = None, **kwargs: Any) -> "AdapterFilesMixin":
        """Load a PEFT-format adapter (saved by fastlora or PEFT; a directory or a Hub repository id, with
        ``revision``, ``token``, ``cache_dir``, ``local_files_only``, ``subfolder``) onto ``model`` as PEFT's
        ``PeftModel.from_pretrained``: ``config`` replaces the file's config; ``is_trainable=False`` (the
        default) freezes the adapter and puts the model in eval mode.  Every tensor is checked before the
        model changes."""
        if key_mapping:
            raise NotImplementedError("from_pretrained(key_mapping=...): remapping base-model keys is not supported by fastlora")
        if config is not None and not isinstance(config, LoraConfig):
            raise TypeError(f"config must be a fastlora.LoraConfig, got {type(config).__name__}")
        check_adapter_name(adapter_name)
        _placement_options(model, kwargs)
        hub_kwargs = _hub_kwargs(kwargs, "from_pretrained")
        file_config, tensors = peft_format.read_adapter(model_id, **hub_kwargs)
        tensors = peft_format.with_model_paths(model, tensors)
        config = untied_where_the_file_is(
            with_task_heads((config or file_config).replace(inference_mode=not is_trainable), model), model, tensors)
        config = _without_entries_matching_nothing(model, config, tensors, model_id)
        def checked(targets, to_save):
            return _checked(model, config, targets, to_save, adapter_name, tensors, model_id)

        with layers_replicated(model, config.layer_replication):  # the stack the file was trained on
            tensors = peft_format.with_model_paths(model, tensors)  # the copied layers' names too
            targets, to_save = _planned_for_file(lambda rule: cls._plan_new(model, config, rule), config, tensors,
                                                 checked)
            targets, config = _without_layers_the_file_lacks(config, targets, tensors, model_id)
            expected, tensors = checked(targets, to_save)
            lora_model, undo = cls._adapt(model, config, adapter_name, autocast_adapter_dtype, (targets, to_save))
            try:
                _copy_values(model, expected, tensors)
            except BaseException:
                undo()
                raise
        if not is_trainable:
            lora_model.eval()
        return lora_model

    def adapter_tensors(self, adapter_name: Optional[str] = None,
                        state_dict: Optional[dict[str, torch.Tensor]] = None,
                        save_embedding_layers: Any = False) -> dict[str, torch.Tensor]:
        """The tensors of ``adapter_name`` (default: the active one) under PEFT's file keys.  With
        ``state_dict`` (this model's, e.g. gathered by FSDP or DeepSpeed) the values are taken from it.
        ``save_embedding_layers``: True adds the embedding tables (the targeted ones where target_modules names an
        embedding, else the model's input and output embeddings: :mod:`fastlora.vocabulary_tables`); "auto" adds
        them where target_modules names an embedding or the vocabulary was resized (PEFT's rule, with its
        warnings)."""
        name = self._check_adapter_names(None if adapter_name is None else [adapter_name])[0]
        model = self.get_base_model()
        config = self.peft_config[name]
        targets, wrappers = peft_format.adapter_targets(model, name, config)
        _check_config_describes_layers(model, config, name, targets)
        expected = peft_format.expected_tensors(model, config, targets, wrappers, name)
        aliases: dict[str, str] = {}
        quantized: dict[str, torch.Tensor] = {}
        base = config.base_model_name_or_path or model.__dict__.get("name_or_path")
        save_tables, resized = save_embedding_layers is True, None  # resized: the base's config read once, if at all
        if save_embedding_layers == "auto":  # PEFT's rule: the targeted tables, else the tables of a resized vocabulary
            if _names_an_embedding(config) and config.trainable_token_indices is None:
                warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in "
                              "`target_modules`.", UserWarning, stacklevel=3)
                save_tables = True
            else:
                save_tables = resized = vocabulary_resized(model, base)
        if save_tables and _names_an_embedding(config):
            left_out = untargeted_embeddings(model, targets)
            if save_embedding_layers == "auto" and left_out and (
                    resized if resized is not None else vocabulary_resized(model, base, announce=False)):
                warnings.warn(f"the vocabulary was resized, and only the targeted embedding tables are saved (PEFT's "
                              f"rule): {left_out} keep the new tokens' rows of this model only; target them too, or "
                              f"train them whole (modules_to_save), for the adapter to carry them", UserWarning,
                              stacklevel=3)
            expected.update(peft_format.embedding_tables(model, targets))
            quantized = peft_format.quantized_tables(model, targets)  # the frozen base's, whatever state_dict says
        elif save_tables:
            tables, aliases = untargeted_tables(model, targets, wrappers, _trained_tokens(model, name))
            if not tables and not hasattr(model, "get_input_embeddings"):
                warnings.warn("Could not identify embedding layer(s) because the model is not a 🤗 transformers model.",
                              UserWarning, stacklevel=3)
            expected.update(tables)
        if state_dict is None:
            params = dict(named_parameters(model, remove_duplicate=False))  # a tied table under each name
            out = {key: params[param] for key, (param, _) in expected.items()}
        else:
            out = {key: _lookup(state_dict, param, name) for key, (param, _) in expected.items()}
        out = {**out, **{alias: out[key] for alias, key in aliases.items() if key in out}, **quantized}
        return {peft_format.file_path(key): tensor for key, tensor in out.items()}

    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor], adapter_name: str = "default",
                             ignore_mismatched_sizes: bool = False):
        """Copy ``tensors`` (PEFT's file keys) into the existing adapter ``adapter_name``; not strict, returns
        ``(missing_keys, unexpected_keys)`` as ``load_state_dict`` does.  Shapes are checked before any copy."""
        from torch.nn.modules.module import _IncompatibleKeys

        name = self._check_adapter_names([adapter_name])[0]
        if not isinstance(tensors, dict) or not all(isinstance(key, str) and isinstance(t, torch.Tensor)
                                                    and t.device.type != "meta" for key, t in tensors.items()):
            raise TypeError(f"an adapter state dict maps PEFT's keys (str) to tensors holding values (not on the meta "
                            f"device), got {_describe(tensors)}")
        model = self.get_base_model()
        targets, wrappers = peft_format.adapter_targets(model, name, self.peft_config[name])
        expected = peft_format.expected_tensors(model, self.peft_config[name], targets, wrappers, name)
        given = peft_format.with_model_paths(model, {
            key if key.startswith(peft_format.PREFIX) else peft_format.PREFIX + key: t for key, t in tensors.items()})
        tables, aliases = _tables_a_file_may_hold(model, targets, wrappers, _trained_tokens(model, name))
        expected.update({key: value for key, value in tables.items() if key in given})
        given = {key: t for key, t in given.items() if key not in aliases}
        usable, mismatched = {}, []
        for key, tensor in given.items():
            if key in expected:
                if tuple(tensor.shape) == expected[key][1]:
                    usable[key] = tensor
                else:
                    mismatched.append(f"{peft_format.file_path(key)}: {tuple(tensor.shape)} in the state dict, "
                                      f"{expected[key][1]} in the model")
        if mismatched and not ignore_mismatched_sizes:
            raise ValueError(f"size mismatch for adapter {name!r}: " + "; ".join(mismatched[:4]))
        if mismatched:
            warnings.warn(f"skipped tensors of the wrong size: {'; '.join(mismatched[:4])}", UserWarning, stacklevel=3)
        self._check_not_merged(name)
        _copy_values(model, {k: expected[k] for k in usable}, usable, restore_on_error=True)
        return _IncompatibleKeys(sorted(map(peft_format.file_path, set(expected) - set(usable))),
                                 sorted(map(peft_format.file_path, set(given) - set(expected))))

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: Optional[list[str]] = None, save_embedding_layers: Any = "auto",
                        is_main_process: bool = True, path_initial_model_for_weight_conversion: Optional[str] = None,
                        **kwargs: Any) -> None:
        """Write adapters in PEFT's format, each file atomically: ``default`` at the top of ``save_directory``,
        every other adapter in a sub-folder named after it (``selected_adapters``: which ones; default all),
        and a ``README.md`` model card.  ``safe_serialization=False`` writes ``adapter_model.bin``;
        ``state_dict=`` takes the values from that (full) state dict, e.g. one gathered by FSDP or DeepSpeed;
        ``is_main_process=False`` writes nothing.  ``path_initial_model_for_weight_conversion``: the directory
        where a PiSSA, OLoRA, LoRA-GA or CorDA adapter was saved right after creation; the adapters are saved as
        plain LoRA adapters of twice the rank for the original (unchanged) base weight
        (:mod:`fastlora.weight_conversion`)."""
        state_dict = kwargs.pop("state_dict", None)
        if kwargs:  # PEFT ignores what it does not know (transformers passes max_shard_size, for one)
            warnings.warn(f"save_pretrained ignored the keyword arguments {sorted(kwargs)}", UserWarning, stacklevel=2)
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown or not names:
            raise ValueError(f"selected_adapters must name adapters of this model ({list(self.peft_config)}), got "
                             f"{selected_adapters!r}")
        if Path(save_directory).is_file():
            raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
        if not is_main_process:
            return
        directories = {name: _adapter_directory(Path(save_directory), name) for name in names}
        weights_name = peft_format.WEIGHTS_NAME if safe_serialization else peft_format.WEIGHTS_BIN_NAME
        taken = [str(d / f) for d in directories.values() for f in (weights_name, peft_format.CONFIG_NAME)
                 if (d / f).is_dir()]
        if taken:  # checked before any adapter is written, as every other check
            raise ValueError(f"save_pretrained: {', '.join(taken)} is a folder where an adapter file goes; nothing "
                             f"was written")
        # any lookup error before writing
        tensors = {name: self.adapter_tensors(name, state_dict, save_embedding_layers) for name in names}
        configs = {name: self.peft_config[name] for name in names}
        if path_initial_model_for_weight_conversion is not None:  # a PiSSA / OLoRA / LoRA-GA / CorDA adapter
            if len(names) > 1:
                raise ValueError(f"path_initial_model_for_weight_conversion names one adapter's initial state, and "
                                 f"{names} would all be converted against it: pass selected_adapters=[<the adapter>]")
            quantized = base_kinds.QUANTIZED_LINEAR.adapted_type
            if any(isinstance(layer, quantized) for _, layer in self.lora_layers(names[0])):
                warnings.warn(r"Note that Quant(W_res) + AB != Quant(W) + \Delta(AB); the converted LoRA, when "
                              "combined with W or Quant(W), may introduce a certain gap in the fine-tuned model. "
                              "Therefore, we recommend directly using the Quant(W_res) in conjunction with the PiSSA "
                              "adapter.", UserWarning, stacklevel=2)
            for name in names:
                configs[name], tensors[name] = converted_for_the_original_weight(
                    configs[name], tensors[name], path_initial_model_for_weight_conversion)
        Path(save_directory).mkdir(parents=True, exist_ok=True)  # the card first, as PEFT writes it
        self.create_or_update_model_card(save_directory)
        base_name = self.get_base_model().__dict__.get("name_or_path") or None
        for name in names:
            directory = directories[name]
            config = configs[name].replace(inference_mode=True)
            if config.base_model_name_or_path is None and base_name:  # as PEFT fills it in when saving
                config = config.replace(base_model_name_or_path=base_name)
            if config.task_type is None:  # PEFT records the base model's class, which AutoPeftModel loads
                base_class = type(self.get_base_model())
                config = config.replace(auto_mapping={"base_model_class": base_class.__name__,
                                                      "parent_library": base_class.__module__})
            peft_format.write_adapter(directory, config, tensors[name], safe_serialization)

    def create_or_update_model_card(self, output_dir: str | os.PathLike) -> None:
        """Create or update ``output_dir/README.md`` with the metadata PEFT and the Hub read."""
        from fastlora.model_card import write_model_card

        task = self.active_peft_config.task_type
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        write_model_card(Path(output_dir), self.get_base_model(), task.value if task is not None else None)

    def push_to_hub(self, repo_id: str, *, commit_message: Optional[str] = None,
                    commit_description: Optional[str] = None, private: Optional[bool] = None, token=None,
                    revision: Optional[str] = None, create_pr: bool = False, max_shard_size: Any = None,
                    tags: Optional[list[str]] = None, safe_serialization: bool = True):
        """Save the adapter folder (as ``save_pretrained``: adapters and model card) and upload it to the Hugging
        Face Hub repository ``repo_id`` (created if needed) in one commit; returns the commit info."""
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, safe_serialization=safe_serialization)
            if tags:
                from huggingface_hub import ModelCard

                card = ModelCard.load(Path(tmp) / "README.md")
                card.data["tags"] = sorted(set(card.data.get("tags") or []) | set(tags), key=str)
                card.save(Path(tmp) / "README.md")
            return hub.upload_folder(tmp, repo_id, commit_message=commit_message or "Upload adapter",
                                     commit_description=commit_description, private=private, token=token,
                                     revision=revision, create_pr=create_pr)


def _describe(tensors) -> str:
    """A state dict's shape in words, for an error: its type, or its first entry that is not a key and a tensor."""
    if not isinstance(tensors, dict):
        return type(tensors).__name__
    key, value = next((k, v) for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)
                      or v.device.type == "meta")
    on_meta = isinstance(value, torch.Tensor) and value.device.type == "meta"
    return f"{key!r}: {type(value).__name__}" + (" on the meta device" if on_meta else "")


def _adapter_directory(save_directory: Path, adapter_name: str) -> Path:
    """Where ``adapter_name`` is saved: ``save_directory`` for "default", else its sub-folder named after the
    adapter, resolved and checked to lie inside ``save_directory`` (ValueError before anything is written)."""
    if adapter_name == "default":
        return save_directory
    check_adapter_name(adapter_name)
    root = save_directory.resolve()
    directory = (save_directory / adapter_name).resolve()
    if directory.parent != root:
        raise ValueError(f"adapter {adapter_name!r} would be saved in {directory}, outside {root}")
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"adapter {adapter_name!r} is saved in the folder {save_directory / adapter_name}, which is a "
                         f"file; nothing was written")
    return save_directory / adapter_name


_PLACEMENT_OPTIONS = ("device_map", "max_memory", "offload_folder", "offload_dir", "offload_index")


def _placement_options(model: nn.Module, kwargs: dict) -> None:
    """Take PEFT's placement keywords out of ``kwargs``.  PEFT uses them only to dispatch a model that
    accelerate offloads to the CPU or disk; fastlora creates each adapter on its layer's device, so they are
    accepted and have nothing to do, except for such an offloaded model, which is refused: its weights are not
    on a device while they wait, and adapters created beside them would not be either."""
    for name in _PLACEMENT_OPTIONS:
        kwargs.pop(name, None)
    placed = set(map(str, (getattr(model, "hf_device_map", None) or {}).values()))
    if "disk" in placed or ("cpu" in placed and len(placed) > 1):
        raise NotImplementedError(
            f"the model is dispatched with CPU or disk offload (hf_device_map places modules on {sorted(placed)}); "
            f"fastlora adapts models whose weights are on their devices: load it without offloading")


def _hub_kwargs(kwargs: dict, caller: str) -> dict:
    """The Hub's options among ``kwargs``; ``strict_adapter_check`` (PEFT 0.22's "warn", "error" or "ignore" for
    a file whose keys differ from the adapter's) is taken and checked, a file that differs being refused in any case;
    anything else is a TypeError."""
    check = kwargs.pop("strict_adapter_check", "error")
    if check not in ("warn", "error", "ignore"):
        raise ValueError(f"strict_adapter_check must be one of 'warn', 'error' or 'ignore', got {check!r}")
    hub_kwargs, rest = hub.split_hub_kwargs(kwargs)
    if rest:
        raise TypeError(f"{caller}() got unexpected keyword arguments {sorted(rest)}")
    return hub_kwargs


_LAYER_FIELDS = ("r", "lora_alpha", "use_rslora", "use_dora", "lora_bias")


def _check_config_describes_layers(model: nn.Module, config: LoraConfig, adapter_name: str, targets: list[str]) -> None:
    """Raise ValueError where ``adapter_name``'s config (a field assigned after the adapter was built) no longer
    describes its layers or its trainable-token rows: the file would record an adapter other than the one saved."""
    for name in targets:
        built, said = model.get_submodule(name).adapter_settings[adapter_name], config.settings_for(name)
        differ = [f"{field}={getattr(said, field)!r} (the layer: {getattr(built, field)!r})" for field in _LAYER_FIELDS
                  if getattr(said, field) != getattr(built, field)]
        if differ:
            raise ValueError(f"adapter {adapter_name!r}'s config says {', '.join(differ)} for {name}: a config field "
                             f"assigned after the adapter was created does not rebuild its layers; set it back, or "
                             f"create the adapter anew with that config")
    if plan_trainable_tokens(model, config, targets) != _trained_tokens(model, adapter_name):
        raise ValueError(f"adapter {adapter_name!r}'s config says trainable_token_indices="
                         f"{config.trainable_token_indices!r}, and the model trains the rows "
                         f"{_trained_tokens(model, adapter_name)}: a config field assigned after the adapter was created "
                         f"does not rebuild it; set it back, or create the adapter anew with that config")


def _trained_tokens(model: nn.Module, adapter_name: str) -> dict[str, list[int]]:
    """Table name → the rows ``adapter_name`` trains, of an adapted model's trainable-token tables."""
    return {n: m.token_indices[adapter_name] for n, m in model.named_modules()
            if isinstance(m, TrainableTokensWrapper) and not m.is_tied and adapter_name in m.token_indices}


def _planned_for_file(plan: Callable[[bool], tuple[list[str], list[str]]], config: LoraConfig,
                      tensors: dict[str, torch.Tensor], fits: Callable[[list[str], list[str]], object]
                      ) -> tuple[list[str], list[str]]:
    """(targets, modules_to_save) of a file's adapter: modules_to_save entries matched as PEFT matches them (the
    name or a dotted suffix), or by PEFT 0.21's rule (every name ending with the entry) where the file was written
    under it: one holding a copy of a module only that rule saves (``"norm"``'s ``input_layernorm``), or one the
    first rule refuses (``"layernorm"`` matches no module's dotted suffix) that fits the other's plan
    (``fits(targets, to_save)`` raises where the file does not).  ``plan(by_ending)`` makes a plan."""
    with warnings.catch_warnings():  # trials: the plan kept is made again below, saying what it says
        warnings.simplefilter("ignore")
        try:
            _, to_save = plan(False)
        except (TypeError, ValueError) as refusal:
            try:
                fits(*plan(True))
            except (TypeError, ValueError):
                raise refusal from None
            to_save = None
        if to_save is not None:
            try:
                _, saved_by_ending = plan(True)
            except (TypeError, ValueError):
                saved_by_ending = []
    if to_save is None:  # the rule of today refused, PEFT 0.21's fits the file
        return plan(True)

    inside_saved = tuple(f"{saved}." for saved in to_save)
    # a name both rules save (a tied head saved with its embeddings, say) tells nothing of the rule the file used
    written_by_ending = any(name not in to_save and not name.startswith(inside_saved) and _holds_copy(
        tensors, name, tuple(saved for saved in to_save if saved.startswith(name + "."))) for name in saved_by_ending)
    return plan(written_by_ending)


def _without_entries_matching_nothing(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor],
                                      where) -> LoraConfig:
    """``config`` without the modules_to_save entries that match no module of ``model`` as PEFT matches them now,
    nor, by PEFT 0.21's rule, a module the file holds a copy of (PEFT 0.22 saves nothing for such an entry, and
    writes it in its file), with a warning; task heads a model lacks stay (they are skipped)."""
    names = [n for n, _ in model.named_modules() if n]
    unmatched = [e for e in config.modules_to_save or [] if e not in task_heads(config)
                 and not any(saved_whole(n, [e]) for n in names)
                 and not any(_holds_copy(tensors, n) for n in names if saved_whole(n, [e], by_ending=True))]
    if not unmatched:
        return config
    warnings.warn(f"modules_to_save entries {unmatched} of the adapter in {str(where)!r} match no module of the model: "
                  f"left out (the file holds nothing of them)", UserWarning, stacklevel=3)
    return config.replace(modules_to_save=[e for e in config.modules_to_save if e not in unmatched] or None)


def _holds_copy(tensors: dict[str, torch.Tensor], name: str, inside: tuple[str, ...] = ()) -> bool:
    """Whether the file holds tensors of the module ``name`` itself (a modules_to_save copy), not an adapter's on
    it or inside it, nor those of the modules ``inside`` it that are saved whole on their own."""
    prefix = f"{peft_format.PREFIX}{name}."
    inner = tuple(f"{peft_format.PREFIX}{module}." for module in inside)
    return any(key.startswith(prefix) and not key.startswith(inner) and not any(
        part.startswith("lora_") or part == "base_layer" for part in key[len(prefix):].split(".")) for key in tensors)


def _without_layers_the_file_lacks(config: LoraConfig, targets: list[str], tensors: dict[str, torch.Tensor],
                                   where) -> tuple[list[str], LoraConfig]:
    """(targets, config) of a file without the planned layers it holds no tensor of, where that is how it was
    written; other targets are kept (a missing tensor is then an error):

    * EVA's file: PEFT records the adapted layers by their shortest suffixes without leaving the layers EVA removed
      out, so its ``target_modules`` can match layers the file lacks; the config then names the layers adapted;
    * a module named in full in ``target_modules`` outside ``layers_to_transform``: an earlier fastlora applied the
      layer filter to it too (PEFT takes it whatever its layer); the config then leaves that name out, with a
      warning."""
    held = peft_format.adapted_module_paths(tensors)
    if config.init_lora_weights == "eva":
        kept = [name for name in targets if name in held]
        return (targets, config) if len(kept) == len(targets) else (kept, config.replace(target_modules=kept))
    if isinstance(config.target_modules, str):
        return targets, config
    filtered = [name for name in targets if name not in held and name in config.target_modules
                and outside_layers_to_transform(name, config)]
    if not filtered:
        return targets, config
    warnings.warn(f"the adapter in {str(where)!r} names {filtered} in full in target_modules, outside "
                  f"layers_to_transform={config.layers_to_transform}, and holds no tensors of them (an earlier fastlora "
                  f"left such modules unadapted): left out", UserWarning, stacklevel=4)
    return ([name for name in targets if name not in filtered],
            config.replace(target_modules=[name for name in config.target_modules if name not in filtered]))


def _check_same_adapter(model: nn.Module, adapter_name: str, have: LoraConfig, file: LoraConfig) -> None:
    """Loading values into an existing adapter: the file must describe the same adapter (``target_modules`` naming
    the same modules of ``model``: a list in full and its shortest suffixes alike)."""
    for field in ("r", "lora_alpha", "use_rslora", "target_modules", "bias", "modules_to_save", "layer_replication"):
        if field == "target_modules" and names_the_same_modules(model, have.target_modules, file.target_modules):
            continue
        if getattr(have, field) != getattr(file, field):
            raise ValueError(
                f"adapter {adapter_name!r} exists with {field}={getattr(have, field)!r} but the file has "
                f"{getattr(file, field)!r}; delete_adapter() it first or load under another name"
            )


def _check_layout(model: nn.Module, config: LoraConfig, targets: list[str], where) -> None:
    """A file saved from Conv1D layers (fan_in_fan_out=True: GPT-2 style, weight stored in × out) does not load
    onto a model whose targets are all Linear: shapes can agree while the models differ.  (A file that says
    False loads onto Conv1D layers, with PEFT's warning: PEFT's files from before it recorded the flag.)"""
    kinds = {base_kinds.is_conv1d_target(model.get_submodule(name)) for name in targets}
    if config.fan_in_fan_out and kinds == {False}:
        raise ValueError(f"{where}: the adapter was saved from Conv1D layers (fan_in_fan_out=True, weights stored "
                         f"in × out, as GPT-2's) but this model's targets are Linear layers: a different model")


# the module names PEFT's save_embedding_layers="auto" looks for in target_modules
_EMBEDDING_NAMES = ("embed_tokens", "lm_head")


def _names_an_embedding(config: LoraConfig) -> bool:
    """PEFT's "auto" rule: target_modules (a list) names embed_tokens or lm_head, or (a regex) matches a module
    path ending in one of them."""
    targets = config.target_modules
    if isinstance(targets, str):
        return targets != "all-linear" and any(re.fullmatch(targets, f"model.{n}") or re.fullmatch(targets, n)
                                               for n in _EMBEDDING_NAMES)
    return any(n in (targets or []) for n in _EMBEDDING_NAMES)


def _checked(model: nn.Module, config: LoraConfig, targets: list[str], to_save: list[str], adapter_name: str,
             tensors: dict[str, torch.Tensor], where) -> tuple[peft_format.Expected, dict[str, torch.Tensor]]:
    """The tensors an adapter file must hold for this plan, and the file's tensors checked against them."""
    _check_layout(model, config, targets, where)
    check_not_per_expert(model, tensors, where)
    expected = peft_format.expected_tensors(model, config, targets, to_save, adapter_name)
    expected, tensors = without_tied_head_factors(model, config, expected, tensors, where)
    # an embedding table PEFT saved beside the adapter (save_embedding_layers) is loaded, as PEFT loads it
    tensors = peft_format.without_quantized_tables(model, targets, tensors, where)
    tables, table_aliases = _tables_a_file_may_hold(model, targets, to_save, plan_trainable_tokens(model, config, targets))
    check_vocabulary_size(tables, tensors, where)
    expected.update({k: v for k, v in tables.items() if k in tensors})
    tensors = peft_format.with_bias_spellings(expected, tensors)
    expected = peft_format.without_other_layers_missing_biases(expected, tensors, config, targets)
    aliases = {**peft_format.peft_bias_aliases(model, config, to_save),
               **{alias: key for alias, key in table_aliases.items() if key in expected}}
    if config.bias != "none":
        others = peft_format.other_layers_biases(model, expected, tensors, where)
        aliases.update({key: None for key in others if key not in aliases})  # a repeat of this adapter's is checked
    peft_format.check_tensors(expected, tensors, where, aliases)
    return expected, tensors


def _tables_a_file_may_hold(model: nn.Module, targets: list[str], to_save: list[str],
                            tokens) -> tuple[peft_format.Expected, dict[str, str]]:
    """The embedding tables PEFT may save beside an adapter (targeted ones, or a resized vocabulary's), and the keys
    PEFT writes as repeats of others: what a file read for this plan may hold besides the adapter's tensors."""
    tables = peft_format.embedding_tables(model, targets)
    untargeted, aliases = untargeted_tables(model, targets, to_save, tokens)
    tables.update(untargeted)
    return tables, aliases


def _copy_values(model: nn.Module, expected: peft_format.Expected, tensors: dict[str, torch.Tensor],
                 restore_on_error: bool = False) -> None:
    """Copy each file tensor into its parameter.  ``restore_on_error``: the parameters already hold values the
    model uses, so an error part way puts back the ones already overwritten."""
    params = dict(named_parameters(model, remove_duplicate=False))  # a tied table under each name
    done: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        try:
            for key, (param_name, _) in expected.items():
                param = params[param_name]
                if restore_on_error:
                    done.append((param, param.detach().clone()))
                _copy_one(param, tensors[key])
        except BaseException:
            for param, old in done:
                param.copy_(old)
            raise


def _copy_one(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value)


def _lookup(state_dict: dict[str, torch.Tensor], param_name: str, adapter_name: str) -> torch.Tensor:
    """``param_name`` of the adapted model in a state dict of the PeftModel (or of the adapted model)."""
    path = peft_format.file_path(param_name)  # a wrapper's state dict (FSDP's, gathered) leaves its level out
    for key in dict.fromkeys((f"base_model.model.{param_name}", param_name, f"base_model.model.{path}", path)):
        if key in state_dict:
            return state_dict[key]
    raise ValueError(
        f"the state_dict given to save adapter {adapter_name!r} has no entry for {param_name!r} (gathered without "
        f"frozen parameters? pass selected_adapters=[...] naming the adapters it holds)"
    )


def load_peft_weights(model_id: str | os.PathLike, device: Optional[str] = None, key_mapping: Optional[dict] = None,
                      **hub_kwargs) -> dict[str, torch.Tensor]:
    """An adapter file's tensors under PEFT's file keys, as :func:`set_peft_model_state_dict` takes them.

    Args:
        model_id (str | PathLike): a directory holding ``adapter_model.safetensors`` (or ``adapter_model.bin``), or
            a Hub repository id.
        device (str | None): where to put the tensors; None: CUDA where available, else the CPU (PEFT's choice).
        key_mapping (dict | None): PEFT's renaming of keys; only None (renaming keys is not supported).
        hub_kwargs: ``revision``, ``token``, ``cache_dir``, ``local_files_only``, ``subfolder``, ... for the Hub.

    Returns a dict of file keys to tensors.

    PEFT equivalent: ``peft.load_peft_weights``.

    Example:
        >>> from fastlora import load_peft_weights, set_peft_model_state_dict
        >>> tensors = load_peft_weights("path/to/adapter", device="cpu")  # doctest: +SKIP
        >>> set_peft_model_state_dict(model, tensors, adapter_name="other")  # doctest: +SKIP
    """
    if key_mapping:
        raise NotImplementedError("load_peft_weights(key_mapping=...): renaming an adapter file's keys is not "
                                  "supported by fastlora")
    tensors = peft_format.read_weights(model_id, **_hub_kwargs(hub_kwargs, "load_peft_weights"))
    device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return {key: tensor.to(device) for key, tensor in tensors.items()}

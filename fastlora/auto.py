"""``AutoPeftModelForCausalLM`` and its siblings: an adapter folder (or Hub id) in, the adapted model out, as PEFT's
``peft.AutoPeftModelFor*``.  The adapter's ``adapter_config.json`` names its base model
(``base_model_name_or_path``, ``revision``); transformers' auto class for the adapter's task loads it, with every
keyword that is not the adapter's own (``dtype``, ``device_map``, ``quantization_config``, ...); a tokenizer saved
beside the adapter with more tokens than the base has embedding rows grows the embeddings first, as PEFT does; then
:meth:`fastlora.PeftModel.from_pretrained` loads the adapter onto it with fastlora's layers.

    from fastlora import AutoPeftModelForCausalLM     # was: from peft import AutoPeftModelForCausalLM
    model = AutoPeftModelForCausalLM.from_pretrained("out/final", dtype=torch.bfloat16)
    merged = model.merge_and_unload()
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Optional

from fastlora.config import LoraConfig, TaskType
from fastlora.hub import resolve_file, split_hub_kwargs
from fastlora.model import PeftModel

__all__ = ["AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForSeq2SeqLM",
           "AutoPeftModelForSequenceClassification", "AutoPeftModelForTokenClassification",
           "AutoPeftModelForQuestionAnswering", "AutoPeftModelForFeatureExtraction"]

# The libraries a task-less adapter's ``auto_mapping`` may import its base class from (PEFT's default allowlist
# holds these and a few others fastlora does not adapt models of).
DEFAULT_IMPORT_ALLOWLIST = ("transformers",)


_FROM_PRETRAINED_DOC = """
    ``from_pretrained(pretrained_model_name_or_path, adapter_name="default", is_trainable=False, config=None,
    revision=None, import_allowlist=None, **kwargs)`` returns a :class:`fastlora.PeftModel`.

    Args:
        pretrained_model_name_or_path (str | PathLike): the adapter's folder or Hub repository id.
        adapter_name (str): the name the adapter gets.  Default "default".
        is_trainable (bool): load it trainable; False freezes it and puts the model in eval mode.  Default False.
        config (LoraConfig | None): replaces the adapter's own config (its base model is still the file's).
        revision (str | None): the adapter repository's revision (the base model's is the config's ``revision``).
        import_allowlist (list[str] | None): the libraries a task-less adapter's ``auto_mapping`` may import its
            base class from.  Default ``("transformers",)``.
        **kwargs: ``token``, ``cache_dir``, ``local_files_only``, ``force_download``, ``proxies`` go to both
            downloads, ``subfolder`` to the adapter's; every other keyword (``dtype``, ``device_map``,
            ``quantization_config``, ``trust_remote_code``, ...) to the base model's ``from_pretrained``.

    Raises ValueError when the config names no base model, or its task is not the class's.

    PEFT equivalent: ``peft.{peft}``.

    Example:
        >>> from fastlora import {this}
        >>> model = {this}.from_pretrained("out/final")  # doctest: +SKIP
"""


class AutoPeftModel:
    __doc__ = """Loads an adapter saved without a task type, the base model's class taken from the config's
    ``auto_mapping`` (``{"base_model_class": ..., "parent_library": ...}``, which PEFT records for such adapters).
    The ``AutoPeftModelFor*`` classes load an adapter of their task (``task_type``) with transformers' class for it.
    Built with ``from_pretrained`` only.
""" + _FROM_PRETRAINED_DOC.format(peft="AutoPeftModel", this="AutoPeftModel")

    task_type: Optional[TaskType] = None
    transformers_class: Optional[str] = None  # the name of transformers' auto class for ``task_type``

    def __init__(self, *args, **kwargs):
        raise OSError(f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(adapter)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[LoraConfig] = None,
                        revision: Optional[str] = None, import_allowlist: Optional[list[str]] = None,
                        **kwargs: Any) -> PeftModel:
        """The base model named by the adapter's config, loaded by transformers, with the adapter loaded onto it
        (the arguments: see the class)."""
        hub_kwargs, model_kwargs = split_hub_kwargs({**kwargs, "revision": revision})
        adapter_config = LoraConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        base_model_path = adapter_config.base_model_name_or_path
        if not base_model_path:
            raise ValueError(f"the adapter in {str(pretrained_model_name_or_path)!r} names no base model "
                             f"(base_model_name_or_path): load the base model yourself and call "
                             f"PeftModel.from_pretrained(model, adapter)")
        model_class = cls._base_model_class(adapter_config, import_allowlist)
        shared = {k: v for k, v in hub_kwargs.items() if k not in ("revision", "subfolder")}
        base = model_class.from_pretrained(base_model_path, revision=adapter_config.revision, **shared, **model_kwargs)
        _grow_embeddings_for_the_saved_tokenizer(base, pretrained_model_name_or_path, hub_kwargs,
                                                 model_kwargs.get("trust_remote_code", False))
        return PeftModel.from_pretrained(base, pretrained_model_name_or_path, adapter_name=adapter_name,
                                         is_trainable=is_trainable, config=config, **hub_kwargs)

    @classmethod
    def _base_model_class(cls, adapter_config: LoraConfig, import_allowlist: Optional[list[str]]) -> type:
        import transformers

        task_type = adapter_config.task_type
        task = None if task_type is None else TaskType(task_type)
        if task is not None:
            if cls.task_type is None:
                raise ValueError(f"AutoPeftModel loads adapters without a task type; this one's is {task.value!r}: "
                                 f"use {_CLASS_OF_TASK[task].__name__}")
            if task != cls.task_type:
                raise ValueError(f"the adapter's task_type is {task.value!r}, not {cls.task_type.value!r}: load it "
                                 f"with {_CLASS_OF_TASK[task].__name__}")
            return getattr(transformers, cls.transformers_class)
        # no task type (any class, as PEFT): the base model's class is the one auto_mapping names
        mapping = adapter_config.auto_mapping or {}
        library, class_name = mapping.get("parent_library"), mapping.get("base_model_class")
        if not library or not class_name:
            raise ValueError("the adapter has neither a task_type nor an auto_mapping naming its base model's class: "
                             "load the base model yourself and call PeftModel.from_pretrained(model, adapter)")
        allowed = tuple(import_allowlist) if import_allowlist is not None else DEFAULT_IMPORT_ALLOWLIST
        if not any(library == name or library.startswith(name + ".") for name in allowed):
            raise ValueError(f"the adapter's auto_mapping imports {library!r}, which is not in the import allowlist "
                             f"{list(allowed)}: pass import_allowlist=[{library!r}] if that library is safe to import")
        return getattr(importlib.import_module(library), class_name)


def _grow_embeddings_for_the_saved_tokenizer(base, adapter, hub_kwargs: dict, trust_remote_code: bool) -> None:
    """PEFT's step: a tokenizer saved beside the adapter with more tokens than the base has embedding rows (tokens
    added while training) grows the embeddings to its length, so that the adapter's tables fit."""
    get = getattr(base, "get_input_embeddings", None)
    if not callable(get) or resolve_file(adapter, "tokenizer_config.json", missing_ok=True, **hub_kwargs) is None:
        return
    from transformers import AutoTokenizer

    tokenizer_kwargs = {k: v for k, v in hub_kwargs.items() if k in ("revision", "token", "cache_dir", "subfolder",
                                                                     "local_files_only")}
    tokenizer = AutoTokenizer.from_pretrained(adapter, trust_remote_code=trust_remote_code, **tokenizer_kwargs)
    if len(tokenizer) > get().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))


def _for_task(task: TaskType, transformers_class: str) -> type:
    name = "AutoPeftModelFor" + transformers_class.removeprefix("AutoModelFor") if transformers_class != "AutoModel" \
        else "AutoPeftModelForFeatureExtraction"
    return type(name, (AutoPeftModel,), {
        "task_type": task, "transformers_class": transformers_class, "__module__": __name__, "__qualname__": name,
        "__doc__": f"Loads an adapter of task_type={task.value!r} onto transformers' ``{transformers_class}``.\n"
                   + _FROM_PRETRAINED_DOC.format(peft=name, this=name)})


AutoPeftModelForCausalLM = _for_task(TaskType.CAUSAL_LM, "AutoModelForCausalLM")
AutoPeftModelForSeq2SeqLM = _for_task(TaskType.SEQ_2_SEQ_LM, "AutoModelForSeq2SeqLM")
AutoPeftModelForSequenceClassification = _for_task(TaskType.SEQ_CLS, "AutoModelForSequenceClassification")
AutoPeftModelForTokenClassification = _for_task(TaskType.TOKEN_CLS, "AutoModelForTokenClassification")
AutoPeftModelForQuestionAnswering = _for_task(TaskType.QUESTION_ANS, "AutoModelForQuestionAnswering")
AutoPeftModelForFeatureExtraction = _for_task(TaskType.FEATURE_EXTRACTION, "AutoModel")

_CLASS_OF_TASK = {c.task_type: c for c in (
    AutoPeftModelForCausalLM, AutoPeftModelForSeq2SeqLM, AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification, AutoPeftModelForQuestionAnswering, AutoPeftModelForFeatureExtraction)}

"""The embedding tables saved beside an adapter when the vocabulary was resized during fine-tuning (new tokens for
a chat template, say), as PEFT saves and loads them: without them, the adapter loaded onto a freshly resized
base meets other rows for the new tokens than the ones it was trained with.

``save_pretrained(save_embedding_layers="auto")`` saves them where the model's ``config.vocab_size`` differs from
the base checkpoint's (its ``config.json``, read from the directory or the Hugging Face cache, never downloaded);
``True`` always.  Where ``target_modules`` names an embedding (``embed_tokens`` / ``lm_head``), PEFT saves the
targeted tables instead (:func:`fastlora.peft_format.embedding_tables`).  The keys, for the model's input and
output embeddings, by what the module became:

=============================  ===================================================================================
a plain table or head          ``<path>.weight``
a ``modules_to_save`` module   ``<path>.original_module.weight`` (the frozen original); the trained copy is
                               ``<path>.weight`` already, repeated as ``<path>.modules_to_save.weight``
``trainable_token_indices``    ``<path>.token_adapter.base_layer.weight``; a head tied to such a table repeats
                               its trained rows as ``<path>.token_adapter.trainable_tokens_delta``
a LoRA layer                   ``<path>.base_layer.weight``
=============================  ===================================================================================

Loading copies each table a file holds into the model, after checking that the model's vocabulary has the
file's size.
"""

from __future__ import annotations

import warnings
from typing import Mapping

import torch
from torch import nn

from fastlora.module_names import named_parameters
from fastlora.base_kinds import is_adapted
from fastlora.modules_to_save import ModulesToSaveWrapper
from fastlora.peft_format import PREFIX, Expected, embedding_modules, embedding_tables
from fastlora.targets import output_head
from fastlora.trainable_tokens import TrainableTokensWrapper

__all__ = ["vocabulary_resized", "untargeted_tables", "untargeted_embeddings", "check_vocabulary_size"]


def vocabulary_resized(model: nn.Module, base_name_or_path: str | None, announce: bool = True) -> bool:
    """Whether ``model.config.vocab_size`` differs from the base checkpoint's (with PEFT's warning when it does and
    ``announce``).  A base whose config cannot be read locally is taken as not resized, with a warning saying how to
    save the tables anyway."""
    config = getattr(model, "config", None)
    vocab_size = getattr(config, "vocab_size", None)
    read = getattr(type(config), "from_pretrained", None)
    if not vocab_size or not base_name_or_path or read is None:
        return False
    try:  # the directory, or the Hub cache a model loaded by name left behind: never the network at save time
        base_vocab = getattr(read(str(base_name_or_path), local_files_only=True), "vocab_size", None)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        if announce:
            warnings.warn(f"could not read the base model's config.json at {base_name_or_path!r} (locally or in the "
                          f"Hugging Face cache) to see whether the vocabulary was resized: the embedding tables are "
                          f"not saved with the adapter; pass save_embedding_layers=True to save them", UserWarning,
                          stacklevel=5)
        return False
    if base_vocab is None or base_vocab == vocab_size:
        return False
    if announce:
        warnings.warn("Setting `save_embedding_layers` to `True` as the embedding layer has been resized during "
                      "finetuning.", UserWarning, stacklevel=5)
    return True


def untargeted_embeddings(model: nn.Module, targets: list[str]) -> list[str]:
    """The names of the model's input and output embeddings that are not LoRA targets."""
    return [name for name, module in embedding_modules(model) if name not in targets and not is_adapted(module)]


def untargeted_tables(model: nn.Module, targets: list[str], to_save: list[str],
                      tokens: Mapping[str, object]) -> tuple[Expected, dict[str, str]]:
    """The model's input and output embeddings under the keys PEFT saves them with where no embedding is a target:
    (file key → (parameter once adapted, shape), alias key → the file key it repeats).  Works on the model before
    or after adaptation (``targets``, ``to_save`` and ``tokens``: the adapter's LoRA targets, modules_to_save and
    trainable-token tables)."""
    tables: Expected = {}
    aliases: dict[str, str] = {}
    head = output_head(model)
    head_rows = any(model.get_submodule(n) is head for n in tokens)  # a head with rows of its own is not tied
    owner_of_tied_head = next((n for n in tokens if head is not None and not isinstance(head, TrainableTokensWrapper)
                               and not head_rows and getattr(head, "weight", None) is _table(model.get_submodule(n))),
                              None)
    for name, module in embedding_modules(model):
        prefix = f"{PREFIX}{name}."
        if name in targets or is_adapted(module):
            tables.update(embedding_tables(model, [name]))
        elif name in to_save or isinstance(module, ModulesToSaveWrapper):
            original = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
            for pname, param in named_parameters(original):
                if param.is_floating_point():
                    tables[f"{prefix}original_module.{pname}"] = (f"{name}.original_module.{pname}", tuple(param.shape))
                    if name in to_save:
                        aliases[f"{prefix}modules_to_save.{pname}"] = f"{prefix}{pname}"
        elif name in tokens or isinstance(module, TrainableTokensWrapper) or (
                module is head and owner_of_tied_head is not None):
            table = _table(module)
            if table is not None and table.is_floating_point():
                tables[f"{prefix}token_adapter.base_layer.weight"] = (f"{name}.base_layer.weight", tuple(table.shape))
            owner = owner_of_tied_head if module is head and owner_of_tied_head is not None else _tied_owner(model, module)
            if owner is not None:
                aliases[f"{prefix}token_adapter.trainable_tokens_delta"] = (
                    f"{PREFIX}{owner}.token_adapter.trainable_tokens_delta")
        else:
            for pname, param in named_parameters(module):
                if param.is_floating_point():
                    tables[f"{prefix}{pname}"] = (f"{name}.{pname}", tuple(param.shape))
    return tables, aliases


def _table(module: nn.Module) -> torch.Tensor | None:
    return getattr(getattr(module, "base_layer", module), "weight", None)


def _tied_owner(model: nn.Module, module: nn.Module) -> str | None:
    """The name of the table whose trained rows a tied head's wrapper reads, None for any other module."""
    if not (isinstance(module, TrainableTokensWrapper) and module.is_tied):
        return None
    return next((n for n, m in model.named_modules() if m is module.owner), None)


def check_vocabulary_size(tables: Expected, tensors: Mapping[str, torch.Tensor], where) -> None:
    """Raise ValueError where a file's embedding table has another number of rows than the model's (the
    vocabulary was resized before training, and the model was not resized the same way)."""
    for key, (_, shape) in tables.items():
        tensor = tensors.get(key)
        if isinstance(tensor, torch.Tensor) and tensor.dim() == len(shape) == 2 and tensor.shape[1] == shape[1] \
                and tensor.shape[0] != shape[0]:
            raise ValueError(
                f"the adapter in {where} was trained on a vocabulary of {tensor.shape[0]} tokens (its embedding tables "
                f"are saved with it), and this model's has {shape[0]}: resize the model's token embeddings first "
                f"(model.resize_token_embeddings({tensor.shape[0]}), or len(tokenizer) of the tokenizer saved with "
                f"the adapter)")

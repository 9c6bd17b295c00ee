"""PEFT's ``ensure_weight_tying``: an output head that shares its table with the input embeddings
(``tie_word_embeddings``) keeps sharing what an adapter trains there.

A tied pair is the input embedding table E (vocab × dim) and a head computing ``logits = h Eᵀ`` from the same tensor.
Training one side alone unties them; with ``ensure_weight_tying=True`` fastlora, as PEFT, ties:

* ``modules_to_save`` naming either side: the embedding's trainable copy E' is made, and the head's copy computes
  with E' itself (one parameter, trained once, saved under both names);
* ``target_modules`` naming either side: the embedding gets the adapter (A: r × vocab, B: dim × r, update
  ``scaling · (B A)ᵀ`` to E) and the head's adapter is its transpose, ``A_head = Bᵀ``, ``B_head = Aᵀ``, so the head's
  update ``scaling · B_head A_head`` is the same matrix.  As in PEFT the head's factors are their own parameters
  sharing the embedding's storage: each receives its own gradient and an optimizer steps both (for plain SGD the
  same as one tied parameter; Adam and weight decay step the shared values twice a step, as PEFT's).  A merge adds
  the update to the shared table once (PEFT's adds it twice);
* ``trainable_token_indices``: a head listed with the embedding's rows shares them (PEFT ties these even without the
  flag); with other rows the flag is an error.

What triggers the tie is PEFT's rule (an entry naming ``embed_tokens`` or ``lm_head``, or the embeddings'
qualified name where PEFT's rewrite put it), and so is the rewrite of the config: the embedding is added to
``modules_to_save`` / ``target_modules`` and the tied head taken out (it is tied, not adapted on its own), which is
what ``adapter_config.json`` records.  Which modules are tied is read from the model itself: those computing with
the input embeddings' table.
"""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from fastlora.base_kinds import peft_factor_keys
from fastlora.config import LoraConfig
from fastlora.layer import LoRALinear, peft_reset_
from fastlora.modules_to_save import ModulesToSaveWrapper
from fastlora.trainable_tokens import TrainableTokensWrapper

__all__ = ["tied_with_input_embeddings", "with_weight_tying", "tied_heads", "tie_targets", "tie_copies", "retie",
           "without_tied_head_factors", "is_embedding", "untied_where_the_file_is"]

# The inits that draw factors from the generator only; the others change or read the shared base weight.
_TIEABLE_INITS = (True, False, "gaussian")

NOT_TIED_WARNING = (
    "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but `ensure_weight_tying` is not "
    "set to True. This can lead to complications, for example when merging the adapter or converting your model to "
    "formats other than safetensors. Check the discussion here: https://github.com/huggingface/peft/issues/2777")


def _unwrapped(module: nn.Module) -> nn.Module:
    """The module a wrapper holds (a modules_to_save original, a token wrapper's base), else the module."""
    while isinstance(module, (ModulesToSaveWrapper, TrainableTokensWrapper)):
        module = module.original_module if isinstance(module, ModulesToSaveWrapper) else module.base_layer
    return module


def _table(module: nn.Module) -> torch.Tensor | None:
    return getattr(_unwrapped(module), "weight", None)


def tied_with_input_embeddings(model: nn.Module) -> tuple[str | None, list[str]]:
    """(the input embeddings' qualified name, the names of the other modules computing with its table), read from
    the parameters themselves; (None, []) for a model without ``get_input_embeddings``."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        embedding = None
    name = next((n for n, m in model.named_modules() if embedding is not None and m is embedding), None)
    table = _table(embedding) if name is not None else None
    if table is None:
        return None, []
    tied: list[str] = []
    inside = [name]  # never a module inside the embedding or inside a module already found (a layer's base_layer)
    for other, module in model.named_modules():
        if not other or other == name or any(other.startswith(n + ".") for n in inside):
            continue
        if isinstance(module, (ModulesToSaveWrapper, TrainableTokensWrapper)) or _table(module) is table:
            inside.append(other)
            if _table(module) is table:
                tied.append(other)
    return name, tied


# The names PEFT's rule looks for in a config's entries (an entry's last component, or what a regex matches whole).
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def _names(config: LoraConfig, embedding: str) -> tuple[bool, bool]:
    """(a modules_to_save entry names the embeddings or the head, target_modules does), by PEFT's rule: an entry
    whose last component is ``embed_tokens`` or ``lm_head``, a regex matching one of those names whole, and, so that
    a saved config reads as it was written, the embeddings' qualified name where PEFT's rewrite put it."""
    def names(entry: str) -> bool:
        return entry.split(".")[-1] in EMBEDDING_LAYER_NAMES or entry == embedding

    saved = any(names(m) for m in config.modules_to_save or [])
    targets = config.target_modules
    if isinstance(targets, str):
        adapted = targets != "all-linear" and (any(re.fullmatch(targets, n) for n in EMBEDDING_LAYER_NAMES)
                                               or _rewritten(targets, embedding))
    else:
        adapted = any(names(m) for m in targets or [])
    return saved, adapted


def _rewritten(pattern: str, embedding: str) -> bool:
    """Whether a target_modules regex is one PEFT's rewrite made (it ends naming the embeddings)."""
    return pattern.endswith(f"|^{re.escape(embedding)}$)")


def is_embedding(module: nn.Module) -> bool:
    """An embedding table (adapted or not): a module reading the tied table as its input, not an output head."""
    module = _unwrapped(module)
    return isinstance(module, nn.Embedding) or isinstance(getattr(module, "base_layer", None), nn.Embedding)


def _without_entries_for(entries: list[str], tied: list[str]) -> list[str]:
    """``entries`` without, for each tied name, the first entry naming it (PEFT's rule)."""
    entries = list(entries)
    for key in tied:
        found = next((m for m in entries if re.match(rf"(^|.*\.){m}($|\..*)", key)), None)
        if found is not None:
            entries.remove(found)
    return entries


def with_weight_tying(config: LoraConfig, model: nn.Module) -> LoraConfig:
    """``config`` as PEFT rewrites it for ``ensure_weight_tying`` on ``model``: the input embeddings added to
    ``modules_to_save`` (or else ``target_modules``) and the tied heads taken out; with PEFT's warnings where the flag
    ties nothing, or where a tied module is adapted without it."""
    named = _names(config, "")
    if not (config.ensure_weight_tying or any(named)):
        return config  # nothing to tie or warn about: the model is not even read
    embedding, tied = tied_with_input_embeddings(model)
    saved, adapted = _names(config, embedding) if tied else (False, False)
    if not config.ensure_weight_tying:
        if saved or adapted:
            warnings.warn(NOT_TIED_WARNING, UserWarning, stacklevel=4)
        return config
    if not tied:
        warnings.warn("You have requested `ensure_weight_tying`, but no tied modules were found in the model",
                      UserWarning, stacklevel=4)
        if config.trainable_token_indices:
            warnings.warn("ensure_weight_tying=True but the model does not have tied weights (tie_word_embeddings="
                          "False). Weight tying will not be applied for trainable_token_indices.", UserWarning,
                          stacklevel=4)
        return config
    if saved:
        entries = list(config.modules_to_save or [])
        entries += [] if embedding in entries else [embedding]
        return config.replace(modules_to_save=_without_entries_for(entries, tied))
    if adapted:
        targets = config.target_modules
        if isinstance(targets, str):  # (rewritten once: a saved config reads back as it was written)
            return config if _rewritten(targets, embedding) else config.replace(
                target_modules=rf"(?:{targets}|^{re.escape(embedding)}$)")
        entries = list(targets) + ([] if embedding in targets else [embedding])
        return config.replace(target_modules=_without_entries_for(entries, tied))
    warnings.warn("You have requested `ensure_weight_tying`, but no tied modules are added in either "
                  "`modules_to_save` or `target_modules`", UserWarning, stacklevel=4)
    return config


def tied_heads(config: LoraConfig, model: nn.Module) -> tuple[str | None, str | None, list[str]]:
    """(how the heads are tied: "modules_to_save", "target_modules" or None; the embedding's name; the tied
    modules' names) for a config :func:`with_weight_tying` has rewritten.  Every one is adapted (target_modules)
    or computes with the embeddings' trained copy (modules_to_save); an adapter is shared with the heads only, other
    embedding tables computing with the table (an encoder-decoder's) getting adapters of their own, as in PEFT."""
    if not config.ensure_weight_tying:
        return None, None, []
    embedding, tied = tied_with_input_embeddings(model)
    if not tied:
        return None, embedding, []
    saved, adapted = _names(config, embedding)
    if saved:
        return "modules_to_save", embedding, tied
    if adapted:
        return "target_modules", embedding, tied
    return None, embedding, []


def tie_targets(model: nn.Module, config: LoraConfig, adapter_name: str, embedding: str, heads: list[str]) -> None:
    """Tie each head's new adapter to the embeddings' (:func:`tie_adapter_factors`), both layers built; refused
    (ValueError / TypeError, for the caller to undo) where the head could not share the embeddings' factors: an
    initialisation that reads or changes the shared table, another rank or scaling, a head of another kind, or
    embeddings without that adapter (left out by exclude_modules, say)."""
    if config.init_lora_weights not in _TIEABLE_INITS:
        raise ValueError(f"ensure_weight_tying with init_lora_weights={config.init_lora_weights!r}: a head sharing "
                         f"the embeddings' adapter starts from drawn factors (True, False or 'gaussian'); the other "
                         f"initialisations read or change the table {heads} share with {embedding}, or give each "
                         f"layer factors of its own")
    owner = model.get_submodule(embedding)
    if not (isinstance(owner, LoRALinear) and adapter_name in owner.adapter_settings):
        raise ValueError(f"ensure_weight_tying: {heads} share their table with {embedding}, which this config does "
                         f"not adapt (exclude_modules or layers_to_transform leave it out): there is no adapter to tie "
                         f"them to")
    for name in heads:
        head = model.get_submodule(name)
        if type(head) is not LoRALinear:
            raise TypeError(f"ensure_weight_tying: the head {name} tied to {embedding} is a {type(head).__name__}; "
                            f"only a Linear head can share the embeddings' adapter")
        ours, theirs = head.adapter_settings[adapter_name], owner.adapter_settings[adapter_name]
        if (ours.r, ours.scaling) != (theirs.r, theirs.scaling):
            raise ValueError(f"ensure_weight_tying: {name} (r={ours.r}, lora_alpha={ours.lora_alpha}) and {embedding} "
                             f"(r={theirs.r}, lora_alpha={theirs.lora_alpha}) share one adapter and need the same r "
                             f"and lora_alpha; make rank_pattern / alpha_pattern give them the same")
        tie_adapter_factors(head, owner, adapter_name, config.init_lora_weights)


@torch.no_grad()
def tie_adapter_factors(head: LoRALinear, embedding: LoRALinear, adapter_name: str, init_lora_weights) -> None:
    """Make the head's factors of ``adapter_name`` (built with ``init_lora_weights=False``: only drawn as
    constructed) the transposes of the embedding's, ``A_head = Bᵀ``, ``B_head = Aᵀ``, sharing storage, then
    initialise them there as PEFT's head does (its initialisation lands in the shared factors; False keeps the
    embedding's)."""
    A, B = head.lora_factors(adapter_name)
    emb_A, emb_B = embedding.lora_factors(adapter_name)
    head.tie_factors(adapter_name, embedding, nn.Parameter(emb_B.t(), requires_grad=A.requires_grad),
                     nn.Parameter(emb_A.t(), requires_grad=B.requires_grad))
    peft_reset_(*head.lora_factors(adapter_name), None, init_lora_weights, head.adapter_settings[adapter_name].r)


def tie_copies(model: nn.Module, adapter_name: str, embedding: str, heads: list[str]) -> None:
    """Each head's copy for ``adapter_name`` computes with the embeddings' copy of the table (the same parameter).
    PEFT makes each such copy an ``nn.Linear`` of the table's shape before it takes the table, and so draws that
    Linear's initial weight: drawn here too (and dropped), so the random generator goes on as after PEFT's."""
    table = model.get_submodule(embedding).modules_to_save[adapter_name].weight
    for name in heads:
        _draw_as_a_new_linear(table.shape)
        model.get_submodule(name).modules_to_save[adapter_name].weight = table


def _draw_as_a_new_linear(shape: torch.Size, chunk: int = 1 << 20) -> None:
    """Take from the global generator what ``nn.Linear(*shape, bias=False)`` takes (one uniform draw per weight
    element), on the CPU a chunk at a time (a vocabulary-sized table need not be allocated twice)."""
    device = torch.empty(()).device
    count = shape[0] * shape[1]
    if device.type != "cpu":  # another generator's offsets depend on the call: one call, as PEFT's
        torch.empty(count, device=device).uniform_()
        return
    scratch = torch.empty(min(count, chunk))
    while count > 0:
        scratch[: min(count, chunk)].uniform_()
        count -= chunk


def untied_where_the_file_is(config: LoraConfig, model: nn.Module, tensors: dict) -> LoraConfig:
    """The config to load an adapter file holding ``tensors`` with: ``config``, but where the file's head factors
    are not the embeddings' transposed (PEFT casts a 16-bit base's adapters to float32 one parameter at a time,
    which unties them as the model is built, so its runs there train them apart), the head adapted on its own, with
    a warning: the file's model as it was trained."""
    how, embedding, heads = tied_heads(config, model)
    if how != "target_modules":
        return config
    def file_factors(name: str) -> list:  # (A, B) under the file's keys, None where absent
        return [tensors.get(f"base_model.model.{name}.{key}") for key in peft_factor_keys(model.get_submodule(name))]

    emb_A, emb_B = file_factors(embedding)
    untied = []
    for head in (h for h in heads if not is_embedding(model.get_submodule(h))):
        head_A, head_B = file_factors(head)
        pairs = [(head_A, emb_B), (head_B, emb_A)]
        if any(ours is not None and theirs is not None and (ours.shape != theirs.t().shape or not torch.equal(
                ours, theirs.t())) for ours, theirs in pairs):
            untied.append(head)
    if not untied:
        return config
    warnings.warn(f"ensure_weight_tying: the file's factors of {untied} are not those of {embedding} transposed (as "
                  f"PEFT leaves them on a 16-bit base, whose float32 cast unties them): loaded as adapters of their "
                  f"own, untied, as the file was trained", UserWarning, stacklevel=4)
    targets = config.target_modules
    if isinstance(targets, str):
        targets = "(?:{}|{})".format(targets, "|".join(f"^{re.escape(h)}$" for h in untied))
    else:
        targets = [*targets, *untied]
    return config.replace(ensure_weight_tying=False, target_modules=targets)


def without_tied_head_factors(model: nn.Module, config: LoraConfig, expected: dict, tensors: dict, where
                              ) -> tuple[dict, dict]:
    """(``expected``, ``tensors``) of an adapter file without the factors of the heads tied to the embeddings (file
    key → (parameter name, shape), and the file's tensors): those are the embeddings' factors transposed, loaded
    with them.  A file may leave them out (PEFT's second tied adapter does); where it holds them, they must be the
    embeddings' transposed (ValueError otherwise: the file was not trained tied)."""
    how, embedding, heads = tied_heads(config, model)
    if how != "target_modules":
        return expected, tensors
    key_of = {param: key for key, (param, _) in expected.items()}
    expected, tensors = dict(expected), dict(tensors)
    for head in (h for h in heads if not is_embedding(model.get_submodule(h))):
        for key, (param, _) in list(expected.items()):
            factor, _, adapter = param.removeprefix(f"{head}.lora_").partition("_")
            if not param.startswith(f"{head}.lora_") or factor not in ("A", "B"):
                continue
            owner_key = key_of.get(f"{embedding}.lora_{'B' if factor == 'A' else 'A'}_{adapter}")
            if key in tensors and owner_key in tensors and not torch.equal(tensors[key], tensors[owner_key].t()):
                raise ValueError(f"adapter in {where} does not match the model: ensure_weight_tying ties {head} to "
                                 f"{embedding}, but the file's {key} is not the transpose of {owner_key}")
            del expected[key]
            tensors.pop(key, None)
    return expected, tensors


def retie(model: nn.Module) -> None:
    """Point every tied head's factors at its embedding's storage again (after a deep copy or unpickling, which
    copy each parameter on its own; a move or a cast reshares them by itself)."""
    for module in model.modules():
        if isinstance(module, LoRALinear) and module.tied_adapters:
            module.reshare_tied_factors()

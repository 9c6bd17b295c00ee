"""An adapter trained from a PiSSA, OLoRA, LoRA-GA or CorDA initialisation, saved as a plain LoRA adapter
for the unchanged base model (``save_pretrained(path_initial_model_for_weight_conversion=<the adapter saved
right after creation>)``, PEFT's conversion).

Those initialisations moved scaling · B₀ A₀ out of the base weight (W_res = W − scaling · B₀ A₀); after training
the model computes W_res + scaling · B A, which is W + scaling · (B A − B₀ A₀) on the original W:

    A' = [A ; A₀]  (rows stacked),   B' = [B | −B₀]  (columns side by side),   B' A' = B A − B₀ A₀

an adapter of rank 2r whose config keeps the scaling (lora_alpha doubled with r, or times √2 with
``use_rslora``) and says ``init_lora_weights=True``, so that loading it leaves the base weight alone.  A table the
file holds for such a layer (``<path>.base_layer.weight``, a targeted output head's) is the residual weight: it
becomes W_res + scaling · B₀ A₀, the original weight again.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fastlora.config import LoraConfig, UnsupportedFeatureError
from fastlora.peft_format import PREFIX, file_path, read_adapter

__all__ = ["converted_for_the_original_weight"]

# file-key fragments of a factor pair: the first stacks rows, the second columns
_FACTOR_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))


def converted_for_the_original_weight(config: LoraConfig, tensors: dict[str, torch.Tensor],
                                      initial: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(the config to save, the tensors to save) of an adapter trained from the adapter saved at ``initial`` (its
    state right after creation), as a plain LoRA adapter of twice the rank (see the module docstring).  As PEFT
    does, the initial adapter's ``adapter_config.json`` is rewritten with ``init_lora_weights=True`` (so that loading
    it does not initialise from the base weight again)."""
    if config.use_dora:
        raise UnsupportedFeatureError(
            "save_pretrained(path_initial_model_for_weight_conversion=...) of a DoRA adapter: the magnitudes were "
            "trained against the residual weight, and no plain LoRA adapter on the original weight gives the same "
            "output; save it without the conversion and keep the residual base model")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError("Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported "
                         "when using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True`.")
    initial = Path(initial)
    _, initial_tensors = read_adapter(initial)
    initial_tensors = {file_path(key): tensor for key, tensor in initial_tensors.items()}  # an earlier release's keys
    out = dict(tensors)
    for first, second in _FACTOR_PAIRS:
        for key in [k for k in tensors if k.endswith(first)]:
            other = key[: -len(first)] + second
            start, start_other = _initial(initial_tensors, key, tensors, initial), _initial(
                initial_tensors, other, tensors, initial)
            start = start.to(device=tensors[key].device, dtype=tensors[key].dtype)
            start_other = start_other.to(device=tensors[other].device, dtype=tensors[other].dtype)
            out[key] = torch.cat([tensors[key], start], dim=0)
            out[other] = torch.cat([tensors[other], -start_other], dim=1)
            table = key[: -len(first)] + ".base_layer.weight"
            if first == ".lora_A.weight" and table in tensors:  # the residual weight saved beside the adapter
                scaling = config.settings_for(key[len(PREFIX): -len(first)]).scaling
                original = tensors[table].float() + (scaling * start_other.float()) @ start.float()
                out[table] = original.to(tensors[table].dtype)
    config.replace(init_lora_weights=True).save_pretrained(initial)
    doubled = config.replace(
        init_lora_weights=True, r=2 * config.r,
        lora_alpha=config.lora_alpha * (2 ** 0.5 if config.use_rslora else 2),
        rank_pattern={key: 2 * value for key, value in config.rank_pattern.items()},
        alpha_pattern={key: 2 * value for key, value in config.alpha_pattern.items()})
    return doubled, out


def _initial(initial_tensors: dict[str, torch.Tensor], key: str, tensors: dict[str, torch.Tensor],
             initial: Path) -> torch.Tensor:
    start = initial_tensors.get(key)
    if start is None or start.shape != tensors[key].shape:
        found = "no such tensor" if start is None else f"shape {tuple(start.shape)}"
        raise ValueError(f"the initial adapter in {str(initial)!r} does not match the adapter being saved: {key} has "
                         f"{found} there, {tuple(tensors[key].shape)} here (save the initial adapter right after "
                         f"get_peft_model, with the same config)")
    return start

"""``add_weighted_adapter``: a new adapter combined from existing ones, with PEFT's combination types for LoRA.

For adapters i with weights w_i and scalings s_i, per layer (the new adapter has lora_alpha = r and no rsLoRA, so
scaling 1; with ``lora_bias`` in any of them it has a bias on B too, b = Σ w_i s_i b_i over those that have one):

    cat              A = [w_1 s_1 A_1; w_2 s_2 A_2; …] (rows), B = [B_1, B_2, …] (columns): ΔW = Σ w_i s_i B_i A_i
                     exactly; the new rank is the sum of the ranks.
    linear, ties, dare_linear, dare_ties, magnitude_prune (equal ranks; the new rank is theirs)
                     A and B combined apart: A = merge(c_i^A, A_i), B = merge(c_i^B, B_i) with
                     c_i^A = sign(w_i s_i)·√|w_i s_i| and c_i^B = √|w_i s_i|, where merge(c, T) is
        linear           Σ c_i T_i
        magnitude_prune  Σ c_i prune(T_i): each T_i keeps its density·numel largest |values|
        ties             prune as magnitude_prune; per element the majority sign of Σ prune(T_i) ("total") or of
                         Σ sign(prune(T_i)) ("frequency"); Σ c_i T_i over the terms of that sign, divided by how
                         many there are (at least 1)
        dare_linear      Σ c_i (T_i ⊙ keep_i) / density, keep_i ~ Bernoulli(density) from torch's generator
        dare_ties        dare_linear's pruning, then ties' sign election
    svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
                     the merge above over the delta weights ΔW_i = s_i B_i A_i with weights w_i, then the best
                     rank-r approximation ΔW ≈ U_r S_r V_rᵀ: B = U_r S_r, A = V_rᵀ (r = svd_rank, else the
                     largest rank); ``svd_clamp`` clamps both to ± the clamp-quantile of their values.

The random pruning of the dare types draws from torch's global generator in PEFT's order (after the new
adapter's layers are created; then layer by layer in module order, within a layer the A's, then the B's,
adapter by adapter; for the svd types the ΔW's).  The new layers' initial draws are PEFT's too (fastlora draws an
adapter's initial values as PEFT's layers do), so the same seed gives PEFT's result (tested).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from fastlora.config import UnsupportedFeatureError
from fastlora.conv1d import LoRAConv1D
from fastlora.embedding import LoRAEmbedding

__all__ = ["COMBINATION_TYPES", "add_weighted_adapter"]

_SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
_SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")
COMBINATION_TYPES = ("cat", *_SAME_RANK, *_SVD)


def _prune(t: Tensor, density: float, method: str) -> Tensor:
    if density >= 1.0:
        return t
    if method == "magnitude":
        keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
        keep[torch.topk(t.abs().reshape(-1), k=int(density * t.numel())).indices] = 1
        return t * keep.reshape(t.shape)
    return t * torch.bernoulli(torch.full_like(t, density)) / density  # "random", rescaled


def _merge(kind: str, tensors: list[Tensor], coefficients: Tensor, density: float, sign_method: str) -> Tensor:
    """merge(c, T) of the module docstring, for kind one of _SAME_RANK (a "_svd" kind without its suffix)."""
    if kind in ("magnitude_prune", "ties"):
        tensors = [_prune(t, density, "magnitude") for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [_prune(t, density, "random") for t in tensors]
    stacked = torch.stack(tensors)
    weighted = stacked * coefficients.reshape(-1, *([1] * (stacked.dim() - 1)))
    if kind not in ("ties", "dare_ties"):
        return weighted.sum(0)
    votes = stacked.sum(0) if sign_method == "total" else stacked.sign().sum(0)
    agree = stacked.sign() == torch.where(votes >= 0, 1, -1)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def _is_weight(w) -> bool:
    """A finite number: Python's, numpy's or a one-element tensor (as ``list(torch.tensor([...]))`` gives)."""
    if isinstance(w, Tensor):
        return w.numel() == 1 and w.dtype != torch.bool and not w.is_complex() and bool(torch.isfinite(w).all())
    return isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w)


def _check(model: nn.Module, adapters: list[str], weights: list[float], combination_type: str,
           svd_rank: int | None, density: float | None, sign_method: str, svd_clamp: float | None = None,
           svd_driver: str | None = None) -> tuple[str, int]:
    """(combination type, new rank), PEFT's checks and a few more, before anything changes."""
    if not isinstance(adapters, (list, tuple)) or not adapters or not all(isinstance(a, str) for a in adapters):
        raise ValueError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
    if not isinstance(weights, (list, tuple)) or len(weights) != len(adapters):
        raise ValueError(f"weights must be a list with one weight per adapter, got {weights!r}")
    if not all(_is_weight(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights!r}")
    for adapter in adapters:
        if adapter not in model.peft_config:
            raise ValueError(f"Adapter {adapter} does not exist")
        config = model.peft_config[adapter]
        if config.target_parameters:
            raise UnsupportedFeatureError(f"add_weighted_adapter: adapter {adapter!r} adapts parameters (target_parameters), "
                                      f"which fastlora does not combine")
        if config.use_dora:
            raise UnsupportedFeatureError(f"add_weighted_adapter: adapter {adapter!r} uses DoRA, which fastlora does "
                                          f"not combine")
    biased = [a for a in adapters if model.peft_config[a].lora_bias]
    on_embeddings = [a for a in adapters if any(isinstance(layer, LoRAEmbedding) and a in layer.adapter_settings
                                                for _, layer in model.lora_layers())]
    if biased and on_embeddings:  # PEFT's refusal: the combined adapter would need a bias on an embedding
        raise ValueError(f"add_weighted_adapter: adapters {biased} use lora_bias=True while adapters {on_embeddings} "
                         f"adapt an nn.Embedding, which takes no bias; leave either group out")
    wrapped = [w for _, w in model.wrappers() if sum(a in w.modules_to_save for a in adapters) > 1]
    if wrapped:
        raise ValueError("Cannot add weighted adapters if they target the same module with modules_to_save, but found "
                         f"{len(wrapped)} such instance(s).")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"Invalid combination_type: {combination_type} (one of {', '.join(COMBINATION_TYPES)})")
    combination_type = "linear" if len(adapters) == 1 else combination_type
    needs_density = combination_type.removesuffix("_svd") in ("ties", "dare_linear", "dare_ties", "magnitude_prune")
    if needs_density and (density is None or not 0.0 <= density <= 1.0):
        raise ValueError(f"combination_type={combination_type!r} needs a density in [0, 1], got {density!r}")
    if sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {sign_method!r}")
    if combination_type in _SVD and svd_clamp is not None and not (
            isinstance(svd_clamp, numbers.Real) and 0.0 <= svd_clamp <= 1.0):
        raise ValueError(f"svd_clamp is a quantile in [0, 1] (or None: no clamping), got {svd_clamp!r}")
    if combination_type in _SVD and svd_driver not in _SVD_DRIVERS:
        raise ValueError(f"svd_driver must be one of {_SVD_DRIVERS} (torch.linalg.svd's), got {svd_driver!r}")
    ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r
             for c in (model.peft_config[a] for a in adapters)]
    if combination_type in _SAME_RANK:
        if len(set(ranks)) != 1:
            raise ValueError("All adapters must have the same r value when using combination_type linear, ties, "
                             "dare_ties or dare_linear.")
        for name, layer in model.lora_layers():  # a rank_pattern can give one layer other ranks
            held = {a: layer.adapter_settings[a].r for a in adapters if a in layer.adapter_settings}
            if len(set(held.values())) > 1:
                raise ValueError(f"All adapters must have the same r value when using combination_type "
                                 f"{combination_type}: in {name} their ranks are {held} (a rank_pattern); use 'cat' "
                                 f"or an svd type")
        return combination_type, ranks[0]
    if combination_type == "cat":
        return combination_type, sum(ranks)
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"svd_rank must be an integer >= 1, got {svd_rank!r}")
    return combination_type, svd_rank or max(ranks)


def _target_modules(model: nn.Module, adapters: list[str]):
    """The new adapter's target_modules: the union of the lists, or the regexes joined (PEFT's rule)."""
    targets = [model.peft_config[a].target_modules for a in adapters]
    if len({isinstance(t, str) for t in targets}) > 1:
        raise ValueError("all adapter configs should follow the same target modules type. Combining adapters with "
                         "`target_modules` type being a mix of list/set and string is not supported.")
    if isinstance(targets[0], str):
        return "|".join(f"({t})" for t in targets)
    return sorted(set().union(*targets))


@torch.no_grad()
def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                         svd_full_matrices: bool = True, svd_driver: str | None = None, density: float | None = None,
                         majority_sign_method: str = "total") -> None:
    """See :meth:`fastlora.PeftModel.add_weighted_adapter`."""
    if adapter_name in model.peft_config:  # PEFT returns without a change
        return
    combination_type, rank = _check(model, adapters, weights, combination_type, svd_rank, density, majority_sign_method,
                                    svd_clamp, svd_driver)
    weights = [float(w) for w in weights]  # a one-element tensor's value exactly (a float32 is a double too)
    # scaling 1: each adapter's scaling is in the combined factors (so no rsLoRA, whose scaling would be √r)
    config = model.peft_config[adapters[0]].replace(
        r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={},
        lora_bias=any(model.peft_config[a].lora_bias for a in adapters), target_modules=_target_modules(model, adapters))
    # The new adapter first, then the combinations, layer by layer in module order: the dare types' draws then
    # follow PEFT's (whose new layers draw their initial values first).  An error takes the new adapter out again.
    model.add_adapter(adapter_name, config)
    try:
        for _, layer in model.lora_layers(adapter_name):
            if adapter_name in layer.tied_adapters:  # a head tied to the embeddings: its factors are theirs, combined
                continue                             # there (ensure_weight_tying)
            held = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapter_settings]
            A, B = layer.lora_factors(adapter_name)
            A.zero_()
            B.zero_()
            if held:
                new_A, new_B = _combine(layer, held, combination_type, rank, density, majority_sign_method, svd_clamp,
                                        svd_full_matrices, svd_driver)
                A[: new_A.shape[0]].copy_(new_A)
                B[:, : new_B.shape[1]].copy_(new_B)
            bias = layer.lora_bias(adapter_name)
            if bias is not None:  # the bias adds to the output whatever the factors: its terms summed as PEFT sums them
                bias.zero_()
                for a, w in held:
                    if layer.lora_bias(a) is not None:
                        bias += w * layer.adapter_settings[a].scaling * layer.lora_bias(a)
    except BaseException:
        model.delete_adapter(adapter_name)
        raise


def _combine(layer, held, combination_type, rank, density, sign_method, svd_clamp, full_matrices, driver):
    """(A, B) of the new adapter in one layer, from the adapters it holds (name, weight)."""
    if combination_type == "cat":
        # A · weight · scaling in PEFT's order (two roundings), so that the combined A equals PEFT's bit for bit
        factors = [(layer.lora_factors(a), w, layer.adapter_settings[a].scaling) for a, w in held]
        return (torch.cat([A * w * scaling for (A, _), w, scaling in factors]),
                torch.cat([B for (_, B), _, _ in factors], dim=1))
    if combination_type in _SAME_RANK:
        scaled = [w * layer.adapter_settings[a].scaling for a, w in held]
        c_A = torch.tensor([math.copysign(math.sqrt(abs(c)), c) if c != 0 else 0.0 for c in scaled])
        c_B = torch.tensor([math.sqrt(abs(c)) for c in scaled])
        As = [layer.lora_factors(a)[0] for a, _ in held]
        Bs = [layer.lora_factors(a)[1] for a, _ in held]
        dtype = As[0].dtype
        # float32 coefficients: a 16-bit adapter's sum is computed in float32 and rounded once, as PEFT's
        new_A = _merge(combination_type, As, c_A.to(As[0].device), density, sign_method)
        new_B = _merge(combination_type, Bs, c_B.to(Bs[0].device), density, sign_method)
        return new_A.to(dtype), new_B.to(dtype)
    # s_i B_i A_i (float32), merged in the layout the base stores (in × out for Conv1D, num × dim for an
    # embedding table: PEFT's, so that a dare type's random draws fall on the same elements), then out × in
    stored_transposed = isinstance(layer, (LoRAConv1D, LoRAEmbedding))
    deltas = [layer.delta_weight(a).t() if stored_transposed else layer.delta_weight(a) for a, _ in held]
    coefficients = torch.tensor([w for _, w in held], device=deltas[0].device, dtype=deltas[0].dtype)
    delta = _merge(combination_type.removesuffix("_svd"), deltas, coefficients, density, sign_method)
    delta = delta.t() if stored_transposed else delta
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    B, A = U[:, :rank] @ torch.diag(S[:rank]), Vh[:rank, :]
    if svd_clamp is not None:
        limit = torch.quantile(torch.cat([B.flatten(), A.flatten()]), svd_clamp)
        B, A = B.clamp(-limit, limit), A.clamp(-limit, limit)
    return A, B

"""The experts of a transformers mixture-of-experts block with LoRA on their parameters, computed without ΔW.

transformers 5's experts modules (those built with its ``use_experts_implementation``: Mixtral, Qwen3-MoE,
gpt-oss, DeepSeek-V3, ...) share one computation, whatever implementation runs it: each token goes to its
top-k experts, and for expert e

    u = x W_e^{up}ᵀ (+ b_e^{up}),   h = gate(u) (or act(u) without a gate),   y_e = h W_e^{down}ᵀ (+ b_e^{down})

summed over the token's k experts with the router's weights.  With adapters on ``gate_up_proj`` / ``up_proj`` /
``down_proj`` (:class:`fastlora.parameter_lora.LoRAParameter`) each product becomes

    x (W_e + s B_e A_e)ᵀ = x W_eᵀ + s (x A_eᵀ) B_eᵀ

and is computed as written on the rows of expert e (rows sorted by expert, one segment per expert): the frozen
product, then the rank-r one.  PEFT instead adds ΔW (the size of the whole expert stack) to W on every forward
and lets autograd form the gradient of W + ΔW (that size again) to reach A and B; here neither exists, autograd
keeps each segment's rank-r product beside the input, and A and B get their gradients from their own rows.

The base products run one expert after the other (as transformers' eager implementation); the low-rank ones run
grouped on the kernels' device (two Triton launches forward and four backward for every expert at once:
:mod:`fastlora.grouped_lora`), one expert after the other in torch ops elsewhere.  In eager mode only: the loop
over experts depends on each expert's token count, which a ``torch.compile`` trace does not know, so there the
layer gives the experts W + ΔW as PEFT does (:class:`fastlora.parameter_lora.LoRAParameter`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["is_transformers_experts", "grouped_experts_forward", "grouped_low_rank"]

# The parameters this computation adapts: the first projection (with a gate: gate and up stacked) and the second.
FIRST, FIRST_NO_GATE, SECOND = "gate_up_proj", "up_proj", "down_proj"


def is_transformers_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers experts module of the shared computation (its flags set by
    ``use_experts_implementation``), not split over several processes (expert parallelism)."""
    flags = ("is_transposed", "has_gate", "has_bias", "num_experts", "_apply_gate")
    return (all(hasattr(module, f) for f in flags) and not getattr(module, "_is_expert_parallel", False)
            and isinstance(getattr(module, SECOND, None), Tensor)
            and isinstance(getattr(module, FIRST if module.has_gate else FIRST_NO_GATE, None), Tensor))


def grouped_low_rank(rows: Tensor, counts: list[int], per_expert_A: Tensor, per_expert_B: Tensor, scaling: float,
                     kernels: bool) -> Tensor:
    """s · (X_e A_eᵀ) B_eᵀ (T × out, the adapters' dtype) for rows sorted by expert (``counts[e]`` rows of expert e),
    A_e / B_e stacked (E, r, in) / (E, out, r): in the grouped kernels with ``kernels``, else one expert after the
    other in torch ops."""
    if kernels:
        from fastlora.grouped_lora import grouped_lora
        from fastlora.kernels.grouped import MAX_POSITIONS

        kernels = rows.shape[0] <= MAX_POSITIONS  # one launch's positions, else one expert after the other
    if kernels:

        bounds = torch.tensor([0, *counts], device=rows.device).cumsum(0)
        return grouped_lora(rows, per_expert_A, per_expert_B, bounds, [float(scaling)] * len(counts))
    updates, start = [], 0
    for expert, count in enumerate(counts):
        segment = rows[start:start + count].to(per_expert_A.dtype)
        start += count
        updates.append((segment @ per_expert_A[expert].t()) @ per_expert_B[expert].t() * scaling)
    return torch.cat(updates) if updates else rows.new_zeros(0, per_expert_B.shape[1], dtype=per_expert_A.dtype)


def _project(experts: nn.Module, name: str, rows: Tensor, counts: list[int], updates, kernels: bool) -> Tensor:
    """rows (sorted by expert, ``counts[e]`` for expert e) times expert e's adapted ``name`` parameter, plus its
    bias; ``updates``: (A_e-stack (E, r, in), B_e-stack (E, out, r), scaling) per active adapter."""
    weight = getattr(experts, name)
    bias = getattr(experts, f"{name}_bias", None) if experts.has_bias else None
    outputs, start = [], 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        segment = rows[start:start + count]
        start += count
        stored = weight[expert]
        out = segment @ (stored if experts.is_transposed else stored.t())
        outputs.append(out + bias[expert] if bias is not None else out)
    if not outputs:
        width = weight.shape[-1] if experts.is_transposed else weight.shape[-2]
        return rows.new_zeros(0, width)
    out = torch.cat(outputs)
    for per_expert_A, per_expert_B, scaling in updates:
        out = out + grouped_low_rank(rows, counts, per_expert_A, per_expert_B, scaling, kernels).to(out.dtype)
    return out


def grouped_experts_forward(experts: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                            updates: dict[str, list[tuple[Tensor, Tensor, float]]], kernels: bool = False) -> Tensor:
    """The experts' output for ``hidden_states`` (tokens × hidden) routed by ``top_k_index`` / ``top_k_weights``
    (tokens × k), with the low-rank ``updates`` of each adapted parameter (name → per-expert factor stacks and
    scaling, one entry per active adapter; see :func:`_project`); ``kernels``: the low-rank products in the
    grouped Triton kernels."""
    num_top_k = top_k_index.shape[-1]
    expert_ids = top_k_index.reshape(-1)
    order = torch.argsort(expert_ids, stable=True)
    token_of_row = order // num_top_k
    counts = torch.bincount(expert_ids, minlength=experts.num_experts)[: experts.num_experts].tolist()
    rows = hidden_states[token_of_row]
    first = FIRST if experts.has_gate else FIRST_NO_GATE
    hidden = _project(experts, first, rows, counts, updates.get(first, []), kernels)
    hidden = experts._apply_gate(hidden) if experts.has_gate else experts.act_fn(hidden)
    out = _project(experts, SECOND, hidden, counts, updates.get(SECOND, []), kernels)
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1)  # in the promoted dtype, as transformers
    # back to (token, k) order and summed over k: deterministic (an index_add is not on CUDA), as transformers
    back = torch.empty_like(order)
    back[order] = torch.arange(order.numel(), device=order.device)
    return out[back].view(hidden_states.shape[0], num_top_k, -1).sum(1).to(hidden_states.dtype)

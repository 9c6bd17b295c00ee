"""The LoRA and DoRA math, written plainly: the oracle that fastlora's torch path and kernels are tested against.

Nothing in fastlora runs it; it shares no code with the paths it checks.  Every input is taken to float64 (a
float64 input that requires grad stays in the graph, so autograd through these functions gives the float64
gradients), each formula is computed as it is written, and the dropout mask is a given 0/1 (or bool) tensor
shaped like x.

LoRA, with m the keep mask, p the dropout probability and s the scaling:

    h  = x ⊙ m / (1-p)                       (h = x without dropout)
    S  = h Aᵀ
    y  = x Wᵀ + b + s · S Bᵀ
    dB = s · dyᵀ S      dS = s · dy B      dA = dSᵀ h      dx = dy W + (dS A) ⊙ m / (1-p)

DoRA as PEFT computes it, with the trained magnitude g_m (one per output row) and the norm a constant for
autograd (DoRA paper, section 4.3):

    n  = ‖W + s · B A‖ per output row,   g = g_m / n
    y  = x Wᵀ + b + (g − 1) ⊙ (h Wᵀ) + g ⊙ (s · S Bᵀ)

(without dropout h = x, and y = g ⊙ (x Wᵀ + s · S Bᵀ) + b).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dropped", "lora", "lora_grads", "dora_norm", "dora"]


def _f64(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.double()


def dropped(x: Tensor, keep: Tensor | None, dropout_p: float) -> Tensor:
    """h = x ⊙ m / (1-p), in float64; x itself without a mask."""
    x = _f64(x)
    return x if keep is None else x * _f64(keep) / (1.0 - dropout_p)


def lora(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scaling: float,
         keep: Tensor | None = None, dropout_p: float = 0.0) -> tuple[Tensor, Tensor]:
    """(y, S) for x of shape (..., K): y = x Wᵀ + b + s · S Bᵀ with S = h Aᵀ."""
    x, W, b, A, B = map(_f64, (x, weight, bias, lora_A, lora_B))
    S = dropped(x, keep, dropout_p) @ A.T
    y = x @ W.T + scaling * (S @ B.T)
    return (y if b is None else y + b), S


def lora_grads(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
               keep: Tensor | None = None, dropout_p: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB) for 2-D dy (M, N) and x (M, K), from the formulas above (S recomputed)."""
    dy, x, W, A, B = map(_f64, (dy, x, weight, lora_A, lora_B))
    h = dropped(x, keep, dropout_p)
    S = h @ A.T
    dS = scaling * (dy @ B)
    dx = dy @ W + dropped(dS @ A, keep, dropout_p)
    return dx, dS.T @ h, scaling * (dy.T @ S)


def dora_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """n = ‖W + s · B A‖ per output row, in float64."""
    return torch.linalg.vector_norm(_f64(weight) + scaling * (_f64(lora_B) @ _f64(lora_A)), dim=1)


def dora(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
         scaling: float, keep: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
    """PEFT's DoRA output y, the norm detached (a constant for autograd)."""
    x, W, b, A, B, mag = map(_f64, (x, weight, bias, lora_A, lora_B, magnitude))
    g = mag / dora_norm(W, A, B, scaling).detach()
    h = dropped(x, keep, dropout_p)
    y = x @ W.T + (g - 1) * (h @ W.T) + g * (scaling * ((h @ A.T) @ B.T))
    return y if b is None else y + b

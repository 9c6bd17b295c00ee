"""PEFT's initialisations of a Linear layer's adapter that read the base weight (PiSSA, OLoRA) or give both
factors values with a zero product (orthogonal): the factors, computed in float32 from W (out × in).

PiSSA and OLoRA move the weight's principal part into the adapter, leaving the layer's output unchanged:

    W = W_res + scaling · B A,   W_res the new base weight

- ``"pissa"``: W = U S Vᵀ (a full SVD); B = U_r √(S_r / scaling), A = √(S_r / scaling) V_rᵀ, the r largest
  singular values.  ``"pissa_niter_<n>"``: the same from torch's randomized ``svd_lowrank`` with n subspace
  iterations (faster on large weights, and drawn from the global random generator).
- ``"olora"``: W = Q R (QR decomposition); B = Q[:, :r], A = R[:r].
- ``"orthogonal"`` (r even): Q from the QR decomposition of an r × r normal matrix, its even rows Q₀ and odd rows
  Q₁ (orthonormal to each other); A = (G_A Q₀)ᵀ / 10 and B = G_Bᵀ Q₁ / 10 with normal G_A (in × r/2) and G_B
  (r/2 × out): B A = G_Bᵀ Q₁ Q₀ᵀ G_Aᵀ / 100 = 0, so the layer starts at the base output while neither factor is 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["WEIGHT_INITS", "is_weight_init", "check_weight_init", "pissa_factors", "olora_factors",
           "orthogonal_factors"]

WEIGHT_INITS = ("pissa", "pissa_niter_<n>", "olora", "orthogonal")


def _pissa_iterations(init: str) -> int | None:
    """None for ``"pissa"`` (a full SVD), n for ``"pissa_niter_<n>"``."""
    if init == "pissa":
        return None
    count = init[len("pissa_niter_"):]
    if init.startswith("pissa_niter_") and count.isdigit():
        return int(count)
    raise ValueError(f"init_lora_weights should be 'pissa' or 'pissa_niter_[number of iters]', got {init!r}")


def is_weight_init(init) -> bool:
    """Whether ``init`` names one of the initialisations this module computes."""
    return isinstance(init, str) and (init.startswith("pissa") or init in ("olora", "orthogonal"))


def check_weight_init(init, r: int) -> None:
    """ValueError for a malformed name or a rank the initialisation cannot use (PEFT's errors)."""
    if isinstance(init, str) and init.startswith("pissa"):
        _pissa_iterations(init)
    if init == "orthogonal" and r % 2:
        raise ValueError(f"Orthogonal initialization requires the LoRA rank to be even, got {r} instead.")


def pissa_factors(weight: Tensor, r: int, scaling: float, init: str) -> tuple[Tensor, Tensor]:
    """(A, B) of PiSSA from ``weight`` (out × in, float32): B A · scaling is W's best rank-r approximation."""
    iterations = _pissa_iterations(init)
    if iterations is None:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(weight, r, niter=iterations)
        Vh = V.t()
    root = torch.diag(torch.sqrt(S / scaling))
    return root @ Vh, U @ root


def olora_factors(weight: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """(A, B) of OLoRA from ``weight`` (out × in, float32): B = the first r columns of Q, A = the first r rows of
    R, W = Q R."""
    Q, R = torch.linalg.qr(weight)
    return R[:r].contiguous(), Q[:, :r].contiguous()


def orthogonal_factors(in_features: int, out_features: int, r: int) -> tuple[Tensor, Tensor]:
    """(A, B) of the orthogonal initialisation (r even), drawn from the global random generator on the CPU, in
    PEFT's order: B A = 0."""
    Q, _ = torch.linalg.qr(torch.randn(r, r))
    lora_A = torch.randn(in_features, r // 2).mm(Q[0::2, :]).T / 10.0
    lora_B = torch.randn(r // 2, out_features).T.mm(Q[1::2, :]) / 10.0
    return lora_A.contiguous(), lora_B.contiguous()

"""PEFT's initialisations of a Linear layer's adapter that read the base weight (PiSSA, OLoRA) or give both
factors values with a zero product (orthogonal): the factors, computed in float32 from W (out × in).

PiSSA and OLoRA move the weight's principal part into the adapter, leaving the layer's output unchanged:

    W = W_res + scaling · B A,   W_res the new base weight

- ``"pissa"``: W = U S Vᵀ (a full SVD); B = U_r √(S_r / scaling), A = √(S_r / scaling) V_rᵀ, the r largest
  singular values.  ``"pissa_niter_<n>"``: the same from torch's randomized ``svd_lowrank`` with n subspace
  iterations (faster on large weights, and drawn from the global random generator).
- ``"olora"``: W = Q R (QR decomposition); B = Q[:, :r], A = R[:r].
- ``"loftq"`` (with ``loftq_config``): the adapter absorbs the error of quantizing W (NF4 with bitsandbytes'
  default block size and no double quantization, or int8 per row), alternated ``loftq_iter`` times from B A = 0:
  Q = dequantize(quantize(W − B A)), then B A = the best rank-r approximation of W − Q (B = U_r √S_r,
  A = √S_r V_rᵀ, without the adapter's scaling, as PEFT); Q becomes the base weight, for the model to be saved and
  loaded quantized.
- ``"lora_ga"`` (LoRA-GA, after :func:`fastlora.preprocess_loraga` estimated the full weight's gradient G,
  out × in): G ≈ U S Vᵀ from torch's randomized ``svd_lowrank`` (q = min(4r, min(out, in)), 4 iterations, the
  global random generator); A takes r rows of Vᵀ and B the matching scaled columns U S of another r of the 2r
  leading directions (``direction``: "ArB2r" A the first r, B the next r; "A2rBr" the reverse; "ArBr" A the odd,
  B the even; "random" r of the 2r drawn with ``randperm``), then B is scaled (``scale``: "stable" by
  out^¼ / √γ; "weight_svd" by W's largest singular value over B's first; "gd_scale" A and B both divided by
  the adapter's scaling; "unit" not at all).  The base weight keeps W − scaling · B A (the factors rounded to
  W's dtype first), so the layer's output is unchanged.
- ``"corda"`` (CorDA, after :func:`fastlora.preprocess_corda` decomposed W C = U S Vᵀ, C the inputs' covariance,
  and kept r directions): with S' = S / scaling, A = √S' (C⁻¹ V)ᵀ and B = U √S', so that scaling · B A is those
  directions' part of W; the base weight keeps W − (scaling · B) A.
- ``"mica"`` (MiCA, minor component adaptation): W = U S Vᵀ; B = the r left singular vectors of the smallest
  singular values, U[:, -r:], frozen; A = 0 (so B A = 0 and W stays), and only A trains: the update lives in the
  output directions the weight uses least.
- ``"orthogonal"`` (r even): Q from the QR decomposition of an r × r normal matrix, its even rows Q₀ and odd rows
  Q₁ (orthonormal to each other); A = (G_A Q₀)ᵀ / 10 and B = G_Bᵀ Q₁ / 10 with normal G_A (in × r/2) and G_B
  (r/2 × out): B A = G_Bᵀ Q₁ Q₀ᵀ G_Aᵀ / 100 = 0, so the layer starts at the base output while neither factor is 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["WEIGHT_INITS", "LORA_GA_DIRECTIONS", "LORA_GA_SCALES", "is_weight_init", "draws_from_the_generator",
           "check_weight_init", "rank_limit", "pissa_factors", "olora_factors", "orthogonal_factors", "loftq_factors",
           "quantization_error_factors", "lora_ga_factors", "corda_factors", "mica_factors"]

WEIGHT_INITS = ("pissa", "pissa_niter_<n>", "olora", "orthogonal", "loftq", "mica")
LORA_GA_DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
LORA_GA_SCALES = ("stable", "weight_svd", "gd_scale", "unit")


def _pissa_iterations(init: str) -> int | None:
    """None for ``"pissa"`` (a full SVD), n for ``"pissa_niter_<n>"``."""
    if init == "pissa":
        return None
    count = init[len("pissa_niter_"):]
    if init.startswith("pissa_niter_") and count.isdigit():
        return int(count)
    raise ValueError(f"init_lora_weights should be 'pissa' or 'pissa_niter_[number of iters]', got {init!r}")


def is_weight_init(init) -> bool:
    """Whether ``init`` names one of the initialisations computed from the base weight alone (not "lora_ga", which
    needs the gradient :func:`fastlora.preprocess_loraga` estimates)."""
    return isinstance(init, str) and (init.startswith("pissa") or init in ("olora", "orthogonal", "loftq", "mica"))


def draws_from_the_generator(init) -> bool:
    """Whether computing ``init``'s factors draws from the global random generator (a randomized SVD): PEFT draws
    them as it builds each layer, between that layer's constructor draws and the next layer's."""
    return isinstance(init, str) and (init.startswith("pissa_niter_") or init == "lora_ga")


def check_weight_init(init, r: int | None) -> None:
    """ValueError for a malformed name or a rank the initialisation cannot use (PEFT's errors); ``r`` None: the
    name alone."""
    if isinstance(init, str) and init.startswith("pissa"):
        _pissa_iterations(init)
    if init == "orthogonal" and r is not None and r % 2:
        raise ValueError(f"Orthogonal initialization requires the LoRA rank to be even, got {r} instead.")


def rank_limit(init, in_features: int, out_features: int) -> int | None:
    """The largest rank ``init`` can give a layer of these sizes: PiSSA, OLoRA and LoftQ take r of the weight's
    min(in, out) directions, LoRA-GA 2r of the gradient's; None: no limit."""
    if init == "lora_ga":
        return min(in_features, out_features) // 2
    return None if init == "orthogonal" else min(in_features, out_features)


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


def quantization_error_factors(residual: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """(A, B) with B A the best rank-r approximation of ``residual`` (float32): B = U_r √S_r, A = √S_r V_rᵀ."""
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    return torch.sqrt(torch.diag(S)[:r, :]) @ Vh, U @ torch.sqrt(torch.diag(S)[:, :r])


def _quantized_and_back(weight: Tensor, bits: int) -> Tensor:
    """``weight`` (float32) quantized by bitsandbytes as LoftQ quantizes it, and dequantized again."""
    import bitsandbytes as bnb

    if bits == 4:
        packed = bnb.nn.Params4bit(weight.to("cpu"), requires_grad=False, compress_statistics=False,
                                   quant_type="nf4").to(weight.device)
        return bnb.functional.dequantize_4bit(packed.data, packed.quant_state)
    packed = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False).to(weight.device)
    return bnb.functional.int8_vectorwise_dequant(packed.data, packed.SCB).to(weight.device)


def loftq_factors(weight: Tensor, r: int, bits: int, iterations: int) -> tuple[Tensor, Tensor, Tensor]:
    """(Q, A, B) of LoftQ from ``weight`` (out × in): Q the quantized weight (dequantized, float32) the base keeps,
    B A the rank-r part of W − Q (see the module docstring)."""
    weight = weight.to(torch.float32)
    remainder = weight.clone()
    for step in range(iterations):
        quantized = _quantized_and_back(remainder, bits)
        A, B = quantization_error_factors(weight - quantized, r)
        if step + 1 < iterations:
            remainder = weight - torch.mm(B, A)
    return quantized, A, B


def lora_ga_factors(gradient: Tensor, r: int, scaling: float, config: dict,
                    weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(A, B) of LoRA-GA from the estimated gradient (out × in, float32) and ``config`` (``direction``, ``scale``,
    ``stable_gamma``; see the module docstring); ``weight`` (out × in, float32) is read by ``scale="weight_svd"``
    only.  Draws from the global random generator: the randomized SVDs
    on the gradient's device, ``direction="random"``'s permutation on the CPU (as PEFT's)."""
    U, S, V = torch.svd_lowrank(gradient, q=min(4 * r, min(gradient.shape)), niter=4)
    U, S, Vh = U[:, :2 * r], S[:2 * r], V.t()[:2 * r]
    direction = config["direction"]
    if direction == "random":
        picked = torch.randperm(2 * r)[:r]
        a_rows = b_columns = picked
    else:
        a_rows, b_columns = {"ArBr": (slice(1, 2 * r, 2), slice(0, 2 * r, 2)), "A2rBr": (slice(r, 2 * r), slice(0, r)),
                             "ArB2r": (slice(0, r), slice(r, 2 * r))}[direction]
    A = Vh[a_rows]
    B_singular = S[b_columns]
    B = U[:, b_columns] @ torch.diag(B_singular)
    scale = config["scale"]
    if scale == "stable":
        B = B * (gradient.shape[0] ** 0.25 / config["stable_gamma"] ** 0.5)
    elif scale == "weight_svd":
        _, weight_singular, _ = torch.svd_lowrank(weight, q=r, niter=4)
        if B_singular[0] > 0:
            B = B * (weight_singular[0] / B_singular[0])
    elif scale == "gd_scale":
        A, B = A / scaling, B / scaling
    return A, B


def corda_factors(U: Tensor, S: Tensor, V: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """(A, B) of CorDA from a layer's kept directions (U out × r, S r, V = C⁻¹ V in × r; see the module
    docstring): scaling · B A = U diag(S) Vᵀ."""
    root = (S / scaling).sqrt()
    return V.t().mul(root.view(-1, 1)).contiguous(), U.mul(root).contiguous()


def mica_factors(weight: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """(A, B) of MiCA from ``weight`` (out × in, float32): B = its r minor left singular vectors, A = 0."""
    U, _, _ = torch.linalg.svd(weight, full_matrices=False)
    return torch.zeros(r, weight.shape[1], device=weight.device), U[:, -r:].contiguous()

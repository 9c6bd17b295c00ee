"""DoRA over a bitsandbytes 4-bit or 8-bit weight (QDoRA): the term a DoRA adapter adds to the output so far,
with autograd, as PEFT's bitsandbytes layers compute it:

    term = (g − 1) ⊙ P + g ⊙ s·(h Aᵀ) Bᵀ,   g = m / n,   n = ‖Ŵ + s·B A‖ per output row (not differentiated)

    h = x,  P = result − b            without dropout (``result``: the output so far, holding the base product
                                      and any adapter added before this one; its gradient gets (g − 1) ⊙ dterm)
    h = dropout(x),  P = h Ŵᵀ         with dropout (a second product with the dequantized weight Ŵ)

Ŵ is dequantized where it is needed and dropped at once: for n and P in forward, for dh = ((g − 1) ⊙ dterm) Ŵ
in backward.  What autograd keeps is x, the rank-r S = h Aᵀ, the seed and, when m trains, z = P + s·S Bᵀ
(M × N, in the output's dtype where that is the narrower) for dm = Σ_rows dterm ⊙ z / n; not Ŵ (PEFT keeps it,
N × K, in every dropped layer), and not the mask, which is drawn again from the seed.  The products run in the
adapters' dtype, as PEFT casts x to it, and the term in the widest of the adapters', m's and the output's
dtypes, as PEFT's type promotion (autocast or not).
Backward dequantizes the weight the forward pass read, even if the layer holds another one by then.

Backward, with d = dterm:  dB = s·(g ⊙ d)ᵀ S,  dS = s·(g ⊙ d) B,  dA = dSᵀ h,
dx = (dS A + [dropout] ((g − 1) ⊙ d) Ŵ) ⊙ mask / (1 − p),  dm = Σ_rows d ⊙ z / n.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from fastlora.ops import keep_fn
from fastlora.torch_path import dora_weight_norm, dropped_input

__all__ = ["quantized_dora_term"]


def _dropped_input(x: Tensor, dtype: torch.dtype, seed: Optional[Tensor], dropout_p: float) -> Tensor:
    """h = x ⊙ mask / (1 − p) in ``dtype`` (x itself, cast, without dropout); the mask drawn from ``seed``."""
    return dropped_input(x, dtype, None if seed is None else keep_fn(seed, dropout_p), dropout_p)


class _QuantizedDoRATerm(torch.autograd.Function):
    """The products in the adapters' dtype ``low`` (PEFT casts x to it); g, the term and its gradient in ``acc``,
    the wider of that, m's and the output's dtypes (PEFT's float32 m makes g, and so the term, float32 beside
    bf16 factors: TRL's QLoRA casts the factors, not m)."""

    @staticmethod
    def forward(ctx, x, base, lora_A, lora_B, magnitude, weight, dequantize, norm, seed, scaling, dropout_p, keep_z):
        low = lora_A.dtype
        acc = torch.promote_types(torch.promote_types(low, magnitude.dtype), base.dtype)
        with torch.autocast(x.device.type, enabled=False):  # autocast changes no dtype here
            g = magnitude.detach().to(acc) / norm.to(acc)
            h = _dropped_input(x, low, seed, dropout_p)
            P = (torch.mm(h, weight.to(low).t()) if seed is not None else base).to(acc)
            S = torch.mm(h, lora_A.t())
            low_rank = torch.mm(S, lora_B.t()).to(acc).mul_(scaling)
            term = torch.addcmul(P * (g - 1.0), low_rank, g)
            # z in the output's dtype where that is narrower: PEFT's dm reads the output so far in it too
            z = (P + low_rank).to(base.dtype if base.dtype.itemsize < acc.itemsize else acc) if keep_z else None
        ctx.save_for_backward(x, lora_A, lora_B, magnitude, norm, S, seed, z)
        ctx.dequantize, ctx.scaling, ctx.dropout_p, ctx.base_dtype = dequantize, scaling, dropout_p, base.dtype
        return term

    @staticmethod
    def backward(ctx, d):
        with torch.autocast(d.device.type, enabled=False):
            return _QuantizedDoRATerm._grads(ctx, d)

    @staticmethod
    def _grads(ctx, d):
        x, lora_A, lora_B, magnitude, norm, S, seed, z = ctx.saved_tensors
        need_dx, need_dbase, need_dA, need_dB, need_dm = ctx.needs_input_grad[:5]
        low, acc, scaling, dropout_p = lora_A.dtype, d.dtype, ctx.scaling, ctx.dropout_p
        g = magnitude.detach().to(acc) / norm.to(acc)
        scaled = (d * (g * scaling)).to(low)  # s·(g ⊙ d), the low-rank product's gradient
        dx = dbase = dA = dB = dm = None
        if need_dB:
            dB = torch.mm(scaled.t(), S)
        if need_dx or need_dA:
            dS = torch.mm(scaled, lora_B)
            if need_dA:
                dA = torch.mm(dS.t(), _dropped_input(x, low, seed, dropout_p))
            if need_dx:
                dh = torch.mm(dS, lora_A)
                if seed is not None:  # P = h Ŵᵀ: Ŵ dequantized again, not kept since forward
                    dh.addmm_((d * (g - 1.0)).to(low), ctx.dequantize().to(low))
                    dh = keep_fn(seed, dropout_p)(dh).mul_(1.0 / (1.0 - dropout_p))
                dx = dh.to(x.dtype)
        if need_dbase and seed is None:
            dbase = (d * (g - 1.0)).to(ctx.base_dtype)
        if need_dm:
            dm = (d * z.to(acc)).sum(0).div_(norm.to(acc)).to(magnitude.dtype)
        return dx, dbase, dA, dB, dm, None, None, None, None, None, None, None


def quantized_dora_term(x: Tensor, result: Tensor, bias: Optional[Tensor], dequantize: Callable[[], Tensor],
                        lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scaling: float, dropout_p: float,
                        seed: Optional[Tensor]) -> Tensor:
    """DoRA's term (..., out) for x (..., in), ``result`` the output so far (..., out) and
    ``bias`` the base layer's (see the module docstring); ``dequantize()`` returns Ŵ (out × in), a fresh tensor
    each call; ``dropout_p`` and ``seed`` as :func:`fastlora.functional.dropout_and_seed` draws them.  Autocast
    does not change the term's dtype."""
    with torch.autocast(x.device.type, enabled=False):
        weight = dequantize()
        norm = dora_weight_norm(weight, lora_A, lora_B, scaling)
    keep_z = torch.is_grad_enabled() and magnitude.requires_grad  # what dm needs
    x2d = x.reshape(-1, x.shape[-1])
    base = result.reshape(-1, result.shape[-1])
    if seed is not None:
        base = base.detach()  # P is h Ŵᵀ: the output so far takes no part
    elif bias is not None:
        base = base - bias.to(base.dtype)
    term = _QuantizedDoRATerm.apply(x2d, base, lora_A, lora_B, magnitude, weight if seed is not None else None,
                                    dequantize, norm, seed, float(scaling), float(dropout_p), keep_z)
    return term.view(*result.shape[:-1], term.shape[-1])

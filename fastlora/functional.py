"""``lora_linear``: argument checks, the dropout seed draw and the schedule (resolved once per call), then the
registered op."""

from __future__ import annotations

import contextlib

import math

import torch
from torch import Tensor

from fastlora import dora_ops, ops
from fastlora.op_scalars import OpScalars
from fastlora.schedules import BACKENDS, TORCH, Schedule, resolve, triton_interpreter_on

__all__ = ["lora_linear", "BACKENDS", "SEED_HIGH", "triton_interpreter_on"]

# Seeds are drawn from [0, 2^62): both 32-bit words of the kernels' Philox key vary, and the CPU path's
# generator takes the same value.
SEED_HIGH = 2**62


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta, ...)
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


def _autocast_off(device_type: str):
    """Autocast switched off for the op's own dtypes (nothing to switch off on a device autocast does not know)."""
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:  # meta, ...
        return contextlib.nullcontext()


def _check(x: Tensor, weight: Tensor | None, bias, lora_A: Tensor, lora_B: Tensor, dropout_p: float) -> None:
    for name, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B)) + ((("weight", weight),) if weight is not None else ()):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if weight is None and bias is not None:
        raise ValueError("bias without weight: the base product, bias included, is the caller's when weight is None")
    if (weight is not None and weight.dim() != 2) or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(
            f"weight, lora_A and lora_B must be 2-D, got shapes {tuple(weight.shape) if weight is not None else None}, "
            f"{tuple(lora_A.shape)}, {tuple(lora_B.shape)}"
        )
    out_features, in_features = weight.shape if weight is not None else (lora_B.shape[0], lora_A.shape[1])
    r = lora_A.shape[0]
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"x's last dimension must be in_features={in_features}, got x of shape {tuple(x.shape)}"
        )
    if lora_A.shape != (r, in_features) or lora_B.shape != (out_features, r):
        raise ValueError(
            f"lora_A must be (r, {in_features}) and lora_B ({out_features}, r) with one r; got "
            f"{tuple(lora_A.shape)} and {tuple(lora_B.shape)}"
        )
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    tensors = {"x": x, "lora_A": lora_A, "lora_B": lora_B}
    if weight is not None:
        tensors["weight"] = weight
    if bias is not None:
        tensors["bias"] = bias
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
    _check_real("dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def _check_real(name: str, value) -> None:
    """A real Python number: not a string, a bool, a tensor, NaN or infinity (each refused by name)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number (int or float), got {type(value).__name__} {value!r}")
    if not -math.inf < value < math.inf:  # comparisons, not math.isfinite: torch.compile traces them
        raise ValueError(f"{name} must be finite, got {value!r}")


def _check_magnitude(magnitude, weight: Tensor, lora_A: Tensor) -> None:
    if not isinstance(magnitude, Tensor):
        raise TypeError(f"magnitude must be a torch.Tensor or None, got {type(magnitude).__name__}")
    if magnitude.shape != (weight.shape[0],):
        raise ValueError(f"magnitude must have shape ({weight.shape[0]},) (one per output feature), "
                         f"got {tuple(magnitude.shape)}")
    if magnitude.dtype != lora_A.dtype:
        raise TypeError(f"magnitude must have the adapters' dtype {lora_A.dtype}, got {magnitude.dtype}")
    if magnitude.device != weight.device:
        raise ValueError(f"magnitude is on {magnitude.device}, the weight on {weight.device}")


def _check_dtypes(x: Tensor, weight: Tensor | None, bias, lora_A: Tensor, lora_B: Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    base = {"x": x.dtype} | ({"weight": weight.dtype} if weight is not None else {}) | (
        {"bias": bias.dtype} if bias is not None else {})
    if len(set(base.values())) > 1:
        raise TypeError(f"x, weight and bias must share one dtype, got {base}")
    if lora_A.dtype != lora_B.dtype or not lora_A.is_floating_point():
        raise TypeError(
            f"lora_A and lora_B must share one floating dtype, got {lora_A.dtype} and {lora_B.dtype}"
        )


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    *,
    training: bool = True,
    backend: str = "auto",
    magnitude: Tensor | None = None,
    output_for_backward: bool = False,
) -> Tensor:
    """y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ, dropout on the LoRA branch only and only in training
    (not with ``training=False``, not under ``torch.inference_mode()``).

    With ``magnitude`` (m, of shape (out,)), DoRA as PEFT computes it: g = m / ‖W + scaling · B A‖ per
    output row (a constant for autograd), y = g ⊙ (x Wᵀ + scaling · (x Aᵀ) Bᵀ) + b without dropout, and
    with dropout y = x Wᵀ + b + (g − 1) ⊙ (h Wᵀ) + g ⊙ scaling · (h Aᵀ) Bᵀ, h = dropout(x) (see
    :mod:`fastlora.dora_ops` for which parts run on the kernels).

    ``x`` is (..., in_features); ``weight`` (out, in); ``lora_A`` (r, in); ``lora_B`` (out, r).  The
    adapters may be kept in a wider dtype than the base (fp32 beside bf16, as PEFT does): the LoRA
    branch then runs in the adapters' dtype.  ``backend``: "torch" (the torch path, any device), "triton"
    (fused kernels; CUDA, or CPU under ``TRITON_INTERPRET=1``), "auto" (triton on CUDA, else torch).
    The dropout mask comes from a seed drawn from torch's RNG on x's device, so ``torch.manual_seed``
    reproduces it and activation checkpointing replays it.

    Args:
        x (Tensor): the input, (..., in_features), floating point.
        weight (Tensor | None): the base weight W, (out_features, in_features), x's dtype; or None for the
            low-rank term alone, scaling · (dropout(x) Aᵀ) Bᵀ in x's dtype, when the caller computes the base
            product itself (a quantized base); bias and magnitude must then be None.
        bias (Tensor | None): the base bias b, (out_features,) in x's dtype, or None.
        lora_A (Tensor): the LoRA factor A, (r, in_features).
        lora_B (Tensor): the LoRA factor B, (out_features, r), lora_A's dtype.
        scaling (float): a finite real number multiplying the LoRA branch (lora_alpha / r in a layer).
        dropout_p (float): dropout probability in [0, 1) on the LoRA branch's input.  Default 0.0.
        training (bool): keyword-only; False turns dropout off (eval mode).  Default True.
        backend (str): keyword-only; ``"auto"``, ``"torch"`` or ``"triton"`` as above.  Default "auto".
        magnitude (Tensor | None): keyword-only; DoRA's m, (out_features,), in the adapters' dtype and on
            W's device; None (default) for plain LoRA.
        output_for_backward (bool): keyword-only; with DoRA, no dropout and no bias, backward reads the
            returned y instead of keeping z = x Wᵀ + scaling · (x Aᵀ) Bᵀ (one M × N tensor less where the
            next op keeps y anyway); y must then not be changed in place before backward.  Default False, as
            fastlora's layers call it (a model may add into a Linear's output in place).

    Returns the output, (..., out_features).  All tensors must be on one device.

    PEFT equivalent: none — PEFT has no functional form; its ``peft.tuners.lora.Linear.forward`` computes
    the same ``base_layer(x) + scaling · lora_B(lora_A(dropout(x)))`` with modules.

    Example:
        >>> import torch
        >>> from fastlora import lora_linear
        >>> x, W = torch.randn(2, 5, 16), torch.randn(32, 16)
        >>> A, B = torch.randn(4, 16), torch.zeros(32, 4)
        >>> y = lora_linear(x, W, None, A, B, scaling=2.0, dropout_p=0.1, training=True)
        >>> y.shape
        torch.Size([2, 5, 32])
        >>> torch.allclose(y, x @ W.T, atol=1e-5)   # B = 0: the base output
        True
    """
    _check(x, weight, bias, lora_A, lora_B, dropout_p)
    if magnitude is not None:
        if weight is None:
            raise ValueError("magnitude (DoRA) needs the base weight: its norm ‖W + scaling · B A‖ reads W")
        _check_magnitude(magnitude, weight, lora_A)
    _check_real("scaling", scaling)
    if not isinstance(training, bool):
        raise TypeError(f"training must be True or False, got {training!r}")
    dtype = _autocast_dtype(x.device.type)
    if dtype is not None:
        x, weight = x.to(dtype), (weight.to(dtype) if weight is not None else None)
        bias = bias.to(dtype) if bias is not None else None
        lora_A, lora_B = lora_A.to(dtype), lora_B.to(dtype)
        magnitude = magnitude.to(dtype) if magnitude is not None else None
    _check_dtypes(x, weight, bias, lora_A, lora_B)
    schedule = resolve(backend, x, weight) if weight is not None else _low_rank_only(backend)
    p, seed = dropout_and_seed(dropout_p, training, x.device)  # after every check: a refused call draws nothing
    scalars = OpScalars(float(scaling), p, schedule)
    with _autocast_off(x.device.type):
        x2d = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # -1 is ambiguous where x has no features
        if magnitude is not None:
            y = dora_ops.dora_linear(x2d, weight, bias, lora_A, lora_B, magnitude, seed, scalars,
                                     output_for_backward=bool(output_for_backward))
        else:
            y = ops.lora_linear(x2d, weight, bias, lora_A, lora_B, seed, scalars)
    return y.view(*x.shape[:-1], lora_B.shape[0])


def dropout_and_seed(dropout_p: float, training: bool, device: torch.device) -> tuple[float, Tensor | None]:
    """(p, seed) of one call: no dropout outside training — eval mode (training=False) and torch.inference_mode()
    (which Dynamo cannot query; compiled code sees only the training flag) — and with dropout a seed drawn from
    torch's generator on ``device``, the mask's only state."""
    in_inference = not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()
    # a meta tensor holds no values to drop: its output's shape is the same without a mask
    p = float(dropout_p) if training and not in_inference and torch.device(device).type != "meta" else 0.0
    return p, (torch.randint(0, SEED_HIGH, (1,), device=device) if p > 0.0 else None)


def term_backend(backend: str) -> str:
    """The backend a layer of backend ``backend`` gives a low-rank term computed apart from a base product (a
    second active adapter's; the term added to a quantized base's output): its own, but "triton" as "auto".
    The kernels fuse the term into a base product, which this call does not compute, so the term takes the
    torch path on every device, as it does with "auto"."""
    return "auto" if backend == "triton" else backend


def _low_rank_only(backend: str) -> Schedule:
    """The schedule of a call without the base weight (the base product computed elsewhere): the torch path,
    which the fused kernels, built around the base GEMM, do not replace."""
    if backend == "triton":
        raise ValueError("backend='triton' needs the base weight (the kernels fuse the low-rank term into the base "
                         "product); with weight=None use backend='auto' or 'torch'")
    resolve(backend, torch.empty(0))  # the backend name's own check
    return TORCH

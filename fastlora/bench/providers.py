"""Providers: who builds the layer (or adapts the model) being measured.

Every provider builds, for ``(K, N, bias, r, alpha, p, dtype, device)``, a module that maps an (M, K)
input to (M, N), with the base weight (and bias) frozen, and adapts a transformers model with the seed
config for ``--model``.  Side by side in one run:

* ``frozen``          – the base ``nn.Linear`` alone, weight frozen, input requiring grad: the floor.
                        In ``--model`` mode: every weight frozen, the input embeddings' output requires
                        grad (``model.enable_input_require_grads()``), so the step has a full backward.
* ``peft``            – Hugging Face PEFT's ``lora.Linear`` (``inject_adapter_in_model``), PEFT defaults.
* ``peft+patch``      – the same PEFT layer or model after ``fastlora.patch_peft`` (PEFT's modules, fastlora's
                        op: the torch path on CPU, the kernels on CUDA).
* ``fastlora-torch``  – fastlora's ``LoRALinear`` with the PyTorch backend.
* ``fastlora-torch+inactive`` – the same with a second adapter of the same rank that is not active (not
                        in the default set): it must cost nothing.
* ``fastlora-triton`` – fastlora's ``LoRALinear`` with the Triton backend (CUDA only, unless asked for by
                        name under ``TRITON_INTERPRET=1``, where the timings mean nothing).
* ``peft-dora``       – PEFT's layer with ``use_dora=True``.
* ``fastlora-torch-dora`` / ``fastlora-triton-dora`` – fastlora's ``LoRALinear`` with ``use_dora=True`` on either
                        backend (see fastlora.dora_ops for which parts of DoRA run on the kernels; the
                        torch backend draws its dropout mask on the CPU).
* ``<name>+compile``  – ``frozen``, ``peft``, ``fastlora-torch`` and ``fastlora-triton`` under ``torch.compile``
                        (default options): what a user who wants speed tries first.  The first forward+backward
                        (tracing and compiling) is timed on its own as ``compile_s`` and never counted in the
                        step time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fastlora.functional import triton_interpreter_on

__all__ = ["Provider", "PROVIDERS", "DEFAULT_ORDER", "ALL_PROVIDERS", "COMPILED_PROVIDERS", "COMPILE_SUFFIX",
           "compiled", "compile_unavailable", "resolve_providers", "SEED_TARGETS"]

SEED_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class _Wrap(nn.Module):
    """One Linear under a name PEFT's ``target_modules`` can match."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def _frozen_linear(K, N, bias, dtype, device) -> nn.Linear:
    lin = nn.Linear(K, N, bias=bias, device=device, dtype=dtype)
    lin.requires_grad_(False)
    return lin


def _set_backend(module: nn.Module, backend: str) -> int:
    """Set ``backend`` on every fastlora LoRALinear inside ``module``; returns how many."""
    import fastlora

    cls = getattr(fastlora, "LoRALinear", None)
    n = 0
    for m in module.modules():
        if (cls is not None and isinstance(m, cls)) or hasattr(m, "lora_A") and hasattr(m, "backend"):
            if hasattr(m, "backend"):
                m.backend = backend
                n += 1
    return n


@dataclass
class Provider:
    name: str
    unavailable: Callable[[torch.device, bool], str | None]  # (device, explicitly requested) → reason or None
    layer: Callable[..., nn.Module]
    model: Callable[..., nn.Module]
    compiled: bool = False  # built under torch.compile: its first call compiles
    lora: bool = True  # adapts the layer or model (False: the frozen base, the floor)


# ---- frozen base -------------------------------------------------------------------------------------


def _frozen_unavailable(device, explicit):
    return None


def _frozen_layer(K, N, bias, r, alpha, p, dtype, device):
    return _frozen_linear(K, N, bias, dtype, device)


def _frozen_model(model, r, alpha, p, targets):
    import warnings

    model.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers 5 warns about a deprecated name it calls itself
        model.enable_input_require_grads()
    return model


# ---- PEFT --------------------------------------------------------------------------------------------


def _peft_unavailable(device, explicit):
    try:
        import peft  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"peft not importable ({type(e).__name__}: {e})"
    return None


def _peft_config(r, alpha, p, targets, use_dora=False):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, target_modules=list(targets), bias="none",
                      use_dora=use_dora)


def _peft_layer(K, N, bias, r, alpha, p, dtype, device, use_dora=False):
    from peft import inject_adapter_in_model

    wrap = _Wrap(_frozen_linear(K, N, bias, dtype, device))
    wrap = inject_adapter_in_model(_peft_config(r, alpha, p, ["proj"], use_dora), wrap)
    for name, prm in wrap.named_parameters():
        prm.requires_grad_("lora_" in name)
    return wrap


def _peft_model(model, r, alpha, p, targets, use_dora=False):
    from peft import get_peft_model

    import warnings

    cfg = _peft_config(r, alpha, p, targets, use_dora)
    cfg.task_type = "CAUSAL_LM"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 deprecation raised inside PEFT
        return get_peft_model(model, cfg)


def _peft_dora_layer(K, N, bias, r, alpha, p, dtype, device):
    return _peft_layer(K, N, bias, r, alpha, p, dtype, device, use_dora=True)


def _peft_dora_model(model, r, alpha, p, targets):
    return _peft_model(model, r, alpha, p, targets, use_dora=True)


def _patched_peft_layer(K, N, bias, r, alpha, p, dtype, device):
    from fastlora import patch_peft

    wrap = _peft_layer(K, N, bias, r, alpha, p, dtype, device)
    patch_peft(wrap)
    return wrap


def _patched_peft_model(model, r, alpha, p, targets):
    from fastlora import patch_peft

    model = _peft_model(model, r, alpha, p, targets)
    patch_peft(model)
    return model


# ---- fastlora ----------------------------------------------------------------------------------------


def _fastlora_unavailable_for(backend):
    def check(device, explicit):
        try:
            import fastlora
        except Exception as e:  # noqa: BLE001
            return f"fastlora not importable ({type(e).__name__}: {e})"
        if not hasattr(fastlora, "LoRALinear"):
            return "fastlora.LoRALinear not there yet"
        if backend == "triton":
            try:
                import triton  # noqa: F401
            except Exception as e:  # noqa: BLE001
                return f"triton not importable ({e})"
            if device.type != "cuda" and not (explicit and triton_interpreter_on()):
                return "needs CUDA (or TRITON_INTERPRET=1 and --providers fastlora-triton)"
        return None

    return check


def _fastlora_layer_for(backend, use_dora=False):
    def build(K, N, bias, r, alpha, p, dtype, device):
        import fastlora

        m = fastlora.LoRALinear(K, N, bias=bias, r=r, lora_alpha=alpha, lora_dropout=p, use_dora=use_dora,
                                device=device, dtype=dtype)
        m.weight.requires_grad_(False)
        if m.bias is not None:
            m.bias.requires_grad_(False)
        if hasattr(m, "backend"):
            m.backend = backend
        return m

    return build


def _fastlora_model_for(backend, inactive_adapter=False, use_dora=False):
    def adapt(model, r, alpha, p, targets):
        import fastlora

        cfg = fastlora.LoraConfig(
            task_type="CAUSAL_LM", target_modules=list(targets), r=r, lora_alpha=alpha, lora_dropout=p,
            use_dora=use_dora,
        )
        out = fastlora.get_peft_model(model, cfg)
        if inactive_adapter:
            out.add_adapter("inactive", cfg)
        _set_backend(out, backend)
        return out

    return adapt


def _fastlora_layer_with_inactive_adapter(K, N, bias, r, alpha, p, dtype, device):
    from fastlora.adapter_settings import AdapterSettings

    m = _fastlora_layer_for("torch")(K, N, bias, r, alpha, p, dtype, device)
    m.add_adapter("inactive", AdapterSettings(r, alpha, p))
    m.lora_factors("inactive")[0].requires_grad_(False)
    m.lora_factors("inactive")[1].requires_grad_(False)
    return m


PROVIDERS: dict[str, Provider] = {
    "frozen": Provider("frozen", _frozen_unavailable, _frozen_layer, _frozen_model, lora=False),
    "peft": Provider("peft", _peft_unavailable, _peft_layer, _peft_model),
    "fastlora-torch": Provider(
        "fastlora-torch", _fastlora_unavailable_for("torch"), _fastlora_layer_for("torch"), _fastlora_model_for("torch")
    ),
    "fastlora-triton": Provider(
        "fastlora-triton",
        _fastlora_unavailable_for("triton"),
        _fastlora_layer_for("triton"),
        _fastlora_model_for("triton"),
    ),
    "peft+patch": Provider("peft+patch", _peft_unavailable, _patched_peft_layer, _patched_peft_model),
    "fastlora-torch+inactive": Provider(
        "fastlora-torch+inactive", _fastlora_unavailable_for("torch"), _fastlora_layer_with_inactive_adapter,
        _fastlora_model_for("torch", inactive_adapter=True),
    ),
    "peft-dora": Provider("peft-dora", _peft_unavailable, _peft_dora_layer, _peft_dora_model),
    "fastlora-torch-dora": Provider(
        "fastlora-torch-dora", _fastlora_unavailable_for("torch"), _fastlora_layer_for("torch", use_dora=True),
        _fastlora_model_for("torch", use_dora=True),
    ),
    "fastlora-triton-dora": Provider(
        "fastlora-triton-dora", _fastlora_unavailable_for("triton"), _fastlora_layer_for("triton", use_dora=True),
        _fastlora_model_for("triton", use_dora=True),
    ),
}


# ---- torch.compile'd twins ---------------------------------------------------------------------------

COMPILE_SUFFIX = "+compile"


def compile_unavailable(device) -> str | None:
    """Why torch.compile cannot run here (None when it can): inductor needs a C++ compiler for CPU code and
    triton for CUDA code."""
    if not hasattr(torch, "compile"):
        return "torch.compile not in this torch"
    if device.type == "cpu":
        import os
        import shutil

        if not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
            return "torch.compile on CPU needs a C++ compiler (g++ or clang++) on PATH"
    else:
        try:
            import triton  # noqa: F401
        except Exception as e:  # noqa: BLE001
            return f"torch.compile on CUDA needs triton ({e})"
    return None


def compiled(base: Provider) -> Provider:
    """``base`` under ``torch.compile``: the same layer or adapted model, compiled as a whole."""

    def unavailable(device, explicit):
        return base.unavailable(device, explicit) or compile_unavailable(device)

    def layer(*args):
        return torch.compile(base.layer(*args))

    def model(*args):
        return torch.compile(base.model(*args))

    return Provider(base.name + COMPILE_SUFFIX, unavailable, layer, model, compiled=True, lora=base.lora)


PROVIDERS.update({n + COMPILE_SUFFIX: compiled(PROVIDERS[n])
                  for n in ("frozen", "peft", "fastlora-torch", "fastlora-triton")})
COMPILED_PROVIDERS = [n for n, p in PROVIDERS.items() if p.compiled]

DEFAULT_ORDER = ["frozen", "peft", "peft+patch", "fastlora-torch", "fastlora-triton"]
DORA_PROVIDERS = ["peft-dora", "fastlora-torch-dora", "fastlora-triton-dora"]
ALL_PROVIDERS = [*DEFAULT_ORDER, "fastlora-torch+inactive", *DORA_PROVIDERS, *COMPILED_PROVIDERS]


def resolve_providers(names: list[str] | None, device: torch.device, *, with_compiled: bool = False
                      ) -> tuple[list[Provider], dict[str, str]]:
    """The providers to run (in table order) and, for each one left out, why.  ``with_compiled``: each chosen
    provider's ``torch.compile`` twin too, where it has one."""
    explicit = names is not None
    wanted = list(names if names else DEFAULT_ORDER)
    if with_compiled:
        wanted += [n + COMPILE_SUFFIX for n in wanted if n + COMPILE_SUFFIX in PROVIDERS and n + COMPILE_SUFFIX not in wanted]
    chosen, skipped = [], {}
    for n in wanted:
        if n not in PROVIDERS:
            raise ValueError(f"unknown provider {n!r}; choose from {', '.join(ALL_PROVIDERS)}")
        reason = PROVIDERS[n].unavailable(device, explicit)
        if reason is None:
            chosen.append(PROVIDERS[n])
        else:
            skipped[n] = reason
    return chosen, skipped

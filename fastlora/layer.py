"""``LoRALinear``: an ``nn.Linear`` that owns its LoRA factors and calls :func:`fastlora.lora_linear`.

A layer holds one or more named adapters (``"default"`` unless named otherwise); one is active, or several,
whose updates add up.
Each adapter's factors are Parameters of the layer itself, ``lora_A_<name>`` (r × in) and
``lora_B_<name>`` (out × r), plus ``lora_magnitude_vector_<name>`` (out) for a DoRA adapter and
``lora_bias_<name>`` (out) for a bias on B, so FSDP and ZeRO-3 gather them with the layer (no prefix begins
another, so no two adapters' names give one parameter name); ``lora_A``, ``lora_B``, ``r``, ``lora_alpha``,
``lora_dropout`` and ``scaling`` are the active adapter's.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Iterable, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastlora.adapter_settings import AdapterSettings, check_adapter_name
from fastlora.functional import BACKENDS, lora_linear, term_backend
from fastlora.mixed_batch_rows import MixedBatchRows
from fastlora.tied_factors import TiedFactors
from fastlora.torch_path import dora_scale, dora_weight_norm
from fastlora.weight_inits import (WEIGHT_INITS, check_weight_init, corda_factors, is_weight_init, loftq_factors,
                                   lora_ga_factors, mica_factors, olora_factors, orthogonal_factors, pissa_factors,
                                   rank_limit)

__all__ = ["LoRALinear", "AdapterSettings", "check_adapter_name"]  # the last two live in adapter_settings

_ACTIVE_ADAPTER_ATTRIBUTES = frozenset({"lora_A", "lora_B", "settings", "r", "lora_alpha", "lora_dropout",
                                        "use_rslora", "use_dora", "scaling"})


def _active_setting(name: str, settable: bool = True) -> property:
    """A layer property reading (and, if ``settable``, replacing, validated) the active adapter's setting."""

    def get(self):
        return getattr(self.settings, name)

    def set_(self, value) -> None:
        self._replace_settings(**{name: value})

    return property(get, set_ if settable else None, doc=f"The active adapter's {name}.")


def _finite(weight: Tensor, bias: Tensor | None) -> bool:
    """Whether a merged weight (and merged bias, if any) is free of NaN and Inf."""
    return bool(torch.isfinite(weight).all()) and (bias is None or bool(torch.isfinite(bias).all()))


# nn.Linear subclasses whose own forward computes x Wᵀ + b all the same (in another order of operations): (the
# end of the module's name, the class name), so that a copy of the modeling file (trust_remote_code) counts too.
_FORWARDS_AS_LINEAR = frozenset({("modeling_falcon", "FalconLinear")})


def computes_as_linear(module: nn.Module) -> bool:
    """Whether ``module``'s forward is x Wᵀ + b, as nn.Linear's: a subclass with a forward of its own (a router
    returning its top-k, a projection with extra features, a quantization library's layer) computes something else,
    which an adapted layer of W and b would not reproduce."""
    cls = type(module)
    return (cls.forward is nn.Linear.forward
            or (cls.__module__.rpartition(".")[2], cls.__qualname__) in _FORWARDS_AS_LINEAR)


def _check_init(init_lora_weights, backend) -> None:
    if not (init_lora_weights is True or init_lora_weights is False
            or init_lora_weights in ("gaussian", "nora", "eva", "lora_ga") or is_weight_init(init_lora_weights)):
        raise ValueError(f"init_lora_weights must be True, False, 'gaussian', 'nora', 'eva', 'lora_ga' or one of "
                         f"{WEIGHT_INITS}, got {init_lora_weights!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _draw_device() -> torch.device:
    """Where PEFT's constructors draw: the default device, but the CPU where that is "meta" (a meta-device context
    around a model whose weights are real), whose tensors hold no values to copy."""
    device = torch.empty(()).device
    return torch.device("cpu") if device.type == "meta" else device


def _peft_draws(a_shape, b_shape, with_bias: bool, init, r: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """(A, B, B's bias) as PEFT's Linear LoRA layer draws them from the global generator, in its order, on the default
    device and dtype: ``nn.Linear``'s own initialisation of A and of B (and of B's bias), then the adapter's
    initialisation (:func:`peft_reset_`; False and the initialisations from the base weight keep the constructors'
    values, which those overwrite).  So a seeded run starts from PEFT's values, and leaves
    the generator where PEFT leaves it."""
    device = _draw_device()
    A, B = torch.empty(a_shape, device=device), torch.empty(b_shape, device=device)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    nn.init.kaiming_uniform_(B, a=math.sqrt(5))
    bias = torch.empty(b_shape[0], device=device).uniform_(-1.0 / math.sqrt(b_shape[1]), 1.0 / math.sqrt(b_shape[1])) \
        if with_bias else None
    peft_reset_(A, B, bias, init, r)
    return A, B, bias


def peft_reset_(A: Tensor, B: Tensor, bias: Tensor | None, init, r: int) -> None:
    """PEFT's ``reset_lora_parameters`` on constructed factors, in place: True (and "lora_ga" before its data-driven
    step): A kaiming-uniform again; "gaussian": A normal with std 1/r; "nora" (NoRA): A as constructed, each column
    of it (of each expert's r rows, for a stack of experts' A) divided by its norm, A[:, j] / max(‖A[:, j]‖, 1e-6);
    these, and "eva": B and its bias 0; False and the initialisations from the base weight: nothing."""
    if init is False or is_weight_init(init):
        return
    if init == "gaussian":
        nn.init.normal_(A, std=1.0 / r)
    elif init == "nora":
        per_expert = A.view(-1, r, A.shape[-1])
        per_expert.div_(per_expert.norm(dim=1, keepdim=True).clamp_min(1e-6))
    elif init != "eva":
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    B.zero_()
    if bias is not None:
        bias.zero_()


class LoRALinear(TiedFactors, MixedBatchRows, nn.Linear):
    """y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ with W, b frozen and A (r × in), B (out × r) trained.

    ``weight`` and ``bias`` keep ``nn.Linear``'s names, so a base checkpoint loads unchanged.  A and B
    are the active adapter's (``lora_A_<name>``, ``lora_B_<name>``, Parameters of this module itself).
    Dropout acts on the LoRA branch only, in training mode only.  Inactive adapters cost nothing in
    forward and backward.

    ``LoRALinear.from_linear(linear, r=..., ...)`` wraps an existing ``nn.Linear`` instead, sharing (not
    copying) its weight and bias, with the same keyword arguments but ``device`` and ``dtype``.  More
    adapters come with ``add_adapter``; one of them is active (``set_adapter``).

    Args:
        in_features (int): size of each input sample, as ``nn.Linear``.
        out_features (int): size of each output sample, as ``nn.Linear``.
        bias (bool): whether the layer has a bias b (frozen, as W).  Default True.
        r (int): the adapter's rank, >= 1.  Default 8.
        lora_alpha (float): the LoRA alpha, > 0; ``scaling`` = lora_alpha / r.  Default 8.
        lora_dropout (float): dropout probability in [0, 1) on the LoRA branch's input.  Default 0.0.
        use_rslora (bool): rank-stabilised scaling, lora_alpha / sqrt(r).  Default False.
        use_dora (bool): a DoRA adapter, with a trained magnitude vector (one entry per output feature).
            Default False.
        lora_bias (bool): a trained bias b_B on B: the update is scaling · ((dropout(x) Aᵀ) Bᵀ + b_B), merged
            into the base bias.  Default False.
        init_lora_weights (bool | str): True (A kaiming-uniform, B = 0, so the layer starts at the base
            output), ``"gaussian"`` (A normal with std 1/r, B = 0) or False (both random).  Default True.
        adapter_dtype (torch.dtype | None): the adapter parameters' dtype (e.g. float32 beside a bfloat16
            weight); None: the weight's dtype.
        backend (str): ``"auto"`` (the Triton kernels for CUDA tensors, the PyTorch path otherwise),
            ``"torch"`` or ``"triton"``; see :func:`fastlora.lora_linear`.  Default "auto".
        adapter_name (str): the first adapter's name (:func:`fastlora.adapter_settings.check_adapter_name`'s rule:
            a non-empty string without ".", a path separator or a control character).  Default "default".
        device (torch.device | str | None): where the weight, bias and adapter are created, as ``nn.Linear``.
        dtype (torch.dtype | None): the weight's and bias's dtype, as ``nn.Linear``.

    PEFT equivalent: ``peft.tuners.lora.Linear``, PEFT's LoRA layer around an ``nn.Linear``; here the
    layer is the ``nn.Linear`` itself (``weight`` and ``bias`` at the top, no ``base_layer``) and the
    factors are Parameters of the layer, not ``lora_A[name]`` / ``lora_B[name]`` submodules.

    Example:
        >>> import torch
        >>> from fastlora import LoRALinear
        >>> layer = LoRALinear(64, 32, r=8, lora_alpha=16, lora_dropout=0.1)
        >>> layer.lora_A.shape, layer.lora_B.shape, layer.scaling
        (torch.Size([8, 64]), torch.Size([32, 8]), 2.0)
        >>> layer(torch.randn(4, 64)).shape
        torch.Size([4, 32])
        >>> wrapped = LoRALinear.from_linear(torch.nn.Linear(64, 32), r=4)   # shares W and b, frozen
        >>> wrapped.weight.requires_grad, wrapped.lora_A.requires_grad
        (False, True)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        lora_bias: bool = False,
        init_lora_weights: Union[bool, str] = True,
        adapter_dtype: torch.dtype | None = None,
        backend: str = "auto",
        adapter_name: str = "default",
        device=None,
        dtype=None,
    ) -> None:
        settings = AdapterSettings(r, lora_alpha, lora_dropout, use_rslora, use_dora, lora_bias)
        _check_init(init_lora_weights, backend)
        check_adapter_name(adapter_name)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.weight.requires_grad_(False)  # the base is frozen, as after from_linear; unfreeze to train it
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._init_adapter_state(backend)
        self.add_adapter(adapter_name, settings, init_lora_weights=init_lora_weights, adapter_dtype=adapter_dtype)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        lora_bias: bool = False,
        init_lora_weights: Union[bool, str] = True,
        adapter_dtype: torch.dtype | None = None,
        backend: str = "auto",
        adapter_name: str = "default",
    ) -> "LoRALinear":
        """Wrap ``linear``: its weight and bias are shared (not copied) and frozen.  Defaults as the constructor's
        (PEFT's: r=8, lora_alpha=8)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        if not computes_as_linear(linear):
            raise TypeError(f"from_linear needs a layer computing x Wᵀ + b; {type(linear).__name__} has a forward of "
                            f"its own (get_peft_model adapts bitsandbytes' 4-bit and 8-bit layers)")
        settings = AdapterSettings(r, lora_alpha, lora_dropout, use_rslora, use_dora, lora_bias)
        return cls.wrapping(linear, adapter_name, settings, init_lora_weights, adapter_dtype, backend)

    @classmethod
    def wrapping(cls, linear: nn.Linear, adapter_name: str, settings: AdapterSettings, init_lora_weights=True,
                 adapter_dtype: torch.dtype | None = None, backend: str = "auto") -> "LoRALinear":
        """:meth:`from_linear` with the adapter's settings given whole."""
        _check_init(init_lora_weights, backend)
        check_adapter_name(adapter_name)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer._init_adapter_state(backend)
        layer.add_adapter(adapter_name, settings, init_lora_weights=init_lora_weights, adapter_dtype=adapter_dtype)
        linear.weight.requires_grad_(False)  # once the adapter is made: a refused one leaves the Linear as it was
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        return layer

    def _init_adapter_state(self, backend: str) -> None:
        self.backend = backend
        self.adapter_settings: dict[str, AdapterSettings] = {}
        self.active_adapters: list[str] = []  # PEFT's several active adapters: their updates add up
        self.merged_adapters: list[str] = []
        self.adapter_enabled = True
        self._merged_dora_norms: dict[str, Tensor] = {}  # n of each merged DoRA adapter, for unmerge
        self.dropout_paused: set[str] = set()  # set_adapter(..., inference_mode=True)'s, until train() / eval()

    def train(self, mode: bool = True) -> "LoRALinear":
        """As nn.Module's; and every adapter's dropout applies again in training (PEFT: its dropout modules follow
        the model's mode again)."""
        self.dropout_paused = set()
        return super().train(mode)

    def forward_settings(self, adapter_name: str) -> AdapterSettings:
        """The adapter's settings as a forward uses them: without dropout while ``set_adapter(...,
        inference_mode=True)`` holds for it (until the next ``train()`` or ``eval()``), as in PEFT."""
        settings = self.adapter_settings[adapter_name]
        paused = adapter_name in self.dropout_paused and settings.lora_dropout
        return dataclasses.replace(settings, lora_dropout=0.0) if paused else settings

    # ---- adapters ---------------------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapter_settings)

    def lora_factors(self, adapter_name: str | None = None) -> tuple[nn.Parameter, nn.Parameter]:
        """(A, B) of ``adapter_name`` (default: the active adapter); KeyError when the layer does not hold it."""
        name = self.active_adapter if adapter_name is None else adapter_name
        if name not in self.adapter_settings:
            raise KeyError(f"adapter {name!r} not found; this layer has {self.adapter_names}")
        return self._parameters[f"lora_A_{name}"], self._parameters[f"lora_B_{name}"]

    def magnitude(self, adapter_name: str | None = None) -> nn.Parameter | None:
        """DoRA's magnitude vector m (out) of ``adapter_name`` (default: the active adapter); None for LoRA."""
        name = self.active_adapter if adapter_name is None else adapter_name
        self.lora_factors(name)
        return self._parameters.get(f"lora_magnitude_vector_{name}")

    def lora_bias(self, adapter_name: str | None = None) -> nn.Parameter | None:
        """The bias on B (out) of ``adapter_name`` (default: the active adapter), with ``lora_bias=True``; else None."""
        name = self.active_adapter if adapter_name is None else adapter_name
        self.lora_factors(name)
        return self._parameters.get(f"lora_bias_{name}")

    def adapter_parameters(self, adapter_name: str | None = None) -> list[nn.Parameter]:
        """Every trained parameter of ``adapter_name``: A, B (not a frozen B: MiCA's) and, for DoRA, m; with
        lora_bias, B's bias."""
        name = self.active_adapter if adapter_name is None else adapter_name
        frozen = self.adapter_settings[name].frozen_lora_B if name in self.adapter_settings else False
        return [p for p in self.adapter_tensors(adapter_name) if not (frozen and p is self.lora_factors(name)[1])]

    def adapter_tensors(self, adapter_name: str | None = None) -> list[nn.Parameter]:
        """Every parameter of ``adapter_name``, trained or frozen."""
        extra = [self.magnitude(adapter_name), self.lora_bias(adapter_name)]
        return [*self.lora_factors(adapter_name), *(p for p in extra if p is not None)]

    @property
    def active_adapter(self) -> str | None:
        """The (first) active adapter, whose factors ``lora_A`` / ``lora_B`` and settings the layer's attributes show."""
        return self.active_adapters[0] if self.active_adapters else None

    @active_adapter.setter
    def active_adapter(self, name: str | None) -> None:
        self.active_adapters = [] if name is None else [name]

    def active_held(self) -> list[str]:
        """The active adapters this layer holds (a model's adapters may target different layers), in order."""
        return [name for name in self.active_adapters if name in self.adapter_settings]

    def __setstate__(self, state) -> None:
        if "active_adapter" in state and "active_adapters" not in state:  # pickled by a release with one active adapter
            name = state.pop("active_adapter")
            state["active_adapters"] = [] if name is None else [name]
        state.setdefault("dropout_paused", set())  # pickled by a release without set_adapter's inference_mode pause
        super().__setstate__(state)

    def _active(self) -> str:
        """The active adapter's name; AttributeError (so ``hasattr`` answers False) when this layer does not hold
        it, which happens when a model's adapters target different layers."""
        if self.active_adapter not in self.adapter_settings:
            raise AttributeError(f"this layer does not hold the active adapter {self.active_adapter!r} "
                                 f"(it holds {self.adapter_names})")
        return self.active_adapter

    def add_adapter(
        self,
        adapter_name: str,
        settings: AdapterSettings,
        *,
        init_lora_weights: Union[bool, str] = True,
        adapter_dtype: torch.dtype | None = None,
    ) -> None:
        """Add an adapter with fresh factors (PEFT's initialisations; for DoRA m = ‖W + scaling · B A‖ per
        output row); the first one added becomes active."""
        check_adapter_name(adapter_name)
        _check_init(init_lora_weights, self.backend)
        if adapter_name in self.adapter_settings:
            raise ValueError(f"adapter {adapter_name!r} already exists in this layer")
        if adapter_dtype is not None and not (isinstance(adapter_dtype, torch.dtype)
                                              and adapter_dtype.is_floating_point):
            raise TypeError(f"adapter_dtype must be a floating-point torch.dtype (or None: the weight's), got "
                            f"{adapter_dtype!r}")
        if (settings.frozen_lora_B or init_lora_weights == "mica") and (settings.use_dora or settings.lora_bias):
            raise ValueError("MiCA's frozen B (init_lora_weights='mica') does not go with use_dora or lora_bias, as in "
                             "PEFT")
        factory = {"device": self.weight.device, "dtype": adapter_dtype or self.weight.dtype}
        rank = self.stored_rank(settings.r)
        self.register_parameter(f"lora_A_{adapter_name}", nn.Parameter(torch.empty(rank, self.in_features, **factory)))
        self.register_parameter(f"lora_B_{adapter_name}", nn.Parameter(torch.empty(self.out_features, rank, **factory)))
        if settings.use_dora:
            self.register_parameter(f"lora_magnitude_vector_{adapter_name}",
                                    nn.Parameter(torch.empty(self.out_features, **factory)))
        if settings.lora_bias:
            if self.bias is None:
                warnings.warn(f"lora_bias=True on a layer of type {type(self.to_base()).__name__} without a bias: "
                              f"the adapter cannot be merged into it", UserWarning, stacklevel=2)
            self.register_parameter(f"lora_bias_{adapter_name}",
                                    nn.Parameter(torch.empty(self.out_features, **factory)))
        self.adapter_settings[adapter_name] = settings
        if settings.frozen_lora_B:
            self._freeze_lora_B(adapter_name)
        if self.active_adapter is None:
            self.active_adapter = adapter_name
        self.reset_lora_parameters(init_lora_weights, adapter_name)

    def stored_rank(self, r: int) -> int:
        """Rows of A (and columns of B) an adapter of rank ``r`` stores: r (a kind that stacks one factor pair per
        expert stores more)."""
        return r

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter that is not merged; deleting the active one activates the first that remains."""
        if adapter_name not in self.adapter_settings:
            raise KeyError(f"adapter {adapter_name!r} not found; this layer has {self.adapter_names}")
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into the weight; unmerge before deleting it")
        del self._parameters[f"lora_A_{adapter_name}"], self._parameters[f"lora_B_{adapter_name}"]
        self.tied_adapters.pop(adapter_name, None)
        self._parameters.pop(f"lora_magnitude_vector_{adapter_name}", None)
        self._parameters.pop(f"lora_bias_{adapter_name}", None)
        del self.adapter_settings[adapter_name]
        if adapter_name in self.active_adapters:
            self.active_adapters = [n for n in self.active_adapters if n != adapter_name]
            if not self.active_adapters:
                self.active_adapter = next(iter(self.adapter_settings), None)

    @property
    def disable_adapters(self) -> bool:
        """PEFT's flag: the layer computes its base output only."""
        return not self.adapter_enabled

    def enable_adapters(self, enabled: bool) -> None:
        """PEFT's layer switch: on, the active adapters apply and train; off, the layer computes its base output
        and its adapters are frozen."""
        self.adapter_enabled = bool(enabled)
        for name in self.adapter_names:
            for param in self.adapter_tensors(name):
                param.requires_grad_(False)
            if enabled and name in self.active_adapters:
                for param in self.adapter_parameters(name):
                    param.requires_grad_(True)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make ``adapter_name`` the active adapter, or a list of names the active adapters (their updates add up,
        as PEFT's).  A layer that does not hold an active adapter (a model's adapters may target different layers)
        leaves it out; holding none, it computes the base output."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            check_adapter_name(name)
        self.active_adapters = list(dict.fromkeys(names))

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: Union[bool, str] = True, adapter_name: str | None = None,
                              loftq_config: dict | None = None) -> None:
        """PEFT's initialisations, drawn as PEFT draws them (see ``_peft_draws``): True → A kaiming-uniform(a=√5),
        B = 0; "gaussian" → A ~ N(0, std=1/r), B = 0; False → both kaiming-uniform (a non-zero update from the
        start, for tests); "eva" / "lora_ga" as PEFT's layers start before PEFT's data-driven step; those from the
        base weight (:meth:`init_from_weight`; "loftq" with ``loftq_config``, ``{"loftq_bits": 4, "loftq_iter":
        1}``).  A DoRA adapter's magnitude is then set to ‖W + scaling · B A‖ per output row, so the layer starts at
        the base output (as PEFT's)."""
        name = self.active_adapter if adapter_name is None else adapter_name
        if is_weight_init(init_lora_weights):  # raises on the meta device, which has no weight to read
            self.check_weight_init(init_lora_weights, self.adapter_settings[name].r)
        if init_lora_weights == "mica":  # MiCA's B is its initialisation, kept
            self._freeze_lora_B(name)
        if self.weight.device.type == "meta":
            return
        lora_A, lora_B = self.lora_factors(name)
        bias = self.lora_bias(name)
        values = _peft_draws(lora_A.shape, lora_B.shape, bias is not None, init_lora_weights,
                             self.adapter_settings[name].r)
        for param, value in zip((lora_A, lora_B, bias), values):
            if param is not None:
                self._hold(param, value)
        if is_weight_init(init_lora_weights):
            self.init_from_weight(init_lora_weights, name, loftq_config)
        else:
            self._set_magnitude(name)

    # PiSSA, OLoRA, LoftQ, LoRA-GA and CorDA change this kind's base weight (an embedding keeps the default
    # initialisation instead)
    WEIGHT_INITS_CHANGE_BASE = True

    # Whether the base layer stays a child module (``base_layer``) holding its weight and bias (a quantized
    # base's), where this layer holds them itself
    HOLDS_BASE_LAYER = False

    @torch.no_grad()
    def init_from_weight(self, init: str, adapter_name: str, loftq_config: dict | None = None,
                         factors: tuple[Tensor, Tensor] | None = None) -> None:
        """Give ``adapter_name`` the factors of PiSSA, OLoRA, LoftQ, LoRA-GA, CorDA or the orthogonal
        initialisation (B's bias 0, a DoRA magnitude from the resulting weight): see :meth:`_init_from_weight`.
        ``factors``: the (A, B) :meth:`init_factors` computed when the layer was built (required by "lora_ga" and
        "corda")."""
        self.check_weight_init(init, self.adapter_settings[adapter_name].r)
        self._init_from_weight(init, adapter_name, loftq_config, factors)
        bias = self.lora_bias(adapter_name)
        if bias is not None:
            nn.init.zeros_(bias)
        self._set_magnitude(adapter_name)

    @torch.no_grad()
    def init_factors(self, init: str, adapter_name: str, source=None,
                     lora_ga_config: dict | None = None) -> tuple[Tensor, Tensor]:
        """(A, B) in float32 of an initialisation computed as the layer is built and given to
        :meth:`init_from_weight` once every layer is: one that draws from the global random generator, in PEFT's
        order ("pissa_niter_<n>"; "lora_ga" from ``source``, the estimated gradient laid out as the stored weight,
        and ``lora_ga_config``), or one from what a data-driven step left on the base layer ("corda": ``source``,
        the kept directions U_WC, S_WC, V_WC).  Nothing in the layer changes."""
        settings = self.adapter_settings[adapter_name]
        self.check_weight_init(init, settings.r)
        if init == "corda":
            return self._corda_factors(source, settings)
        if init != "lora_ga":
            return pissa_factors(self.base_weight().to(torch.float32), settings.r, settings.scaling, init)
        gradient = source
        if gradient.shape != self.weight.shape:
            raise ValueError(f"the LoRA-GA gradient held for this layer has shape {tuple(gradient.shape)}, its weight "
                             f"{tuple(self.weight.shape)}: it was estimated for another model")
        weight = self.base_weight().to(torch.float32) if lora_ga_config["scale"] == "weight_svd" else None
        return lora_ga_factors(self._out_by_in(gradient).to(torch.float32), settings.r, settings.scaling,
                               lora_ga_config, weight)

    def _corda_factors(self, eigens, settings) -> tuple[Tensor, Tensor]:
        U, S, V = eigens.U_WC, eigens.S_WC, eigens.V_WC
        for name, value in (("U", U), ("S", S), ("V", V)):
            if not torch.isfinite(value).all():
                raise ValueError(f"CorDA's decomposition holds an invalid value (NaN or Inf) in {name} for this layer")
        for name, value, want in (("U", U, (self.out_features, settings.r)), ("S", S, (settings.r,)),
                                  ("V", V, (self.in_features, settings.r))):
            if tuple(value.shape) != want:
                raise ValueError(f"Matrix {name} size mismatch: {tuple(value.shape)} vs. {want}. Please make sure the "
                                 f"`lora_config` and `model` argument of `preprocess_corda` is consistent with "
                                 f"`get_peft_model` (a cache file built with the same model and LoRA rank).")
        return corda_factors(U.float(), S.float(), V.float(), settings.scaling)

    def _out_by_in(self, stored: Tensor) -> Tensor:
        """A tensor laid out as the stored weight (a gradient of it), seen out × in as :meth:`base_weight`."""
        return stored

    def _freeze_lora_B(self, name: str) -> None:
        """Make ``name`` an adapter whose B keeps its values (MiCA's): only A trains."""
        self.adapter_settings[name] = dataclasses.replace(self.adapter_settings[name], frozen_lora_B=True)
        self.lora_factors(name)[1].requires_grad_(False)

    def _set_magnitude(self, name: str) -> None:
        magnitude = self.magnitude(name)
        if magnitude is not None:
            lora_A, lora_B = self.lora_factors(name)
            magnitude.copy_(dora_weight_norm(self.base_weight(), lora_A, lora_B, self.adapter_settings[name].scaling))

    def check_weight_init(self, init: str, r: int) -> None:
        """Raise where this layer cannot take the initialisation ``init`` (:mod:`fastlora.weight_inits`) at rank
        ``r``, before anything changes: a malformed name, an odd rank for "orthogonal", a weight on the meta device,
        a rank beyond :func:`fastlora.weight_inits.rank_limit`."""
        check_weight_init(init, r)
        if self.weight.device.type == "meta":
            raise ValueError(f"init_lora_weights={init!r} reads the base weight, which is on the meta device: load "
                             f"the model's weights before adding the adapter")
        limit = rank_limit(init, self.in_features, self.out_features)
        if limit is not None and r > limit:
            raise ValueError(f"init_lora_weights={init!r} with r={r} on a layer of {self.in_features} → "
                             f"{self.out_features} features: the rank can be at most {limit} there")

    def _factor_rounding_dtype(self) -> torch.dtype | None:
        """The dtype PEFT moves a new adapter's factors to before ``autocast_adapter_dtype`` casts them (the base
        weight's); None: none."""
        return self.weight.dtype

    def _hold(self, param: Tensor, value: Tensor) -> None:
        """Copy a new adapter value into its parameter as PEFT holds it: rounded to :meth:`_factor_rounding_dtype`
        first, then in the parameter's own dtype."""
        rounding = self._factor_rounding_dtype()
        param.copy_(value.to(rounding) if rounding is not None else value)

    def _init_from_weight(self, init: str, name: str, loftq_config: dict | None = None,
                          factors: tuple[Tensor, Tensor] | None = None) -> None:
        """PiSSA, OLoRA, LoftQ, LoRA-GA, CorDA or orthogonal factors (:mod:`fastlora.weight_inits`), held as PEFT
        holds them: rounded to a floating base weight's dtype first.  PiSSA, OLoRA and CorDA leave
        W − (scaling · B) A as the base weight, from the float32 factors (requantized where the base is
        quantized), LoRA-GA W − scaling · (B A) from the rounded factors, so the layer's output is unchanged;
        LoftQ leaves the quantized W."""
        settings = self.adapter_settings[name]
        if init in ("lora_ga", "corda") and factors is None:
            raise ValueError(f"init_lora_weights={init!r} takes the factors computed from its data-driven step's "
                             f"results (init_factors) when the layer is built")
        if init == "orthogonal":
            A, B = orthogonal_factors(self.in_features, self.out_features, settings.r)
        elif init == "loftq":
            if not loftq_config:
                raise ValueError("`loftq_config` must be specified when `init_lora_weights` is 'loftq'.")
            quantized, A, B = loftq_factors(self.base_weight(), settings.r, loftq_config["loftq_bits"],
                                            loftq_config["loftq_iter"])
            self._store_base_weight(quantized)
        elif init == "mica":  # the base weight stays: B A = 0
            A, B = mica_factors(self.base_weight().to(torch.float32), settings.r)
        elif init == "lora_ga":
            A, B = factors
            rounding = self._factor_rounding_dtype() or torch.float32
            held_A, held_B = A.to(rounding).to(torch.float32), B.to(rounding).to(torch.float32)
            self._store_base_weight(self.base_weight().to(torch.float32) - settings.scaling * (held_B @ held_A))
        else:
            weight = self.base_weight().to(torch.float32)
            if factors is not None:  # pissa_niter_<n>'s, drawn as the layer was built; CorDA's
                A, B = factors
            else:
                A, B = (pissa_factors(weight, settings.r, settings.scaling, init) if init.startswith("pissa")
                        else olora_factors(weight, settings.r))
            self._store_base_weight(weight - (settings.scaling * B) @ A)
        lora_A, lora_B = self.lora_factors(name)
        self._hold(lora_A, A)
        self._hold(lora_B, B)

    # The active adapter's factors and settings, under the names a single-adapter layer has always had.
    @property
    def lora_A(self) -> nn.Parameter:
        return self.lora_factors(self._active())[0]

    @property
    def lora_B(self) -> nn.Parameter:
        return self.lora_factors(self._active())[1]

    def __setattr__(self, name: str, value) -> None:
        if name in ("lora_A", "lora_B"):  # assigning the property: replace the active adapter's factor
            name = f"{name}_{self._active()}"
        super().__setattr__(name, value)

    def __getattr__(self, name: str):
        if name in _ACTIVE_ADAPTER_ATTRIBUTES:  # a property raised AttributeError: say why, not "no attribute"
            self._active()
        return super().__getattr__(name)

    @property
    def settings(self) -> AdapterSettings:
        return self.adapter_settings[self._active()]

    r = _active_setting("r", settable=False)
    lora_alpha = _active_setting("lora_alpha")
    lora_dropout = _active_setting("lora_dropout")
    use_rslora = _active_setting("use_rslora")
    use_dora = _active_setting("use_dora", settable=False)

    def _replace_settings(self, **changes) -> None:
        """Change the active adapter's lora_alpha / lora_dropout / use_rslora (validated; r is fixed by the
        factors' shapes)."""
        name = self._active()
        self.adapter_settings[name] = dataclasses.replace(self.adapter_settings[name], **changes)

    @property
    def scaling(self) -> float:
        return self.settings.scaling

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints from before layers held named adapters name the only adapter's factors lora_A / lora_B.
        if len(self.adapter_settings) == 1:
            (name,) = self.adapter_settings
            for which in ("lora_A", "lora_B"):
                if prefix + which in state_dict and f"{prefix}{which}_{name}" not in state_dict:
                    state_dict[f"{prefix}{which}_{name}"] = state_dict.pop(prefix + which)
        # Earlier checkpoints name a bias on B lora_B_bias_<name>, which adapter "bias_<name>"'s B could also be.
        for name, settings in self.adapter_settings.items():
            old, new = f"{prefix}lora_B_bias_{name}", f"{prefix}lora_bias_{name}"
            if settings.lora_bias and f"bias_{name}" not in self.adapter_settings and old in state_dict \
                    and new not in state_dict:
                state_dict[new] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- merge ------------------------------------------------------------------------------------

    def delta_weight(self, adapter_name: str | None = None) -> Tensor:
        """scaling · B A of ``adapter_name`` (default: the active adapter), in float32 (out × in)."""
        name = self.active_adapter if adapter_name is None else adapter_name
        lora_A, lora_B = self.lora_factors(name)
        return torch.mm(lora_B.float(), lora_A.float()).mul_(self.adapter_settings[name].scaling)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters) or bool(self.merged_by_owner())

    def _names_to_merge(self, adapter_names: Iterable[str] | None) -> list[str]:
        """The names to merge here, not merged yet; a tied adapter's are its owner's to merge."""
        names = self.active_held() if adapter_names is None else list(adapter_names)
        for name in names:
            self.lora_factors(name)  # unknown names raise before anything changes
        return [n for n in dict.fromkeys(names) if n not in self.merged_adapters and n not in self.tied_adapters]

    def _unmerged_weight(self) -> Tensor:
        """W with every merged adapter taken out again (a float32 copy here; a base kind may compute it as its
        peers do), undoing merges in reverse order."""
        weight = self.base_weight()
        restored = weight.float()
        if restored is weight:
            restored = restored.clone()
        for step, name in enumerate(reversed(self.merged_adapters)):
            if step:
                restored = self._stored_and_read_again(restored)
            if name in self._merged_dora_norms:
                restored.div_(dora_scale(self.magnitude(name), self._merged_dora_norms[name]).unsqueeze(1))
            restored.sub_(self.delta_weight(name))
        return restored

    def _merged_weight(self, names: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """(W with ``names`` merged in, in float32 here (a base kind may compute it as its peers do, quantized); the
        norms n of the DoRA adapters among them).  As PEFT's:
        LoRA adds scaling · B A; DoRA makes W ← g ⊙ (W + scaling · B A), g = m / ‖W₀ + scaling · B A‖ with W₀
        the weight without any merged adapter."""
        weight = self.base_weight()
        merged = weight.float()
        if merged is weight:
            merged = merged.clone()
        norms = {}
        unmerged = None
        for step, name in enumerate(names):
            if step:
                merged = self._stored_and_read_again(merged)
            delta = self.delta_weight(name)
            merged.add_(delta)
            if self.magnitude(name) is not None:
                if unmerged is None:
                    unmerged = self._unmerged_weight() if self.merged_adapters else weight.float()
                norms[name] = torch.linalg.vector_norm(unmerged + delta, dim=1)
                merged.mul_(dora_scale(self.magnitude(name), norms[name]).unsqueeze(1))
        return merged, norms

    def _stored_and_read_again(self, weight: Tensor) -> Tensor:
        """The float32 ``weight`` as it reads after being stored, between two adapters of one merge or unmerge:
        itself here (a float32 sum, rounded once, by the store); a base kind whose stores change the weight more
        than its dtype's rounding (quantized) overrides it, to merge adapter by adapter as PEFT does there."""
        return weight

    def _bias_after(self, names: list[str], sign: float) -> Tensor | None:
        """The base bias with ± scaling · b_B of each of ``names`` that has a lora_bias (None when none has),
        summed in float32; RuntimeError, before anything changes, when the base has no bias to hold it."""
        with_bias = [n for n in names if self.lora_bias(n) is not None]
        if not with_bias:
            return None
        if self.bias is None:
            raise RuntimeError(f"cannot merge adapter(s) {with_bias} with lora_bias=True: the base layer has no bias")
        total = self.bias.float()
        for name in with_bias:
            total = total + sign * self.adapter_settings[name].scaling * self.lora_bias(name).float()
        return total

    @torch.no_grad()
    def merge_problem(self, adapter_names: Iterable[str] | None = None, safe_merge: bool = False,
                      layer_name: str | None = None) -> str | None:
        """The message of the ValueError that merging ``adapter_names`` (default: the active adapter) would raise,
        or None when the merge would go through, from one build of the merged weight; nothing changes.  A model
        asks every layer before merging any; ``layer_name`` goes into the message.  RuntimeError where an adapter
        with lora_bias meets a base without a bias (which a model checks first)."""
        for owner, tied in self._tied_to_merge(adapter_names).items():
            problem = owner.merge_problem(tied, safe_merge, layer_name)
            if problem is not None:
                return problem
        names = self._names_to_merge(adapter_names)
        if not names:
            return None
        merged, _ = self._merged_weight(names)
        return self._merge_problem(names, merged, self._bias_after(names, +1.0), safe_merge, layer_name)

    def _merge_problem(self, names: list[str], merged: Tensor, bias: Tensor | None, safe_merge: bool,
                       layer_name: str | None = None) -> str | None:
        """Why storing ``merged`` (and ``bias``) would be refused: what storing would damage whatever
        ``safe_merge`` says, then, with ``safe_merge``, NaN or Inf."""
        reason = self._storage_refusal(merged)
        if reason is not None:
            into = f" into {layer_name}" if layer_name else ""
            return f"cannot merge adapter(s) {names}{into}: {reason}; nothing was merged"
        if safe_merge and not _finite(merged, bias):
            of = f" of {layer_name} for" if layer_name else " of"
            return f"NaNs or Infs in the merged weight{of} adapter(s) {names}: the adapter is broken; nothing was merged"
        return None

    def _storage_refusal(self, merged: Tensor) -> str | None:
        """Why storing ``merged`` (float32, or a quantized layer's merge dtype) as this layer's weight would damage it
        whatever ``safe_merge`` says (None: it would not); a base kind that stores W in another form (quantized)
        overrides it."""
        return None

    @torch.no_grad()
    def merge(self, adapter_names: Iterable[str] | None = None, safe_merge: bool = False) -> None:
        """W ← round(W + Σ scaling · B A) over ``adapter_names`` (default: the active adapter) not yet merged,
        summed in float32 and rounded once to W's dtype (a DoRA adapter also scales the rows, see
        ``_merged_weight``; a base kind whose stores round more, quantized, rounds after each adapter:
        ``_stored_and_read_again``).  ``safe_merge``: refuse (ValueError, W unchanged) when the merged weight would
        hold NaN or Inf.  A tied adapter (:attr:`tied_adapters`) is merged by its owner, once, into the table both
        layers share."""
        for owner, tied in self._tied_to_merge(adapter_names).items():
            owner.merge(tied, safe_merge)
        names = self._names_to_merge(adapter_names)
        if not names:
            return
        merged, norms = self._merged_weight(names)
        bias = self._bias_after(names, +1.0)
        problem = self._merge_problem(names, merged, bias, safe_merge)
        if problem is not None:
            raise ValueError(problem)
        self._store_base_weight(merged)
        if bias is not None:
            self.bias.copy_(bias)
        self.merged_adapters.extend(names)
        self._merged_dora_norms.update(norms)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged adapters out of W again (W ← round(W − Σ scaling · B A), a DoRA adapter's row scale
        divided out first): W back to within one rounding of its value before merge().  The owners of tied adapters
        merged into the shared table unmerge too."""
        for owner in {self.tied_adapters[name] for name in self.merged_by_owner()}:
            owner.unmerge()
        if not self.merged_adapters:
            return
        bias = self._bias_after(self.merged_adapters, -1.0)
        self._store_base_weight(self._unmerged_weight())
        if bias is not None:
            self.bias.copy_(bias)
        self.merged_adapters.clear()
        self._merged_dora_norms.clear()

    # ---- the base layer: what another base kind (fastlora.base_kinds) overrides ---------------------

    def base_weight(self) -> Tensor:
        """W as the LoRA math reads it: (out × in), a view of the stored weight, never a copy (the kernels read
        any strides)."""
        return self.weight

    def _store_base_weight(self, weight: Tensor) -> None:
        """Write a merged or unmerged (out × in) weight back into the stored one, rounded to its dtype."""
        self.weight.copy_(weight)

    def base_forward(self, x: Tensor) -> Tensor:
        """The base layer's own output (merged, disabled, or without the active adapter)."""
        return F.linear(x, self.weight, self.bias)

    def to_base(self) -> nn.Module:
        """The plain base layer, sharing this layer's weight and bias (as they are: merged or not)."""
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def to_linear(self) -> nn.Module:
        """:meth:`to_base` under the name a dense layer has always had (a Conv1D for a Conv1D base)."""
        return self.to_base()

    # ---- forward ----------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if self.row_adapters is not None:
            return self.mixed_batch_forward(x, self.row_adapters)
        names = self.active_held()
        if not self.adapter_enabled and self.merged:  # merged while disabled: taken out again first, as in PEFT
            self.unmerge()
        if self.merged or not self.adapter_enabled or not names:
            return self.base_forward(x)
        return self.adapted_forward(x, names)

    def adapted_forward(self, x: Tensor, names: list[str]) -> Tensor:
        """The output with the active adapters ``names`` (held by this layer, at least one): what a base kind
        computes differently overrides this, the dispatch in ``forward`` (merged, disabled, mixed batch) is
        shared."""
        first, *others = names
        lora_A, lora_B = self.lora_factors(first)
        settings = self.forward_settings(first)
        y = lora_linear(
            x, self.base_weight(), self._bias_with_lora_bias(first), lora_A, lora_B, settings.scaling,
            settings.lora_dropout, training=self.training, backend=self.backend, magnitude=self.magnitude(first),
        )
        for name in others:  # each active adapter's update added in turn, as PEFT adds them
            term = self.low_rank_term(x, name) if self.magnitude(name) is None else self.dora_term(x, name, y)
            y = y + term.to(y.dtype)
        return y

    def dora_term(self, x: Tensor, name: str, result: Tensor) -> Tensor:
        """What DoRA adapter ``name``, active after others, adds to ``result`` (the output so far), as PEFT computes
        it there: (g − 1) ⊙ base + g ⊙ scaling · (h Aᵀ) Bᵀ, g = m / ‖W + scaling · B A‖ (the norm not
        differentiated), h = dropout(x); base is ``result`` without the base bias when nothing is dropped (so it holds
        the adapters before this one, as in PEFT), else h Wᵀ.  On the torch path: its dropout mask is kept for
        backward (a combination PEFT's DoRA layer computes this way alone)."""
        lora_A, lora_B = self.lora_factors(name)
        settings = self.forward_settings(name)
        weight = self.base_weight()
        dropping = self.training and settings.lora_dropout > 0
        h = F.dropout(x, settings.lora_dropout, training=True) if dropping else x
        if dropping:
            base = F.linear(h.to(weight.dtype), weight)
        else:
            base = result if self.bias is None else result - self.bias.to(result.dtype)
        norm = dora_weight_norm(weight, lora_A, lora_B, settings.scaling)
        g = (self.magnitude(name) / norm.to(lora_A.dtype))
        low_rank = (h.to(lora_A.dtype) @ lora_A.t()) @ lora_B.t()
        return (g - 1) * base.to(lora_A.dtype) + g * low_rank * settings.scaling

    def _frozen_dense_base(self, x: Tensor) -> bool:
        """Whether this layer's base output is F.linear(x, W, b) with W and b frozen and of x's dtype: then a mixed
        batch's grouped updates go into the base product itself (:meth:`grouped_rows_forward`)."""
        if type(self).base_forward is not LoRALinear.base_forward or self.weight.requires_grad:
            return False
        return self.weight.dtype == x.dtype and (self.bias is None or not self.bias.requires_grad)

    def low_rank_term(self, x: Tensor, name: str) -> Tensor:
        """scaling · ((dropout(x) Aᵀ) Bᵀ + b_B) of LoRA adapter ``name`` (a DoRA one: :meth:`dora_term`), in the
        adapters' dtype rounded to x's, with its own mask: the update a layer adds on top of its base output for an
        active adapter after the first, as PEFT adds each active adapter's."""
        lora_A, lora_B = self.lora_factors(name)
        settings = self.forward_settings(name)
        term = lora_linear(x, None, None, lora_A, lora_B, settings.scaling, settings.lora_dropout,
                           training=self.training, backend=term_backend(self.backend))
        bias = self._scaled_lora_bias(name)
        return term if bias is None else term + bias.to(term.dtype)

    def _scaled_lora_bias(self, adapter_name: str) -> Tensor | None:
        """scaling · b_B of the adapter (in the adapters' dtype), None without lora_bias."""
        lora_bias = self.lora_bias(adapter_name)
        return None if lora_bias is None else lora_bias * self.adapter_settings[adapter_name].scaling

    def _bias_with_lora_bias(self, adapter_name: str) -> Tensor | None:
        """The base bias, plus scaling · b_B with the adapter's lora_bias (summed in the adapters' dtype, rounded
        once to the base's): the bias the op adds."""
        scaled = self._scaled_lora_bias(adapter_name)
        if scaled is None:
            return self.bias
        total = scaled if self.bias is None else scaled + self.bias.to(scaled.dtype)
        return total.to(self.weight.dtype)

    def extra_repr(self) -> str:
        adapters = ", ".join(
            f"{name}: r={s.r}, lora_alpha={s.lora_alpha}, lora_dropout={s.lora_dropout}, scaling={s.scaling:g}"
            + (", use_dora=True" if s.use_dora else "")
            for name, s in self.adapter_settings.items()
        )
        return f"{super().extra_repr()}, adapters={{{adapters}}}, active={self.active_adapter!r}, merged={self.merged_adapters}"


# PEFT's base class of its LoRA layers (``peft.tuners.lora.LoraLayer``), as scripts test modules with it
# (``isinstance(module, LoraLayer)``): every fastlora LoRA layer is a LoRALinear.
LoraLayer = LoRALinear

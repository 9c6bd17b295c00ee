"""LoRA on bitsandbytes' quantized Linears (QLoRA): ``bnb.nn.Linear4bit`` (nf4, fp4, with or without double
quantization) and ``bnb.nn.Linear8bitLt``.

:class:`LoRAQuantizedLinear` holds the quantized layer as ``base_layer`` (composition: its packed weight and
quantization state stay bitsandbytes'), and computes what PEFT's bitsandbytes LoRA layers compute:

    y = base_layer(x) + scaling · ((dropout(x) Aᵀ) Bᵀ + b_B)    (the term in the adapters' dtype, rounded to the
                                                                 base output's dtype)

(b_B: B's bias, with ``lora_bias=True``; merged into the base bias as scaling · b_B, the term the forward adds)

The base product is bitsandbytes' own (dequantization inside its matmul, on CPU and CUDA); the low-rank term is
``fastlora.lora_linear`` without a base weight, so dropout regenerates its mask from a seed instead of storing a
dropped copy of x.  On the kernels' device with the ``base_4bit=fused`` schedule, a 4-bit base with one active adapter
runs fused instead in eager mode (:mod:`fastlora.qlora_ops`): the GEMM dequantizes the weight tile by tile in
its main loop, forward and for dx, and adds the low-rank term in the same accumulator.  Adapters are float32 by
default, as PEFT creates them beside an integer weight.  Merging follows PEFT: dequantize, add scaling · B A
computed in the adapters' dtype, quantize again, adapter by adapter (with PEFT's warning about rounding).  A DoRA adapter (QDoRA) adds PEFT's DoRA term to
bitsandbytes' output (:mod:`fastlora.qdora_ops`), with the weight dequantized only while a pass needs it.
"""

from __future__ import annotations

import functools
import math
import re
import warnings

import torch
from torch import Tensor, nn

from fastlora.adapter_settings import AdapterSettings
from fastlora.layer import LoRALinear
from fastlora.schedules import QUANTIZED_VARIANTS, Schedule, kernel_schedule, resolve

__all__ = ["LoRAQuantizedLinear", "is_bnb_linear", "quantized_refusal", "plus_low_rank", "MIN_BITSANDBYTES"]


# The oldest bitsandbytes whose 4-bit layers run on the CPU as well (the qlora extra's floor).
MIN_BITSANDBYTES = (0, 46)


def _bnb():
    import bitsandbytes as bnb

    return bnb


def is_bnb_linear(module: nn.Module) -> bool:
    """bitsandbytes' Linear4bit or Linear8bitLt (recognised without importing bitsandbytes when it is not loaded;
    by class name when it cannot be imported, so that :func:`quantized_refusal` can say why)."""
    if type(module).__module__.split(".")[0] != "bitsandbytes":
        return False
    try:
        bnb = _bnb()
    except ImportError:
        return any(c.__name__ in ("Linear4bit", "Linear8bitLt") for c in type(module).__mro__)
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def _quant_state(base: nn.Module, weight: Tensor | None = None):
    """The quantization state of a 4-bit layer's weight (``weight``: the layer's current one unless given): the
    weight's own, or, where a wrapper dropped it (FSDP's flattening), the copy bitsandbytes keeps on the layer,
    which its own forward restores the weight's from."""
    weight = base.weight if weight is None else weight
    state = getattr(weight, "quant_state", None)
    return state if state is not None or weight is not base.weight else getattr(base, "quant_state", None)


def quantized_refusal(module: nn.Module) -> str | None:
    """Why the bitsandbytes layer ``module`` cannot be adapted (None when it can): bitsandbytes missing or older
    than fastlora's QLoRA needs, the layer's weight not loaded (on the meta device: no quantization state to
    read), or a 4-bit weight not quantized yet (its forward would fail inside bitsandbytes)."""
    needed = ".".join(map(str, MIN_BITSANDBYTES))
    try:
        bnb = _bnb()
    except ImportError as err:
        return (f"a bitsandbytes layer, but bitsandbytes cannot be imported ({err}); QLoRA needs "
                f"bitsandbytes>={needed}: pip install 'fastlora-kernels[qlora]'")
    found = tuple(int(part) for part in re.findall(r"\d+", bnb.__version__)[:2])
    if found < MIN_BITSANDBYTES:
        return (f"bitsandbytes {bnb.__version__} is installed; fastlora's QLoRA needs bitsandbytes>={needed}: "
                f"pip install -U 'bitsandbytes>={needed}'")
    if module.weight.device.type == "meta":
        return (f"a bitsandbytes {type(module).__name__} whose weight is on the meta device (not loaded, no "
                f"quantization state): load the model's weights before adapting it")
    if isinstance(module, bnb.nn.Linear4bit) and _quant_state(module) is None:
        return (f"a bitsandbytes {type(module).__name__} whose weight is not quantized yet (no quantization state; "
                f"bitsandbytes quantizes it when the layer moves to a device): call .to(device) on the layer, or "
                f"load the model with a BitsAndBytesConfig, before adapting it")
    return None


def plus_low_rank(result: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, dropout_p: float,
                  training: bool, backend: str) -> Tensor:
    """``result``, a quantized layer's output for x, plus scaling · (dropout(x) Aᵀ) Bᵀ (in the adapters' dtype,
    rounded to the output's), the mask drawn from a seed, on the torch path whatever the layer's ``backend``
    (:func:`fastlora.functional.term_backend`).  In place (:func:`fastlora.qlora_ops.add_low_rank_`: no M × N
    temporary, no second output) in eager mode outside autocast, where ``result`` is contiguous and no view (an
    8-bit layer's output in eval mode can be a view made inside bitsandbytes' autograd Function, which autograd
    forbids changing in place); otherwise out of place through the registered op (torch.compile, autocast's
    casts)."""
    from fastlora.functional import _autocast_dtype, dropout_and_seed, lora_linear, term_backend
    from fastlora.qlora_ops import add_low_rank_

    in_place = (not torch.compiler.is_compiling()  # first: Tensor._is_view is a graph break under torch.compile
                and not result._is_view() and result.is_contiguous() and _autocast_dtype(x.device.type) is None)
    if in_place:
        p, seed = dropout_and_seed(dropout_p, training, x.device)
        return add_low_rank_(result, x, lora_A, lora_B, scaling, p, seed)
    term = lora_linear(x, None, None, lora_A, lora_B, scaling, dropout_p, training=training,
                       backend=term_backend(backend))
    return result + term.to(result.dtype)


class LoRAQuantizedLinear(LoRALinear):
    """y = base_layer(x) + scaling · (dropout(x) Aᵀ) Bᵀ for a bitsandbytes 4-bit or 8-bit Linear ``base_layer``."""

    # A mixed batch copies bitsandbytes' output before its indexed adds (PEFT clones it too before adding to it);
    # one adapter's term goes into it in place where autograd allows that: no view (see plus_low_rank).
    CLONE_BASE_OUTPUT = True
    HOLDS_BASE_LAYER = True

    @classmethod
    def from_quantized(cls, base: nn.Module, adapter_name: str, settings: AdapterSettings, init_lora_weights,
                       adapter_dtype: torch.dtype | None, backend: str = "auto") -> "LoRAQuantizedLinear":
        """Wrap ``base`` (kept as ``base_layer``, frozen)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = base.in_features, base.out_features
        layer.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        layer._init_adapter_state(backend)
        layer.add_adapter(adapter_name, settings, init_lora_weights=init_lora_weights,
                          adapter_dtype=adapter_dtype or torch.float32)
        return layer

    # The quantized weight and the bias are the base layer's; they are not this layer's parameters (no second
    # state-dict key), only read through it.
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def add_adapter(self, adapter_name: str, settings: AdapterSettings, *, init_lora_weights=True,
                    adapter_dtype: torch.dtype | None = None) -> None:
        if adapter_dtype is None or not adapter_dtype.is_floating_point:
            adapter_dtype = torch.float32
        super().add_adapter(adapter_name, settings, init_lora_weights=init_lora_weights, adapter_dtype=adapter_dtype)

    def check_weight_init(self, init: str, r: int) -> None:
        super().check_weight_init(init, r)
        if init.startswith("pissa"):  # PEFT's refusal: PiSSA's residual is meant to be quantized afterwards
            raise TypeError("Please initialize PiSSA under float32, float16, or bfloat16. Subsequently, re-quantize "
                            "the residual model to help minimize quantization errors.")
        if init == "mica":  # PEFT's refusal
            raise TypeError("Please initialize MiCA under float32, float16, or bfloat16.")
        if init == "corda":  # PEFT's refusal: the residual is meant to be quantized afterwards
            raise TypeError("Please initialize CorDA under float32, float16, or bfloat16. Subsequently, re-quantize "
                            "the residual model to help minimize quantization errors.")
        if init == "lora_ga":  # PEFT's preprocess_loraga refuses these layers
            raise ValueError("LoRA-GA does not support quantized models: it needs the full-precision weight's "
                             "gradient; estimate it on the model loaded unquantized")
        if init == "loftq":
            raise TypeError("init_lora_weights='loftq' quantizes a full-precision model's weights itself (save that "
                            "model and load it quantized afterwards); on an already quantized model, create the "
                            "adapter and call fastlora.replace_lora_weights_loftq(model)")

    def _factor_rounding_dtype(self) -> torch.dtype | None:
        """A 4-bit layer's compute dtype (PEFT's choice); none for an 8-bit layer's int8 weight."""
        base = self.base_layer
        dtype = base.compute_dtype if hasattr(base, "compute_dtype") else base.weight.dtype
        return dtype if dtype is not None and dtype.is_floating_point else None

    def base_weight(self) -> Tensor:
        """W dequantized, (out × in): a copy, for merging and DoRA's norm (a LoRA forward pass never builds it)."""
        return self._dequantize(self.base_layer.weight)

    def _dequantize(self, weight: Tensor) -> Tensor:
        """``weight``, a quantized weight of the base layer (the current one, or the one a forward pass read),
        dequantized as PEFT dequantizes it: a fresh (out × in) tensor."""
        bnb = _bnb()
        if isinstance(self.base_layer, bnb.nn.Linear4bit):
            data, state = weight.data, _quant_state(self.base_layer, weight)
            if getattr(state, "packing_format_for_cpu", False):  # repacked for bitsandbytes' CPU kernels
                from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

                data, state = _convert_weight_packed_for_cpu_inverse(data, state)
            return bnb.functional.dequantize_4bit(data, state)
        if weight.dtype != torch.int8:  # an 8-bit layer holding float weights (has_fp16_weights, or not moved to
            return weight.data.to(torch.float32, copy=True)  # a device yet): bitsandbytes quantizes per call
        # Linear8bitLt: int8 rows with one absmax each (SCB)
        scale = weight.SCB if weight.SCB is not None else self.base_layer.state.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scale.to(weight.data.device))

    def _merged_weight(self, names: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """W with ``names`` merged in as PEFT's bitsandbytes layers merge LoRA adapters, one after the other,
        requantized between two: each update added as :meth:`_plus_update` adds it, so that adapters held in bf16
        (as TRL keeps QLoRA's) merge into PEFT's weights too.  With a DoRA adapter among them: LoRALinear's merge."""
        if any(self.magnitude(name) is not None for name in names):
            return super()._merged_weight(names)
        return self._with_updates(names, +1), {}

    def _unmerged_weight(self) -> Tensor:
        """W with every merged adapter taken out again, last first, as PEFT's bitsandbytes layers unmerge (see
        :meth:`_merged_weight`)."""
        if any(self.magnitude(name) is not None for name in self.merged_adapters):
            return super()._unmerged_weight()
        return self._with_updates(list(reversed(self.merged_adapters)), -1)

    def _with_updates(self, names: list[str], sign: int) -> Tensor:
        """The dequantized W with each of ``names``' updates added (``sign`` +1) or taken out (-1) in turn
        (:meth:`_plus_update`), requantized between two."""
        weight = self.base_weight()
        for step, name in enumerate(names):
            if step:
                weight = self._stored_and_read_again(weight)
            weight = self._plus_update(weight, name, sign)
        return weight

    def _plus_update(self, weight: Tensor, name: str, sign: int) -> Tensor:
        """``weight`` (dequantized) ± scaling · B A, computed as PEFT's bitsandbytes layers compute it: the update in
        the adapters' dtype (B A, then times scaling), added to a 4-bit layer's weight in the dtype torch promotes
        the two to, and to an 8-bit layer's int8 weight once cast to the adapters' dtype (float weights an 8-bit
        layer holds take it in the dtype the two promote to: casting them would round them)."""
        lora_A, lora_B = self.lora_factors(name)
        update = (lora_B @ lora_A) * self.adapter_settings[name].scaling
        if self.base_layer.weight.dtype == torch.int8:  # an 8-bit layer's int8 weight (not float weights it holds)
            weight = weight.to(update.dtype)
        return weight + update if sign > 0 else weight - update

    def _store_base_weight(self, weight: Tensor) -> None:
        """Quantize the merged or unmerged weight again, with the base's quantization settings."""
        self.base_layer.weight = self._quantized(weight, for_the_layer=True)

    def _stored_and_read_again(self, weight: Tensor) -> Tensor:
        """``weight`` quantized and dequantized: PEFT's bitsandbytes layers merge (and unmerge) several adapters
        one by one, requantizing the weight after each, so the merged weight carries each rounding as theirs.  A
        weight the layer cannot hold (:meth:`_storage_refusal`) stays as it is, so that the merge's own check names
        the overflow (requantized, it would read back as Inf or NaN)."""
        if self._storage_refusal(weight) is not None:
            return weight
        return self._dequantize(self._quantized(weight, for_the_layer=False))

    def _quantized(self, weight: Tensor, for_the_layer: bool) -> nn.Parameter:
        """``weight`` (out × in, float) quantized as the base layer's weight is: a new parameter of its kind.  Only
        one ``for_the_layer`` is bound to the layer (a 4-bit parameter gives its module its quantization state as
        it quantizes): an intermediate one, between two adapters of a merge, leaves the layer as it was."""
        bnb = _bnb()
        old = self.base_layer.weight
        if isinstance(self.base_layer, bnb.nn.Linear4bit):
            kwargs = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k != "data"}
            kwargs["bnb_quantized"] = False
            kwargs["requires_grad"] = False
            if not for_the_layer:
                kwargs.pop("module", None)
            return bnb.nn.Params4bit(weight.to("cpu"), **kwargs).to(old.device)
        if old.has_fp16_weights:  # kept in float and quantized per call: made where it lives, in its dtype (moving
            # such a parameter from the CPU to CUDA gives a plain tensor, which a module refuses as its weight)
            return bnb.nn.Int8Params(weight.to(device=old.device, dtype=old.dtype), requires_grad=False,
                                     has_fp16_weights=True)
        return bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False).to(old.device)

    def _storage_refusal(self, merged: Tensor) -> str | None:
        """Why requantizing the merged weight would damage it (None when it would not): NaN or Inf in it, or a
        value beyond the dtype bitsandbytes gives the weight (a 4-bit layer's compute dtype, into which forward
        casts the dequantized weight; float16 for an 8-bit layer, which quantizes from float16)."""
        peak = float(merged.abs().max()) if merged.numel() else 0.0
        if not math.isfinite(peak):
            return "the merged weight holds NaN or Inf"
        base = self.base_layer
        dtype = ((base.compute_dtype or _quant_state(base).dtype) if isinstance(base, _bnb().nn.Linear4bit)
                 else torch.float16)
        if peak > torch.finfo(dtype).max:
            return (f"the merged weight reaches {peak:.4g}, beyond {dtype}'s range ({torch.finfo(dtype).max:.4g}) "
                    f"in which the {self._bits()}-bit layer holds it: requantizing would overflow")
        return None

    def merge(self, adapter_names=None, safe_merge: bool = False) -> None:
        """As :meth:`LoRALinear.merge`: W ← quantize(dequantize(W) + scaling · B A), with PEFT's warning."""
        if self._names_to_merge(adapter_names):
            warnings.warn(f"Merge lora module to {self._bits()}-bit linear may get different generations due to "
                          f"rounding errors.")
        super().merge(adapter_names, safe_merge)

    def unmerge(self) -> None:
        if self.merged_adapters:
            warnings.warn(f"Unmerge lora module to {self._bits()}-bit linear may get different generations due to "
                          f"rounding errors.")
        super().unmerge()

    def quantization_backend(self) -> str:
        """The quantization library and kind of the base layer, as the layer status reports it."""
        return f"bnb {self._bits()}bit"

    def _bits(self) -> int:
        return 4 if isinstance(self.base_layer, _bnb().nn.Linear4bit) else 8

    def base_forward(self, x: Tensor) -> Tensor:
        return self.base_layer(x)

    def to_base(self) -> nn.Module:
        return self.base_layer

    def adapted_forward(self, x: Tensor, names: list[str]) -> Tensor:
        schedule = self._fused_4bit_schedule(x, names)
        if schedule is not None:
            return self._fused_4bit_forward(x, names[0], schedule)
        result = self.base_layer(x)
        for name in names:  # one update after the other, each rounded to the output's dtype, as PEFT adds them
            if self.magnitude(name) is not None:
                result = (result + self.dora_term(x, name, result)).to(result.dtype)
            elif self.lora_bias(name) is not None:  # term and b_B summed in the adapters' dtype, rounded once
                adapters_dtype = self.lora_factors(name)[0].dtype
                result = (result + self.low_rank_term(x.to(adapters_dtype), name)).to(result.dtype)
            else:
                lora_A, lora_B = self.lora_factors(name)
                settings = self.forward_settings(name)
                result = plus_low_rank(result, x, lora_A, lora_B, settings.scaling, settings.lora_dropout,
                                       self.training, self.backend)
        return result

    def dora_term(self, x: Tensor, name: str, result: Tensor) -> Tensor:
        """What DoRA adapter ``name`` adds to ``result``, the output so far (:mod:`fastlora.qdora_ops`: the weight
        dequantized for the norm and, with dropout, for the dropped input's product; kept by neither pass)."""
        from fastlora.functional import dropout_and_seed
        from fastlora.qdora_ops import quantized_dora_term

        lora_A, lora_B = self.lora_factors(name)
        settings = self.forward_settings(name)
        p, seed = dropout_and_seed(settings.lora_dropout, self.training, x.device)
        packed = self.base_layer.weight  # the weight this pass reads, dequantized again in backward
        return quantized_dora_term(x, result, self.bias, functools.partial(self._dequantize, packed), lora_A, lora_B,
                                   self.magnitude(name), settings.scaling, p, seed)

    def _fused_4bit_schedule(self, x: Tensor, names: list[str]) -> Schedule | None:
        """The kernel schedule when this call runs fused (a 4-bit base with a 16-bit compute dtype, one active
        adapter, plain LoRA (no DoRA, no lora_bias), the kernels' device, eager mode, and a schedule whose 4-bit
        product is fused: ``base_4bit=fused``, by name or from the schedule table for this shape);
        None for bitsandbytes' product plus the low-rank term (the default, ``base_4bit=dequant``: bitsandbytes'
        dequantize-then-matmul, the bounded-downside choice where no GPU run says otherwise; and under
        ``torch.compile``, where the fused call, an autograd.Function over bitsandbytes' quantization state, would
        break the graph)."""
        base = self.base_layer
        if torch.compiler.is_compiling():
            return None
        if len(names) != 1 or not isinstance(base, _bnb().nn.Linear4bit):
            return None
        if self.magnitude(names[0]) is not None or self.lora_bias(names[0]) is not None:  # not in the 4-bit kernel
            return None
        if (base.compute_dtype or x.dtype) not in (torch.float16, torch.bfloat16):  # the kernel's 16-bit dots
            return None
        if getattr(_quant_state(base), "packing_format_for_cpu", False):  # repacked for bitsandbytes' CPU kernels
            return None
        if not resolve(self.backend, x).uses_kernels:
            return None
        out_features, in_features = (int(s) for s in _quant_state(base).shape)
        schedule = kernel_schedule(x.numel() // max(in_features, 1), out_features, in_features, QUANTIZED_VARIANTS)
        return schedule if schedule.base_4bit == "fused" else None

    def _fused_4bit_forward(self, x: Tensor, name: str, schedule: Schedule) -> Tensor:
        """bitsandbytes' Linear4bit forward (x and bias in its compute dtype, the output in x's) with the adapter's
        term in the same GEMM (:func:`fastlora.qlora_ops.lora_linear_4bit`)."""
        from fastlora.functional import dropout_and_seed
        from fastlora.qlora_ops import lora_linear_4bit

        base = self.base_layer
        compute = base.compute_dtype or x.dtype
        bias = base.bias.to(compute) if base.bias is not None else None
        lora_A, lora_B = self.lora_factors(name)
        settings = self.forward_settings(name)
        p, seed = dropout_and_seed(settings.lora_dropout, self.training, x.device)
        y = lora_linear_4bit(x.to(compute), base.weight.data, _quant_state(base), bias, lora_A, lora_B,
                             settings.scaling, p, seed, schedule)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{name}: r={s.r}, lora_alpha={s.lora_alpha}, lora_dropout={s.lora_dropout}"
                             for name, s in self.adapter_settings.items())
        return f"adapters={{{adapters}}}, active={self.active_adapter!r}, merged={self.merged_adapters}"

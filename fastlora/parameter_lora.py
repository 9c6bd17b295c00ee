"""LoRA on a module's parameter (``LoraConfig(target_parameters=[...])``, PEFT's ``ParamWrapper``): the experts of a
mixture-of-experts block stored as one 3-D parameter (transformers' fused ``gate_up_proj`` / ``down_proj``), a
router's ``weight``, any weight a module uses in its own forward.

A parameter of E experts, each (out × in), is stored (E, out, in), or (E, in, out) where the module says
``is_transposed`` (gpt-oss); a 2-D parameter (out, in) is one expert.  An adapter of rank r holds, in PEFT's
layout,

    A (r·E × in), B (out × r·E)        A_e = A[e·r : (e+1)·r]   (rows, expert by expert)
                                       B_e = B[:, e::E]          (columns: column j·E + e is rank j of expert e)
    W_e ← W_e + scaling · B_e A_e      for the duration of the module's forward

so the module's own forward (its routing, every expert's gated MLP) computes with the adapted parameter, and
autograd carries the gradient of W + ΔW back to A and B.  There is no dropout, as in PEFT: the update is on the
weight, shared by every token, so it cannot act on a dropped copy of each token's input.

Several parameters of one module are adapted by nested layers, as PEFT nests them: the parameter registered last
by the outermost layer, at the module's path, the one before by its ``base_layer``, and so on, so that adapter
files carry PEFT's keys (``experts.lora_A.weight``, ``experts.base_layer.lora_A.weight``).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastlora.module_names import named_parameters
from fastlora.adapter_settings import AdapterSettings
from fastlora.config import LoraConfig, UnsupportedFeatureError
from fastlora.grouped_experts import FIRST, FIRST_NO_GATE, SECOND, grouped_experts_forward, is_transformers_experts
from fastlora.layer import LoRALinear
from fastlora.schedules import resolve

__all__ = ["LoRAParameter", "ParameterTarget", "plan_parameter_targets", "parameter_chain", "owner_of",
           "add_parameter_adapters", "wrapped_by_parameter_layers"]


def parameter_sizes(owner: nn.Module, parameter: Tensor) -> tuple[int, int, int, bool]:
    """(experts E, in_features, out_features, stored (E, in, out)) of a parameter LoRA adapts."""
    if parameter.dim() == 3:
        experts, first, second = parameter.shape
        transposed = bool(getattr(owner, "is_transposed", False))
        return (experts, first, second, True) if transposed else (experts, second, first, False)
    if parameter.dim() == 2:
        return 1, parameter.shape[1], parameter.shape[0], False
    raise ValueError(f"target_parameters adapts 2-D and 3-D parameters; {type(owner).__name__} has one of shape "
                     f"{tuple(parameter.shape)}")


class LoRAParameter(LoRALinear):
    """A module whose parameter ``parameter_name`` gets LoRA adapters (see the module docstring for the math).

    The module is kept as ``base_layer`` and runs its own forward; ``in_features`` / ``out_features`` are one
    expert's, ``num_experts`` how many the parameter stacks.  Adapter bookkeeping, activation, merging and files
    are :class:`fastlora.LoRALinear`'s, over the whole parameter.

    PEFT equivalent: ``peft.tuners.lora.ParamWrapper``.
    """

    @classmethod
    def wrap(cls, module: nn.Module, parameter_name: str, adapter_name: str, settings: AdapterSettings,
             init_lora_weights, adapter_dtype: torch.dtype | None, backend: str = "auto") -> "LoRAParameter":
        """Adapt ``module``'s parameter ``parameter_name`` (``module`` may itself be a LoRAParameter of another
        parameter of the same module).  ``backend``: where a transformers experts module's low-rank products run
        ("auto": the grouped Triton kernels on CUDA, torch ops elsewhere; "torch"; "triton")."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.base_layer = module
        layer.parameter_name = parameter_name
        owner = owner_of(module)
        layer.num_experts, layer.in_features, layer.out_features, layer.stored_transposed = parameter_sizes(
            owner, getattr(owner, parameter_name))
        layer._init_adapter_state(backend)
        layer.add_adapter(adapter_name, settings, init_lora_weights=init_lora_weights, adapter_dtype=adapter_dtype)
        return layer

    def check_weight_init(self, init: str, r: int) -> None:
        raise UnsupportedFeatureError(f"init_lora_weights={init!r} on a target_parameters adapter "
                                      f"({type(owner_of(self.base_layer)).__name__}.{self.parameter_name}): PiSSA, OLoRA, "
                                      f"LoftQ, LoRA-GA, CorDA and orthogonal initialisations are for Linear layers "
                                      f"(PEFT fails there too)")

    @staticmethod
    def check_settings(settings: AdapterSettings, where: str = "target_parameters",
                       otherwise: str = "adapt the parameter's module through target_modules if it is a Linear"
                       ) -> None:
        """PEFT's refusals: the update is on a weight, so no dropout of the input, no DoRA, no bias on B.  The
        message says ``where`` the settings were given and what to do ``otherwise`` than setting them off."""
        for name, on in (("lora_dropout", settings.lora_dropout != 0), ("use_dora", settings.use_dora),
                         ("lora_bias", settings.lora_bias)):
            if on:
                raise ValueError(f"{where} does not work with {name}={getattr(settings, name)!r} (as in PEFT): the "
                                 f"update is added to the weight itself; set {name} off, or {otherwise}")

    @property
    def weight(self) -> nn.Parameter:
        """The adapted parameter (the module's own, stored as the module stores it)."""
        return getattr(owner_of(self.base_layer), self.parameter_name)

    @property
    def bias(self) -> Tensor | None:
        """The module's own bias, which its forward adds unchanged (``bias="lora_only"`` trains it, as PEFT's)."""
        bias = getattr(owner_of(self.base_layer), "bias", None)
        return bias if isinstance(bias, Tensor) else None

    def stored_rank(self, r: int) -> int:
        return r * self.num_experts

    def add_adapter(self, adapter_name: str, settings: AdapterSettings, *, init_lora_weights=True,
                    adapter_dtype: torch.dtype | None = None) -> None:
        self.check_settings(settings, f"target_parameters ({self.parameter_name})")
        super().add_adapter(adapter_name, settings, init_lora_weights=init_lora_weights, adapter_dtype=adapter_dtype)

    def _stacks(self, adapter_name: str) -> tuple[Tensor, Tensor]:
        """(A_e stacked (E, r, in), B_e stacked (E, out, r)): views of A and B in PEFT's layout."""
        lora_A, lora_B = self.lora_factors(adapter_name)
        experts = self.num_experts
        return (lora_A.reshape(experts, -1, self.in_features),
                lora_B.reshape(self.out_features, -1, experts).permute(2, 0, 1))

    def _update(self, adapter_name: str, dtype: torch.dtype) -> Tensor:
        """scaling · B_e A_e of every expert, in the parameter's layout, computed in ``dtype``."""
        scaling = self.adapter_settings[adapter_name].scaling
        if self.weight.dim() == 2:
            lora_A, lora_B = self.lora_factors(adapter_name)
            return (lora_B.to(dtype) @ lora_A.to(dtype)) * scaling
        per_expert_A, per_expert_B = self._stacks(adapter_name)
        update = torch.bmm(per_expert_B.to(dtype), per_expert_A.to(dtype)) * scaling      # (E, out, in)
        return update.transpose(1, 2) if self.stored_transposed else update

    def delta_weight(self, adapter_name: str | None = None) -> Tensor:
        """scaling · B_e A_e of ``adapter_name`` (default: the active adapter), in float32, shaped as the parameter."""
        return self._update(self.active_adapter if adapter_name is None else adapter_name, torch.float32)

    def to_base(self) -> nn.Module:
        return self.base_layer

    def _path_to_parameter(self) -> str:
        """The parameter's name relative to ``base_layer`` (through the nested layers of other parameters)."""
        path, module = self.parameter_name, self.base_layer
        while isinstance(module, LoRAParameter):
            path, module = "base_layer." + path, module.base_layer
        return path

    def forward(self, *args, **kwargs):
        if self.row_adapters is not None:
            raise ValueError(f"adapter_names= (a mixed-adapter batch) is not supported on a model whose "
                             f"target_parameters adapt {type(owner_of(self)).__name__}.{self.parameter_name} (as in "
                             f"PEFT): the update is on the weight, shared by every row")
        names = self.active_held()
        if not self.adapter_enabled and self.merged:  # merged while disabled: taken out again first, as in PEFT
            self.unmerge()
        if self.merged or not self.adapter_enabled or not names:
            return self.base_layer(*args, **kwargs)
        routed = self._routed_arguments(args, kwargs)
        # transformers experts: per expert, no ΔW (eager only: the per-expert loop would break a compiled graph)
        if routed is not None and not torch.compiler.is_compiling():
            updates = {layer.parameter_name: layer.factor_stacks() for layer in parameter_chain(self)}
            kernels = resolve(self.backend, routed[0]).uses_kernels
            return grouped_experts_forward(owner_of(self), *routed, updates=updates, kernels=kernels)
        weight = self.weight
        update = None
        for name in names:  # the active adapters' updates add up, as PEFT's
            term = self._update(name, self.lora_factors(name)[0].dtype)
            update = term if update is None else update + term
        adapted = weight + update.to(weight.dtype)
        return torch.func.functional_call(self.base_layer, {self._path_to_parameter(): adapted}, args, kwargs)

    def factor_stacks(self) -> list[tuple[Tensor, Tensor, float]]:
        """Per active adapter (none when merged or disabled): (A_e stacked (E, r, in), B_e stacked (E, out, r),
        scaling), views of A and B in PEFT's layout."""
        if self.merged or not self.adapter_enabled:
            return []
        return [(*self._stacks(name), self.adapter_settings[name].scaling) for name in self.active_held()]

    def _routed_arguments(self, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor] | None:
        """(hidden_states, top_k_index, top_k_weights) when this layer and those inside it adapt the projections of
        a transformers experts module called with its routing (see :mod:`fastlora.grouped_experts`); else None."""
        owner = owner_of(self)
        if not is_transformers_experts(owner):
            return None
        first = FIRST if owner.has_gate else FIRST_NO_GATE
        if any(layer.parameter_name not in (first, SECOND) for layer in parameter_chain(self)):
            return None
        values = dict(zip(("hidden_states", "top_k_index", "top_k_weights"), args))
        values.update(kwargs)
        if len(args) > 3 or set(values) != {"hidden_states", "top_k_index", "top_k_weights"}:
            return None
        return values["hidden_states"], values["top_k_index"], values["top_k_weights"]

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, num_experts={self.num_experts}, " + super().extra_repr()


def owner_of(module: nn.Module) -> nn.Module:
    """The module that holds the parameters, under any LoRAParameter layers around it."""
    while isinstance(module, LoRAParameter):
        module = module.base_layer
    return module


def parameter_chain(module: nn.Module) -> list[LoRAParameter]:
    """The LoRAParameter layers around a module, outermost first."""
    chain = []
    while isinstance(module, LoRAParameter):
        chain.append(module)
        module = module.base_layer
    return chain


@dataclass(frozen=True)
class ParameterTarget:
    """One parameter ``target_parameters`` adapts: ``owner`` (the qualified name of the module holding it, under
    any adapter layers), ``parameter`` (its name there), its position among the owner's adapted parameters in
    registration order (``index`` of ``count``)."""

    owner: str
    parameter: str
    index: int
    count: int

    @property
    def key(self) -> str:
        """``owner.parameter``: the name rank_pattern / alpha_pattern keys match, as in PEFT."""
        return f"{self.owner}.{self.parameter}"

    @property
    def layer_path(self) -> str:
        """Where the parameter's LoRAParameter sits once the model is adapted (PEFT's nesting: the last
        registered parameter outermost)."""
        return self.owner + ".base_layer" * (self.count - 1 - self.index)


def _matching(key: str, wanted: list[str]) -> list[str]:
    """The entries of ``wanted`` naming the parameter ``key``, whole or as a dotted suffix."""
    return [w for w in wanted if key == w or key.endswith("." + w)]


def plan_parameter_targets(model: nn.Module, config: LoraConfig,
                           module_targets: list[str] | None = None) -> list[ParameterTarget]:
    """The parameters ``config.target_parameters`` adapts, in PEFT's order, on a model before or after adaptation.

    An entry matches a parameter ``owner.name`` exactly or as its dotted suffix.  Checked: each is a floating-point
    2-D or 3-D parameter of a module fastlora does not adapt otherwise; the settings are ones a parameter takes
    (:meth:`LoRAParameter.check_settings`).  Given the modules ``target_modules`` adapts (``module_targets``, when
    the adapter is made), entries that match nothing are PEFT's: left out where another entry matches, PEFT's
    warning where none does but a module target does, an error where nothing at all is adapted."""
    wanted = list(config.target_parameters or [])
    if not wanted:
        return []
    if config.fan_in_fan_out:
        raise ValueError("target_parameters does not work with fan_in_fan_out=True (as in PEFT)")
    found: dict[str, list[str]] = {}
    used = set()
    for name, module in model.named_modules():
        if isinstance(module, LoRAParameter):
            continue  # its owner, under it, is visited
        owner = re.sub(r"(\.base_layer)+$", "", name) if wrapped_by_parameter_layers(model, name) else name
        for parameter_name, parameter in module.named_parameters(recurse=False):
            matching = _matching(f"{owner}.{parameter_name}" if owner else parameter_name, wanted)
            if not matching:
                continue
            match = matching[0]
            if not owner:
                raise ValueError(f"target_parameters entry {match!r} matches {parameter_name}, a parameter of the "
                                 f"model itself: LoRA adapts a parameter of a submodule (its layer wraps the "
                                 f"module), as in PEFT")
            if isinstance(module, LoRALinear) or _inside_adapted_layer(model, name):
                raise ValueError(f"target_parameters entry {match!r} matches {owner}.{parameter_name}, a parameter of a "
                                 f"layer target_modules adapts; adapt the layer or its parameter, not both")
            if not parameter.is_floating_point():
                raise ValueError(f"target_parameters entry {match!r} matches {owner}.{parameter_name}, a "
                                 f"{parameter.dtype} parameter (quantized?): LoRA adapts floating-point parameters")
            parameter_sizes(module, parameter)  # 2-D or 3-D
            found.setdefault(owner, []).append(parameter_name)
            used.update(matching)  # two entries may name one parameter ("experts.gate_up_proj", "gate_up_proj")
    if module_targets is not None and not used:
        if not module_targets:
            raise ValueError(f"target_parameters entries {wanted} match no parameter of the model; parameters with "
                             f"more than one dimension include: {', '.join(_some_parameters(model)) or 'none'}")
        warnings.warn(f"target_parameters={set(config.target_parameters)} were set but no parameter was matched.",
                      RuntimeWarning, stacklevel=4)
    nested = [(inner, outer) for inner in found for outer in found if inner.startswith(outer + ".")]
    if nested:
        inner, outer = nested[0]
        raise ValueError(f"target_parameters adapts parameters of {outer} and of {inner}, a module inside it; adapt "
                         f"the parameters of one of the two (as in PEFT, which cannot nest them either)")
    plan = [ParameterTarget(owner, parameter, i, len(names))
            for owner, names in found.items() for i, parameter in enumerate(names)]
    for target in plan:
        LoRAParameter.check_settings(config.settings_for(target.key), f"target_parameters ({target.key})")
    return plan


def wrapped_by_parameter_layers(model: nn.Module, name: str) -> bool:
    """Whether the module ``name`` is the base layer of a LoRAParameter (one whose parameters they adapt)."""
    parent = name.rsplit(".base_layer", 1)[0] if name.endswith(".base_layer") else None
    return parent is not None and isinstance(model.get_submodule(parent), LoRAParameter)


def _inside_adapted_layer(model: nn.Module, name: str) -> bool:
    """Whether the module at ``name`` lies inside a layer target_modules adapted (an embedding's base, ...)."""
    parts = name.split(".")
    for end in range(1, len(parts)):
        module = model.get_submodule(".".join(parts[:end]))
        if isinstance(module, LoRALinear) and not isinstance(module, LoRAParameter):
            return True
    return False


def _some_parameters(model: nn.Module, limit: int = 6) -> list[str]:
    names = [n for n, p in named_parameters(model) if p.dim() >= 2 and ".lora_" not in f".{n}"]
    return [re.sub(r"(\.base_layer)+\.", ".", n) for n in names[:limit]]


def add_parameter_adapters(model: nn.Module, config: LoraConfig, adapter_name: str, plan: list[ParameterTarget],
                           adapter_dtype) -> dict[str, nn.Module]:
    """Give ``adapter_name`` to every planned parameter: the LoRAParameter layers already there gain the adapter
    (every adapter adapts the same parameters, PEFT's rule); a module adapted for the first time gets new layers,
    returned (owner's name → outermost layer) for the caller to put in place.  ``adapter_dtype(parameter)`` is the
    new factors' dtype.  The caller undoes a failure."""
    new_layers = {}
    by_owner: dict[str, list[ParameterTarget]] = {}
    for target in plan:
        by_owner.setdefault(target.owner, []).append(target)
    for owner, targets in by_owner.items():
        module = model.get_submodule(owner)
        chain = parameter_chain(module)
        if chain:
            if [layer.parameter_name for layer in reversed(chain)] != [t.parameter for t in targets]:
                raise ValueError(f"every adapter must adapt the same parameters of {owner} (as in PEFT): it has "
                                 f"{[layer.parameter_name for layer in reversed(chain)]}, the new adapter names "
                                 f"{[t.parameter for t in targets]}")
            for layer, target in zip(reversed(chain), targets):
                layer.add_adapter(adapter_name, config.settings_for(target.key), init_lora_weights=config.init_lora_weights,
                                  adapter_dtype=adapter_dtype(layer.weight))
            continue
        for target in targets:
            parameter = getattr(owner_of(module), target.parameter)
            module = LoRAParameter.wrap(module, target.parameter, adapter_name, config.settings_for(target.key),
                                        config.init_lora_weights, adapter_dtype(parameter))
        new_layers[owner] = module
    return new_layers

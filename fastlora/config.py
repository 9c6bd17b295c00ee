"""``LoraConfig`` and ``TaskType``: PEFT's names and meanings, validated in one place.

``LoraConfig`` takes every field of PEFT's ``LoraConfig``.  The ones that switch on a feature fastlora
does not implement (LoftQ, QA-LoRA, ...) are refused when switched
on, with an :class:`UnsupportedFeatureError` naming the field; the others are validated or kept as
they are and written back to ``adapter_config.json``.
"""

from __future__ import annotations

import dataclasses
import re
import enum
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from fastlora.adapter_settings import AdapterSettings, plain_number
from fastlora.files import atomic_write_text
from fastlora.init_configs import checked_corda_config, checked_eva_config, checked_loftq_config, checked_lora_ga_config
from fastlora.layer_replication import check_layer_map
from fastlora.weight_inits import check_weight_init, is_weight_init

__all__ = ["LoraConfig", "TaskType", "UnsupportedFeatureError", "CONFIG_NAME"]

CONFIG_NAME = "adapter_config.json"


class UnsupportedFeatureError(NotImplementedError, ValueError):
    """A PEFT feature fastlora does not implement (a ValueError too, as PEFT's config errors are).

    fastlora raises it, naming the field or argument, when a config, an adapter file or a call asks for a
    feature it does not implement; it is also a ``NotImplementedError``.

    Args:
        message (str): what is refused, naming the field or argument and the value fastlora accepts (the
            exception's positional argument, as for any exception).

    PEFT equivalent: none — PEFT implements these features, so it has no such error; code that catches
    ``ValueError`` around a PEFT config catches this one too.

    Example:
        >>> from fastlora import LoraConfig, UnsupportedFeatureError
        >>> try:
        ...     LoraConfig(target_modules=["q_proj"], use_qalora=True)
        ... except UnsupportedFeatureError as err:
        ...     print(err)
        LoraConfig(use_qalora=True): use_qalora is a PEFT feature fastlora does not support; leave it at False
    """


class PeftType(str, enum.Enum):
    """PEFT's method type, as PEFT's ``PeftType``: a ``str`` enum, so ``config.peft_type == "LORA"``,
    ``config.peft_type == peft.PeftType.LORA`` and ``config.peft_type.value`` all work as with PEFT's configs.

    Args:
        LORA: LoRA (and its variants: DoRA, rsLoRA), the one method fastlora implements.

    PEFT equivalent: ``peft.PeftType`` (its LORA member).

    Example:
        >>> from fastlora import LoraConfig, PeftType
        >>> LoraConfig(target_modules=["q_proj"]).peft_type == PeftType.LORA == "LORA"
        True
    """

    LORA = "LORA"


class TaskType(str, enum.Enum):
    """PEFT's task types (the same string values, so configs round-trip through JSON).

    Pass a member, or its string value, as ``LoraConfig(task_type=...)``.

    Args:
        SEQ_CLS: sequence classification; ``classifier`` and ``score`` (those the model has) are added to
            ``modules_to_save``.
        SEQ_2_SEQ_LM: sequence-to-sequence language modelling.
        CAUSAL_LM: causal language modelling.
        TOKEN_CLS: token classification; ``classifier`` and ``score`` (those the model has) are added to
            ``modules_to_save``.
        QUESTION_ANS: extractive question answering; ``qa_outputs`` is added to ``modules_to_save``.
        FEATURE_EXTRACTION: feature extraction (embeddings).

    PEFT equivalent: ``peft.TaskType`` (the same members and string values).

    Example:
        >>> from fastlora import LoraConfig, TaskType
        >>> TaskType("CAUSAL_LM") is TaskType.CAUSAL_LM
        True
        >>> LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"]).task_type
        <TaskType.SEQ_CLS: 'SEQ_CLS'>
    """

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


_BIAS_MODES = ("none", "all", "lora_only")

# PEFT fields that switch on a feature fastlora does not implement, with the value that means "off".
UNSUPPORTED_FEATURES = {
    "velora_config": None,
    "monteclora_config": None,
    "arrow_config": None,
    "kasa_config": None,
    "astra_config": None,
    "use_qalora": False,
    "use_bdlora": None,
    "megatron_config": None,
    "alora_invocation_tokens": None,
}


# Fields PEFT 0.22 added, which fastlora leaves out of the files it writes while they are off.
_FIELDS_SINCE_0_22 = ("astra_config",)

# Initialisations whose values come from a data-driven step: preprocess_loraga's gradients and preprocess_corda's
# decompositions before get_peft_model, initialize_lora_eva_weights after it.
DATA_DRIVEN_INITS = ("eva", "lora_ga", "corda")


def _is_off(name: str, value: Any) -> bool:
    """The feature's "off" value, None, or an empty container (PEFT writes ``target_parameters: []`` for a
    config whose MoE conversion found no parameter to target)."""
    off = UNSUPPORTED_FEATURES[name]
    if value is None or (isinstance(value, (list, tuple, set, frozenset, dict)) and not value):
        return True
    return type(value) is type(off) and value == off


def as_list(value) -> list:
    """``layers_to_transform`` or ``layers_pattern`` as a list: one index or one pattern as a list of one (PEFT
    takes either), a list or tuple as it is."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def pattern_key(patterns: dict, module_name: str) -> str | None:
    """The first key of ``patterns`` that matches ``module_name`` whole or as its last dotted components."""
    return next((key for key in patterns if re.fullmatch(rf"(?:.*\.)?(?:{key})", module_name)), None)


@dataclass
class LoraConfig:
    """LoRA settings, field for field PEFT's ``LoraConfig``.

    ``target_modules``: a list of module names (exact, or a dotted suffix of the qualified name), a
    regex string (full match on the qualified name) or ``"all-linear"`` (every ``nn.Linear`` and transformers
    ``Conv1D`` but the output head).  ``scaling`` = lora_alpha / r, or lora_alpha / sqrt(r) with ``use_rslora``.

    ``config.replace(**changes)`` returns a changed copy.  Assigning a field (as PEFT scripts do: a PiSSA
    adapter's ``init_lora_weights = True`` before its initial state is saved) checks the value as the
    constructor does, and changes what the config says and what is saved, not the layers already built.
    ``save_pretrained(dir)``
    and ``LoraConfig.from_pretrained(dir_or_hub_id)`` write and read ``adapter_config.json`` as PEFT does.

    Args:
        task_type (TaskType | str | None): the model's task (see :class:`TaskType`); ``"SEQ_CLS"`` and
            ``"TOKEN_CLS"`` add ``classifier`` / ``score``, ``"QUESTION_ANS"`` adds ``qa_outputs`` to
            ``modules_to_save``.  Default None.
        target_modules (list[str] | str | None): which modules get an adapter, as above; each match must be a
            layer fastlora adapts (``nn.Linear``, transformers' ``Conv1D``, ``nn.Embedding``, bitsandbytes'
            ``Linear4bit`` / ``Linear8bitLt``; an ``nn.Linear`` subclass with a forward of its own is refused,
            "all-linear" matching it too).  None: the architecture's defaults,
            PEFT's (``q_proj`` and ``v_proj`` for Llama, ``c_attn`` for GPT-2, ...), filled in by
            ``get_peft_model`` (not when ``target_parameters`` names what to adapt).  Default None.
        target_parameters (list[str] | None): parameters that get an adapter, each the qualified name of a
            2-D or 3-D parameter or its dotted suffix (``"experts.gate_up_proj"``, a mixture-of-experts block's
            experts stored as one parameter; ``"gate.weight"``, a router's): the update is added to the
            parameter while its module runs (see :class:`fastlora.parameter_lora.LoRAParameter`), without
            dropout, DoRA or lora_bias, as in PEFT.  Default None.
        r (int): the adapters' rank, >= 1.  Default 8.
        lora_alpha (float): the LoRA alpha, > 0.  Default 8.
        lora_dropout (float): dropout probability in [0, 1) on the LoRA branch's input, in training only.
            Default 0.0.
        inference_mode (bool): create the adapter frozen.  Default False.
        bias (str): which biases train: ``"none"``, ``"all"`` (every bias of the model) or ``"lora_only"``
            (the biases of the adapted layers).  At most one adapter of a model may set it.  Default "none".
        use_rslora (bool): rank-stabilised scaling, lora_alpha / sqrt(r).  Default False.
        exclude_modules (list[str] | str | None): modules not to adapt, matched as ``target_modules``.
        layers_to_transform (list[int] | int | None): adapt only the modules in these layer indices.
        layers_pattern (list[str] | str | None): the name of the layer list those indices count in (e.g.
            ``"layers"``); None: any ``<name>.<index>`` in the module's qualified name.
        modules_to_save (list[str] | None): modules trained and saved whole (the module an entry names, whole or
            as a dotted suffix, as in PEFT): each gets a trainable copy that the model uses, beside its frozen
            original.
        init_lora_weights (bool | str): True (A kaiming-uniform, B = 0), ``"gaussian"`` (A normal with std
            1/r, B = 0), ``"nora"`` (A kaiming-uniform, each column divided by its norm; B = 0), False (both
            random), or from the base weight: ``"pissa"`` / ``"pissa_niter_<n>"``
            (the weight's top-r singular part moves into the adapter), ``"olora"`` (its QR decomposition's first r
            columns and rows), ``"loftq"`` (the adapter absorbs the error of quantizing W, which the base keeps
            quantized; with ``loftq_config``), ``"orthogonal"`` (B A = 0 with neither factor 0, r even) and
            ``"mica"`` (B the weight's r minor left singular vectors, kept frozen; A = 0 trains); see
            :mod:`fastlora.weight_inits`; from data: ``"lora_ga"``, ``"corda"`` and ``"eva"`` (see their
            configs below).  Embedding tables take True's initialisation for those but MiCA, as in PEFT.  Default
            True.
        eva_config (EvaConfig | dict | None): EVA's settings, kept as a dict (PEFT's defaults, with its warning,
            where ``init_lora_weights="eva"`` has none).  ``init_lora_weights="eva"`` starts with A as drawn and
            B = 0, until :func:`fastlora.initialize_lora_eva_weights` gives A the layers' principal input
            directions (as PEFT's).
        lora_ga_config (LoraGAConfig | dict | None): LoRA-GA's settings, kept as a dict; required where a target
            holds the gradient :func:`fastlora.preprocess_loraga` estimated.  ``init_lora_weights="lora_ga"``
            starts each such layer from that gradient (:mod:`fastlora.weight_inits`), the others as True.
        corda_config (CordaConfig | dict | None): CorDA's settings, kept as a dict (PEFT's defaults, with its
            warning, where ``init_lora_weights="corda"`` has none); ``init_lora_weights="corda"`` starts each
            Linear target from the decomposition :func:`fastlora.preprocess_corda` left on it.
        loftq_config (LoftQConfig | dict): ``init_lora_weights="loftq"``'s settings (``loftq_bits`` 4 or 8,
            ``loftq_iter``), required there and ignored (with a warning) otherwise; kept as a dict.  Default {}.
        autocast_adapter_dtype (bool): float16 / bfloat16 base layers get float32 adapters.  Default True.
        base_model_name_or_path (str | None): recorded in ``adapter_config.json``; ``get_peft_model`` sets it to
            the model's ``name_or_path`` (with PEFT's warning where it named another), and keeps it for a model
            without one (built from a config, where PEFT records None).
        revision (str | None): the base model's revision, recorded in ``adapter_config.json``.
        use_dora (bool): DoRA adapters (a trained magnitude per output feature).  Default False.
        rank_pattern (dict[str, int]): per-module ranks: a key (a module name, a dotted suffix of one, or a regex
            matching either) → r; the first matching key in the dict's order wins.  Default {}.
        alpha_pattern (dict[str, float]): per-module lora_alpha, keys as ``rank_pattern``'s.  Default {}.
        lora_bias (bool): a trained bias on B (PEFT's ``lora_B.bias``), merged into the base bias.  Default False.
        trainable_token_indices (list[int] | dict[str, list[int]] | None): rows of an embedding table that train
            (a list: the input embeddings'; a dict: module name → rows), the rest of the table frozen.
        ensure_weight_tying (bool): an output head tied to the input embeddings (``tie_word_embeddings``) keeps
            sharing what the adapter trains there: with the embeddings or the head in ``modules_to_save``, the
            head computes with the embeddings' trained copy; in ``target_modules``, the embeddings get the adapter
            and the head its transpose, sharing the factors; in ``trainable_token_indices``, other rows for the
            two are an error.  As PEFT, the config then names the embeddings instead of the head (see
            :mod:`fastlora.weight_tying`).  Default False.
        layer_replication (list[list[int]] | None): a new stack of decoder layers built from the model's, each
            ``[start, end)`` range appended in turn (``[[0, 4], [2, 5]]`` makes ``[0, 1, 2, 3, 2, 3, 4]``); the
            copies share the base weights and get adapters of their own (see :mod:`fastlora.layer_replication`);
            ``merge_and_unload`` gives each copy its own weights, ``merge_adapter`` in place is refused.  Default
            None.
        fan_in_fan_out (bool): whether the targets store their weight (in, out), as transformers' ``Conv1D``
            (GPT-2) does.  As PEFT, adapting a model sets it from the targets' kind, warning when it was set
            otherwise.  Default False.

    PEFT's other fields are accepted too: its bookkeeping fields (``auto_mapping``, ``peft_version``,
    ``megatron_core``, ``qalora_group_size``, ``runtime_config``) are kept as given, and the switches of
    features fastlora does not implement (``use_qalora``, ``kasa_config``, ...) take
    only their "off" value; anything else raises :class:`UnsupportedFeatureError` naming the field.

    PEFT equivalent: ``peft.LoraConfig`` (the same fields, defaults and ``adapter_config.json``).

    Example:
        >>> from fastlora import LoraConfig, TaskType
        >>> config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=16, lora_alpha=32, lora_dropout=0.05,
        ...                     target_modules=["q_proj", "v_proj"])
        >>> config.scaling
        2.0
        >>> config.replace(use_rslora=True).scaling
        8.0
        >>> LoraConfig(target_modules="all-linear", bias="lora_only", modules_to_save=["lm_head"]).r
        8
    """

    task_type: Optional[Union[TaskType, str]] = None
    target_modules: Optional[Union[list[str], str]] = None
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    inference_mode: bool = False
    bias: str = "none"
    use_rslora: bool = False
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    autocast_adapter_dtype: bool = True
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    use_dora: bool = False
    # Whether a target stores its weight (in, out), as transformers' Conv1D does; as in PEFT, adapting a model
    # sets it from the targets' kind (with PEFT's warning), so it is descriptive rather than a switch.
    fan_in_fan_out: bool = False
    # PEFT's bookkeeping fields: kept as given and written back.
    auto_mapping: Optional[dict] = None
    peft_version: Optional[str] = None
    megatron_core: Optional[str] = "megatron.core"
    qalora_group_size: int = 16
    runtime_config: Optional[Any] = None
    # PEFT's feature switches that fastlora does not implement: only their "off" values are accepted.
    rank_pattern: Optional[dict] = field(default_factory=dict)
    alpha_pattern: Optional[dict] = field(default_factory=dict)
    layer_replication: Optional[list] = None
    loftq_config: Optional[dict] = field(default_factory=dict)
    eva_config: Optional[Any] = None
    corda_config: Optional[Any] = None
    lora_ga_config: Optional[Any] = None
    velora_config: Optional[Any] = None
    monteclora_config: Optional[Any] = None
    arrow_config: Optional[Any] = None
    kasa_config: Optional[Any] = None
    astra_config: Optional[Any] = None
    use_qalora: bool = False
    use_bdlora: Optional[Any] = None
    lora_bias: bool = False
    megatron_config: Optional[dict] = None
    trainable_token_indices: Optional[Any] = None
    alora_invocation_tokens: Optional[list] = None
    target_parameters: Optional[list] = None
    ensure_weight_tying: bool = False
    peft_type: PeftType = field(default=PeftType.LORA, init=False)

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in UNSUPPORTED_FEATURES:
            value = getattr(self, name)
            if not _is_off(name, value):
                raise UnsupportedFeatureError(
                    f"LoraConfig({name}={value!r}): {name} is a PEFT feature fastlora does not support; "
                    f"leave it at {UNSUPPORTED_FEATURES[name]!r}"
                )
        for name in ("r", "lora_alpha", "lora_dropout"):
            put(name, plain_number(getattr(self, name)))
        if isinstance(self.task_type, str) and not isinstance(self.task_type, TaskType):
            try:
                put("task_type", TaskType(self.task_type))
            except ValueError:
                raise ValueError(
                    f"task_type must be one of {[t.value for t in TaskType]} or None, got {self.task_type!r}"
                ) from None
        elif self.task_type is not None and not isinstance(self.task_type, TaskType):
            raise ValueError(f"task_type must be one of {[t.value for t in TaskType]} or None, got {self.task_type!r}")
        self.settings  # r, lora_alpha, lora_dropout, use_rslora, use_dora: validated where layers take them
        if self.use_dora and self.lora_bias:
            raise UnsupportedFeatureError("LoraConfig(use_dora=True, lora_bias=True): a bias on B with DoRA is not "
                                          "supported by fastlora; use one of the two")
        tokens = self.trainable_token_indices
        if tokens is not None and any(isinstance(v, (list, tuple)) and not v
                                      for v in (tokens.values() if isinstance(tokens, dict) else [tokens])):
            raise ValueError(f"trainable_token_indices={tokens!r} lists no token id for a table: list the rows to "
                             f"train, or leave it None to train none")
        if tokens is not None:
            lists = tokens.values() if isinstance(tokens, dict) else [tokens]
            if (isinstance(tokens, dict) and not all(isinstance(k, str) for k in tokens)) or not all(
                    isinstance(v, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                         for i in v) for v in lists):
                raise ValueError(f"trainable_token_indices must be a list of token ids >= 0, or a dict of module name "
                                 f"-> such a list, got {tokens!r}")
            put("trainable_token_indices", {k: list(v) for k, v in tokens.items()} if isinstance(tokens, dict)
                else list(tokens))
        if self.layer_replication:  # None or [] (PEFT writes either): the model's own layers
            check_layer_map(self.layer_replication)
            put("layer_replication", [list(pair) for pair in self.layer_replication])
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if value is None:
                put(name, {})
            elif not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise TypeError(f"{name} must be a dict of module name (or regex) -> value, got {value!r}")
            else:
                put(name, {key: plain_number(v) for key, v in value.items()})
        for key in [*self.rank_pattern, *self.alpha_pattern]:
            try:
                re.compile(key)
            except re.error as exc:
                raise ValueError(f"rank_pattern / alpha_pattern key {key!r} is not a valid regex: {exc}") from None
        for name, field_name in (("rank_pattern", "r"), ("alpha_pattern", "lora_alpha")):
            for key, value in getattr(self, name).items():  # validated as the layers will take them
                try:
                    dataclasses.replace(self.settings, **{field_name: value})
                except ValueError as exc:
                    raise ValueError(f"{name}[{key!r}]: {exc}") from None
        for name in ("inference_mode", "autocast_adapter_dtype", "fan_in_fan_out"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.bias not in _BIAS_MODES:
            raise ValueError(f"bias must be one of {_BIAS_MODES}, got {self.bias!r}")
        init = self.init_lora_weights
        if isinstance(init, str) and init.lower() in ("olora", "gaussian"):  # PEFT takes these in any case
            init = init.lower()
            put("init_lora_weights", init)
        if isinstance(init, str) and init.lower() == "mica":  # PEFT's initialisation takes it in any case
            init = "mica"
            put("init_lora_weights", init)
        if init == "astra":
            raise UnsupportedFeatureError("LoraConfig(init_lora_weights='astra'): ASTRA (PEFT's preprocess_astra, then "
                                          "the base weight changed by its decomposition) is a PEFT initialisation "
                                          "fastlora does not implement")
        if not (init is True or init is False or init in ("gaussian", "nora") or is_weight_init(init)
                or init in DATA_DRIVEN_INITS):
            raise ValueError(f"Unknown initialization init_lora_weights={init!r}: use True, False, 'gaussian', 'nora', "
                             f"'pissa', 'pissa_niter_<n>', 'olora', 'orthogonal', 'loftq', 'mica', 'eva', 'lora_ga' or "
                             f"'corda'")
        if init == "mica" and self.use_dora:
            raise UnsupportedFeatureError("LoraConfig(init_lora_weights='mica', use_dora=True): MiCA's frozen B with "
                                          "DoRA is not supported (PEFT has no variant for the pair either)")
        check_weight_init(init, None)  # the ranks where a layer takes one (a pattern may match no module, as in PEFT)
        if self.lora_bias and init not in (True, False):  # PEFT's refusal: its files would not load there
            raise ValueError(f"The argument lora_bias=True is only supported with init_lora_weights=True or False, got "
                             f"init_lora_weights={init} instead.")
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern) and (
                (isinstance(init, str) and init.startswith("pissa")) or init in ("olora", "corda", "lora_ga")):
            warnings.warn("Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern and post-training conversion of "
                          "modified base weights PiSSA/CorDA/OLoRA/LoRA-GA means that you won't be able to pass "
                          "`path_initial_model_for_weight_conversion` to `save_pretrained` to restore the initial "
                          "values of the base weights; if you intend to do this, please ensure not to use rslora or "
                          "rank_pattern/alpha_pattern.", UserWarning, stacklevel=4)
        put("loftq_config", checked_loftq_config(init, self.loftq_config))
        put("lora_ga_config", checked_lora_ga_config(init, self.lora_ga_config))
        put("eva_config", checked_eva_config(init, self.eva_config))
        put("corda_config", checked_corda_config(init, self.corda_config))
        if self.target_parameters is not None:  # a set of names, as PEFT keeps it; empty: none (PEFT writes [])
            value = self.target_parameters
            if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)) or not all(
                    isinstance(v, str) and v for v in value):
                raise TypeError(f"target_parameters must be a list of parameter names (as 'experts.gate_up_proj'), "
                                f"got {value!r}")
            put("target_parameters", sorted(set(value)) or None)
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(v, str) for v in value):
                    raise TypeError(f"{name} must be a string or a list of strings, got {value!r}")
                put(name, sorted(set(value)))  # a set of names, as PEFT keeps it; sorted so configs compare equal
        for name in ("target_modules", "exclude_modules"):  # a string is a regex the full module name must match
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as exc:
                    raise ValueError(f"{name}={value!r} is not a valid regex: {exc}") from None
        if isinstance(self.target_modules, list) and not self.target_modules and not self.target_parameters:
            raise ValueError(
                "target_modules must name the modules to adapt (a list of names, a regex or 'all-linear'), or be "
                "left out for the architecture's default targets"
            )
        # one layer index or one pattern stays as given (PEFT writes it so), a tuple becomes a list
        if self.layers_to_transform is not None and not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in as_list(self.layers_to_transform)):
            raise ValueError(f"layers_to_transform must be layer indices >= 0, got {self.layers_to_transform!r}")
        if isinstance(self.layers_to_transform, tuple):
            put("layers_to_transform", list(self.layers_to_transform))
        if self.layers_pattern is not None and not all(isinstance(p, str) and p for p in as_list(self.layers_pattern)):
            raise TypeError(f"layers_pattern must be the name of the layer list (as 'layers') or a list of such names, "
                            f"got {self.layers_pattern!r}")
        if isinstance(self.layers_pattern, tuple):
            put("layers_pattern", list(self.layers_pattern))
        # PEFT's rules (its configs refuse these, so no PEFT file holds them): a regex or "all-linear" names modules
        # by their full names, and a layer pattern alone selects nothing
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save):
                raise TypeError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
            put("modules_to_save", list(self.modules_to_save))
        put("_checked", True)  # from here on, an assignment to a field is checked (__setattr__)

    @property
    def settings(self) -> AdapterSettings:
        """What each adapted layer gets: r, lora_alpha, lora_dropout, use_rslora, use_dora (and the scaling)."""
        return AdapterSettings(self.r, self.lora_alpha, self.lora_dropout, self.use_rslora, self.use_dora,
                               self.lora_bias)

    def settings_for(self, module_name: str) -> AdapterSettings:
        """The settings of the layer at ``module_name`` (its qualified name in the adapted model): ``settings`` with
        r from ``rank_pattern`` and lora_alpha from ``alpha_pattern`` where a key matches, as PEFT matches them
        (the first key, in the dict's order, that is the name or a dotted suffix of it, as a regex)."""
        r = self.rank_pattern.get(pattern_key(self.rank_pattern, module_name), self.r)
        alpha = self.alpha_pattern.get(pattern_key(self.alpha_pattern, module_name), self.lora_alpha)
        return AdapterSettings(r, alpha, self.lora_dropout, self.use_rslora, self.use_dora, self.lora_bias,
                               frozen_lora_B=self.init_lora_weights == "mica")

    @property
    def is_prompt_learning(self) -> bool:
        """False: LoRA is not a prompt-learning method (PEFT's helpers and transformers' Trainer ask)."""
        return False

    is_adaption_prompt = is_prompt_learning  # PEFT's other such flag: False for LoRA too

    @property
    def scaling(self) -> float:
        return self.settings.scaling

    def replace(self, **changes: Any) -> "LoraConfig":
        return dataclasses.replace(self, **changes)

    def __setattr__(self, name: str, value: Any) -> None:
        if not self.__dict__.get("_checked") or name not in _FIELD_NAMES:  # the constructor's own assignments
            object.__setattr__(self, name, value)
            return
        if name == "peft_type":
            if PeftType(value) is not PeftType.LORA:
                raise ValueError(f"a LoraConfig's peft_type is LORA, got {value!r}")
            return
        checked = self.replace(**{name: value})  # the constructor's checks and normal forms, or its error
        for field_name in _FIELD_NAMES:
            object.__setattr__(self, field_name, getattr(checked, field_name))

    def __delattr__(self, name: str) -> None:
        if name in _FIELD_NAMES:
            raise AttributeError(f"cannot delete LoraConfig.{name}; assign it instead")
        object.__delattr__(self, name)

    def to_json(self) -> str:
        """``adapter_config.json``'s text, as PEFT writes it: keys sorted, in nested dicts too, but for
        ``rank_pattern`` and ``alpha_pattern``, whose order decides where several keys match a module."""
        def sorted_keys(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: v if k in ("rank_pattern", "alpha_pattern") else sorted_keys(v)
                        for k, v in sorted(value.items())}
            return [sorted_keys(v) for v in value] if isinstance(value, (list, tuple)) else value

        return json.dumps(sorted_keys(self.to_dict()), indent=2) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """PEFT's adapter_config.json content (keys sorted when written)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["task_type"] = self.task_type.value if self.task_type is not None else None
        out["peft_type"] = self.peft_type.value
        for name in ("target_modules", "exclude_modules"):
            if isinstance(out[name], list):
                out[name] = sorted(out[name])
        for option in ("autocast_adapter_dtype", "runtime_config"):  # loading options in PEFT, not saved fields
            out.pop(option)
        out.update(UNSUPPORTED_FEATURES)  # written as PEFT writes them: each feature off
        for name in _FIELDS_SINCE_0_22:  # off, and left out so that PEFT 0.21 reads the file without a warning
            out.pop(name)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        """Read a PEFT ``adapter_config.json``'s content; refuse features fastlora does not implement.  A key
        this version does not know is left out with a warning when it is unset (null, false, empty), as PEFT
        does with files from newer versions, and refused when it is set."""
        if not isinstance(data, dict):
            raise ValueError(f"an adapter config must be a JSON object, got {type(data).__name__}")
        if data.get("peft_type", "LORA") != "LORA":
            raise UnsupportedFeatureError(
                f"not a LoRA adapter: peft_type is {data.get('peft_type')!r}; fastlora loads LoRA adapters only"
            )
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - names - {"peft_type"})
        switched_on = [k for k in unknown if data[k] not in (None, False, {}, [], "")]
        if switched_on:  # a field of a newer PEFT, set: it may change what the adapter computes
            raise UnsupportedFeatureError(
                f"adapter config sets fields fastlora does not know: "
                f"{', '.join(f'{k}={data[k]!r}' for k in switched_on)}; refusing rather than ignoring them"
            )
        if unknown:
            warnings.warn(f"adapter config fields {unknown} are unknown to fastlora; they are unset, so ignored",
                          stacklevel=3)
        return cls(**{key: value for key, value in data.items() if key in names})

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """Write ``adapter_config.json`` (PEFT's content, :meth:`to_json`) into ``save_directory``; keyword arguments
        replace fields first."""
        directory = Path(save_directory)
        if directory.is_file():
            raise ValueError(f"save_directory {str(directory)!r} is a file, not a directory")
        directory.mkdir(parents=True, exist_ok=True)
        config = self.replace(**kwargs) if kwargs else self
        atomic_write_text(directory / CONFIG_NAME, config.to_json())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, subfolder: str | None = None,
                        **kwargs: Any) -> "LoraConfig":
        """Read ``adapter_config.json`` from a directory or a Hub repository (``revision``, ``token``,
        ``cache_dir``, ``local_files_only`` go to huggingface_hub); other keyword arguments replace fields."""
        from fastlora.hub import resolve_file, split_hub_kwargs

        hub_kwargs, overrides = split_hub_kwargs({**kwargs, "subfolder": subfolder})
        path = resolve_file(pretrained_model_name_or_path, CONFIG_NAME, **hub_kwargs)
        if path is None:
            raise ValueError(f"no {CONFIG_NAME} in {str(pretrained_model_name_or_path)!r}")
        return cls.from_file(path).replace(**overrides) if overrides else cls.from_file(path)

    @classmethod
    def from_file(cls, path: str | Path, amend: Callable[[dict], dict] | None = None) -> "LoraConfig":
        """Parse an ``adapter_config.json``; unreadable JSON or a bad field raises ValueError naming the file.
        ``amend`` rewrites the parsed content first (a reader that has the adapter's tensors at hand)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if amend is not None and isinstance(data, dict):
            data = amend(data)
        try:
            return cls.from_dict(data)
        except UnsupportedFeatureError as err:
            raise UnsupportedFeatureError(f"{path}: {err}") from None
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path} has an invalid field: {err}") from None


# PEFT's base class of adapter configs, under which scripts read an adapter's config
# (``PeftConfig.from_pretrained(folder).base_model_name_or_path``): fastlora's one adapter type is LoRA.
PeftConfig = LoraConfig


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(LoraConfig))

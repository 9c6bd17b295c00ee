"""PEFT's ``layer_replication``: a deeper (or shallower) stack of decoder layers that share the base weights, each
with an adapter of its own.

``layer_replication=[[0, 4], [2, 5]]`` turns layers ``[0, 1, 2, 3, 4]`` into ``[0, 1, 2, 3, 2, 3, 4]``: each entry
``[start, end)`` appends copies of those layers.  Every copy shares its source's parameters (no base weight is
duplicated) and has buffers of its own; its ``layer_idx`` (transformers' key into the KV cache) is its new position,
and the model's ``config.num_hidden_layers`` (and ``config.layer_types``, which transformers indexes by position,
where the config has them) follow the new stack.  The layer list is found as PEFT finds it: ``<model>(.model)*``'s
``layers`` (Llama-like), ``bert.encoder.layer`` / ``encoder.layer`` (BERT), ``h`` (Falcon).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator

from torch import nn

__all__ = ["replicate_layers", "layers_replicated", "check_layer_map", "shared_parameters", "unshare_parameters"]


def check_layer_map(layer_map) -> None:
    """ValueError unless ``layer_map`` is a list of ``[start, end]`` pairs of ints, 0 <= start <= end (an empty
    range adds nothing, as in PEFT), that adds at least one layer."""
    pairs = layer_map if isinstance(layer_map, (list, tuple)) else None
    if not pairs or not all(isinstance(p, (list, tuple)) and len(p) == 2 and all(
            isinstance(i, int) and not isinstance(i, bool) for i in p) and 0 <= p[0] <= p[1] for p in pairs) \
            or not any(p[0] < p[1] for p in pairs):
        raise ValueError(f"layer_replication must be a list of [start, end] pairs of layer indices, 0 <= start <= end, "
                         f"adding at least one layer (e.g. [[0, 4], [2, 5]]), got {layer_map!r}")


def _layer_list(model: nn.Module) -> tuple[nn.Module, nn.Module, str]:
    """(the innermost model, whose config describes the stack; the module holding the decoder layers' ModuleList;
    that attribute's name), as PEFT locates them."""
    while hasattr(model, "model"):
        model = model.model
    if hasattr(model, "bert"):
        model = model.bert
    if isinstance(getattr(model, "layers", None), nn.ModuleList):
        return model, model, "layers"
    if hasattr(model, "encoder") and isinstance(getattr(model.encoder, "layer", None), nn.ModuleList):
        return model, model.encoder, "layer"
    if isinstance(getattr(model, "h", None), nn.ModuleList):
        return model, model, "h"
    raise ValueError("layer_replication: could not locate the layers attribute in the model. Expected Llama, Bert or "
                     "Falcon compatible architectures (a ModuleList at model.layers, encoder.layer or h)")


def _copy_sharing_parameters(layer: nn.Module, position: int) -> nn.Module:
    """A deep copy of ``layer`` whose parameters are the layer's own (buffers copied), its ``layer_idx``
    ``position``."""
    copied = copy.deepcopy(layer)
    for name, module in layer.named_modules():
        target = copied.get_submodule(name)
        for pname, param in module.named_parameters(recurse=False):
            target.register_parameter(pname, param)
    for module in copied.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = position
    return copied


def replicate_layers(model: nn.Module, layer_map) -> Callable[[], None]:
    """Replace the model's layer stack by the one ``layer_map`` describes (see the module docstring); returns the
    ``undo`` that puts the original stack and config back.  Checked before anything changes: the map's form, and
    each index inside the stack."""
    check_layer_map(layer_map)
    inner, holder, attribute = _layer_list(model)
    layers = getattr(holder, attribute)
    outside = [pair for pair in layer_map if pair[1] > len(layers)]
    if outside:
        raise ValueError(f"layer_replication {layer_map}: {outside} reach past the model's {len(layers)} layers")
    order = [i for start, end in layer_map for i in range(start, end)]
    config = getattr(inner, "config", None)  # PEFT's (the outer model's, where it has one, is the same object)
    before = {name: getattr(config, name) for name in ("num_hidden_layers", "layer_types") if hasattr(config, name)}
    setattr(holder, attribute, nn.ModuleList(_copy_sharing_parameters(layers[i], position)
                                             for position, i in enumerate(order)))
    if "num_hidden_layers" in before:
        config.num_hidden_layers = len(order)
    if isinstance(before.get("layer_types"), (list, tuple)) and len(before["layer_types"]) == len(layers):
        config.layer_types = [before["layer_types"][i] for i in order]

    def undo() -> None:
        setattr(holder, attribute, layers)
        for name, value in before.items():
            setattr(config, name, value)

    return undo


@contextlib.contextmanager
def layers_replicated(model: nn.Module, layer_map) -> Iterator[None]:
    """The block runs on the stack ``layer_map`` describes (the model's own where it is None or empty); an error in
    the block puts the original stack back."""
    undo = replicate_layers(model, layer_map) if layer_map else None
    try:
        yield
    except BaseException:
        if undo is not None:
            undo()
        raise


def _stack_parameters(model: nn.Module):
    """(module, parameter name, parameter) of every parameter of the layer stack, layer by layer."""
    _, holder, attribute = _layer_list(model)
    for layer in getattr(holder, attribute):
        for module in layer.modules():
            for name, param in module.named_parameters(recurse=False):
                yield module, name, param


def shared_parameters(model: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """The parameters of the layer stack that a layer before holds too (a replicated layer's base weights)."""
    seen: set[int] = set()
    shared = []
    for module, name, param in _stack_parameters(model):
        if id(param) in seen:
            shared.append((module, name, param))
        seen.add(id(param))
    return shared


def unshare_parameters(model: nn.Module) -> Callable[[], None]:
    """Give each replicated layer copies of the parameters it shares with a layer before it, so that each can merge
    its own adapter; returns the ``undo`` that shares them again.  ValueError, before anything changes, where such a
    parameter is not floating point (quantized weights are not copied here)."""
    shared = shared_parameters(model)
    quantized = [(module, name, param) for module, name, param in shared if not param.is_floating_point()]
    if quantized:
        module, name, param = quantized[0]
        path = next(n for n, m in model.named_modules() if m is module)
        raise ValueError(f"cannot give the replicated layers weights of their own to merge into: "
                         f"{path}.{name} is quantized ({type(param).__name__}, {param.dtype}); merge on "
                         f"the model loaded unquantized")
    for module, name, param in shared:
        module.register_parameter(name, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))

    def undo() -> None:
        for module, name, param in shared:
            module.register_parameter(name, param)

    return undo

"""The two benchmark modes: single layers (``run_layers``) and one training step of a model (``run_model``).

Providers are measured interleaved: each round runs one iteration of every provider of the case in
turn, so slow drifts of a shared machine (other jobs, clock changes) hit all providers alike.  Timings
are the median over the timed rounds, after the warm-up rounds.
"""

from __future__ import annotations

import gc
import statistics
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from .measure import OtherLoad, SavedTensorCounter, Timer, median, module_tensors, peak_memory, profile_ops, wait_for_idle
from .presets import ModelPreset
from .providers import SEED_TARGETS, Provider
from .roofline import Roofline, floor_ms, layer_cost

__all__ = ["LayerCase", "ModelCase", "Quiet", "run_layers", "run_model", "add_ratios", "DTYPES"]

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class LayerCase:
    label: str  # preset projection name ("q_proj") or "shape"
    preset: str | None
    M: int
    K: int
    N: int
    bias: bool
    r: int
    alpha: float
    dropout: float
    dtype: torch.dtype


@dataclass
class ModelCase:
    preset: ModelPreset
    layers: int
    batch: int
    seq: int
    vocab: int
    r: int
    alpha: float
    dropout: float
    dtype: torch.dtype
    targets: list[str] = field(default_factory=lambda: list(SEED_TARGETS))


def _clear_grads(tensors: Iterable[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Quiet:
    """What to do about other processes on a CPU run: measure their share always; with ``max_other``
    set, wait for an idle machine before timing a case and time it again (up to ``retries`` times) when
    other processes took more than ``max_other`` of the CPUs meanwhile."""

    max_other: float | None = None
    retries: int = 2
    wait_s: float = 60.0


def _round(providers, iterate, device, warmup, repeats, progress=None, quiet: Quiet | None = None):
    """Interleaved rounds; returns ({provider name: (list fwd ms, list bwd ms)}, other load, attempts)."""
    quiet = quiet or Quiet()
    attempts = 0
    while True:
        attempts += 1
        if quiet.max_other is not None and device.type == "cpu":
            wait_for_idle(quiet.max_other, quiet.wait_s)
        times = {p.name: ([], []) for p in providers}
        with OtherLoad() as other:
            for i in range(warmup + repeats):
                for p in providers:
                    fwd, bwd = iterate(p)
                    if i >= warmup:
                        times[p.name][0].append(fwd)
                        times[p.name][1].append(bwd)
                if progress is not None and attempts == 1:
                    progress()
        clean = other.value is None or quiet.max_other is None or other.value <= quiet.max_other
        if clean or attempts > quiet.retries or device.type != "cpu":
            return times, other.value, attempts


def _compile_times(providers, iterate) -> dict[str, float]:
    """Seconds of the first forward+backward of each ``torch.compile``'d provider (tracing and compiling, with
    inductor's on-disk cache as it is found), run before the rounds so that no timed round includes it.  Dynamo's
    caches are emptied first: they belong to the code, not to the module, so a case would otherwise reuse (or, a
    shape later, recompile with dynamic shapes) what an earlier case of the run compiled."""
    if not any(p.compiled for p in providers):
        return {}
    torch._dynamo.reset()
    return {p.name: sum(iterate(p)) / 1e3 for p in providers if p.compiled}


def _timing_fields(fwd: list[float], bwd: list[float]) -> dict:
    tot = [a + b for a, b in zip(fwd, bwd)]
    quartiles = statistics.quantiles(tot, n=4) if len(tot) >= 2 else [None, None, None]
    return {
        "fwd_ms": median(fwd),
        "bwd_ms": median(bwd),
        "fwd_bwd_ms": median(tot),
        "fwd_bwd_ms_min": min(tot) if tot else None,
        "fwd_bwd_ms_max": max(tot) if tot else None,
        "fwd_bwd_ms_q1": quartiles[0],
        "fwd_bwd_ms_q3": quartiles[2],
    }


def _timed(forward: Callable[[], torch.Tensor], params: list[torch.Tensor], device: torch.device,
           grad: torch.Tensor | None = None) -> tuple[float, float]:
    """One forward and its backward (with ``grad``), gradients cleared first: (fwd ms, bwd ms)."""
    _clear_grads(params)
    t = Timer(device)
    t.mark()
    out = forward()
    t.mark()
    out.backward(grad)
    t.mark()
    fwd, bwd = t.intervals_ms()
    return fwd, bwd


def _round_fields(times: tuple[list[float], list[float]], other_load: float | None, attempts: int) -> dict:
    """A provider's timing fields from its rounds, with how quiet the machine was."""
    return {
        **_timing_fields(*times),
        "other_load": None if other_load is None else round(other_load, 3),
        "attempts": attempts,
    }


def _memory_fields(
    forward: Callable[[], torch.Tensor],
    params: list[torch.Tensor],
    module: torch.nn.Module,
    inputs: list[torch.Tensor],
    device: torch.device,
    *,
    grad: torch.Tensor | None = None,
    memory: bool,
    profile: int,
) -> dict:
    """Saved activations of one forward (its backward then frees the graph), the peak memory of one
    forward+backward when ``memory``, and the ``profile`` top ops when asked for."""
    _clear_grads(params)
    with SavedTensorCounter(exclude=module_tensors(module), inputs=inputs) as saved:
        out = forward()
    out.backward(grad)
    del out
    fields = saved.fields()
    if memory:
        _clear_grads(params)
        _sync(device)
        fields["peak_mem_bytes"], fields["peak_mem_method"] = peak_memory(lambda: forward().backward(grad), device)
    else:
        fields["peak_mem_bytes"], fields["peak_mem_method"] = None, "not measured"
    if profile:
        _clear_grads(params)
        fields["profile"] = profile_ops(lambda: forward().backward(grad), device, profile)
    return fields


def _release(device: torch.device, on_case_done: Callable[[], None] | None) -> None:
    """After a case: free its models and inputs (already dropped by the caller) and report progress."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if on_case_done is not None:
        on_case_done()


def run_layers(
    cases: list[LayerCase],
    providers: list[Provider],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    roofline: Roofline | None = None,
    memory: bool = True,
    profile: int = 0,
    quiet: Quiet | None = None,
    on_case_done: Callable[[], None] | None = None,
    on_round: Callable[[], None] | None = None,
) -> list[dict]:
    rows: list[dict] = []
    for case in cases:
        # Drawn on the device itself: an 8192 × 14336 input drawn on the CPU and copied over takes seconds.
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(case.M, case.K, generator=gen, device=device, dtype=case.dtype).requires_grad_(True)
        dy = torch.randn(case.M, case.N, generator=gen, device=device, dtype=case.dtype)
        mods = {}
        for p in providers:
            torch.manual_seed(0)
            mods[p.name] = p.layer(case.K, case.N, case.bias, case.r, case.alpha, case.dropout, case.dtype, device)
            mods[p.name].train()
        trainable = {n: [t for t in m.parameters() if t.requires_grad] + [x] for n, m in mods.items()}

        def iterate(p: Provider):
            return _timed(lambda: mods[p.name](x), trainable[p.name], device, dy)

        compile_s = _compile_times(providers, iterate)
        times, other_load, attempts = _round(providers, iterate, device, warmup, repeats, on_round, quiet)
        elem = torch.empty((), dtype=case.dtype).element_size()
        for p in providers:
            m = mods[p.name]
            lora = p.lora
            lora_A = next((q for k, q in m.named_parameters() if "lora_A" in k), None)
            adapter_elem = lora_A.element_size() if lora_A is not None else elem
            row = {
                "mode": "layer",
                "preset": case.preset,
                "case": case.label,
                "M": case.M,
                "K": case.K,
                "N": case.N,
                "bias": case.bias,
                "r": case.r,
                "alpha": case.alpha,
                "dropout": case.dropout,
                "dtype": dtype_name(case.dtype),
                "adapter_dtype": dtype_name(lora_A.dtype if lora_A is not None else case.dtype) if lora else None,
                "provider": p.name,
                "warmup": warmup,
                "repeats": repeats,
            }
            row.update(_round_fields(times[p.name], other_load, attempts))
            row["compile_s"] = compile_s.get(p.name)
            row.update(_memory_fields(lambda: m(x), trainable[p.name], m, [x], device, grad=dy, memory=memory,
                                      profile=profile))
            cost = layer_cost(case.M, case.K, case.N, case.r, lora=lora, elem=elem, adapter_elem=adapter_elem, bias=case.bias)
            row["flops"] = cost.flops
            row["min_bytes"] = cost.bytes
            if roofline is not None:
                fl = floor_ms(cost, roofline)
                row["roofline"] = roofline.name
                row["floor_fwd_ms"] = fl["fwd"]
                row["floor_bwd_ms"] = fl["bwd"]
                row["floor_ms"] = fl["fwd_bwd"]
                row["of_floor"] = row["fwd_bwd_ms"] / fl["fwd_bwd"] if row["fwd_bwd_ms"] else None
            else:
                row["roofline"] = None
                row["floor_ms"] = None
                row["of_floor"] = None
            rows.append(row)
        del mods, trainable, x, dy
        _release(device, on_case_done)
    return rows


def build_model(case: ModelCase, device: torch.device):
    """A Llama-architecture causal LM at the preset's width: ``case.layers`` decoder layers, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    pr = case.preset
    cfg = LlamaConfig(
        vocab_size=case.vocab,
        hidden_size=pr.hidden,
        intermediate_size=pr.intermediate,
        num_hidden_layers=case.layers,
        num_attention_heads=pr.heads,
        num_key_value_heads=pr.kv_heads,
        head_dim=pr.head_dim,
        max_position_embeddings=max(case.seq, 128),
        attention_bias=pr.qkv_bias,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: the 8B-width presets have ~1.5G parameters
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype=case.dtype)
    if pr.qkv_bias:
        # Llama's attention_bias puts a bias on o_proj too; Qwen2.5 has it on q/k/v only.
        for layer in model.model.layers:
            layer.self_attn.o_proj.bias = None
    return model


def run_model(
    cases: list[ModelCase],
    providers: list[Provider],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    memory: bool = True,
    profile: int = 0,
    quiet: Quiet | None = None,
    on_case_done: Callable[[], None] | None = None,
    on_round: Callable[[], None] | None = None,
) -> list[dict]:
    rows: list[dict] = []
    for case in cases:
        gen = torch.Generator(device="cpu").manual_seed(0)
        ids = torch.randint(0, case.vocab, (case.batch, case.seq), generator=gen).to(device)
        models = {}
        for p in providers:
            m = build_model(case, device)
            m = p.model(m, case.r, case.alpha, case.dropout, case.targets)
            m.train()
            models[p.name] = m
        trainable = {n: [t for t in m.parameters() if t.requires_grad] for n, m in models.items()}

        def step(m):
            return m(input_ids=ids, labels=ids).loss

        def iterate(p: Provider):
            return _timed(lambda: step(models[p.name]), trainable[p.name], device)

        compile_s = _compile_times(providers, iterate)
        times, other_load, attempts = _round(providers, iterate, device, warmup, repeats, on_round, quiet)
        tokens = case.batch * case.seq
        for p in providers:
            m = models[p.name]
            row = {
                "mode": "model",
                "preset": case.preset.name,
                "case": f"{case.preset.name} {case.layers}L {case.batch}x{case.seq}",
                "hidden": case.preset.hidden,
                "intermediate": case.preset.intermediate,
                "layers": case.layers,
                "batch": case.batch,
                "seq": case.seq,
                "tokens": tokens,
                "vocab": case.vocab,
                "r": case.r,
                "alpha": case.alpha,
                "dropout": case.dropout,
                "targets": ",".join(case.targets) if p.lora else None,
                "dtype": dtype_name(case.dtype),
                "provider": p.name,
                "trainable_params": sum(t.numel() for t in trainable[p.name]),
                "warmup": warmup,
                "repeats": repeats,
            }
            row.update(_round_fields(times[p.name], other_load, attempts))
            row["compile_s"] = compile_s.get(p.name)
            row["tokens_per_s"] = tokens / (row["fwd_bwd_ms"] / 1e3) if row["fwd_bwd_ms"] else None
            row.update(_memory_fields(lambda: step(m), trainable[p.name], m, [ids], device, memory=memory,
                                      profile=profile))
            rows.append(row)
        del models, trainable
        _release(device, on_case_done)
    return rows


_GROUP_KEYS_LAYER = ("mode", "preset", "case", "M", "K", "N", "bias", "r", "dropout", "dtype")
_GROUP_KEYS_MODEL = ("mode", "preset", "case", "layers", "batch", "seq", "r", "dropout", "dtype")


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def add_ratios(rows: list[dict]) -> list[dict]:
    """Add ``<metric>_vs_frozen`` and ``<metric>_vs_peft`` to every row, within its case, and
    ``<metric>_vs_frozen_compiled`` / ``<metric>_vs_peft_compiled`` (over the ``+compile`` rows)."""
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        keys = _GROUP_KEYS_LAYER if row["mode"] == "layer" else _GROUP_KEYS_MODEL
        groups.setdefault(tuple(row.get(k) for k in keys), {})[row["provider"]] = row
    for group in groups.values():
        for row in group.values():
            for ref, suffix in (("frozen", "frozen"), ("peft", "peft"), ("frozen+compile", "frozen_compiled"),
                                ("peft+compile", "peft_compiled")):
                other = group.get(ref)
                for metric, short in (
                    ("fwd_bwd_ms", "time"),
                    ("fwd_ms", "fwd"),
                    ("bwd_ms", "bwd"),
                    ("saved_bytes", "saved"),
                    ("peak_mem_bytes", "peak"),
                ):
                    row[f"{short}_vs_{suffix}"] = _ratio(row.get(metric), other.get(metric)) if other else None
    return rows

"""Models of every base kind, adapted by fastlora and run under ``torch.compile`` beside eager.

Run as ``python -m tests.compile_cases OUT_DIR [CASE ...]`` from the repository root, in an interpreter without
``TRITON_INTERPRET`` (torch.compile cannot trace a triton_op while it is set): for each case, one file
``OUT_DIR/<case>.pt`` with the graph breaks of the adapted model and of its frozen base (``torch._dynamo.explain``,
tracing only), and the loss and every trainable parameter's gradient of one training step in eager mode and under
``torch.compile``, from one seed.  tests/test_compile.py reads them.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch._dynamo

from tests.models import SEED_TARGETS, load_quantized, tiny_gpt2, tiny_llama, tiny_mixtral, tokens

ADAPTER = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=False)


@dataclass(frozen=True)
class Case:
    build: Callable[[str], torch.nn.Module]  # a tiny model (the argument: a scratch folder for checkpoints)
    config: dict  # LoraConfig arguments beside ADAPTER's
    backend: str = "aot_eager"  # traced as Inductor traces it (fake tensors, functionalization, AOT autograd)
    both_active: bool = False  # a second adapter, "other", active beside "default"
    adapter_names: tuple[str, ...] | None = None  # a mixed batch over "default" and "other", one name per row
    activations: torch.dtype = torch.float32  # the dtype gradients flow in (the compute dtype of a 4-bit base)


def _gpt2(_):
    return tiny_gpt2(vocab_size=128)


def _mixtral(_):
    return tiny_mixtral()


def _quantized(**quantization):
    def build(scratch):
        checkpoint = Path(scratch) / "tiny-llama"
        if not checkpoint.exists():
            tiny_llama().save_pretrained(checkpoint)
        return load_quantized(checkpoint, **quantization)
    return build


def _llama(_):
    return tiny_llama()


CASES = {
    "dense": Case(_llama, dict(target_modules=SEED_TARGETS)),
    "dora": Case(_llama, dict(target_modules=SEED_TARGETS, use_dora=True)),
    "lora-bias": Case(_llama, dict(target_modules=["q_proj", "down_proj"], lora_bias=True)),
    "embedding": Case(_llama, dict(target_modules=["embed_tokens", "q_proj"])),
    "trainable-tokens": Case(_llama, dict(target_modules=["q_proj"], trainable_token_indices=[1, 2])),
    "two-active-adapters": Case(_llama, dict(target_modules=SEED_TARGETS), both_active=True),
    # eager: rows gathered; rows read in place (sorted by adapter); one adapter's own forward (one name)
    "mixed-batch": Case(_llama, dict(target_modules=SEED_TARGETS), adapter_names=("other", "default", "default", "other")),
    "mixed-batch-sorted": Case(_llama, dict(target_modules=SEED_TARGETS),
                               adapter_names=("default", "default", "other", "other")),
    "mixed-batch-one-name": Case(_llama, dict(target_modules=SEED_TARGETS), adapter_names=("default",) * 4),
    "gpt2-conv1d": Case(_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"])),
    "moe-experts": Case(_mixtral, dict(target_modules=["q_proj"], lora_dropout=0.0,  # no dropout there, as in PEFT
                                       target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])),
    "nf4": Case(_quantized(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
                dict(target_modules=SEED_TARGETS), backend="inductor"),
    "nf4-double-bf16": Case(_quantized(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.bfloat16),
                            dict(target_modules=SEED_TARGETS), activations=torch.bfloat16),
    "int8": Case(_quantized(load_in_8bit=True), dict(target_modules=SEED_TARGETS)),
    "nf4-dora": Case(_quantized(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
                     dict(target_modules=SEED_TARGETS, use_dora=True)),
}


def _breaks(model, inputs: dict) -> tuple[int, list[str]]:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**inputs)
    reasons = []
    for reason in explained.break_reasons:
        frames = [f"{frame.filename}:{frame.lineno}" for frame in reason.user_stack][-3:]
        reasons.append(f"{reason.reason.splitlines()[0]} at {' <- '.join(reversed(frames))}")
    return explained.graph_break_count, reasons


def _step(model, inputs: dict, call: Callable | None = None) -> dict[str, torch.Tensor]:
    """The loss and every trainable parameter's gradient of one step of ``model`` from seed 0 (the forward through
    ``call``, the model itself by default)."""
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(0)
    loss = (model if call is None else call)(**inputs).loss
    loss.backward()
    return {"loss": loss.detach(), **{name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}}


def run(name: str, scratch: str) -> dict:
    import fastlora

    case = CASES[name]
    ids = tokens(batch=4)
    inputs = {"input_ids": ids, "labels": ids}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frozen_breaks, _ = _breaks(case.build(scratch).train(), inputs)
        model = fastlora.get_peft_model(case.build(scratch), fastlora.LoraConfig(**{**ADAPTER, **case.config})).train()
        if case.both_active or case.adapter_names:
            model.add_adapter("other", fastlora.LoraConfig(**{**ADAPTER, **case.config}))
        if case.both_active:
            model.base_model.set_adapter(["default", "other"])
        if case.adapter_names:
            inputs["adapter_names"] = list(case.adapter_names)
        breaks, reasons = _breaks(model, inputs)
        torch._dynamo.reset()
        eager = _step(model, inputs)
        torch._dynamo.utils.counters.clear()
        patch = (torch._inductor.config.patch(fallback_random=True) if case.backend == "inductor"
                 else contextlib.nullcontext())  # Inductor's own generator otherwise: other seeds, other masks
        with patch:
            compiled = _step(model, inputs, torch.compile(model, backend=case.backend))
        compiled_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        inference = _inference(model, inputs, case.backend) if case.adapter_names else None
    return {"breaks": breaks, "frozen_breaks": frozen_breaks, "reasons": reasons, "eager": eager,
            "compiled": compiled, "compiled_graphs": compiled_graphs, "activations": case.activations,
            "inference": inference}


def _inference(model, inputs: dict, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits in eval mode without autograd (a mixed batch served), eager and compiled: nothing requires grad
    there, which torch.compile traces differently."""
    model.eval()
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        eager = model(**inputs).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend)(**inputs).logits
    return eager, compiled


def main(out_dir: str, names: list[str]) -> None:
    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as scratch:
        for name in names or list(CASES):
            try:
                result = run(name, scratch)
            except Exception:
                result = {"error": traceback.format_exc()}
            torch.save(result, out / f"{name}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

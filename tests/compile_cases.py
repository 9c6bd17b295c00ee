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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch._dynamo

from tests.models import SEED_TARGETS, tiny_llama, tokens

ADAPTER = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=False)


@dataclass(frozen=True)
class Case:
    build: Callable[[str], torch.nn.Module]  # a tiny model (the argument: a scratch folder for checkpoints)
    config: dict  # LoraConfig arguments beside ADAPTER's
    backend: str = "aot_eager"  # traced as Inductor traces it (fake tensors, functionalization, AOT autograd)
    second_adapter: str | None = None  # "active": both adapters active; "mixed": adapter_names, one per row
    activations: torch.dtype = torch.float32  # the dtype gradients flow in (the compute dtype of a 4-bit base)
    inputs: dict = field(default_factory=dict)


def _gpt2(_):
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                                     eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _mixtral(_):
    import transformers

    torch.manual_seed(0)
    config = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    return transformers.MixtralForCausalLM(config)


def _quantized(**quantization):
    def build(scratch):
        import bitsandbytes as bnb
        import transformers

        checkpoint = Path(scratch) / "tiny-llama"
        if not checkpoint.exists():
            tiny_llama().save_pretrained(checkpoint)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = transformers.AutoModelForCausalLM.from_pretrained(
                checkpoint, quantization_config=transformers.BitsAndBytesConfig(**quantization))
        for module in model.modules():  # the portable CPU kernel (as tests/test_qlora.py explains)
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
        return model
    return build


def _llama(_):
    return tiny_llama()


CASES = {
    "dense": Case(_llama, dict(target_modules=SEED_TARGETS)),
    "dora": Case(_llama, dict(target_modules=SEED_TARGETS, use_dora=True)),
    "lora-bias": Case(_llama, dict(target_modules=["q_proj", "down_proj"], lora_bias=True)),
    "embedding": Case(_llama, dict(target_modules=["embed_tokens", "q_proj"])),
    "trainable-tokens": Case(_llama, dict(target_modules=["q_proj"], trainable_token_indices=[1, 2])),
    "two-active-adapters": Case(_llama, dict(target_modules=SEED_TARGETS), second_adapter="active"),
    "mixed-batch": Case(_llama, dict(target_modules=SEED_TARGETS), second_adapter="mixed"),
    "gpt2-conv1d": Case(_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"])),
    "moe-experts": Case(_mixtral, dict(target_modules=["q_proj"], lora_dropout=0.0,  # no dropout there, as in PEFT
                                       target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])),
    "nf4": Case(_quantized(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
                dict(target_modules=SEED_TARGETS), backend="inductor"),
    "nf4-double-bf16": Case(_quantized(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.bfloat16),
                            dict(target_modules=SEED_TARGETS), activations=torch.bfloat16),
    "int8": Case(_quantized(load_in_8bit=True), dict(target_modules=SEED_TARGETS)),
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
    inputs = {"input_ids": ids, "labels": ids, **case.inputs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frozen_breaks, _ = _breaks(case.build(scratch).train(), inputs)
        model = fastlora.get_peft_model(case.build(scratch), fastlora.LoraConfig(**{**ADAPTER, **case.config})).train()
        if case.second_adapter is not None:
            model.add_adapter("other", fastlora.LoraConfig(**{**ADAPTER, **case.config}))
            if case.second_adapter == "active":
                model.base_model.set_adapter(["default", "other"])
            else:
                inputs["adapter_names"] = ["other", "default", "default", "other"]
        breaks, reasons = _breaks(model, inputs)
        torch._dynamo.reset()
        eager = _step(model, inputs)
        patch = (torch._inductor.config.patch(fallback_random=True) if case.backend == "inductor"
                 else contextlib.nullcontext())  # Inductor's own generator otherwise: other seeds, other masks
        with patch:
            compiled = _step(model, inputs, torch.compile(model, backend=case.backend))
    return {"breaks": breaks, "frozen_breaks": frozen_breaks, "reasons": reasons, "eager": eager,
            "compiled": compiled, "activations": case.activations}


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

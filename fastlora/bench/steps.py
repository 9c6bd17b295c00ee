"""Training steps of whole models for the base kinds beyond a dense Llama: ``fastlora bench --step CASE``.

Each case builds one model per provider from the same seed and times one training step of each (forward, loss,
backward, SGD update), side by side in interleaved rounds (a drift of the machine hits every provider alike); it
records the median step time, the bytes autograd keeps for backward (parameters and buffers excluded) and the
step's peak memory above what was allocated before it (CUDA's allocator statistics; on the CPU, torch's allocator
as torch.profiler sees it: fastlora.bench.measure.peak_memory).

    gpt2          GPT-2 (transformers' Conv1D layers: c_attn, c_proj, c_fc), r=8, lora_alpha=32, lora_dropout=0.1
    moe           a Mixtral-style mixture of experts, target_modules="all-linear": attention, the router and the
                  experts (stored as parameters, through target_parameters), r=8, lora_alpha=32, no dropout (a
                  parameter target takes none, in PEFT as here)
    qlora-nf4     the seven projections of a 4-bit (nf4, double-quantized) Llama, r=8, lora_alpha=32,
                  lora_dropout=0.1 (bitsandbytes; its CPU backend or CUDA)
    qlora-int8    the same on an 8-bit Llama
    mixed-batch   k = 1, 2, 4, 8 adapters over one batch of a small Llama (see :func:`mixed_batch_rows`)

Providers (but for mixed-batch): ``frozen`` (the base, every weight frozen, its input embeddings' output
requiring grad, as gradient checkpointing would), ``peft`` and ``fastlora`` (each library's get_peft_model; named
``peft-qlora`` / ``fastlora-qlora`` in the QLoRA cases, ``peft-qdora`` / ``fastlora-qdora`` in QDoRA's); with
``compiled``, also each of them under ``torch.compile`` (``frozen+compile``, ...: the same model, compiled as a
whole), its first step (tracing and compiling) timed apart as ``compile_s`` before the rounds.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .measure import SavedTensorCounter, module_tensors, peak_memory
from .providers import COMPILE_SUFFIX

__all__ = ["STEP_CASES", "STEPS_SCHEMA", "StepSizes", "run_step_case", "mixed_batch_rows", "format_step_rows"]

STEPS_SCHEMA = "fastlora-bench-steps/1"  # the results file of --step (rows of its own kind)
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class StepSizes:
    """The model's size and the batch: hidden width, decoder layers, batch × sequence tokens, vocabulary; for the
    Llama cases (QLoRA, mixed batch) also the MLP width and the attention heads (None: each case's own)."""

    hidden: int = 512
    layers: int = 4
    batch: int = 4
    seq: int = 256
    vocab: int = 1024
    intermediate: int | None = None
    heads: int | None = None
    kv_heads: int | None = None


def _gpt2(sizes: StepSizes, device) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=sizes.hidden, n_layer=sizes.layers, n_head=8, vocab_size=sizes.vocab,
                                      n_positions=max(512, sizes.seq), bos_token_id=0, eos_token_id=0)).to(device)


def _moe(sizes: StepSizes, device) -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(
        hidden_size=sizes.hidden, intermediate_size=sizes.hidden, num_hidden_layers=sizes.layers,
        num_attention_heads=8, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        vocab_size=sizes.vocab, max_position_embeddings=max(512, sizes.seq))).to(device)


def _quantized(bits: int) -> Callable[[StepSizes, str], nn.Module]:
    """A builder of a Llama quantized as transformers loads one: a checkpoint written once per size and dtype in
    this process (a temporary folder, removed at exit) and loaded with bitsandbytes' config for each role, so
    the three roles read one set of weights without initialising and writing the model three times (a
    Llama-3-8B-width layer is 0.9 GB in float32).  The checkpoint is float32 on the CPU, bf16 elsewhere (the
    usual QLoRA checkpoint, and half the bytes): there the model's unquantized parts (embeddings, norms, the
    head) and its activations are bf16 too."""
    checkpoints: dict[tuple[str, torch.dtype], tempfile.TemporaryDirectory] = {}

    def build(sizes: StepSizes, device) -> nn.Module:
        import bitsandbytes as bnb
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(hidden_size=sizes.hidden, intermediate_size=sizes.intermediate or int(sizes.hidden * 2.6875),
                             num_attention_heads=sizes.heads or 8, num_key_value_heads=sizes.kv_heads or 8,
                             num_hidden_layers=sizes.layers,
                             vocab_size=sizes.vocab, max_position_embeddings=max(512, sizes.seq))
        compute = torch.float32 if str(device) == "cpu" else torch.bfloat16
        quantization = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=compute) if bits == 4
                        else BitsAndBytesConfig(load_in_8bit=True))
        key = (config.to_json_string(), compute)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if key not in checkpoints:
                checkpoints[key] = tempfile.TemporaryDirectory(prefix="fastlora-bench-")
                LlamaForCausalLM(config).to(compute).save_pretrained(checkpoints[key].name)
            model = AutoModelForCausalLM.from_pretrained(checkpoints[key].name, quantization_config=quantization,
                                                         device_map=str(device))
        for module in model.modules():  # bitsandbytes 0.50 repacks CPU 4-bit weights on inference forwards
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
        return model
    return build


LIBRARIES = ("frozen", "peft", "fastlora")  # the roles of a step case's three models


@dataclass(frozen=True)
class StepCase:
    """A model builder (``build(sizes, device)``, seeded by the caller), the LoRA config both libraries get, and
    the provider name of each role (:data:`LIBRARIES`) in the rows: ``frozen``, ``peft`` and ``fastlora`` but where
    the case names them after its adapter (``peft-qlora``, ``fastlora-qlora``: the frozen 4-bit base stays
    ``frozen``)."""

    build: Callable[[StepSizes, str], nn.Module]
    lora: dict
    about: str
    names: tuple[str, str, str] = LIBRARIES


_SEED = dict(task_type="CAUSAL_LM", r=8, lora_alpha=32)
_QLORA = ("frozen", "peft-qlora", "fastlora-qlora")
STEP_CASES: dict[str, StepCase] = {
    "gpt2": StepCase(_gpt2, dict(_SEED, target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.1),
                     "GPT-2, Conv1D c_attn / c_proj / c_fc, dropout 0.1"),
    "moe": StepCase(_moe, dict(_SEED, target_modules="all-linear", lora_dropout=0.0),
                    "Mixtral-style MoE (8 experts, top 2), all-linear: experts via target_parameters"),
    "qlora-nf4": StepCase(_quantized(4), dict(_SEED, target_modules=SEVEN, lora_dropout=0.1),
                          "4-bit nf4 Llama, the seven projections, dropout 0.1", _QLORA),
    "qlora-int8": StepCase(_quantized(8), dict(_SEED, target_modules=SEVEN, lora_dropout=0.1),
                           "8-bit Llama, the seven projections, dropout 0.1", _QLORA),
    "qdora-nf4": StepCase(_quantized(4), dict(_SEED, target_modules=SEVEN, lora_dropout=0.1, use_dora=True),
                          "4-bit nf4 Llama, DoRA on the seven projections, dropout 0.1", ("frozen", "peft-qdora",
                                                                                          "fastlora-qdora")),
}


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _models(case: StepCase, sizes: StepSizes, device) -> dict[str, nn.Module]:
    import peft

    import fastlora

    models = {}
    for role, name in zip(LIBRARIES, case.names):
        torch.manual_seed(0)
        model = case.build(sizes, device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's and fastlora's notes on the config (fan_in_fan_out, ...)
            if role == "frozen":
                model.requires_grad_(False)
                model.enable_input_require_grads()
            else:
                library = peft if role == "peft" else fastlora
                model = library.get_peft_model(model, library.LoraConfig(**case.lora))
        models[name] = model.train()
    return models


def _interleaved(steps: dict[str, Callable[[], None]], warmup: int, repeats: int, device) -> dict[str, float]:
    """Median seconds of each step over ``repeats`` rounds after ``warmup``, the providers in turn each round."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(warmup + repeats):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _saved_bytes(model: nn.Module, loss: Callable[[], torch.Tensor]) -> int:
    with SavedTensorCounter(exclude=module_tensors(model)) as counter:
        value = loss()
    value.backward()
    model.zero_grad(set_to_none=True)
    return counter.bytes


def run_step_case(name: str, sizes: StepSizes, device, warmup: int, repeats: int,
                  compiled: bool = False) -> list[dict]:
    """One row per provider of ``STEP_CASES[name]`` (with ``compiled``, also each under ``torch.compile``): median
    step time, bytes kept for backward, trainable parameters, peak memory, and the compiled ones' compile time."""
    case = STEP_CASES[name]
    models = _models(case, sizes, device)
    runs = {provider: (model, model) for provider, model in models.items()}  # provider: (its model, what it calls)
    if compiled:
        runs.update({provider + COMPILE_SUFFIX: (model, torch.compile(model)) for provider, model in models.items()})
    ids = torch.randint(0, sizes.vocab, (sizes.batch, sizes.seq), generator=torch.Generator().manual_seed(1)).to(device)
    steps = {}
    for provider, (model, run) in runs.items():
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trained or [torch.zeros(1, requires_grad=True)], lr=1e-4)

        def step(run=run, optimizer=optimizer):
            run(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        steps[provider] = step
    compile_s = {}
    if compiled:  # each compiled step's first call (tracing, compiling) timed alone, before the rounds; dynamo's
        torch._dynamo.reset()  # caches emptied first, so that no provider reuses what another compiled
        compile_s = _interleaved({p: s for p, s in steps.items() if p.endswith(COMPILE_SUFFIX)}, 0, 1, device)
    medians = _interleaved(steps, warmup, repeats, device)
    rows = []
    for provider, (model, run) in runs.items():
        rows.append({
            "step": name, "provider": provider, "library": LIBRARIES[case.names.index(provider.removesuffix(
                COMPILE_SUFFIX))], "step_ms": round(1000 * medians[provider], 2),
            **({"compile_s": round(compile_s[provider], 2)} if provider in compile_s else {}),
            "saved_bytes": _saved_bytes(model, lambda r=run: r(input_ids=ids, labels=ids).loss),
            "peak_bytes": peak_memory(steps[provider], torch.device(device))[0],
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "about": case.about, "hidden": sizes.hidden, "layers": sizes.layers, "batch": sizes.batch,
            "seq": sizes.seq, "vocab": sizes.vocab, "repeats": repeats,
        })
    return rows


def mixed_batch_rows(sizes: StepSizes, device, warmup: int, repeats: int, adapters=(1, 2, 4, 8)) -> list[dict]:
    """k adapters (r=8, lora_alpha=16, dropout 0.1, on the seven projections) of ``sizes.batch`` rows each over one
    batch of a Llama of ``sizes`` (a small one by default), one row per k with, in interleaved rounds:

        fastlora-mixed      one training step (forward, loss, backward) over the k·batch rows, ``adapter_names=``
        fastlora-separate   k training steps, one per adapter (``set_adapter``), each over its own rows
        fastlora-one-adapter  one training step over all k·batch rows of a model holding one adapter (the first's
                            weights, no switching): the floor a mixed step approaches (the same tokens, one
                            adapter's masks and products)
        fastlora-mixed-fwd  the mixed forward alone, in eval mode without autograd
        peft-mixed-fwd      PEFT's mixed forward, the same way (PEFT cannot train a mixed batch)

    and the bytes autograd keeps in the mixed step and in one one-adapter step over the same k·batch rows."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    import fastlora

    def build(library, names):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            hidden_size=sizes.hidden, intermediate_size=sizes.intermediate or 2 * sizes.hidden,
            num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads or 4,
            num_key_value_heads=sizes.kv_heads or 2, vocab_size=sizes.vocab,
            max_position_embeddings=max(512, sizes.seq))).to(device).train()
        config = library.LoraConfig(target_modules=SEVEN, r=8, lora_alpha=16, lora_dropout=0.1, init_lora_weights=False)
        model = library.get_peft_model(model, config, adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, config)
        return model

    rows = []
    for k in adapters:
        names = [f"a{i}" for i in range(k)]
        ours, theirs, alone = build(fastlora, names), build(peft, names).eval(), build(fastlora, names[:1])
        ours.set_requires_grad(names)
        ids = torch.randint(0, sizes.vocab, (k * sizes.batch, sizes.seq),
                            generator=torch.Generator().manual_seed(0)).to(device)
        per_row = [name for name in names for _ in range(sizes.batch)]

        def mixed_step():
            ours(input_ids=ids, labels=ids, adapter_names=per_row).loss.backward()
            ours.zero_grad(set_to_none=True)

        def separate_steps():
            for i, name in enumerate(names):
                ours.set_adapter(name)
                part = ids[i * sizes.batch:(i + 1) * sizes.batch]
                ours(input_ids=part, labels=part).loss.backward()
            ours.zero_grad(set_to_none=True)
            ours.set_requires_grad(names)

        def one_adapter_step():
            alone(input_ids=ids, labels=ids).loss.backward()
            alone.zero_grad(set_to_none=True)

        def mixed_forward(model):
            training = model.training
            model.eval()
            with torch.no_grad():
                model(input_ids=ids, adapter_names=per_row)
            model.train(training)

        medians = _interleaved({"fastlora-mixed": mixed_step, "fastlora-separate": separate_steps,
                                "fastlora-one-adapter": one_adapter_step,
                                "fastlora-mixed-fwd": lambda: mixed_forward(ours),
                                "peft-mixed-fwd": lambda: mixed_forward(theirs)}, warmup, repeats, device)
        mixed_bytes = _saved_bytes(ours, lambda: ours(input_ids=ids, labels=ids, adapter_names=per_row).loss)
        ours.set_adapter(names[0])
        one_bytes = _saved_bytes(ours, lambda: ours(input_ids=ids, labels=ids).loss)
        row = {"step": "mixed-batch", "adapters": k, "rows_per_adapter": sizes.batch, "hidden": sizes.hidden,
               "intermediate": sizes.intermediate or 2 * sizes.hidden,
               "layers": sizes.layers, "seq": sizes.seq, "repeats": repeats,
               **{f"{name}_ms": round(1000 * m, 2) for name, m in medians.items()},
               "saved_bytes_mixed": mixed_bytes, "saved_bytes_one_adapter": one_bytes}
        row["mixed_over_separate"] = round(row["fastlora-mixed_ms"] / row["fastlora-separate_ms"], 3)
        row["one_adapter_over_separate"] = round(row["fastlora-one-adapter_ms"] / row["fastlora-separate_ms"], 3)
        rows.append(row)
    return rows


def format_step_rows(rows: list[dict]) -> str:
    """The rows as a text table: per case, each provider's step time and its ratio to frozen and to PEFT."""
    lines = []
    for name in dict.fromkeys(r["step"] for r in rows):
        case_rows = [r for r in rows if r["step"] == name]
        if name == "mixed-batch":
            lines.append(f"mixed-batch  {'k':>3} {'mixed':>9} {'separate':>9} {'ratio':>6} {'one adapter':>11} "
                         f"{'ratio':>6} {'mixed fwd':>10} {'peft fwd':>9} {'saved mixed':>12} {'saved one':>12}")
            for r in case_rows:
                lines.append(f"{'':13}{r['adapters']:>3} {r['fastlora-mixed_ms']:>7.1f}ms {r['fastlora-separate_ms']:>7.1f}ms "
                             f"{r['mixed_over_separate']:>6.2f} {r['fastlora-one-adapter_ms']:>9.1f}ms "
                             f"{r['one_adapter_over_separate']:>6.2f} {r['fastlora-mixed-fwd_ms']:>8.1f}ms "
                             f"{r['peft-mixed-fwd_ms']:>7.1f}ms {r['saved_bytes_mixed']:>12,d} "
                             f"{r['saved_bytes_one_adapter']:>12,d}")
            continue
        # each row's role, compiled or not (results files from before the case named its providers: the name)
        by = {(r.get("library", r["provider"].removesuffix(COMPILE_SUFFIX)), r["provider"].endswith(COMPILE_SUFFIX)): r
              for r in case_rows}
        lines.append(f"{name}: {case_rows[0]['about']}")
        lines.append(f"  {'provider':<22} {'step':>10} {'vs frozen':>10} {'vs peft':>8} {'saved':>14} {'peak':>14}"
                     f"{'  compile' if any('compile_s' in r for r in case_rows) else ''}")
        for r in case_rows:  # a compiled provider against the compiled frozen base and PEFT
            compiled = r["provider"].endswith(COMPILE_SUFFIX)
            frozen, theirs = by[("frozen", compiled)]["step_ms"], by[("peft", compiled)]["step_ms"]
            peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes']:,d}"
            compile_s = f"  {r['compile_s']:>6.1f}s" if "compile_s" in r else ""
            lines.append(f"  {r['provider']:<22} {r['step_ms']:>8.1f}ms {r['step_ms'] / frozen:>9.2f}x "
                         f"{r['step_ms'] / theirs:>7.2f}x {r['saved_bytes']:>14,d} {peak:>14}{compile_s}")
    return "\n".join(lines)

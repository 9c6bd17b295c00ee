"""One QLoRA training step (forward + loss + backward + SGD step) on a 4-bit (nf4, double-quantized) Llama-style
model, side by side in interleaved rounds:

    frozen     the 4-bit model with every weight frozen and its input embeddings' output requiring grad
    peft       PEFT's get_peft_model (its bitsandbytes LoRA layers)
    fastlora   fastlora's get_peft_model (LoRAQuantizedLinear)

with the seed configuration (the seven projections, r=8, lora_alpha=32, lora_dropout=0.1).  Records the median
step time of each and the bytes autograd keeps for backward; writes
``bench/results/<date>-<hardware>-qlora-step.json`` (or --output) and prints a table.  Runs on the CPU
(bitsandbytes >= 0.46) or on CUDA.

    python bench/qlora_step.py [--hidden 512] [--layers 4] [--batch 4] [--length 256] [--rounds 10]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import peft  # noqa: E402

import fastlora  # noqa: E402
from fastlora.bench.measure import SavedTensorCounter, module_tensors  # noqa: E402
from fastlora.bench.meta import environment, hardware_slug  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_4bit(directory: str, device: str):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=config, device_map=device)
    for module in model.modules():  # bitsandbytes 0.50 repacks CPU weights on inference forwards; training does not
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model.train()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875), num_attention_heads=8,
                         num_key_value_heads=8, num_hidden_layers=args.layers, vocab_size=1024,
                         max_position_embeddings=max(512, args.length))
    with tempfile.TemporaryDirectory() as directory:
        LlamaForCausalLM(config).save_pretrained(directory)
        frozen = load_4bit(directory, args.device)
        frozen.requires_grad_(False)
        frozen.enable_input_require_grads()
        models = {"frozen": frozen}
        for name, library in (("peft", peft), ("fastlora", fastlora)):
            lora = library.LoraConfig(task_type="CAUSAL_LM", target_modules=TARGETS, r=8, lora_alpha=32,
                                      lora_dropout=0.1)
            models[name] = library.get_peft_model(load_4bit(directory, args.device), lora).train()
    ids = torch.randint(0, 1024, (args.batch, args.length), generator=torch.Generator().manual_seed(1)).to(args.device)
    optimizers = {name: torch.optim.SGD([p for p in m.parameters() if p.requires_grad] or [torch.zeros(1)], lr=1e-3)
                  for name, m in models.items()}

    def step(name):
        model = models[name]
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times = {name: [] for name in models}
    for round_ in range(args.warmup + args.rounds):
        for name in models:  # interleaved: a drift of the machine hits every provider alike
            t = step(name)
            if round_ >= args.warmup:
                times[name].append(t)
    saved = {}
    for name, model in models.items():
        with SavedTensorCounter(exclude=module_tensors(model)) as counter:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        saved[name] = counter.bytes
    rows = [{"provider": name, "step_ms": round(1000 * statistics.median(t), 2), "saved_bytes": saved[name],
             "trainable_params": sum(p.numel() for p in models[name].parameters() if p.requires_grad)}
            for name, t in times.items()]
    output = args.output or (Path(__file__).parent / "results" /
                             f"{dt.date.today().isoformat()}-{hardware_slug(args.device)}-qlora-step.json")
    output.write_text(json.dumps({"environment": environment(args.device), "torch_threads": torch.get_num_threads(),
                                  "config": {k: v for k, v in vars(args).items() if k != "output"}, "rows": rows},
                                 indent=2) + "\n")
    frozen_ms = rows[0]["step_ms"]
    print(f"{'provider':<10} {'step':>9} {'vs frozen':>10} {'saved':>13}")
    for row in rows:
        print(f"{row['provider']:<10} {row['step_ms']:>7.1f}ms {row['step_ms'] / frozen_ms:>9.2f}x {row['saved_bytes']:>13,d}")
    print(f"written: {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

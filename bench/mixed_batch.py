"""Several adapters over one batch: fastlora's mixed-batch training step against the same adapters trained one
per step, and PEFT's mixed-batch forward (inference only: PEFT cannot train a mixed batch), side by side.

For k adapters of b rows each on the small Llama of the demo (or --hidden / --layers), every round runs, in turn:

    fastlora-mixed      one training step (forward + loss + backward) over the k·b rows, ``adapter_names=``
    fastlora-separate   k training steps, one per adapter (``set_adapter``), each over its b rows
    fastlora-mixed-fwd  the mixed forward alone, in eval mode under ``torch.no_grad()``
    peft-mixed-fwd      PEFT's mixed forward on the same model and adapters, in eval mode under ``torch.no_grad()``

and records the median time of each over the timed rounds, and the bytes autograd saves for backward in the
mixed step and in one one-adapter step of the same k·b rows.  Writes
``bench/results/<date>-<hardware>-mixed-batch.json`` (or --output) and prints a table.

    python bench/mixed_batch.py [--adapters 1,2,4,8] [--rows 4] [--length 64] [--rounds 12] [--output FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import peft  # noqa: E402

import fastlora  # noqa: E402
from fastlora.bench.measure import SavedTensorCounter, module_tensors  # noqa: E402
from fastlora.bench.meta import environment, hardware_slug  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model(hidden: int, layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                        max_position_embeddings=512)).train()


def adapted(library, base, names: list[str]):
    model = None
    for i, name in enumerate(names):
        config = library.LoraConfig(target_modules=TARGETS, r=8, lora_alpha=16, lora_dropout=0.1,
                                    init_lora_weights=False)
        if model is None:
            model = library.get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return model


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def case(k: int, rows: int, length: int, hidden: int, layers: int, rounds: int, warmup: int) -> dict:
    names = [f"a{i}" for i in range(k)]
    ours = adapted(fastlora, base_model(hidden, layers), names)
    ours.set_requires_grad(names)
    theirs = adapted(peft, base_model(hidden, layers), names).eval()
    ids = torch.randint(0, 256, (k * rows, length), generator=torch.Generator().manual_seed(0))
    row_adapters = [name for name in names for _ in range(rows)]

    def mixed_step():
        ours(input_ids=ids, labels=ids, adapter_names=row_adapters).loss.backward()
        ours.zero_grad(set_to_none=True)

    def separate_steps():
        for i, name in enumerate(names):
            ours.set_adapter(name)
            part = ids[i * rows:(i + 1) * rows]
            ours(input_ids=part, labels=part).loss.backward()
        ours.zero_grad(set_to_none=True)
        ours.set_requires_grad(names)

    def mixed_forward(model):
        training = model.training
        model.eval()  # inference: no dropout, as PEFT's mixed forward
        with torch.no_grad():
            model(input_ids=ids, adapter_names=row_adapters)
        model.train(training)

    providers = {"fastlora-mixed": mixed_step, "fastlora-separate": separate_steps,
                 "fastlora-mixed-fwd": lambda: mixed_forward(ours), "peft-mixed-fwd": lambda: mixed_forward(theirs)}
    times = {name: [] for name in providers}
    for round_ in range(warmup + rounds):
        for name, fn in providers.items():  # interleaved: a drift of the machine hits every provider alike
            t = timed(fn)
            if round_ >= warmup:
                times[name].append(t)

    def saved(call) -> int:
        with SavedTensorCounter(exclude=module_tensors(ours)) as counter:
            loss = call()
        loss.backward()
        ours.zero_grad(set_to_none=True)
        return counter.bytes

    mixed_bytes = saved(lambda: ours(input_ids=ids, labels=ids, adapter_names=row_adapters).loss)
    ours.set_adapter(names[0])
    one_bytes = saved(lambda: ours(input_ids=ids, labels=ids).loss)
    row = {"adapters": k, "rows_per_adapter": rows, "length": length, "hidden": hidden, "layers": layers,
           "rounds": rounds, **{f"{name}_ms": round(1000 * statistics.median(t), 3) for name, t in times.items()},
           "saved_bytes_mixed": mixed_bytes, "saved_bytes_one_adapter": one_bytes}
    row["mixed_over_separate"] = round(row["fastlora-mixed_ms"] / row["fastlora-separate_ms"], 3)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", default="1,2,4,8")
    parser.add_argument("--rows", type=int, default=4, help="rows per adapter")
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    rows = [case(int(k), args.rows, args.length, args.hidden, args.layers, args.rounds, args.warmup)
            for k in args.adapters.split(",")]
    output = args.output or (Path(__file__).parent / "results" /
                             f"{dt.date.today().isoformat()}-{hardware_slug('cpu')}-mixed-batch.json")
    output.write_text(json.dumps({"environment": environment("cpu"), "torch_threads": torch.get_num_threads(),
                                  "rows": rows}, indent=2) + "\n")
    print(f"{'k':>3} {'mixed':>9} {'separate':>9} {'ratio':>6} {'mixed fwd':>10} {'peft fwd':>9} {'saved mixed':>12} "
          f"{'saved one':>10}")
    for r in rows:
        print(f"{r['adapters']:>3} {r['fastlora-mixed_ms']:>8.1f}ms {r['fastlora-separate_ms']:>7.1f}ms "
              f"{r['mixed_over_separate']:>6.2f} {r['fastlora-mixed-fwd_ms']:>8.1f}ms {r['peft-mixed-fwd_ms']:>7.1f}ms "
              f"{r['saved_bytes_mixed']:>12,d} {r['saved_bytes_one_adapter']:>10,d}")
    print(f"written: {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Train several LoRA adapters on one base model in one loop: every batch mixes rows of every adapter, the base
model runs once over the whole batch, and each adapter, with its own rank and learning rate and its own
optimizer, learns from its own rows only.  Each adapter is then saved as a PEFT adapter folder.

    python examples/mixed_batch_train.py --output out/ [--steps 30] [--adapters 4]

A small Llama-architecture model is built from a config (nothing is downloaded); each adapter learns its own
synthetic task (a fixed shift of the token ids) so that their losses can be told apart.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fastlora import LoraConfig, get_peft_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def task_batch(generator: torch.Generator, shift: int, rows: int, length: int = 16) -> torch.Tensor:
    """Rows whose next token is the previous one plus ``shift`` (mod 128): one learnable task per adapter."""
    start = torch.randint(0, 128, (rows, 1), generator=generator)
    return (start + shift * torch.arange(length)) % 128


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="folder for the adapter folders and summary.json")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rows-per-adapter", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    # One adapter per job: its own rank, alpha, dropout and learning rate.
    jobs = {f"job{i}": dict(r=2 * (i + 1), lora_alpha=4 * (i + 1), lora_dropout=0.05 * i, lr=1e-3 * (i + 1),
                            shift=i + 1) for i in range(args.adapters)}
    names = list(jobs)
    model = None
    for name in names:
        config = LoraConfig(task_type="CAUSAL_LM", target_modules=TARGETS, r=jobs[name]["r"],
                            lora_alpha=jobs[name]["lora_alpha"], lora_dropout=jobs[name]["lora_dropout"])
        if model is None:
            model = get_peft_model(build_base_model(args.seed), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    model.set_requires_grad(names)  # every adapter trains (set_adapter would leave only the active one trainable)
    model.train()
    optimizers = {name: torch.optim.AdamW(
        [p for n, p in model.named_parameters() if n.endswith(f"_{name}")], lr=jobs[name]["lr"]) for name in names}

    generator = torch.Generator().manual_seed(args.seed)
    rows = args.rows_per_adapter
    row_adapters = [name for name in names for _ in range(rows)]
    history = {name: [] for name in names}
    for _ in range(args.steps):
        ids = torch.cat([task_batch(generator, jobs[name]["shift"], rows) for name in names])
        logits = model(input_ids=ids, adapter_names=row_adapters).logits
        per_token = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                      ids[:, 1:].reshape(-1), reduction="none")
        per_row = per_token.view(ids.shape[0], -1).mean(1)
        # Each adapter's loss is the mean over its rows; their sum trains every adapter from its own rows at once.
        losses = {name: per_row[i * rows:(i + 1) * rows].mean() for i, name in enumerate(names)}
        sum(losses.values()).backward()
        for name in names:
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            history[name].append(round(losses[name].item(), 4))

    args.output.mkdir(parents=True, exist_ok=True)
    for name in names:
        model.save_pretrained(args.output / "adapters", selected_adapters=[name])
    summary = {"adapters": {name: {"r": jobs[name]["r"], "lr": jobs[name]["lr"], "first_loss": history[name][0],
                                   "last_loss": history[name][-1]} for name in names}}
    (args.output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for name, row in summary["adapters"].items():
        print(f"{name}: r={row['r']} lr={row['lr']:g} loss {row['first_loss']:.3f} -> {row['last_loss']:.3f}")
    return summary


if __name__ == "__main__":
    main()

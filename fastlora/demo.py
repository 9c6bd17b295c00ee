"""``fastlora demo``: LoRA fine-tuning of a small Llama-architecture model on CPU, end to end.

The common PEFT configuration (r=8, alpha=32, dropout 0.1 on q/k/v/o/gate/up/down) on a model built from a
config with random weights (nothing downloaded), trained on a text that ships with the package as
bytes (vocabulary 256); then the adapter is saved in PEFT's format, reloaded onto a fresh copy of the
base model (with fastlora, and with PEFT when installed) and the reloaded models must give the
trained model's loss.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import warnings
from importlib import resources
from pathlib import Path

import torch

from fastlora.cli import check_output, positive_float, positive_int

SEED_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
POSITIONS = 512  # the model's max_position_embeddings: the longest --length


def load_text_tokens() -> torch.Tensor:
    data = resources.files("fastlora").joinpath("data/demo.txt").read_bytes()
    return torch.tensor(list(data), dtype=torch.long)


def build_base_model(seed: int, hidden: int = 128, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=POSITIONS,
    )
    return LlamaForCausalLM(config)


def batches(tokens: torch.Tensor, batch: int, length: int, generator: torch.Generator):
    """Random windows of the text, forever: input_ids of shape (batch, length) (the labels are the same ids)."""
    while True:
        starts = torch.randint(0, tokens.numel() - length, (batch,), generator=generator)
        ids = torch.stack([tokens[s : s + length] for s in starts.tolist()])
        yield ids


@torch.no_grad()
def eval_loss(model, ids: torch.Tensor) -> float:
    model.eval()
    return model(input_ids=ids, labels=ids).loss.item()


class _Progress:
    """A tqdm bar on a terminal; elsewhere (a log file, a pipe) a plain line at every tenth of the run, since a
    bar redrawn with carriage returns becomes one very long line in a file."""

    def __init__(self, steps: int):
        self.steps, self.bar = steps, None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=steps, desc="fine-tuning", unit="step")
        self.every = max(1, steps // 10)

    def update(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}")
        elif step % self.every == 0 or step == self.steps:
            print(f"fine-tuning: step {step}/{self.steps}, loss {loss:.3f}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(steps: int = 300, batch: int = 8, length: int = 64, lr: float = 3e-3, seed: int = 0,
        output: str | None = None, hidden: int = 128, layers: int = 2) -> int:
    from fastlora import LoraConfig, PeftModel, TaskType, get_peft_model

    tokens = load_text_tokens()
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=SEED_TARGETS, inference_mode=False,
                        r=8, lora_alpha=32, lora_dropout=0.1)
    model = get_peft_model(build_base_model(seed, hidden, layers), config)
    model.print_trainable_parameters()
    eval_ids = next(batches(tokens, 16, length, torch.Generator().manual_seed(seed + 1)))
    print(f"text: {tokens.numel():,d} bytes; model: hidden {hidden}, {layers} layers; "
          f"{steps} steps of {batch}x{length} tokens")
    start_loss = eval_loss(model, eval_ids)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    stream = batches(tokens, batch, length, torch.Generator().manual_seed(seed))
    model.train()
    started = time.perf_counter()
    progress = _Progress(steps)
    for step in range(1, steps + 1):
        ids = next(stream)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.update(step, loss.item())
    elapsed = time.perf_counter() - started
    progress.close()
    end_loss = eval_loss(model, eval_ids)
    print(f"eval loss: {start_loss:.4f} -> {end_loss:.4f} (perplexity {math.exp(end_loss):.2f}); "
          f"{steps * batch * length / elapsed:,.0f} tokens/s over {elapsed:.1f} s")

    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(output) if output else Path(scratch) / "adapter"
        model.save_pretrained(directory)
        print(f"adapter saved to {directory}" + ("" if output else " (temporary; pass --output to keep it)"))
        reloaded = {"fastlora": eval_loss(PeftModel.from_pretrained(build_base_model(seed, hidden, layers), directory), eval_ids)}
        try:
            from peft import PeftModel
        except ImportError:
            print("peft is not installed: reload checked with fastlora only")
        else:
            with warnings.catch_warnings():  # PEFT's loading asks transformers for a name it has deprecated
                warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
                peft_model = PeftModel.from_pretrained(build_base_model(seed, hidden, layers), directory)
            reloaded["peft"] = eval_loss(peft_model, eval_ids)
    failed = False
    for name, value in reloaded.items():
        ok = abs(value - end_loss) <= 1e-5 * max(1.0, abs(end_loss))
        failed |= not ok
        print(f"reloaded with {name}: loss {value:.6f} ({'same as trained' if ok else 'DIFFERENT from trained'})")
    if not end_loss < start_loss:
        print(f"fastlora demo: the eval loss did not decrease ({start_loss:.4f} -> {end_loss:.4f}) with these "
              "settings: try more --steps or a larger --lr", file=sys.stderr)
    return 1 if failed or not end_loss < start_loss else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fastlora demo",
        description="LoRA fine-tuning of a small Llama-architecture model on CPU (r=8, alpha=32, dropout 0.1 on "
                    "q/k/v/o/gate/up/down), then the adapter saved in PEFT's format and reloaded with fastlora and "
                    "PEFT, which must give the trained model's loss. Nothing is downloaded.",
    )
    parser.add_argument("--steps", type=positive_int, default=300, help="optimizer steps (default: 300)")
    parser.add_argument("--batch", type=positive_int, default=8, help="sequences per step (default: 8)")
    parser.add_argument("--length", type=positive_int, default=64,
                        help=f"tokens (bytes of the text) per sequence, 2 to {POSITIONS} (default: 64)")
    parser.add_argument("--lr", type=positive_float, default=3e-3, help="AdamW learning rate (default: 0.003)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the base model, the adapter and the batches (default: 0)")
    parser.add_argument("--hidden", type=positive_int, default=128,
                        help="hidden size of the model, a multiple of 8 (default: 128)")
    parser.add_argument("--layers", type=positive_int, default=2, help="decoder layers of the model (default: 2)")
    parser.add_argument("--output", help="directory to keep the adapter in (default: a temporary one, deleted at the end)")
    args = parser.parse_args(argv)
    if not 2 <= args.length <= POSITIONS:
        parser.error(f"--length must be from 2 to {POSITIONS} (the model's positions)")
    if args.hidden % 8:
        parser.error("--hidden must be a multiple of 8 (4 attention heads of an even size)")
    if args.output:
        check_output(parser, "--output", args.output, folder=True)
    torch.set_num_threads(min(torch.get_num_threads(), 8))
    return run(args.steps, args.batch, args.length, args.lr, args.seed, args.output, args.hidden, args.layers)

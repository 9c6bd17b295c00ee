"""LoRA fine-tuning with transformers' Trainer, written as for PEFT with only the import changed.

    python examples/trainer_finetune.py --output out/trainer
    accelerate launch --multi_gpu --num_processes 2 examples/trainer_finetune.py --output out/trainer-2proc
    torchrun --nproc-per-node 2 examples/trainer_finetune.py --output out/trainer-torchrun

(accelerate's ``--cpu`` flag starts several CPU processes only through MPI; ``--multi_gpu`` starts them
with torch's launcher, and on a machine without CUDA the Trainer then runs DDP on CPU over gloo.)

A small Llama-architecture model built from a config (nothing downloaded) learns a short text that
ships with fastlora, with the seed configuration (r=8, alpha=32, dropout 0.1 on q/k/v/o/gate/up/down).
Checkpoints and the final ``save_model`` are PEFT adapter folders.  Each process also writes its LoRA
weights to ``lora_rank<N>.pt`` so runs can be compared.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from fastlora import LoraConfig, TaskType, get_peft_model  # was: from peft import ...
from fastlora.demo import SEED_TARGETS, build_base_model, load_text_tokens


class TextWindows(torch.utils.data.Dataset):
    """Consecutive windows of the bundled text as {"input_ids", "labels"} rows."""

    def __init__(self, tokens: torch.Tensor, length: int):
        self.tokens, self.length = tokens, length

    def __len__(self) -> int:
        return self.tokens.numel() // self.length

    def __getitem__(self, i: int) -> dict:
        ids = self.tokens[i * self.length : (i + 1) * self.length]
        return {"input_ids": ids, "labels": ids}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--per-device-batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--lora-dropout", type=float, default=0.1)
    parser.add_argument("--optim", default="adamw_torch", help="a TrainingArguments optim name, e.g. sgd")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    torch.manual_seed(args.seed)
    model = build_base_model(args.seed, hidden=64, layers=2)
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=SEED_TARGETS, inference_mode=False,
                        r=8, lora_alpha=32, lora_dropout=args.lora_dropout)
    model = get_peft_model(model, config)
    data = TextWindows(load_text_tokens(), args.length)
    training_args = TrainingArguments(
        output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=args.per_device_batch,
        learning_rate=args.lr, optim=args.optim, logging_steps=1, save_steps=3, seed=args.seed, report_to="none",
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=data, eval_dataset=torch.utils.data.Subset(data, range(8)))
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(args.output)
    rank = training_args.process_index
    weights = {n: p.detach().cpu() for n, p in trainer.model.named_parameters() if p.requires_grad}
    torch.save(weights, Path(args.output) / f"lora_rank{rank}.pt")
    print(f"process {rank}: eval_loss {metrics['eval_loss']:.4f}; adapter saved to {args.output}", flush=True)
    # The Trainer leaves the process group of a multi-process run open.  Left to interpreter shutdown, gloo's
    # worker threads can still hold tensors while Python is torn down, and the process aborts ("terminate
    # called without an active exception") after everything was saved.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank shuts gloo down while another still has work in flight
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    from distributed_exit import exit_process

    exit_process(main())

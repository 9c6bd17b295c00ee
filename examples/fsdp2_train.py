"""LoRA fine-tuning with FSDP2 in a plain PyTorch loop, under torchrun.

    torchrun --nproc-per-node 2 examples/fsdp2_train.py --output out/fsdp2
    python examples/fsdp2_train.py --output out/single      # one process, the same global batches

Each decoder layer and the root are sharded with ``fully_shard`` (frozen base weights and trainable
adapters in the same units); every rank takes its rows of each global batch.  After training the full
adapter is gathered (trainable parameters only), saved by rank 0 in PEFT's format, reloaded onto a
fresh base model and checked against the trained model's logits.  Each rank also writes its gathered
LoRA weights to ``lora_rank<N>.pt`` so runs can be compared.  CPU runs use the gloo backend.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

from fastlora import LoraConfig, PeftModel, TaskType, get_peft_model
from fastlora.demo import SEED_TARGETS, batches, build_base_model, load_text_tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="directory for the adapter and the per-rank weights")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--global-batch", type=int, default=4, help="rows per step over all ranks")
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--lora-dropout", type=float, default=0.1)
    parser.add_argument("--optim", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if args.global_batch % world:
        parser.error(f"--global-batch {args.global_batch} does not split over {world} ranks")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    torch.set_num_threads(1)

    torch.manual_seed(args.seed)  # the same base model and initial adapter on every rank
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=SEED_TARGETS, r=8, lora_alpha=32,
                        lora_dropout=args.lora_dropout)
    model = get_peft_model(build_base_model(args.seed, hidden=64, layers=2), config).to(device)
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.get_base_model().model.layers:
            fully_shard(layer)
        fully_shard(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = (torch.optim.AdamW if args.optim == "adamw" else torch.optim.SGD)(trainable, lr=args.lr)
    stream = batches(load_text_tokens(), args.global_batch, args.length, torch.Generator().manual_seed(args.seed))
    torch.manual_seed(args.seed + 1 + rank)  # each rank draws its own dropout masks
    model.train()
    for step in range(args.steps):
        ids = next(stream).chunk(world)[rank].to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"rank {rank} step {step} loss {loss.item():.4f}", flush=True)

    if world > 1:  # gather the full adapter on every rank (a collective: all ranks call it)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True))
    else:
        state = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in state.items()}, output / f"lora_rank{rank}.pt")
    model.save_pretrained(output / "adapter", state_dict=state, is_main_process=rank == 0)
    if world > 1:
        dist.barrier()

    model.eval()
    probe = next(stream)[:2].to(device)
    with torch.no_grad():
        trained = model(input_ids=probe).logits
        reloaded = PeftModel.from_pretrained(build_base_model(args.seed, hidden=64, layers=2).to(device), output / "adapter")
        same = torch.allclose(reloaded(input_ids=probe).logits, trained, atol=1e-5, rtol=1e-5)
    print(f"rank {rank}: adapter saved to {output / 'adapter'}; reloaded logits "
          f"{'match' if same else 'DIFFER FROM'} the trained model", flush=True)
    if world > 1:
        dist.destroy_process_group()
    return 0 if same else 1


if __name__ == "__main__":
    from distributed_exit import exit_process

    exit_process(main())

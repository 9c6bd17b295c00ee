"""The examples/ scripts, run as a user runs them: one process, two processes under accelerate launch
(Trainer, DDP over gloo) and under torchrun (FSDP2).  With dropout 0, the two ranks end with identical
LoRA weights and match the one-process run on the same global batches.

The runs compared use plain SGD.  Two processes sum their gradients in another order than one process, so
the gradients differ by float32 rounding; under SGD a weight moves by lr·g, so after n steps it differs by at
most lr·Σ|δg|, a few float32 ulps of the gradients (plus their small effect on later gradients).  Adam divides
each step by √v: for an element whose gradient is near zero, rounding flips or scales a step of size ~lr, so
the difference depends on the CPU's summation order and is not bounded by rounding at all (one element of
an o_proj lora_A was seen 1.6e-4 apart against a median of 1.9e-6)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch

from fastlora import LoraModel
from fastlora.demo import build_base_model
from tests.tolerances import assert_close

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, timeout=240) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _torchrun(script, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
            str(_free_port()), str(EXAMPLES / script), *args]


def _weights(directory, rank):
    return torch.load(Path(directory) / f"lora_rank{rank}.pt", weights_only=True)


# float32 rounding of lr·Σ|δg| over the runs' 5-6 SGD steps, with room for other CPUs' summation orders
SGD_ATOL = 2e-6


def _assert_ranks_agree_and_match(multi, single, atol=SGD_ATOL):
    rank0, rank1, alone = _weights(multi, 0), _weights(multi, 1), _weights(single, 0)
    assert rank0.keys() == rank1.keys() == alone.keys() and len(rank0) == 28
    worst = max((rank0[k] - alone[k]).abs().max().item() for k in rank0)
    print(f"largest difference between two processes and one: {worst:.3g}")
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], alone[key], atol=atol, rtol=0, msg=key)


def test_trainer_example_one_process_and_accelerate_two(tmp_path):
    _run([sys.executable, str(EXAMPLES / "trainer_finetune.py"), "--output", str(tmp_path / "one"),
          "--per-device-batch", "4", "--lora-dropout", "0", "--optim", "sgd"])
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
          str(_free_port()), str(EXAMPLES / "trainer_finetune.py"), "--output", str(tmp_path / "two"),
          "--per-device-batch", "2", "--lora-dropout", "0", "--optim", "sgd"])
    _assert_ranks_agree_and_match(tmp_path / "two", tmp_path / "one")
    for run in ("one", "two"):
        assert {"adapter_config.json", "adapter_model.safetensors", "checkpoint-3", "checkpoint-6"} <= set(os.listdir(tmp_path / run))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = LoraModel.from_pretrained(build_base_model(0, hidden=64, layers=2), tmp_path / "two")(input_ids=ids).logits
        theirs = peft.PeftModel.from_pretrained(build_base_model(0, hidden=64, layers=2), tmp_path / "two").eval()(input_ids=ids).logits
    assert_close(ours, theirs, kind="same_math")


def test_trainer_example_seed_configuration_under_torchrun(tmp_path):
    out = _run(_torchrun("trainer_finetune.py", "--output", str(tmp_path)))  # dropout 0.1
    assert "process 0: eval_loss" in out and "process 1: eval_loss" in out
    rank0, rank1 = _weights(tmp_path, 0), _weights(tmp_path, 1)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # DDP keeps the ranks in step


def test_fsdp2_example_two_ranks_match_one_process(tmp_path):
    out = _run(_torchrun("fsdp2_train.py", "--output", str(tmp_path / "two"), "--lora-dropout", "0", "--optim", "sgd"))
    assert out.count("reloaded logits match the trained model") == 2
    _run([sys.executable, str(EXAMPLES / "fsdp2_train.py"), "--output", str(tmp_path / "one"), "--lora-dropout", "0",
          "--optim", "sgd"])
    _assert_ranks_agree_and_match(tmp_path / "two", tmp_path / "one")


def test_fsdp2_example_with_dropout(tmp_path):
    out = _run(_torchrun("fsdp2_train.py", "--output", str(tmp_path)))
    assert out.count("reloaded logits match the trained model") == 2
    rank0, rank1 = _weights(tmp_path, 0), _weights(tmp_path, 1)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


def test_mixed_batch_example_trains_every_adapter_and_saves_peft_folders(tmp_path):
    """Four adapters (ranks 2-8, their own learning rates and dropout) trained in one loop on mixed batches: each
    one's loss falls, and each saved folder loads in PEFT with fastlora's outputs for that adapter."""
    import json

    import fastlora

    sys.path.insert(0, str(EXAMPLES))
    try:
        from mixed_batch_train import build_base_model as mixed_base
    finally:
        sys.path.remove(str(EXAMPLES))
    _run([sys.executable, str(EXAMPLES / "mixed_batch_train.py"), "--output", str(tmp_path), "--steps", "30"])
    summary = json.loads((tmp_path / "summary.json").read_text())["adapters"]
    assert len(summary) == 4
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    for name, row in summary.items():
        assert row["last_loss"] < row["first_loss"] - 0.05, (name, row)
        folder = tmp_path / "adapters" / name
        theirs = peft.PeftModel.from_pretrained(mixed_base(), folder).eval()
        ours = fastlora.PeftModel.from_pretrained(mixed_base(), folder).eval()
        assert theirs.peft_config["default"].r == ours.peft_config["default"].r == row["r"]
        assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, kind="same_math")

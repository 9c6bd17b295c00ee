"""transformers' Trainer with a fastlora model and a PEFT user's script unchanged: default arguments,
adapter checkpoints, resuming, the best checkpoint, gradient accumulation and checkpointing, bf16.
Where dropout is 0, every run is compared with the same run on a PEFT model with the same initial
adapter: losses and adapter weights agree to float32 rounding (adapter weights: tests/tolerances.py's
float32 "same_math")."""

import os

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

import fastlora
from fastlora import LoraConfig, LoraModel, get_peft_model
from tests.models import SEED_TARGETS, clone, copy_lora_weights, tiny_llama, tokens
from tests.tolerances import assert_close

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def _data(n=32, length=16, extra_column=False):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 128, (length,), generator=g)
        rows.append({"input_ids": ids, "labels": ids, **({"not_a_model_input": 1} if extra_column else {})})
    return rows


def _models(dropout=0.0, r=8, **kwargs):
    """A fastlora model and a PEFT model with the same base and the same non-zero initial adapter."""
    base = tiny_llama()
    common = dict(task_type="CAUSAL_LM", target_modules=SEED_TARGETS, r=r, lora_alpha=32, lora_dropout=dropout, **kwargs)
    torch.manual_seed(0)
    pm = peft.get_peft_model(clone(base), peft.LoraConfig(init_lora_weights=False, **common))
    fm = get_peft_model(clone(base), LoraConfig(**common))
    copy_lora_weights(pm, fm)
    return base, fm, pm


def _train(model, output_dir, data=None, resume=None, callbacks=(), **args):
    args = TrainingArguments(output_dir=str(output_dir), **args)
    data = data if data is not None else _data()
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8], callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _adapter(model):
    sd = fastlora.get_peft_model_state_dict(model) if isinstance(model, LoraModel) else peft.get_peft_model_state_dict(model)
    return {k: v.detach().clone() for k, v in sd.items()}


def _assert_same_adapter(a, b, kind="same_math"):
    """Every adapter weight within the ``kind`` tolerance (tests/tolerances.py); ``kind=None``: bit-identical."""
    assert a.keys() == b.keys()
    for key in a:
        if kind is None:
            assert torch.equal(a[key], b[key]), key
        else:
            assert_close(a[key], b[key], kind=kind, msg=key)


def test_default_arguments_train_and_evaluate_as_peft(tmp_path):
    _, fm, pm = _models()
    ours = _train(fm, tmp_path / "ours")  # TrainingArguments(output_dir=...) and nothing else
    theirs = _train(pm, tmp_path / "peft")
    assert ours.state.global_step == theirs.state.global_step == 12  # 32 rows, batch 8, 3 epochs
    ours_eval, theirs_eval = ours.evaluate(), theirs.evaluate()
    assert "eval_loss" in ours_eval
    assert ours_eval["eval_loss"] == pytest.approx(theirs_eval["eval_loss"], abs=1e-5)
    train_loss = [next(h["train_loss"] for h in t.state.log_history if "train_loss" in h) for t in (ours, theirs)]
    assert train_loss[0] == pytest.approx(train_loss[1], abs=1e-5)
    _assert_same_adapter(_adapter(fm), _adapter(pm))


def test_unused_columns_are_dropped_as_for_peft(tmp_path):
    _, fm, _ = _models()
    trainer = _train(fm, tmp_path, data=_data(extra_column=True), max_steps=2)
    assert trainer.state.global_step == 2 and "eval_loss" in trainer.evaluate()


def test_checkpoints_and_save_model_are_adapter_folders(tmp_path):
    base, fm, _ = _models(dropout=0.1)
    trainer = _train(fm, tmp_path / "run", max_steps=4, save_steps=2, learning_rate=1e-2)
    checkpoints = sorted(os.listdir(tmp_path / "run"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    for name in checkpoints:
        files = set(os.listdir(tmp_path / "run" / name))
        assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files
        assert not files & {"model.safetensors", "pytorch_model.bin"}
    trainer.save_model(tmp_path / "final")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "final"))
    fm.eval()
    with torch.no_grad():
        want = fm(input_ids=tokens()).logits
        for loaded in (peft.PeftModel.from_pretrained(clone(base), tmp_path / "run" / "checkpoint-4"),
                       LoraModel.from_pretrained(clone(base), tmp_path / "run" / "checkpoint-4"),
                       LoraModel.from_pretrained(clone(base), tmp_path / "final")):
            assert_close(loaded.eval()(input_ids=tokens()).logits, want, kind="same_math")


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_from_checkpoint_continues_the_run(tmp_path):
    """With dropout 0.1: the resumed run replays the uninterrupted run's dropout masks (torch's RNG state is in
    the checkpoint), so weights and losses match it bit for bit; asserted to float32 roundoff (1e-6)."""
    args = dict(max_steps=6, save_steps=3, logging_steps=1, learning_rate=1e-2, per_device_train_batch_size=4)
    _, whole, _ = _models(dropout=0.1)
    uninterrupted = _train(whole, tmp_path / "whole", **args)
    _, first, _ = _models(dropout=0.1)
    _train(first, tmp_path / "split", callbacks=[_StopAt(3)], **args)
    _, second, _ = _models(dropout=0.1)
    resumed = _train(second, tmp_path / "split", resume=True, **args)
    assert resumed.state.global_step == 6
    _assert_same_adapter(_adapter(second), _adapter(whole), kind="roundoff")
    assert _losses(resumed)[-3:] == pytest.approx(_losses(uninterrupted)[-3:], abs=1e-6)
    assert not torch.allclose(_adapter(second)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
                              _adapter(first)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])


def test_load_best_model_at_end_restores_the_best_adapter(tmp_path):
    # greater_is_better=True makes the highest eval loss "best": an early checkpoint, not the last one
    _, fm, _ = _models()
    trainer = _train(fm, tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2, save_steps=2, learning_rate=1e-2,
                     load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-6")
    restored = _adapter(fm)
    _assert_same_adapter(restored, load_file(os.path.join(best, "adapter_model.safetensors")), kind=None)
    last = load_file(tmp_path / "checkpoint-6" / "adapter_model.safetensors")
    assert any(not torch.equal(restored[k], last[k]) for k in last)
    assert not fm.training  # as PEFT: loading the best adapter puts the model in eval mode


@pytest.mark.parametrize("setting", [
    {"gradient_accumulation_steps": 2},
    {"gradient_checkpointing": True},
    {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}},
])
def test_training_settings_as_peft(tmp_path, setting):
    _, fm, pm = _models()
    ours = _train(fm, tmp_path / "ours", max_steps=4, logging_steps=1, learning_rate=1e-2, **setting)
    theirs = _train(pm, tmp_path / "peft", max_steps=4, logging_steps=1, learning_rate=1e-2, **setting)
    assert _losses(ours) == pytest.approx(_losses(theirs), abs=1e-5)
    _assert_same_adapter(_adapter(fm), _adapter(pm))


def test_bf16_trains_as_close_to_float32_as_peft(tmp_path):
    """bf16 autocast (CPU here; fp16 autocast needs a GPU): bf16 rounding moves both runs away from the
    float32 run; fastlora's adapters must end no further from it than 1.5x PEFT's distance, stay float32,
    and the losses within 0.05 of float32's."""
    args = dict(max_steps=4, logging_steps=1, learning_rate=1e-2)
    _, reference, _ = _models()
    exact = _train(reference, tmp_path / "fp32", **args)
    _, fm, pm = _models()
    bf16 = dict(bf16=True, use_cpu=not torch.cuda.is_available(), **args)
    ours, theirs = _train(fm, tmp_path / "ours", **bf16), _train(pm, tmp_path / "peft", **bf16)

    def distance(model):
        a, b = _adapter(model), _adapter(reference)
        return max((a[k] - b[k]).abs().max().item() for k in a)

    assert 0 < distance(fm) <= 1.5 * distance(pm)
    assert _losses(ours) == pytest.approx(_losses(exact), abs=0.05)
    assert _losses(theirs) == pytest.approx(_losses(exact), abs=0.05)
    assert all(p.dtype == torch.float32 for n, p in fm.named_parameters() if "lora_" in n)


def test_gradient_checkpointing_replays_dropout(tmp_path):
    runs = []
    for checkpointing in (False, True):
        _, fm, _ = _models(dropout=0.1)
        trainer = _train(fm, tmp_path / str(checkpointing), max_steps=3, logging_steps=1, learning_rate=1e-2,
                         gradient_checkpointing=checkpointing)
        runs.append((_losses(trainer), _adapter(fm)))
    assert runs[0][0] == pytest.approx(runs[1][0], abs=1e-6)
    _assert_same_adapter(runs[0][1], runs[1][1], kind="roundoff")

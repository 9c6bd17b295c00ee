"""patch_peft: a PEFT model's LoRA layers through fastlora's op, with PEFT's modules, files, merging and
disabling unchanged; per instance, undone by unpatch_peft."""

import os

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fastlora import patch_peft, unpatch_peft
from fastlora.bench.measure import SavedTensorCounter, module_tensors
from tests.models import SEED_TARGETS, clone, tiny_llama, tokens
from tests.tolerances import assert_close

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _peft(dropout=0.0, base=None, **kwargs):
    torch.manual_seed(0)
    config = peft.LoraConfig(task_type="CAUSAL_LM", target_modules=SEED_TARGETS, r=8, lora_alpha=32,
                             lora_dropout=dropout, init_lora_weights=False, **kwargs)
    return peft.get_peft_model(clone(base if base is not None else tiny_llama()), config)


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bias", [False, True])
def test_patched_model_gives_peft_outputs_and_gradients(bias):
    base = tiny_llama(attention_bias=bias, mlp_bias=bias)
    plain, patched = _peft(base=base), _peft(base=base)
    peft_forward = peft.tuners.lora.layer.Linear.forward
    report = patch_peft(patched)
    assert peft.tuners.lora.layer.Linear.forward is peft_forward  # no class was touched
    assert len(report.patched) == 14 and report.skipped == {}
    ids = tokens()
    for model in (plain, patched):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    want, got = _lora_grads(plain), _lora_grads(patched)
    assert want.keys() == got.keys() and len(got) == 28
    for name in want:
        assert_close(got[name], want[name], kind="same_math", msg=name)
    plain.eval(), patched.eval()
    with torch.no_grad():
        assert_close(patched(input_ids=ids).logits, plain(input_ids=ids).logits, kind="same_math")


def test_patched_layer_really_runs_fastlora(monkeypatch):
    model = _peft()
    patch_peft(model)
    calls = []
    import fastlora.patch

    real = fastlora.patch.lora_linear
    monkeypatch.setattr(fastlora.patch, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        model(input_ids=tokens())
    assert len(calls) == 14


def _saved_for_backward(module, x):
    """What autograd keeps for ``module(x)`` (its own parameters and x aside), after one backward."""
    with SavedTensorCounter(exclude=module_tensors(module), inputs=[x]) as counter:
        y = module(x)
    y.sum().backward()
    return counter


def test_saved_activations_drop_to_x_S_and_a_seed():
    """One PEFT layer with dropout 0.1: PEFT keeps the dropped copy of x and its mask; patched, x, S and the
    8-byte seed."""
    def saved(patch):
        torch.manual_seed(0)
        wrap = nn.Sequential()
        wrap.add_module("proj", nn.Linear(256, 128))
        wrap = peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["proj"], r=8, lora_dropout=0.1), wrap)
        if patch:
            patch_peft(wrap)
        return _saved_for_backward(wrap.train(), torch.randn(64, 256, requires_grad=True))

    peft_saved, patched_saved = saved(False), saved(True)
    x_bytes, s_bytes = 64 * 256 * 4, 64 * 8 * 4
    assert patched_saved.bytes == x_bytes + s_bytes + 8 and patched_saved.one_element_bytes == 8
    assert peft_saved.bytes >= 2 * x_bytes + s_bytes  # x and the dropped copy, plus the mask


def test_patched_model_trains_with_dropout_and_saves_peft_files(tmp_path):
    base = tiny_llama()
    model = _peft(dropout=0.1, base=base)
    patch_peft(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens()
    model.train()
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step(), opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "patched")
    _peft(base=base).save_pretrained(tmp_path / "plain")
    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("patched", "plain"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert sorted(os.listdir(tmp_path / "patched")) == sorted(os.listdir(tmp_path / "plain"))
    assert all("forward" not in k for k in model.state_dict())


def test_merge_and_unload_and_disable_adapter_as_unpatched():
    base = tiny_llama()
    plain, patched = _peft(base=base), _peft(base=base)
    patch_peft(patched)
    ids = tokens()
    with torch.no_grad():
        with patched.disable_adapter():
            torch.testing.assert_close(patched.eval()(input_ids=ids).logits, base(input_ids=ids).logits)
        patched.merge_adapter()
        assert_close(patched(input_ids=ids).logits, plain.eval()(input_ids=ids).logits, kind="same_math")
        patched.unmerge_adapter()
    merged_plain, merged_patched = plain.merge_and_unload(), patched.merge_and_unload()
    for (name, a), (_, b) in zip(merged_plain.state_dict().items(), merged_patched.state_dict().items()):
        assert torch.equal(a, b), name


def test_report_names_each_layer_left_to_peft_and_unpatch_restores():
    base = tiny_llama()
    config = peft.LoraConfig(target_modules=["q_proj", "v_proj", "embed_tokens"], r=4, init_lora_weights=False)
    model = peft.get_peft_model(clone(base), config)
    model.base_model.model.model.layers[1].self_attn.v_proj.fan_in_fan_out = True  # a layer fastlora cannot run
    report = patch_peft(model)
    assert len(report.patched) == 3
    assert any("Embedding" in reason for reason in report.skipped.values())
    assert any("fan_in_fan_out" in reason for reason in report.skipped.values())
    assert "left to PEFT" in str(report)
    assert unpatch_peft(model) == 3
    assert all("forward" not in vars(m) for m in model.modules())
    with pytest.raises(ValueError, match="no PEFT LoRA layer"):
        patch_peft(base)
    for wrong in (None, "model"):
        with pytest.raises(TypeError, match="a torch.nn.Module"):
            patch_peft(wrong)
        with pytest.raises(TypeError, match="a torch.nn.Module"):
            unpatch_peft(wrong)


def test_hooks_added_after_patching_send_the_call_to_peft():
    model = _peft()
    patch_peft(model)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    seen = []
    q_proj.base_layer.register_forward_pre_hook(lambda module, args: seen.append(1))
    with torch.no_grad():
        model(input_ids=tokens())
    assert seen == [1]  # PEFT's forward ran the base layer as a module, so its hook ran


def test_patched_model_pickles():
    import io

    model = _peft()
    patch_peft(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=tokens()).logits, model.eval()(input_ids=tokens()).logits)
    assert "_fastlora_patch" in vars(loaded.base_model.model.model.layers[0].self_attn.q_proj)


@pytest.fixture(scope="module")
def quantized_checkpoint(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(directory)
    return directory


def _peft_qlora(checkpoint, quant, dropout=0.0):
    from tests.models import load_quantized
    from tests.test_qlora import QUANT

    torch.manual_seed(0)
    config = peft.LoraConfig(task_type="CAUSAL_LM", target_modules=SEED_TARGETS, r=8, lora_alpha=32,
                             lora_dropout=dropout, init_lora_weights=False)
    return peft.get_peft_model(load_quantized(checkpoint, **QUANT[quant]), config)


@pytest.mark.parametrize("quant", ["nf4-fp32", "nf4-double-bf16", "int8"])
def test_patched_qlora_model_gives_peft_outputs_and_gradients(quantized_checkpoint, quant, monkeypatch):
    """PEFT's bitsandbytes LoRA layers patched: bitsandbytes' product plus fastlora's term, PEFT's logits and
    every LoRA gradient."""
    from tests.test_qlora import GRAD_DTYPE

    import fastlora.patch

    plain, patched = _peft_qlora(quantized_checkpoint, quant), _peft_qlora(quantized_checkpoint, quant)
    report = patch_peft(patched)
    assert len(report.patched) == 14 and report.skipped == {}
    calls = []
    real = fastlora.patch.plus_low_rank
    monkeypatch.setattr(fastlora.patch, "plus_low_rank", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = tokens()
    outputs = []
    for model in (plain, patched):
        model.train()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        outputs.append(out.logits)
    assert len(calls) == 14  # every patched layer ran fastlora's term
    assert_close(outputs[1], outputs[0], kind="same_math", dtype=GRAD_DTYPE[quant])
    want, got = _lora_grads(plain), _lora_grads(patched)
    assert want.keys() == got.keys() and len(got) == 28
    for name in want:
        assert_close(got[name], want[name], kind="same_math", dtype=GRAD_DTYPE[quant], msg=name)


def test_patched_qlora_layer_keeps_no_dropped_copy_of_x(quantized_checkpoint):
    """A patched 4-bit layer with dropout 0.1 keeps x, S and an 8-byte seed for its term, where PEFT's also keeps
    the dropped copy of x (and the mask); the patched model trains."""
    def saved(patch):
        model = _peft_qlora(quantized_checkpoint, "nf4-fp32", dropout=0.1)
        layer = model.base_model.model.model.layers[0].mlp.up_proj
        if patch:
            assert patch_peft(model).skipped == {}
        return _saved_for_backward(layer.train(), torch.randn(64, layer.in_features, requires_grad=True))

    peft_saved, patched_saved = saved(False), saved(True)
    x_bytes, s_bytes = 64 * 64 * 4, 64 * 8 * 4
    assert patched_saved.bytes == x_bytes + s_bytes + 8 and patched_saved.one_element_bytes == 8
    assert peft_saved.bytes >= x_bytes + s_bytes + 64 * 64  # the dropped copy and S, plus the mask

    model = _peft_qlora(quantized_checkpoint, "nf4-fp32", dropout=0.1)
    patch_peft(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens()
    losses = []
    for _ in range(4):
        loss = model.train()(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step(), opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

"""Named adapters, call for call against PEFT 0.21 on a small Llama: add / set / delete / load, which
adapter trains (requires_grad after every call), the reference-adapter pattern of preference training,
two adapters saved and loaded both ways, merging and unloading with several adapters, and the features
refused with a named NotImplementedError."""

import os
import re

import peft
import pytest
import torch

from fastlora import LoraConfig, LoraModel, get_peft_model
from fastlora.bench.measure import SavedTensorCounter, module_tensors
from tests.models import assert_unchanged, clone, snapshot, tiny_llama, tokens

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

CONFIGS = {  # (targets, r, alpha) per adapter name
    "default": (["q_proj", "v_proj"], 4, 8),
    "other": (["q_proj"], 2, 8),
    "third": (["v_proj"], 4, 16),
    "mlp": (["q_proj", "up_proj"], 2, 8),  # also a layer the default adapter does not target
}


def _configs(name, lib, **kwargs):
    targets, r, alpha = CONFIGS[name]
    cls = LoraConfig if lib == "fastlora" else peft.LoraConfig
    extra = {} if lib == "fastlora" else {"init_lora_weights": False}
    return cls(task_type="CAUSAL_LM", target_modules=targets, r=r, lora_alpha=alpha, **extra, **kwargs)


def _flags(model):
    """{adapter: {requires_grad values}} over each adapter's LoRA factors (both libraries' naming)."""
    out = {}
    for name, p in model.named_parameters():
        found = re.search(r"\.lora_[AB](?:_|\.)([^.]+)", name)
        if found:
            out.setdefault(found.group(1), set()).add(p.requires_grad)
    return out


def _copy_adapter(pm, fm, adapter):
    """PEFT's values of ``adapter`` into fastlora's."""
    state = dict(pm.named_parameters())
    with torch.no_grad():
        for name, layer in fm.lora_layers(adapter):
            A, B = layer.lora_factors(adapter)
            A.copy_(state[f"base_model.model.{name}.lora_A.{adapter}.weight"])
            B.copy_(state[f"base_model.model.{name}.lora_B.{adapter}.weight"])


def _logits(model, ids=None):
    with torch.no_grad():
        return model.eval()(input_ids=tokens() if ids is None else ids).logits


def _both(base=None):
    base = base if base is not None else tiny_llama()
    torch.manual_seed(0)
    pm = peft.get_peft_model(clone(base), _configs("default", "peft"))
    fm = get_peft_model(clone(base), _configs("default", "fastlora"))
    _copy_adapter(pm, fm, "default")
    return base, pm, fm


def _same_state(pm, fm):
    assert fm.active_adapter == pm.active_adapter
    assert fm.active_adapters == pm.active_adapters
    assert list(fm.peft_config) == list(pm.peft_config)
    assert _flags(fm) == _flags(pm)
    torch.testing.assert_close(_logits(fm), _logits(pm), atol=1e-5, rtol=1e-5)


def test_add_set_delete_as_peft():
    _, pm, fm = _both()
    steps = [
        ("add_adapter", "other"), ("set_adapter", "other"), ("set_adapter", "default"), ("add_adapter", "third"),
        ("set_adapter", "third"), ("delete_adapter", "third"), ("set_adapter", "other"), ("delete_adapter", "default"),
    ]
    for op, name in steps:
        if op == "add_adapter":
            pm.add_adapter(name, _configs(name, "peft"))
            fm.add_adapter(name, _configs(name, "fastlora"))
            _copy_adapter(pm, fm, name)
        else:
            getattr(pm, op)(name)
            getattr(fm, op)(name)
        _same_state(pm, fm)
    assert fm.active_adapter == "other" and list(fm.peft_config) == ["other"]


def test_adding_an_adapter_changes_no_output_until_it_is_set():
    base, pm, fm = _both()
    before = _logits(fm)
    fm.add_adapter("mlp", _configs("mlp", "fastlora", init_lora_weights=False))  # non-zero B: visible if used
    torch.testing.assert_close(_logits(fm), before)  # up_proj became a LoRALinear holding only "mlp"
    pm.add_adapter("mlp", _configs("mlp", "peft"))
    _copy_adapter(pm, fm, "mlp")
    _same_state(pm, fm)
    fm.set_adapter("mlp"), pm.set_adapter("mlp")
    _same_state(pm, fm)
    assert not torch.allclose(_logits(fm), before)
    layer = fm.model.model.layers[0]
    assert layer.self_attn.q_proj.lora_A.shape == (2, 64) and layer.self_attn.q_proj.scaling == 4.0
    fm.set_adapter("default"), pm.set_adapter("default")
    assert layer.self_attn.q_proj.lora_A.shape == (4, 64) and layer.self_attn.q_proj.scaling == 2.0
    _same_state(pm, fm)
    torch.testing.assert_close(_logits(fm), before)


def test_deleting_the_active_adapter_activates_one_for_the_whole_model():
    """PEFT picks the new active adapter per layer (the alphabetically first the layer holds), so a layer that
    holds only another adapter ends up applying and training that one while the model reports "default";
    fastlora activates the alphabetically first remaining adapter everywhere, as the model reports."""
    base, _, fm = _both()
    fm.add_adapter("mlp", _configs("mlp", "fastlora", init_lora_weights=False))
    fm.add_adapter("third", _configs("third", "fastlora"))
    fm.set_adapter("third")
    with pytest.warns(UserWarning, match="Setting active adapter to default"):
        fm.delete_adapter("third")
    assert fm.active_adapter == "default" and _flags(fm) == {"default": {True}, "mlp": {False}}
    up_proj = fm.model.model.layers[0].mlp.up_proj
    assert up_proj.active_adapter == "default" and up_proj.adapter_names == ["mlp"]
    with torch.no_grad():
        x = torch.randn(3, 64)
        torch.testing.assert_close(up_proj(x), torch.nn.functional.linear(x, up_proj.weight))  # base output


def test_reference_adapter_pattern(tmp_path):
    """Preference training: train "policy" while a frozen "reference" adapter gives reference logits under
    no_grad after set_adapter("reference"), then switch back; flags compared with PEFT at every point."""
    base, pm, fm = _both()
    pm.save_pretrained(tmp_path / "policy")
    ref = peft.get_peft_model(clone(base), _configs("default", "peft"))
    ref.save_pretrained(tmp_path / "reference")
    models = {}
    for lib, cls in (("fastlora", LoraModel), ("peft", peft.PeftModel)):
        model = cls.from_pretrained(clone(base), tmp_path / "policy", adapter_name="policy", is_trainable=True)
        model.load_adapter(tmp_path / "reference", adapter_name="reference")
        models[lib] = model
    assert _flags(models["fastlora"]) == _flags(models["peft"]) == {"policy": {True}, "reference": {False}}
    ids, trained = tokens(), {}
    for lib, model in models.items():
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model.train()
        for _ in range(2):
            logits = model(input_ids=ids).logits
            with torch.no_grad():
                model.set_adapter("reference")
                assert _flags(model) == {"policy": {False}, "reference": {True}}
                reference = model(input_ids=ids).logits
                model.set_adapter("policy")
            assert _flags(model) == {"policy": {True}, "reference": {False}}
            loss = (logits.log_softmax(-1) - reference.log_softmax(-1)).pow(2).mean()
            loss.backward()
            assert all(p.grad is None for n, p in model.named_parameters() if "reference" in n)
            opt.step(), opt.zero_grad()
        trained[lib] = (reference, {n: p for n, p in model.named_parameters() if "policy" in n})
    torch.testing.assert_close(trained["fastlora"][0], trained["peft"][0], atol=1e-5, rtol=1e-5)
    ours = {re.sub(r"lora_([AB])_policy", r"lora_\1.policy.weight", n): p for n, p in trained["fastlora"][1].items()}
    for name, p in trained["peft"][1].items():
        torch.testing.assert_close(ours[name], p, atol=1e-5, rtol=1e-5, msg=name)


def test_two_adapters_save_and_load_both_ways(tmp_path):
    base, pm, fm = _both()
    pm.add_adapter("other", _configs("other", "peft"))
    fm.add_adapter("other", _configs("other", "fastlora"))
    _copy_adapter(pm, fm, "other")
    fm.save_pretrained(tmp_path / "ours")
    pm.save_pretrained(tmp_path / "peft")
    for folder in ("ours", "peft"):
        assert sorted(os.listdir(tmp_path / folder)) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "other"]
        assert sorted(os.listdir(tmp_path / folder / "other")) == ["adapter_config.json", "adapter_model.safetensors"]
    want = {name: (fm.set_adapter(name), _logits(fm))[1] for name in ("default", "other")}
    for folder in ("ours", "peft"):
        for cls in (LoraModel, peft.PeftModel):
            loaded = cls.from_pretrained(clone(base), tmp_path / folder)
            loaded.load_adapter(tmp_path / folder / "other", adapter_name="other")
            for name in ("default", "other"):
                loaded.set_adapter(name)
                torch.testing.assert_close(_logits(loaded), want[name], atol=1e-5, rtol=1e-5)
    fm.save_pretrained(tmp_path / "selected", selected_adapters=["other"])
    assert sorted(os.listdir(tmp_path / "selected")) == ["README.md", "other"]
    single = LoraModel.from_pretrained(clone(base), tmp_path / "selected", subfolder="other", adapter_name="other")
    torch.testing.assert_close(_logits(single), want["other"], atol=1e-5, rtol=1e-5)


def test_merge_unload_disable_with_two_adapters():
    base, pm, fm = _both()
    for model, lib in ((pm, "peft"), (fm, "fastlora")):
        model.add_adapter("other", _configs("other", lib))
    _copy_adapter(pm, fm, "other")
    plain = _logits(base)
    with fm.disable_adapter():
        torch.testing.assert_close(_logits(fm), plain)
    active_only = clone(fm).merge_and_unload()
    torch.testing.assert_close(_logits(active_only), _logits(clone(pm).merge_and_unload()), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(active_only), _logits(fm), atol=1e-5, rtol=1e-5)
    both = clone(fm).merge_and_unload(adapter_names=["default", "other"])
    theirs = clone(pm).merge_and_unload(adapter_names=["default", "other"])
    torch.testing.assert_close(_logits(both), _logits(theirs), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_logits(both), _logits(active_only))
    torch.testing.assert_close(_logits(fm.unload()), plain)


def test_inactive_adapter_costs_nothing():
    """A second adapter that is not active adds no saved tensor and no LoRA computation in forward."""
    _, _, fm = _both()
    x = tokens()

    def saved():
        fm.train()
        with SavedTensorCounter(exclude=module_tensors(fm)) as counter:
            loss = fm(input_ids=x, labels=x).loss
        loss.backward()
        return counter.bytes

    alone = saved()
    fm.add_adapter("other", _configs("other", "fastlora"))
    fm.set_adapter("default")
    assert saved() == alone
    assert all(p.grad is None for n, p in fm.named_parameters() if "_other" in n)


def test_refused_features_are_named():
    _, _, fm = _both()
    fm.add_adapter("other", _configs("other", "fastlora"))
    before = snapshot(fm)
    with pytest.raises(NotImplementedError, match="several simultaneously active adapters"):
        fm.set_adapter(["default", "other"])
    with pytest.raises(NotImplementedError, match="several simultaneously active adapters"):
        fm.base_model.set_adapter(["default", "other"])
    with pytest.raises(NotImplementedError, match="mixed-batch"):
        fm(input_ids=tokens(), adapter_names=["default", "other"])
    with pytest.raises(NotImplementedError, match="weighted combinations"):
        fm.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")
    assert_unchanged(fm, before)


@pytest.mark.parametrize("call, error, match", [
    (lambda m: m.set_adapter("nope"), ValueError, "nope not found"),
    (lambda m: m.delete_adapter("nope"), ValueError, "nope does not exist"),
    (lambda m: m.add_adapter("default", _configs("other", "fastlora")), ValueError, "already exists"),
    (lambda m: m.add_adapter("a.b", _configs("other", "fastlora")), ValueError, "without '.'"),
    (lambda m: m.add_adapter("x", peft.LoraConfig(target_modules=["q_proj"])), TypeError, "fastlora.LoraConfig"),
    (lambda m: m.add_adapter("x", _configs("other", "fastlora", modules_to_save=["nope"])), ValueError, "matches no module"),
    (lambda m: m.merge_and_unload(adapter_names=["nope"]), ValueError, "unknown adapter"),
    (lambda m: m.save_pretrained("/tmp/never", selected_adapters=["nope"]), ValueError, "selected_adapters"),
])
def test_bad_adapter_calls_change_nothing(call, error, match):
    _, _, fm = _both()
    before = snapshot(fm)
    with pytest.raises(error, match=match):
        call(fm)
    assert_unchanged(fm, before)
    assert fm.active_adapter == "default" and list(fm.peft_config) == ["default"]


def test_last_adapter_and_merged_adapter_cannot_be_deleted(tmp_path):
    _, _, fm = _both()
    with pytest.raises(ValueError, match="only adapter"):
        fm.delete_adapter("default")
    fm.add_adapter("other", _configs("other", "fastlora"))
    fm.merge_adapter()
    with pytest.raises(ValueError, match="while they are merged"):
        fm.delete_adapter("default")
    fm.unmerge_adapter()
    fm.save_pretrained(tmp_path)
    other_rank = LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=8)
    get_peft_model(tiny_llama(), other_rank).save_pretrained(tmp_path / "r8")
    before = snapshot(fm)
    with pytest.raises(ValueError, match="exists with r=4 but the file has 8"):
        fm.load_adapter(tmp_path / "r8", adapter_name="default")
    assert_unchanged(fm, before)

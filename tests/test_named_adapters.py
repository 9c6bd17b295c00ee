"""Named adapters, call for call against PEFT 0.21 on a small Llama: add / set / delete / load, which
adapter trains (requires_grad after every call), the reference-adapter pattern of preference training,
two adapters saved and loaded both ways, merging and unloading with several adapters, and the features
refused with a named NotImplementedError."""

import os
import re
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastlora as fastlora_lib
from fastlora import LoraConfig, LoraModel, get_peft_model, get_peft_model_state_dict
from fastlora.bench.measure import SavedTensorCounter, module_tensors
from tests.models import PEFT_BEFORE_0_22, assert_unchanged, clone, snapshot, tiny_llama, tokens
from tests.tolerances import assert_close

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


def _flags(model, lora_only=True):
    """{adapter: {requires_grad values}} over each adapter's LoRA factors (both libraries' naming); with
    ``lora_only=False`` also each adapter's modules_to_save copy ("copy:<adapter>"), the frozen originals and
    the base weights and biases."""
    out = {}
    for name, p in model.named_parameters():
        found = re.search(r"\.lora_[AB](?:_|\.)([^.]+)", name)
        copy = re.search(r"\.modules_to_save\.([^.]+)\.", name)
        if found:
            key = found.group(1)
        elif lora_only:
            continue
        elif copy:
            key = f"copy:{copy.group(1)}"
        elif ".original_module." in name:
            key = "original"
        else:
            key = "base bias" if name.endswith("bias") else "base weight"
        out.setdefault(key, set()).add(p.requires_grad)
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


def _both(base=None, **kwargs):
    base = base if base is not None else tiny_llama()
    torch.manual_seed(0)
    pm = peft.get_peft_model(clone(base), _configs("default", "peft", **kwargs))
    fm = get_peft_model(clone(base), _configs("default", "fastlora", **kwargs))
    _copy_adapter(pm, fm, "default")
    return base, pm, fm


def _same_state(pm, fm, skip=()):
    assert fm.active_adapter == pm.active_adapter
    assert fm.active_adapters == pm.active_adapters
    assert list(fm.peft_config) == list(pm.peft_config)
    ours, theirs = _flags(fm, lora_only=False), _flags(pm, lora_only=False)
    assert {k: v for k, v in ours.items() if k not in skip} == {k: v for k, v in theirs.items() if k not in skip}
    assert_close(_logits(fm), _logits(pm), kind="same_math")


@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]])
def test_add_set_delete_as_peft(modules_to_save):
    """Flags of every parameter (factors, modules_to_save copies and originals, base weights) after each call.
    One documented difference: deleting the active adapter makes the newly active adapter's modules_to_save
    copy trainable in fastlora (as set_adapter does); PEFT leaves it frozen."""
    extra = {"modules_to_save": modules_to_save} if modules_to_save else {}
    _, pm, fm = _both(**extra)
    steps = [
        ("add_adapter", "other"), ("set_adapter", "other"), ("set_adapter", "default"), ("add_adapter", "third"),
        ("set_adapter", "third"), ("delete_adapter", "third"), ("set_adapter", "other"), ("delete_adapter", "default"),
    ]
    for op, name in steps:
        if op == "add_adapter":
            pm.add_adapter(name, _configs(name, "peft", **extra))
            fm.add_adapter(name, _configs(name, "fastlora", **extra))
            _copy_adapter(pm, fm, name)
        else:
            getattr(pm, op)(name)
            getattr(fm, op)(name)
        deleted_active = (op, name) in (("delete_adapter", "third"), ("delete_adapter", "default"))
        skip = {f"copy:{fm.active_adapter}"} if modules_to_save and deleted_active else set()
        _same_state(pm, fm, skip)
        if skip:
            assert _flags(fm, lora_only=False)[f"copy:{fm.active_adapter}"] == {True}
    assert fm.active_adapter == "other" and list(fm.peft_config) == ["other"]


def test_adapters_beside_one_with_bias_as_peft(tmp_path):
    """An adapter training biases (bias="all") beside one that does not: flags as PEFT's (adding the second
    keeps the trained biases trainable), a second bias adapter refused as PEFT does, and each adapter's
    files load both ways (PEFT spells the bias of a layer another adapter made a LoRA layer base_layer.bias)."""
    base = tiny_llama(attention_bias=True)
    models = {}
    for lib, cls in (("fastlora", LoraConfig), ("peft", peft.LoraConfig)):
        extra = {} if lib == "fastlora" else {"init_lora_weights": False}
        model = (get_peft_model if lib == "fastlora" else peft.get_peft_model)(
            clone(base), cls(task_type="CAUSAL_LM", target_modules=["q_proj"], bias="all", **extra))
        model.add_adapter("x", cls(task_type="CAUSAL_LM", target_modules=["v_proj"], **extra))
        with pytest.raises(ValueError, match="only 1 adapter with bias"):
            model.add_adapter("y", cls(target_modules=["k_proj"], bias="lora_only"))
        models[lib] = model
    fm, pm = models["fastlora"], models["peft"]
    _copy_adapter(pm, fm, "default"), _copy_adapter(pm, fm, "x")
    with torch.no_grad():
        for model in (fm, pm):
            for _, p in model.named_parameters():
                p.add_(0.01) if p.requires_grad and p.dim() == 1 else None  # trained biases, same in both
    assert _flags(fm, lora_only=False) == _flags(pm, lora_only=False)
    assert _flags(fm, lora_only=False)["base bias"] == {True}
    fm.save_pretrained(tmp_path / "ours")
    pm.save_pretrained(tmp_path / "peft")
    want = _logits(fm)
    assert_close(_logits(pm), want, kind="same_math")
    assert load_file(tmp_path / "ours" / "adapter_model.safetensors").keys() == \
        load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    for folder in ("ours", "peft"):
        loaded = LoraModel.from_pretrained(clone(base), tmp_path / folder)
        assert_close(_logits(loaded), want, kind="same_math", msg=folder)
    # PEFT itself drops v_proj's trained bias (saved as base_layer.bias, and v_proj is no LoRA layer on a fresh
    # model): both folders load in PEFT alike.
    theirs = [_logits(peft.PeftModel.from_pretrained(clone(base), tmp_path / f)) for f in ("ours", "peft")]
    assert_close(theirs[0], theirs[1], kind="same_math")


def test_a_lora_only_adapter_beside_another_loads_its_file_as_peft(tmp_path):
    """bias="lora_only" saves the bias of every LoRA layer of the model, another adapter's layers included (PEFT's
    rule): both libraries' files of such an adapter load onto a fresh model, as PEFT loads them: the other layers'
    biases are not the adapter's, and a changed one is named in a warning and left as the model has it."""
    base = tiny_llama(attention_bias=True)
    models = {}
    for lib, cls, make in (("fastlora", LoraConfig, get_peft_model), ("peft", peft.LoraConfig, peft.get_peft_model)):
        model = make(clone(base), cls(target_modules=["q_proj"], bias="lora_only"))
        model.add_adapter("x", cls(target_modules=["v_proj"]))
        models[lib] = model
    fm, pm = models["fastlora"], models["peft"]
    _copy_adapter(pm, fm, "default"), _copy_adapter(pm, fm, "x")
    for model in (fm, pm):
        model.save_pretrained(tmp_path / f"{model is fm}-unchanged")
        with torch.no_grad():
            model.base_model.model.model.layers[0].self_attn.v_proj.bias.add_(0.5)  # another layer's bias changed
        model.save_pretrained(tmp_path / f"{model is fm}-changed")
    saved = {folder.name: load_file(folder / "adapter_model.safetensors") for folder in tmp_path.iterdir()}
    assert saved["True-changed"].keys() == saved["False-changed"].keys()
    assert "base_model.model.model.layers.0.self_attn.v_proj.base_layer.bias" in saved["True-changed"]
    for folder in sorted(saved):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours = LoraModel.from_pretrained(clone(base), tmp_path / folder)
        named = [w for w in caught if "layers it does not adapt" in str(w.message)]
        assert len(named) == folder.endswith("-changed"), folder
        if named:
            assert "model.layers.0.self_attn.v_proj" in str(named[0].message)
        theirs = peft.PeftModel.from_pretrained(clone(base), tmp_path / folder)
        assert_close(_logits(ours), _logits(theirs), kind="same_math", msg=folder)


def test_a_lora_only_file_loads_beside_another_adapters_layers(tmp_path):
    """A bias="lora_only" file saved before another adapter made more LoRA layers lacks their biases: it loads
    back into its adapter (a Trainer's resume) and onto a model holding the other adapter, as PEFT loads it."""
    base = tiny_llama(attention_bias=True)
    model = get_peft_model(clone(base), LoraConfig(target_modules=["q_proj"], bias="lora_only"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.1)  # trained factors and q_proj biases
    want = _logits(model)
    model.save_pretrained(tmp_path)
    model.add_adapter("other", LoraConfig(target_modules=["v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name and "default" in name:
                param.zero_()
    model.load_adapter(tmp_path, "default")
    assert_close(_logits(model), want, kind="same_math")
    beside = get_peft_model(clone(base), LoraConfig(target_modules=["v_proj"]), adapter_name="other")
    beside.load_adapter(tmp_path, "default")
    beside.set_adapter("default")
    assert_close(_logits(beside), want, kind="same_math")


def test_other_layers_biases_of_a_half_precision_file_are_not_called_changed(tmp_path):
    """The model's own biases rounded to the file's dtype are the file's: no warning."""
    base = tiny_llama(attention_bias=True)
    with torch.no_grad():
        for name, param in base.named_parameters():
            if name.endswith("bias"):
                param.normal_(generator=torch.Generator().manual_seed(len(name)))  # values bf16 rounds
    model = get_peft_model(clone(base).to(torch.bfloat16), LoraConfig(target_modules=["q_proj"], bias="lora_only"))
    model.add_adapter("x", LoraConfig(target_modules=["v_proj"]))
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LoraModel.from_pretrained(clone(base), tmp_path)
    assert not [w for w in caught if "layers it does not adapt" in str(w.message)]


def test_adding_an_adapter_keeps_a_trained_base_weight_trainable():
    plain = get_peft_model(tiny_llama(attention_bias=True), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    plain.model.model.layers[0].self_attn.k_proj.bias.requires_grad_(True)  # a bias the user trains
    plain.add_adapter("other", LoraConfig(target_modules=["k_proj"]))
    assert plain.model.model.layers[0].self_attn.k_proj.bias.requires_grad


def test_adapter_added_while_disabled_stays_disabled():
    base, _, fm = _both()
    fm.disable_adapter_layers()
    fm.add_adapter("mlp", _configs("mlp", "fastlora", init_lora_weights=False))
    fm.set_adapter("mlp")
    assert not fm.adapters_enabled
    torch.testing.assert_close(_logits(fm), _logits(base))
    fm.enable_adapter_layers()
    assert not torch.allclose(_logits(fm), _logits(base))


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
    assert_close(trained["fastlora"][0], trained["peft"][0], kind="same_math")
    ours = {re.sub(r"lora_([AB])_policy", r"lora_\1.policy.weight", n): p for n, p in trained["fastlora"][1].items()}
    for name, p in trained["peft"][1].items():
        assert_close(ours[name], p, kind="same_math", msg=name)


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
                assert_close(_logits(loaded), want[name], kind="same_math")
    fm.save_pretrained(tmp_path / "selected", selected_adapters=["other"])
    assert sorted(os.listdir(tmp_path / "selected")) == ["README.md", "other"]
    single = LoraModel.from_pretrained(clone(base), tmp_path / "selected", subfolder="other", adapter_name="other")
    assert_close(_logits(single), want["other"], kind="same_math")


def test_merge_unload_disable_with_two_adapters():
    base, pm, fm = _both()
    for model, lib in ((pm, "peft"), (fm, "fastlora")):
        model.add_adapter("other", _configs("other", lib))
    _copy_adapter(pm, fm, "other")
    plain = _logits(base)
    with fm.disable_adapter():
        torch.testing.assert_close(_logits(fm), plain)
    active_only = clone(fm).merge_and_unload()
    assert_close(_logits(active_only), _logits(clone(pm).merge_and_unload()), kind="same_math")
    assert_close(_logits(active_only), _logits(fm), kind="same_math")
    both = clone(fm).merge_and_unload(adapter_names=["default", "other"])
    theirs = clone(pm).merge_and_unload(adapter_names=["default", "other"])
    assert_close(_logits(both), _logits(theirs), kind="same_math")
    assert not torch.allclose(_logits(both), _logits(active_only))
    torch.testing.assert_close(_logits(fm.unload()), plain)


def test_inactive_adapter_costs_nothing(monkeypatch):
    """A second adapter that is not active (with non-zero factors, so using it would show) changes no output,
    adds no saved tensor, and adds no LoRA computation: one lora_linear call per layer of the active adapter."""
    import fastlora.layer

    _, _, fm = _both()
    x = tokens()
    calls = []
    real = fastlora.layer.lora_linear
    monkeypatch.setattr(fastlora.layer, "lora_linear", lambda *a, **k: calls.append(a[3].shape) or real(*a, **k))

    def step():
        calls.clear()
        fm.train()
        with SavedTensorCounter(exclude=module_tensors(fm)) as counter:
            out = fm(input_ids=x, labels=x)
        out.loss.backward()
        return counter.bytes, out.logits.detach(), list(calls)

    alone = step()
    fm.add_adapter("other", _configs("other", "fastlora", init_lora_weights=False))
    with_other = step()
    assert with_other[0] == alone[0]
    assert torch.equal(with_other[1], alone[1])  # an inactive adapter changes nothing, not even the rounding
    assert with_other[2] == alone[2] and len(alone[2]) == 4 and all(s[0] == 4 for s in alone[2])  # rank 4 only
    fm.set_adapter("other")
    assert not torch.equal(step()[1], alone[1])  # the same check sees the adapter once it is active


def test_refused_features_are_named():
    _, _, fm = _both()
    fm.add_adapter("other", _configs("other", "fastlora"))
    before = snapshot(fm)
    with pytest.raises(NotImplementedError, match="hot-swapping"):
        fm.enable_peft_hotswap(target_rank=8)
    with pytest.raises(NotImplementedError, match="mixing adapter types"):
        get_peft_model(tiny_llama(), _configs("default", "fastlora"), mixed=True)
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
    (lambda m: m.add_adapter("x", None), TypeError, "peft_config must be a fastlora.LoraConfig"),
    (lambda m: get_peft_model(tiny_llama(), None), TypeError, "peft_config must be a fastlora.LoraConfig"),
    (lambda m: m.add_adapter("keys", _configs("other", "fastlora", modules_to_save=["lm_head"])), ValueError,
     "'keys' is an attribute of torch's nn.ModuleDict"),
    (lambda m: m.set_adapter({"default"}), TypeError, "set_adapter takes an adapter name"),
    (lambda m: m.base_model.set_adapter([["default"]]), TypeError, "set_adapter takes an adapter name"),
    (lambda m: m.delete_adapter(["default"]), TypeError, "delete_adapter takes one adapter name"),
    (lambda m: m.merge_and_unload(adapter_names=5), TypeError, "adapter_names should be a list of strings"),
    (lambda m: m.set_requires_grad(None), TypeError, "set_requires_grad takes an adapter name"),
    (lambda m: m.set_requires_grad("default", requires_grad="no"), TypeError, "requires_grad must be True or False"),
    (lambda m: m.load_adapter(None, adapter_name="x"), TypeError, "a str or a path"),
    (lambda m: fastlora_lib.set_peft_model_state_dict(m, {k: 1.0 for k in get_peft_model_state_dict(m)}), TypeError,
     "lora_A.weight': float"),
    (lambda m: fastlora_lib.set_peft_model_state_dict(m, None), TypeError, "got NoneType"),
    (lambda m: fastlora_lib.set_peft_model_state_dict(
        m, {k: v.to("meta") for k, v in get_peft_model_state_dict(m).items()}), TypeError, "on the meta device"),
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


def test_new_values_for_a_merged_adapter_are_refused(tmp_path):
    _, _, fm = _both()
    fm.save_pretrained(tmp_path)
    fm.merge_adapter()
    before = snapshot(fm)
    with pytest.raises(ValueError, match="is merged into the base weights"):
        fm.load_adapter(tmp_path, adapter_name="default")
    import fastlora

    with pytest.raises(ValueError, match="is merged into the base weights"):
        fastlora.set_peft_model_state_dict(fm, fastlora.get_peft_model_state_dict(fm))
    assert_unchanged(fm, before)


def test_base_model_level_methods_as_peft():
    base, _, fm = _both()
    want = _logits(fm)
    tuner = fm.base_model
    del fm  # PEFT users keep model.base_model around and call adapter methods on it
    assert tuner.active_adapter == "default" and list(tuner.peft_config) == ["default"]
    merged = tuner.merge_and_unload()
    assert_close(_logits(merged), want, kind="same_math")
    import copy

    with pytest.raises(AttributeError, match="copied without its PeftModel"):
        copy.deepcopy(_both()[2].base_model).set_adapter("default")


def test_layer_attributes_of_an_adapter_the_layer_does_not_hold():
    _, _, fm = _both()
    fm.add_adapter("mlp", _configs("mlp", "fastlora"))
    up = fm.model.model.layers[0].mlp.up_proj  # holds "mlp" only; the active adapter is "default"
    assert not hasattr(up, "lora_A") and getattr(up, "r", None) is None
    with pytest.raises(AttributeError, match="does not hold the active adapter 'default'"):
        up.scaling


@pytest.mark.parametrize("names", [("default", "other", "third"), ("other", "third")], ids=["three", "no-default"])
def test_each_adapter_is_saved_in_its_own_folder(tmp_path, names):
    """Three adapters, or two with no "default": each folder holds its own adapter's tensors, and PEFT loads each."""
    base = tiny_llama()
    fm = get_peft_model(clone(base), _configs(names[0], "fastlora", init_lora_weights=False), adapter_name=names[0])
    for name in names[1:]:
        fm.add_adapter(name, _configs(name, "fastlora", init_lora_weights=False))
    fm.save_pretrained(tmp_path)
    for name in names:
        folder = tmp_path if name == "default" else tmp_path / name
        saved = load_file(folder / "adapter_model.safetensors")
        want = get_peft_model_state_dict(fm, adapter_name=name)
        assert saved.keys() == want.keys() and all(torch.equal(saved[k], want[k]) for k in want), name
        theirs = peft.PeftModel.from_pretrained(clone(base), folder, adapter_name=name)
        fm.set_adapter(name)
        assert_close(_logits(theirs), _logits(fm), kind="same_math")


def test_merge_and_unload_merges_the_active_adapter_as_peft():
    """After set_adapter("other"), merge_and_unload merges "other" (not the first adapter added), as PEFT does."""
    base, pm, fm = _both()
    for model, lib in ((pm, "peft"), (fm, "fastlora")):
        model.add_adapter("other", _configs("other", lib))  # PEFT's non-zero init, copied into fastlora's
    _copy_adapter(pm, fm, "other")
    pm.set_adapter("other")
    fm.set_adapter("other")
    ours, theirs = clone(fm).merge_and_unload(), clone(pm).merge_and_unload()
    assert_close(_logits(ours), _logits(theirs), kind="same_math")
    fm.set_adapter("default")
    assert not torch.allclose(_logits(ours), _logits(fm))


def test_no_adapter_name_gives_another_adapter_s_parameter_name(tmp_path):
    """Adapter "x" with a bias on B beside "bias_x", and a DoRA adapter "magnitude_vector_x": each keeps its own
    parameters through adding, deleting and saving, and each computes as PEFT's loaded from the same folder."""
    def config(lib, r, **extra):
        return lib.LoraConfig(target_modules=["q_proj"], r=r, init_lora_weights=False, **extra)

    model = get_peft_model(tiny_llama(), config(fastlora_lib, 4, lora_bias=True), adapter_name="x")
    model.add_adapter("bias_x", config(fastlora_lib, 2))
    model.add_adapter("magnitude_vector_x", config(fastlora_lib, 3, use_dora=True))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    shapes = {name: [tuple(p.shape) for p in layer.adapter_tensors(name)] for name in layer.adapter_names}
    assert shapes == {"x": [(4, 64), (64, 4), (64,)], "bias_x": [(2, 64), (64, 2)],
                      "magnitude_vector_x": [(3, 64), (64, 3), (64,)]}
    assert len(list(layer.parameters())) == 1 + 3 + 2 + 3
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "x", adapter_name="x")
    for name in ("bias_x", "magnitude_vector_x"):
        theirs.load_adapter(tmp_path / name, adapter_name=name)
    for name in ("x", "bias_x", "magnitude_vector_x"):
        model.set_adapter(name), theirs.set_adapter(name)
        assert_close(_logits(model), _logits(theirs), kind="same_math", msg=name)
    kept = {name: [p.detach().clone() for p in layer.adapter_tensors(name)]
            for name in ("bias_x", "magnitude_vector_x")}
    model.delete_adapter("x")
    for name, values in kept.items():
        assert all(torch.equal(p, v) for p, v in zip(layer.adapter_tensors(name), values, strict=True))
        model.set_adapter(name), theirs.set_adapter(name)
        assert_close(_logits(model), _logits(theirs), kind="same_math", msg=name)


def test_a_module_state_dict_from_before_the_bias_on_b_had_its_own_name_loads():
    def model(seed):
        torch.manual_seed(seed)
        return get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], r=4, lora_bias=True,
                                                       init_lora_weights=False), adapter_name="x")

    source, target = model(1), model(2)
    earlier = {key.replace(".lora_bias_x", ".lora_B_bias_x"): value for key, value in source.state_dict().items()}
    assert any(".lora_B_bias_x" in key for key in earlier)
    target.load_state_dict(earlier)
    assert_close(_logits(target), _logits(source), kind="same_math")


def test_set_adapter_in_inference_mode_pauses_dropout_until_train_or_eval_as_peft():
    """set_adapter(name, inference_mode=True) on a model in training mode: the adapter is frozen, its dropout off
    (and its modules_to_save copy in eval mode) until the next train() / eval() or set_adapter without
    inference_mode, as PEFT since 0.22."""
    from fastlora.modules_to_save import ModulesToSaveWrapper

    base = tiny_llama()
    ids = tokens()
    config = dict(target_modules=["q_proj", "v_proj"], lora_dropout=0.5, init_lora_weights=False,
                  modules_to_save=["lm_head"])

    def stochastic(model):
        with torch.no_grad():
            return not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)

    model = get_peft_model(clone(base), LoraConfig(**config)).train()
    model.add_adapter("other", LoraConfig(**config))
    with torch.no_grad():
        evaluated = model.eval()(input_ids=ids).logits
    model.train()
    assert stochastic(model)
    model.set_adapter("default", inference_mode=True)
    assert model.training and not stochastic(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, evaluated, rtol=0, atol=0)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "default" in n)
    copy = next(m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)).modules_to_save["default"]
    assert not copy.training
    model.set_adapter("default")  # training again, with its dropout
    assert stochastic(model) and copy.training
    model.set_adapter("default", inference_mode=True)
    model.train()
    assert stochastic(model) and copy.training
    if not PEFT_BEFORE_0_22:
        theirs = peft.get_peft_model(clone(base), peft.LoraConfig(**config)).train()
        theirs.set_adapter("default", inference_mode=True)
        assert not stochastic(theirs)
        theirs.train()
        assert stochastic(theirs)


def test_a_layer_pickled_before_the_dropout_pause_existed_unpickles_and_pauses():
    """A layer's state from a release without set_adapter's dropout pause has no ``dropout_paused``: unpickled, it
    computes and takes the pause."""
    import pickle

    layer = fastlora_lib.LoRALinear(16, 8, r=4, lora_dropout=0.5, init_lora_weights=False, backend="torch").train()
    state = dict(layer.__dict__)
    del state["dropout_paused"]
    old = fastlora_lib.LoRALinear.__new__(fastlora_lib.LoRALinear)
    old.__setstate__(state)
    again = pickle.loads(pickle.dumps(old))
    x = torch.randn(4, 16)
    assert again.dropout_paused == set() and not torch.equal(again(x), again(x))  # dropout, not paused
    again.dropout_paused = {"default"}
    assert again.forward_settings("default").lora_dropout == 0.0
    assert torch.equal(again(x), again(x))


def test_a_merge_while_the_layers_are_disabled_is_taken_out_by_the_next_forward_as_peft():
    """PEFT's layers unmerge a merged adapter in a forward while they are disabled: the model computes its base
    outputs until ``enable_adapter_layers()``, whatever was merged meanwhile."""
    base, pm, fm = _both()
    expected = _logits(base)
    for model in (pm, fm):
        model.disable_adapter_layers()
        model.merge_adapter()
    assert all(layer.merged for _, layer in fm.lora_layers())
    assert_close(_logits(fm), expected, kind="same_math")
    assert_close(_logits(pm), expected, kind="same_math")
    assert not any(layer.merged for _, layer in fm.lora_layers())
    for model in (pm, fm):
        model.enable_adapter_layers()
    assert_close(_logits(fm), _logits(pm), kind="same_math")


def test_enabling_the_layers_leaves_a_merged_adapter_merged_as_peft():
    base, pm, fm = _both()
    for model, lib in ((pm, "peft"), (fm, "fastlora")):
        model.add_adapter("other", _configs("other", lib))
    _copy_adapter(pm, fm, "other")
    for model in (pm, fm):
        model.merge_adapter(adapter_names=["other"])
    merged = _logits(fm)
    assert_close(merged, _logits(pm), kind="same_math")
    for model in (pm, fm):
        model.enable_adapter_layers()  # already enabled: nothing changes
    layer = fm.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.merged_adapters == ["other"]
    assert torch.equal(_logits(fm), merged)
    assert_close(_logits(pm), merged, kind="same_math")


def test_an_adapter_saving_a_module_whole_leaves_its_bias_to_the_active_adapter_that_trains_it():
    """With ``bias="all"`` on the active adapter, a second adapter that saves a biased module whole wraps it: the
    original, which the active adapter computes with, keeps its trained bias (PEFT's flags), the copy is frozen."""
    base = tiny_llama(attention_bias=True)
    models = {}
    for lib, cls in (("fastlora", LoraConfig), ("peft", peft.LoraConfig)):
        model = (get_peft_model if lib == "fastlora" else peft.get_peft_model)(
            clone(base), cls(task_type="CAUSAL_LM", target_modules=["q_proj"], bias="all"))
        before = model.get_nb_trainable_parameters()[0]
        model.add_adapter("x", cls(task_type="CAUSAL_LM", target_modules=["v_proj"],
                                   modules_to_save=["layers.0.self_attn.k_proj"]))
        model.add_adapter("y", cls(task_type="CAUSAL_LM", target_modules=["v_proj"],
                                   modules_to_save=["layers.1.self_attn.k_proj"]))  # x's copy stays frozen
        assert model.get_nb_trainable_parameters()[0] == before
        models[lib] = model
    fm = models["fastlora"]
    assert _flags(fm, lora_only=False) == _flags(models["peft"], lora_only=False)
    k_proj = fm.base_model.model.model.layers[0].self_attn.k_proj
    assert k_proj.original_module.bias.requires_grad and not k_proj.modules_to_save["x"].bias.requires_grad
    fm.train()(input_ids=tokens(), labels=tokens()).loss.backward()
    assert k_proj.original_module.bias.grad is not None and k_proj.modules_to_save["x"].bias.grad is None

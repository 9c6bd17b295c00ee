"""get_peft_model / LoraModel against PEFT itself on a small Llama, target selection, failures that
change nothing, merge / unload / disable."""

import json
import warnings

import peft
import pytest
import torch
from torch import nn

import fastlora
from fastlora import LoraConfig, LoRALinear, TaskType, get_peft_model
from tests.models import SEED_TARGETS, assert_unchanged, clone, copy_lora_weights, snapshot, tiny_llama, tokens
from tests.tolerances import assert_close


def _pair(dropout=0.1, **kwargs):
    base = tiny_llama()
    common = dict(task_type="CAUSAL_LM", target_modules=SEED_TARGETS, r=8, lora_alpha=32, lora_dropout=dropout,
                  inference_mode=False, **kwargs)
    # init_lora_weights=False on PEFT's side gives non-zero B; fastlora then copies PEFT's values
    pm = peft.get_peft_model(clone(base), peft.LoraConfig(init_lora_weights=False, **common))
    fm = get_peft_model(clone(base), LoraConfig(**common))
    copy_lora_weights(pm, fm)
    return base, pm, fm


def test_eval_outputs_and_loss_equal_peft():
    _, pm, fm = _pair(dropout=0.1)
    ids = tokens()
    pm.eval(), fm.eval()
    a, b = pm(input_ids=ids, labels=ids), fm(input_ids=ids, labels=ids)
    assert_close(b.logits, a.logits, kind="same_math")
    assert_close(b.loss, a.loss, kind="roundoff")  # one cross-entropy of the same logits


def test_lora_gradients_equal_peft_without_dropout():
    _, pm, fm = _pair(dropout=0.0)
    ids = tokens()
    pm.train(), fm.train()
    pm(input_ids=ids, labels=ids).loss.backward()
    fm(input_ids=ids, labels=ids).loss.backward()
    peft_grads = {k.replace(".default", ""): p.grad for k, p in pm.named_parameters() if p.requires_grad}
    n = 0
    for name, layer in fm.lora_layers():
        for which, param in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
            want = peft_grads[f"base_model.model.{name}.{which}.weight"]
            assert_close(param.grad, want, kind="same_math", msg=f"{name} {which}")
            n += 1
    assert n == 2 * 7 * 2


def test_trainable_parameter_counts_and_line_equal_peft(capsys):
    _, pm, fm = _pair()
    assert fm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    pm.print_trainable_parameters()
    fm.print_trainable_parameters()
    peft_line, ours = capsys.readouterr().out.strip().splitlines()
    assert ours == peft_line
    only_lora = {n for n, p in fm.named_parameters() if p.requires_grad}
    assert only_lora and all(n.endswith((".lora_A_default", ".lora_B_default")) for n in only_lora)


def test_only_adapter_parameters_change_in_training():
    _, _, fm = _pair()
    before = {n: p.detach().clone() for n, p in fm.named_parameters()}
    opt = torch.optim.SGD([p for p in fm.parameters() if p.requires_grad], lr=0.1)
    ids = tokens()
    fm.train()
    fm(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    for name, p in fm.named_parameters():
        assert torch.equal(p, before[name]) != name.endswith((".lora_A_default", ".lora_B_default")), name


def test_attribute_access_reaches_the_wrapped_model():
    _, _, fm = _pair()
    assert fm.config.hidden_size == 64
    out = fm.generate(tokens(batch=1, length=4), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    assert isinstance(fm.model.model.layers[0].self_attn.q_proj, LoRALinear)


@pytest.mark.parametrize(
    "targets, expected",
    [
        (["q_proj"], 2),
        (["self_attn.v_proj"], 2),
        ("all-linear", 14),  # everything but lm_head
        (r".*\.layers\.1\.mlp\.(gate|up)_proj", 2),
    ],
)
def test_target_selection_like_peft(targets, expected):
    base = tiny_llama()
    fm = get_peft_model(clone(base), LoraConfig(target_modules=targets))
    pm = peft.get_peft_model(clone(base), peft.LoraConfig(target_modules=targets))
    ours = sorted(n for n, _ in fm.lora_layers())
    theirs = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.Linear))
    assert ours == theirs and len(ours) == expected


def test_exclude_and_layers_to_transform():
    fm = get_peft_model(tiny_llama(), LoraConfig(target_modules=SEED_TARGETS, exclude_modules=["down_proj"],
                                                 layers_to_transform=[1]))
    names = sorted(n for n, _ in fm.lora_layers())
    assert len(names) == 6 and all(".layers.1." in n and "down_proj" not in n for n in names)


@pytest.mark.parametrize("settings", [
    dict(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers"),
    dict(target_modules=["model.layers.0.self_attn.q_proj"], layers_to_transform=1),
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[]),
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0], layers_pattern=["h", "layers"]),
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=1, layers_pattern="layers"),
], ids=["a full name beside a suffix", "full names only", "no layers listed", "patterns", "one index, one pattern"])
def test_layers_to_transform_selects_the_layers_peft_selects(settings):
    """layers_to_transform filters the modules a target_modules entry matches as a dotted suffix; an entry naming
    a module in full takes it whatever its layer, and an empty list filters nothing (PEFT's rules)."""
    def adapted(library):
        model = library.get_peft_model(tiny_llama(), library.LoraConfig(**settings))
        return sorted({name.split(".lora_")[0] for name, _ in model.named_parameters() if ".lora_A" in name})

    assert adapted(fastlora) == adapted(peft)
    config = fastlora.LoraConfig(**settings)
    their_config = peft.LoraConfig(**settings)
    for field in ("layers_to_transform", "layers_pattern"):  # written as given, as PEFT writes them
        assert json.loads(config.to_json())[field] == their_config.to_dict()[field]


@pytest.mark.parametrize("settings, written", [
    (dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
     {"target_modules": r".*\.(q_proj|v_proj)", "layers_to_transform": [1]}),
    (dict(target_modules=["q_proj"]), {"layers_pattern": ["layers"], "layers_to_transform": None}),
    (dict(target_modules=["v_proj"], layers_to_transform=[1]),
     {"target_modules": ["model.layers.0.self_attn.q_proj", "v_proj"]}),
], ids=["a regex beside layers", "a layer pattern alone", "a full name outside the layers"])
def test_a_file_with_a_layer_filter_as_an_earlier_release_applied_it_loads(tmp_path, settings, written):
    """Configs an earlier fastlora wrote with layer filters PEFT's rules refuse or apply otherwise load as the
    adapter they hold, and save again as a config PEFT reads to the same adapter."""
    trained = get_peft_model(tiny_llama(), LoraConfig(r=4, **settings))
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.normal_(generator=torch.Generator().manual_seed(0))
    trained.eval().save_pretrained(tmp_path / "written")
    path = tmp_path / "written" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **written}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = fastlora.PeftModel.from_pretrained(tiny_llama(), tmp_path / "written")
    assert any("an earlier fastlora" in str(w.message) for w in caught)  # said, with what is read
    ids = tokens()
    with torch.no_grad():
        assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits, kind="same_math")
        loaded.save_pretrained(tmp_path / "again")
        by_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "again")
        assert_close(by_peft(input_ids=ids).logits, trained(input_ids=ids).logits, kind="same_math")


@pytest.mark.parametrize("settings, names", [
    (dict(target_modules="all-linear"), 7),
    (dict(target_modules=[f"model.layers.{i}.{m}" for i in range(3) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj",
        "mlp.gate_proj")]), 7),
    (dict(target_modules=[f"model.layers.{i}.self_attn.{m}" for i in range(3) for m in ("q_proj", "v_proj")]), 6),
], ids=["all-linear", "21 full names", "6 full names"])
def test_target_modules_are_recorded_as_peft_records_them(tmp_path, settings, names):
    """A list of 20 names or more ("all-linear" on a model of 21 Linear layers, or given) is recorded by the
    shortest dotted suffixes that pick the same modules, in peft_config and the file, as PEFT records it."""
    recorded = {}
    for library in (fastlora, peft):
        model = library.get_peft_model(tiny_llama(num_hidden_layers=3), library.LoraConfig(**settings))
        model.save_pretrained(tmp_path / library.__name__)
        recorded[library.__name__] = (sorted(model.peft_config["default"].target_modules), sorted(json.loads(
            (tmp_path / library.__name__ / "adapter_config.json").read_text())["target_modules"]))
    assert recorded["fastlora"] == recorded["peft"]
    assert len(recorded["fastlora"][0]) == names
    loaded = fastlora.PeftModel.from_pretrained(tiny_llama(num_hidden_layers=3), tmp_path / "peft")
    assert sorted(n for n, _ in loaded.lora_layers()) == sorted(
        n for n, _ in fastlora.PeftModel.from_pretrained(tiny_llama(num_hidden_layers=3), tmp_path / "fastlora").lora_layers())


def test_a_condensed_list_picks_on_a_fresh_model_the_modules_it_picked(tmp_path):
    """The suffixes are chosen among the module names of the model without adapters: another adapter's saved
    copy of a container (``layers.0.mlp``) must not make ``mlp.up_proj`` look unique."""
    model = get_peft_model(tiny_llama(num_hidden_layers=4), LoraConfig(target_modules=["q_proj"],
                                                                       modules_to_save=["layers.0.mlp"]))
    names = [f"model.layers.{i}.{m}" for i in range(4) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj",
        "mlp.gate_proj") if i or not m.startswith("mlp")]
    model.add_adapter("second", LoraConfig(target_modules=names))
    assert len(model.peft_config["second"].target_modules) < len(names)
    model.save_pretrained(tmp_path)
    loaded = fastlora.PeftModel.from_pretrained(tiny_llama(num_hidden_layers=4), tmp_path / "second")
    assert sorted(n for n, _ in loaded.lora_layers()) == sorted(names)


def test_resuming_from_a_file_listing_the_names_in_full(tmp_path):
    """A checkpoint whose config lists the modules in full (an earlier release's, or a list under 20 names made
    longer) loads into the adapter whose config names the same modules by their suffixes."""
    settings = dict(target_modules="all-linear")
    model = get_peft_model(tiny_llama(num_hidden_layers=3), LoraConfig(**settings))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    full = sorted(n for n, _ in model.lora_layers())
    path.write_text(json.dumps({**json.loads(path.read_text()), "target_modules": full}))
    resumed = get_peft_model(tiny_llama(num_hidden_layers=3), LoraConfig(**settings))
    resumed.load_adapter(tmp_path, "default")
    other = tmp_path / "other"
    model.save_pretrained(other)
    path = other / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "target_modules": full[:-1]}))
    with pytest.raises(ValueError, match="exists with target_modules"):
        resumed.load_adapter(other, "default")


def test_no_match_lists_existing_modules_and_changes_nothing():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"matched no module.*q_proj"):
        get_peft_model(model, LoraConfig(target_modules=["query"]))
    assert_unchanged(model, before)


def test_non_linear_target_is_a_type_error_and_changes_nothing():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"not nn.Linear.*LlamaMLP"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj", "mlp"]))
    assert_unchanged(model, before)
    with pytest.raises(TypeError, match="LoraConfig"):
        get_peft_model(model, peft.LoraConfig(target_modules=["q_proj"]))
    assert_unchanged(model, before)


def test_failure_while_applying_rolls_back(monkeypatch):
    model = tiny_llama()
    before = snapshot(model)
    calls = []

    def flaky(linear, *args, **kwargs):
        if len(calls) == 5:
            raise RuntimeError("out of memory (simulated)")
        calls.append(1)
        return original(linear, *args, **kwargs)

    original = LoRALinear.wrapping
    monkeypatch.setattr(LoRALinear, "wrapping", staticmethod(flaky))
    with pytest.raises(RuntimeError, match="simulated"):
        get_peft_model(model, LoraConfig(target_modules=SEED_TARGETS))
    assert_unchanged(model, before)


def test_applying_twice_is_refused():
    fm = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already"):
        get_peft_model(fm.model, LoraConfig(target_modules=["q_proj"]))


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_modes_match_peft(bias):
    base = tiny_llama(attention_bias=True, mlp_bias=True)
    fm = get_peft_model(clone(base), LoraConfig(target_modules=["q_proj", "v_proj"], bias=bias))
    pm = peft.get_peft_model(clone(base), peft.LoraConfig(target_modules=["q_proj", "v_proj"], bias=bias))
    assert fm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()


def test_inference_mode_freezes_adapters():
    fm = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], inference_mode=True))
    assert fm.get_nb_trainable_parameters()[0] == 0


def test_half_precision_base_gets_fp32_adapters_like_peft():
    model = tiny_llama().to(torch.bfloat16)
    fm = get_peft_model(model, LoraConfig(target_modules=["q_proj"]))
    layer = fm.model.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    ids = tokens()
    fm.train()
    fm(input_ids=ids, labels=ids).loss.backward()
    assert layer.lora_A.grad.dtype == torch.float32


def test_merge_and_unload_unload_disable():
    base, _, fm = _pair()
    fm.eval()
    ids = tokens()
    with torch.no_grad():
        adapted = fm(input_ids=ids).logits
        plain = base(input_ids=ids).logits
        with fm.disable_adapter():
            torch.testing.assert_close(fm(input_ids=ids).logits, plain)
        torch.testing.assert_close(fm(input_ids=ids).logits, adapted)
        fm.merge_adapter()
        assert_close(fm(input_ids=ids).logits, adapted, kind="same_math")
        fm.unmerge_adapter()
        merged_model = clone(fm).merge_and_unload()
        assert not any(isinstance(m, LoRALinear) for m in merged_model.modules())
        assert all(type(m) is nn.Linear for n, m in merged_model.named_modules() if n.endswith("q_proj"))
        assert_close(merged_model(input_ids=ids).logits, adapted, kind="same_math")
        unloaded = fm.unload()
        assert_close(unloaded(input_ids=ids).logits, plain, kind="roundoff")  # weights merged and unmerged


def test_public_names():
    for name in ("LoRALinear", "LoraConfig", "TaskType", "lora_linear", "get_peft_model", "LoraModel"):
        assert hasattr(fastlora, name)
    assert TaskType.CAUSAL_LM.value == "CAUSAL_LM"


def test_hf_gradient_checkpointing_replays_dropout_masks():
    base = tiny_llama()
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # same adapter init in both runs
        fm = get_peft_model(clone(base), LoraConfig(target_modules=SEED_TARGETS, r=4, lora_alpha=8,
                                                    lora_dropout=0.3, init_lora_weights="gaussian"))
        with torch.no_grad():
            for _, layer in fm.lora_layers():
                layer.lora_B.fill_(0.01)
        if checkpointing:
            fm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        fm.train()
        torch.manual_seed(0)
        ids = tokens()
        fm(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in fm.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], kind="roundoff", msg=name)  # the forward recomputed

"""PEFT's model-level surface on a fastlora model, compared call for call with PEFT 0.21 on a small Llama:
keyword arguments, attributes, trainable flags around disable/merge, state-dict functions, and the
transformers PEFT-integration names that must not reach the wrapped model."""

import json
import os
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastlora
from fastlora import LoraConfig, LoraModel, UnsupportedFeatureError, get_peft_model
from fastlora.peft_format import CONFIG_NAME, WEIGHTS_BIN_NAME, WEIGHTS_NAME
from tests.models import SEED_TARGETS, assert_unchanged, clone, copy_lora_weights, snapshot, tiny_llama, tokens
from tests.tolerances import assert_close


def _pair(base=None, **kwargs):
    base = base if base is not None else tiny_llama()
    common = dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, **kwargs)
    pm = peft.get_peft_model(clone(base), peft.LoraConfig(init_lora_weights=False, **common))
    fm = get_peft_model(clone(base), LoraConfig(**common))
    copy_lora_weights(pm, fm)
    return base, pm, fm


def _flags(model):
    """requires_grad by kind of parameter: LoRA factors, modules_to_save copies, the rest."""
    kinds = {"lora": set(), "copy": set(), "base": set()}
    for name, p in model.named_parameters():
        kind = "lora" if ".lora_" in name else "copy" if ".modules_to_save." in name else "base"
        kinds[kind].add(p.requires_grad)
    return kinds


def _logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids=tokens() if ids is None else ids).logits


# ---- attributes -----------------------------------------------------------------------------------


def test_attributes_as_peft():
    base, pm, fm = _pair(modules_to_save=["lm_head"])
    assert isinstance(fm.peft_config, dict) and list(fm.peft_config) == list(pm.peft_config) == ["default"]
    assert fm.peft_config["default"].r == 4 and fm.active_peft_config is fm.peft_config["default"]
    assert fm.active_adapter == pm.active_adapter == "default"
    assert fm.active_adapters == pm.active_adapters == ["default"]
    assert fm.active_adapters() == ["default"]  # transformers calls it
    assert fm.prefix == pm.prefix == "lora_"
    assert fm.modules_to_save == pm.modules_to_save == {"lm_head"}
    assert fm.peft_type == pm.peft_type == "LORA"
    assert fm.base_model_torch_dtype == pm.base_model_torch_dtype == torch.float32
    assert type(fm.get_base_model()) is type(pm.get_base_model())
    assert fm.base_model.model is fm.get_base_model() and fm.model is fm.get_base_model()
    assert type(fm.base_model.model).__name__ == "LlamaForCausalLM"
    assert not fm.peft_config["default"].is_prompt_learning
    assert isinstance(fm, peft.PeftModel)  # what transformers' Trainer checks


def test_peft_model_methods_fastlora_lacks_say_so():
    _, _, fm = _pair()
    with pytest.raises(NotImplementedError, match="get_prompt is a method of PEFT's PeftModel"):
        fm.get_prompt(1)
    assert not hasattr(fm, "nonexistent_attribute")


def test_get_peft_model_keyword_arguments():
    base = tiny_llama().to(torch.bfloat16)
    config = LoraConfig(target_modules=["q_proj"])
    for autocast in (True, False):
        fm = get_peft_model(clone(base), config, adapter_name="mine", autocast_adapter_dtype=autocast,
                            revision="v1", low_cpu_mem_usage=False)
        pm = peft.get_peft_model(clone(base), peft.LoraConfig(target_modules=["q_proj"]), adapter_name="mine",
                                 autocast_adapter_dtype=autocast)
        layer = fm.model.model.layers[0].self_attn.q_proj
        assert layer.lora_A.dtype == pm.model.model.layers[0].self_attn.q_proj.lora_A["mine"].weight.dtype
        assert layer.lora_A.dtype == (torch.float32 if autocast else torch.bfloat16)
        assert list(fm.peft_config) == ["mine"] and fm.peft_config["mine"].revision == "v1"
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(NotImplementedError, match="mixed=True"):
        get_peft_model(model, config, mixed=True)
    with pytest.raises(ValueError, match="adapter_name"):
        get_peft_model(model, config, adapter_name="a.b")
    assert_unchanged(model, before)


# ---- save_pretrained ------------------------------------------------------------------------------


def test_save_pretrained_keyword_arguments(tmp_path):
    base, pm, fm = _pair()
    fm.save_pretrained(tmp_path / "st", safe_serialization=True, selected_adapters=["default"], is_main_process=True,
                       save_embedding_layers="auto")
    fm.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert sorted(os.listdir(tmp_path / "bin")) == ["README.md", CONFIG_NAME, WEIGHTS_BIN_NAME]
    from_bin = torch.load(tmp_path / "bin" / WEIGHTS_BIN_NAME, weights_only=True)
    from_st = load_file(tmp_path / "st" / WEIGHTS_NAME)
    assert from_bin.keys() == from_st.keys() and all(torch.equal(from_bin[k], from_st[k]) for k in from_st)
    pm.save_pretrained(tmp_path / "peft", safe_serialization=True)
    assert load_file(tmp_path / "peft" / WEIGHTS_NAME).keys() == from_st.keys()
    for folder in ("st", "bin"):  # both load in PEFT and in fastlora and give the same logits
        want = _logits(fm.eval())
        torch.testing.assert_close(_logits(peft.PeftModel.from_pretrained(clone(base), tmp_path / folder)), want)
        torch.testing.assert_close(_logits(LoraModel.from_pretrained(clone(base), tmp_path / folder)), want)

    fm.save_pretrained(tmp_path / "other", is_main_process=False)
    assert not (tmp_path / "other").exists() or not any((tmp_path / "other").iterdir())
    with pytest.raises(ValueError, match="selected_adapters"):
        fm.save_pretrained(tmp_path / "none", selected_adapters=["nope"])
    assert not (tmp_path / "none").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="should be a directory, not a file"):
        fm.save_pretrained(tmp_path / "file")
    fm.save_pretrained(tmp_path / "emb", save_embedding_layers=True)  # PEFT's keys for the tables: tests/test_vocabulary_tables.py
    assert load_file(tmp_path / "emb" / WEIGHTS_NAME).keys() == from_st.keys() | {
        "base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"}
    with pytest.warns(UserWarning, match="max_shard_size"):
        fm.save_pretrained(tmp_path / "shard", max_shard_size="5GB")


def test_save_pretrained_takes_values_from_a_given_state_dict(tmp_path):
    _, _, fm = _pair()
    state = {k: v.clone() for k, v in fm.state_dict().items()}
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A_default"
    state[key] = torch.zeros_like(state[key])
    fm.save_pretrained(tmp_path, state_dict=state)
    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert torch.count_nonzero(saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]) == 0
    assert torch.count_nonzero(saved["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]) > 0


# ---- from_pretrained / load ---------------------------------------------------------------------


def test_from_pretrained_keyword_arguments(tmp_path):
    base, pm, fm = _pair()
    pm.save_pretrained(tmp_path)
    cfg = LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=16)
    loaded = LoraModel.from_pretrained(clone(base), tmp_path, adapter_name="mine", is_trainable=True, config=cfg,
                                       autocast_adapter_dtype=True, torch_device="cpu", low_cpu_mem_usage=False,
                                       ephemeral_gpu_offload=False)
    assert list(loaded.peft_config) == ["mine"] and loaded.peft_config["mine"].lora_alpha == 16
    assert loaded.model.model.layers[0].self_attn.q_proj.scaling == 4.0  # the given config, not the file's 2.0
    assert loaded.training and _flags(loaded)["lora"] == {True}
    frozen = LoraModel.from_pretrained(clone(base), tmp_path)
    assert not frozen.training and _flags(frozen)["lora"] == {False}
    assert frozen.peft_config["default"].inference_mode
    half = LoraModel.from_pretrained(clone(base).to(torch.bfloat16), tmp_path, autocast_adapter_dtype=False)
    assert half.model.model.layers[0].self_attn.q_proj.lora_A.dtype == torch.bfloat16
    with pytest.raises(NotImplementedError, match="key_mapping"):
        LoraModel.from_pretrained(clone(base), tmp_path, key_mapping={"a": "b"})
    with pytest.raises(TypeError, match="unexpected keyword"):
        LoraModel.from_pretrained(clone(base), tmp_path, not_an_argument=1)


def test_peft_bin_adapter_loads(tmp_path):
    base, pm, fm = _pair()
    pm.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / WEIGHTS_BIN_NAME).is_file() and not (tmp_path / WEIGHTS_NAME).exists()
    loaded = LoraModel.from_pretrained(clone(base), tmp_path)
    torch.testing.assert_close(_logits(loaded), _logits(pm.eval()))


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-pickle",))


def test_bin_adapter_is_read_without_running_its_pickle(tmp_path, monkeypatch):
    base, pm, _ = _pair()
    pm.save_pretrained(tmp_path, safe_serialization=False)
    torch.save({"base_model.model.x": _Payload()}, tmp_path / WEIGHTS_BIN_NAME)
    monkeypatch.chdir(tmp_path)
    model = clone(base)
    before = snapshot(model)
    with pytest.raises(ValueError, match="not a readable PyTorch weights file"):
        LoraModel.from_pretrained(model, tmp_path)
    assert not (tmp_path / "pwned-by-pickle").exists()
    assert_unchanged(model, before)


# ---- merging --------------------------------------------------------------------------------------


def test_merge_keyword_arguments_and_warnings_as_peft():
    _, pm, fm = _pair()
    fm.eval(), pm.eval()
    want = _logits(fm)
    fm.merge_adapter(adapter_names=["default"], safe_merge=True)
    pm.merge_adapter(adapter_names=["default"], safe_merge=True)
    assert_close(_logits(fm), want, kind="same_math")
    with pytest.warns(UserWarning, match="already merged") as ours:
        fm.merge_adapter()
    with pytest.warns(UserWarning, match="already merged") as theirs:
        pm.merge_adapter()
    assert str(ours[0].message) == str(theirs[0].message)
    fm.unmerge_adapter(), pm.unmerge_adapter()
    with pytest.warns(UserWarning, match="Already unmerged"):
        fm.unmerge_adapter()
    with pytest.raises(TypeError, match="list of strings"):
        fm.merge_adapter(adapter_names="default")
    with pytest.raises(ValueError, match="unknown adapter"):
        fm.merge_adapter(adapter_names=["nope"])
    merged = fm.merge_and_unload(progressbar=True, safe_merge=True, adapter_names=["default"])
    assert_close(_logits(merged), want, kind="same_math")


def test_safe_merge_refuses_nan_and_leaves_every_layer_unmerged():
    _, pm, fm = _pair()
    layers = [layer for _, layer in fm.lora_layers()]
    with torch.no_grad():
        layers[-1].lora_B[0, 0] = float("nan")  # the last layer: a non-atomic merge would have merged the others
    weights = [layer.weight.detach().clone() for layer in layers]
    with pytest.raises(ValueError, match="NaNs"):
        fm.merge_adapter(safe_merge=True)
    assert not any(layer.merged for layer in layers)
    assert all(torch.equal(layer.weight, w) for layer, w in zip(layers, weights))
    with pytest.raises(ValueError, match="NaNs"):
        fm.merge_and_unload(safe_merge=True)
    assert all(isinstance(layer, fastlora.LoRALinear) for _, layer in fm.lora_layers()) and len(list(fm.lora_layers())) == 4
    with torch.no_grad():
        pm.base_model.model.model.layers[1].self_attn.v_proj.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs"):  # PEFT refuses too
        pm.merge_adapter(safe_merge=True)


# ---- disabling ------------------------------------------------------------------------------------


def test_disable_adapter_flags_and_outputs_as_peft():
    base, pm, fm = _pair(modules_to_save=["lm_head"])
    fm.eval(), pm.eval()
    plain, adapted = _logits(base), _logits(fm)
    for model in (fm, pm):
        assert _flags(model) == {"lora": {True}, "copy": {True}, "base": {False}}
    with fm.disable_adapter(), pm.disable_adapter():
        assert _flags(fm) == _flags(pm) == {"lora": {False}, "copy": {False}, "base": {False}}
        torch.testing.assert_close(_logits(fm), plain)
    assert _flags(fm) == _flags(pm) == {"lora": {True}, "copy": {True}, "base": {False}}
    torch.testing.assert_close(_logits(fm), adapted)
    fm.disable_adapter_layers(), pm.disable_adapter_layers()
    assert _flags(fm) == _flags(pm)
    torch.testing.assert_close(_logits(fm), plain)
    fm.enable_adapter_layers(), pm.enable_adapter_layers()
    assert _flags(fm) == _flags(pm)
    torch.testing.assert_close(_logits(fm), adapted)


def test_disable_adapter_on_a_frozen_loaded_model_matches_peft(tmp_path):
    base, pm, fm = _pair()
    fm.save_pretrained(tmp_path)
    ours, theirs = LoraModel.from_pretrained(clone(base), tmp_path), peft.PeftModel.from_pretrained(clone(base), tmp_path)
    assert _flags(ours) == _flags(theirs) == {"lora": {False}, "copy": set(), "base": {False}}
    with ours.disable_adapter(), theirs.disable_adapter():
        pass
    assert _flags(ours) == _flags(theirs)  # PEFT turns the adapter's gradients on when it re-enables
    assert ours.training == theirs.training


def test_disable_adapter_on_a_merged_model():
    base, _, fm = _pair()
    fm.eval()
    adapted = _logits(fm)
    fm.merge_adapter()
    with fm.disable_adapter():
        torch.testing.assert_close(_logits(fm), _logits(base))
    assert_close(_logits(fm), adapted, kind="same_math")


# ---- state-dict functions ---------------------------------------------------------------------------


def test_state_dict_functions_interoperate_with_peft():
    base, pm, fm = _pair()
    ours = fastlora.get_peft_model_state_dict(fm)
    theirs = peft.get_peft_model_state_dict(pm)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    other_peft = peft.get_peft_model(clone(base), peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8))
    peft.set_peft_model_state_dict(other_peft, ours)
    torch.testing.assert_close(_logits(other_peft.eval()), _logits(fm.eval()))

    fresh = get_peft_model(clone(base), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8))
    result = fastlora.set_peft_model_state_dict(fresh, theirs)
    assert result.missing_keys == [] and result.unexpected_keys == []
    torch.testing.assert_close(_logits(fresh.eval()), _logits(pm.eval()))

    stripped = {k.removeprefix("base_model.model."): v for k, v in theirs.items()}
    stripped["model.not.a.key"] = torch.zeros(1)
    result = fastlora.set_peft_model_state_dict(fresh, stripped)
    assert result.unexpected_keys == ["base_model.model.model.not.a.key"]
    bad = {k: v[:1] for k, v in theirs.items()}
    with pytest.raises(ValueError, match="size mismatch"):
        fastlora.set_peft_model_state_dict(fresh, bad)
    torch.testing.assert_close(_logits(fresh.eval()), _logits(pm.eval()))  # nothing copied


# ---- LoraConfig -----------------------------------------------------------------------------------


def test_config_save_and_from_pretrained_interoperate_with_peft(tmp_path):
    config = LoraConfig(task_type="CAUSAL_LM", target_modules=SEED_TARGETS, r=8, lora_alpha=32, lora_dropout=0.1)
    config.save_pretrained(tmp_path / "ours")
    assert LoraConfig.from_pretrained(tmp_path / "ours") == config
    theirs = peft.LoraConfig.from_pretrained(tmp_path / "ours")
    assert (theirs.r, theirs.lora_alpha, theirs.lora_dropout, sorted(theirs.target_modules)) == (8, 32, 0.1, sorted(SEED_TARGETS))
    peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], r=4, use_rslora=True).save_pretrained(tmp_path / "peft")
    ours = LoraConfig.from_pretrained(tmp_path / "peft")
    assert ours.r == 4 and ours.use_rslora and ours.target_modules == ["q_proj"]
    # PEFT 0.22's new field, off, is left out: PEFT 0.21 reads the file without warning of an unknown field
    assert set(json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())) == set(
        json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())) - {"astra_config"}
    assert LoraConfig.from_pretrained(tmp_path / "ours", lora_dropout=0.0).lora_dropout == 0.0
    with pytest.raises(ValueError, match="no adapter_config.json"):
        LoraConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("field, value", [
    ("velora_config", {"rank": 4}), ("monteclora_config", {"rank": 4}),
    ("kasa_config", {"rank": 4}), ("astra_config", {"rank": 4}), ("use_qalora", True),
])
def test_unsupported_peft_fields_are_named(field, value, tmp_path):
    with pytest.raises(UnsupportedFeatureError, match=rf"{field}.*not support"):
        LoraConfig(target_modules=["q_proj"], **{field: value})
    peft_config = peft.LoraConfig(target_modules=["q_proj"])
    data = {**peft_config.to_dict(), field: value}
    data.pop("runtime_config", None)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data, default=str))
    with pytest.raises(NotImplementedError, match=field):  # UnsupportedFeatureError is both kinds
        LoraConfig.from_pretrained(tmp_path)


# ---- transformers' PEFT-integration names ---------------------------------------------------------


def test_transformers_adapter_methods_do_not_reach_the_wrapped_model(tmp_path):
    """Every public name of transformers' PeftAdapterMixin answers with fastlora's meaning or a clear error,
    and none adds PEFT layers to the wrapped model."""
    from transformers.integrations.peft import PeftAdapterMixin

    base, _, fm = _pair()
    fm.save_pretrained(tmp_path)
    names = sorted(n for n in vars(PeftAdapterMixin) if not n.startswith("_") and callable(getattr(PeftAdapterMixin, n)))
    assert {"load_adapter", "add_adapter", "set_adapter", "delete_adapter", "enable_adapters", "disable_adapters",
            "active_adapters", "get_adapter_state_dict"} <= set(names)
    for name in names:  # fastlora's own attribute, not the wrapped model's through attribute fall-through
        assert any(name in vars(k) for k in type(fm).__mro__ if k.__module__.startswith("fastlora")), name
    before = snapshot(fm)
    calls = {
        "load_adapter": lambda: fm.load_adapter(tmp_path),          # PEFT's signature: the name is required
        "add_adapter": lambda: fm.add_adapter(LoraConfig(target_modules=["q_proj"])),  # transformers' order
        "set_adapter": lambda: fm.set_adapter("nope"),
        "delete_adapter": lambda: fm.delete_adapter("nope"),
        "enable_peft_hotswap": lambda: fm.enable_peft_hotswap(),
        "get_adapter_state_dict": lambda: fm.get_adapter_state_dict("nope"),
    }
    for name, call in calls.items():
        with pytest.raises((TypeError, ValueError, NotImplementedError)):
            call()
        assert_unchanged(fm, before)
    assert not any(type(m).__module__.startswith("peft") for m in fm.modules())
    assert fm.active_adapters() == ["default"]
    assert fm.get_adapter_state_dict().keys() == fastlora.get_peft_model_state_dict(fm).keys()
    fm.disable_adapters()
    torch.testing.assert_close(_logits(fm.eval()), _logits(base))
    fm.enable_adapters()
    assert _flags(fm)["lora"] == {True}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fm.load_adapter(tmp_path, "default")  # PEFT's form: values reloaded in place


def test_fsdp_style_state_dict_without_frozen_adapters(tmp_path):
    """A state dict gathered without frozen parameters holds only the trained adapter: saving every adapter
    from it says which are missing, and selected_adapters saves the one it holds."""
    base, _, fm = _both_with_second_adapter()
    trained_only = {n: p.detach() for n, p in fm.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="pass selected_adapters"):
        fm.save_pretrained(tmp_path / "all", state_dict=trained_only)
    fm.save_pretrained(tmp_path / "one", state_dict=trained_only, selected_adapters=["default"])
    torch.testing.assert_close(_logits(LoraModel.from_pretrained(clone(base), tmp_path / "one")), _logits(fm.eval()))


def _both_with_second_adapter():
    base, pm, fm = _pair()
    fm.add_adapter("reference", LoraConfig(target_modules=["q_proj"], r=2))
    return base, pm, fm


def test_added_adapter_records_the_base_model_when_saved(tmp_path):
    base = tiny_llama()
    base.name_or_path = "some-org/some-model"
    fm = get_peft_model(base, LoraConfig(target_modules=["q_proj"]))
    fm.add_adapter("other", LoraConfig(target_modules=["v_proj"]))
    fm.save_pretrained(tmp_path)
    for folder in (tmp_path, tmp_path / "other"):
        assert json.loads((folder / CONFIG_NAME).read_text())["base_model_name_or_path"] == "some-org/some-model"


@pytest.mark.parametrize("revision", [None, "v2"])
def test_a_config_naming_another_base_records_the_model_it_adapts_as_peft(tmp_path, revision):
    """A config reused from another model's adapter names that model: the adapter records the model it adapts
    (what AutoPeftModel loads), with PEFT's warnings about the name and the revision."""
    config = dict(target_modules=["q_proj"], base_model_name_or_path="other-org/other-model", revision="v1")
    models, said = {}, {}
    for lib in (peft, fastlora):
        base = tiny_llama()
        base.name_or_path = "some-org/some-model"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            models[lib] = lib.get_peft_model(base, lib.LoraConfig(**config), revision=revision)
        said[lib] = sorted(str(w.message) for w in caught if "renamed from" in str(w.message)
                           or "overwriting with revision" in str(w.message))
        models[lib].save_pretrained(tmp_path / lib.__name__)
    assert said[fastlora] == said[peft] and len(said[peft]) == (2 if revision else 1)
    recorded = [json.loads((tmp_path / lib.__name__ / CONFIG_NAME).read_text()) for lib in (peft, fastlora)]
    assert recorded[0]["base_model_name_or_path"] == recorded[1]["base_model_name_or_path"] == "some-org/some-model"
    assert recorded[0]["revision"] == recorded[1]["revision"] == (revision or "v1")


def test_a_model_built_from_a_config_keeps_the_base_the_config_names(tmp_path):
    """A model without a checkpoint name (built from a config) records the base the config names, where PEFT
    records none."""
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], base_model_name_or_path="/models/base"))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["base_model_name_or_path"] == "/models/base"


def test_full_checkpoints_from_before_named_adapters_load():
    """A full state dict written when a layer's only adapter was named lora_A / lora_B loads into the layer."""
    _, _, fm = _pair()
    old = {k.replace("lora_A_default", "lora_A").replace("lora_B_default", "lora_B"): v.clone()
           for k, v in fm.state_dict().items()}
    fresh = get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4,
                                                    lora_alpha=8))
    result = fresh.load_state_dict(old)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(_logits(fresh.eval()), _logits(fm.eval()))


def test_wrong_subfolder_of_a_local_adapter_is_named(tmp_path):
    _, _, fm = _pair()
    fm.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no sub-folder 'nope'"):
        LoraModel.from_pretrained(tiny_llama(), tmp_path, subfolder="nope")


def test_the_attributes_and_options_peft_s_helpers_use(tmp_path):
    """peft_type / task_type as str enums with .value, the prompt-learning flags, device_map accepted on loading
    (adapters land on each layer's device) and an offloaded model refused with the reason."""
    config = LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], r=2)
    assert config.peft_type == peft.PeftType.LORA and config.peft_type.value == "LORA"
    assert config.task_type.value == "CAUSAL_LM" and config.is_prompt_learning is False
    model = get_peft_model(tiny_llama(), config)
    assert model._is_prompt_learning is False and model.peft_type.value == "LORA"
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["peft_type"] == "LORA"
    loaded = LoraModel.from_pretrained(tiny_llama(), tmp_path, device_map="cpu", max_memory=None)
    loaded.load_adapter(tmp_path, adapter_name="again", device_map={"": "cpu"})
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    offloaded = tiny_llama()
    offloaded.hf_device_map = {"model.embed_tokens": 0, "model.layers": "cpu", "lm_head": "disk"}
    with pytest.raises(NotImplementedError, match="offload"):
        LoraModel.from_pretrained(offloaded, tmp_path)


def test_a_pickled_model_loads_in_a_fresh_process(tmp_path):
    """torch.save of the whole model, torch.load in a process that has not built a fastlora model yet."""
    import subprocess
    import sys

    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(target_modules=["0"], r=2))
    torch.save(model, tmp_path / "model.pt")
    code = ("import torch; m = torch.load(%r, weights_only=False); "
            "print(type(m).__name__, tuple(m(torch.ones(2, 4)).shape))") % str(tmp_path / "model.pt")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "PeftCompatibleLoraModel (2, 4)"


def test_all_linear_is_recorded_as_the_modules_it_adapted_as_peft_records_it(tmp_path):
    base = tiny_llama()
    pm = peft.get_peft_model(clone(base), peft.LoraConfig(target_modules="all-linear", r=4))
    fm = get_peft_model(clone(base), LoraConfig(target_modules="all-linear", r=4))
    assert fm.peft_config["default"].target_modules == sorted(pm.peft_config["default"].target_modules)
    pm.save_pretrained(tmp_path / "peft")
    fm.save_pretrained(tmp_path / "ours")
    saved = [json.loads((tmp_path / d / CONFIG_NAME).read_text())["target_modules"] for d in ("peft", "ours")]
    assert sorted(saved[0]) == saved[1] and "lm_head" not in saved[1] and len(saved[1]) == 14
    loaded = LoraModel.from_pretrained(clone(base), tmp_path / "ours")
    assert sorted(name for name, _ in loaded.lora_layers()) == saved[1]

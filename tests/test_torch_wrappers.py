"""Models whose layers torch's ``checkpoint_wrapper`` wraps (accelerate's FSDP activation checkpointing does): the
wrapper adds ``_checkpoint_wrapped_module`` to the names of what it wraps, and adapter files leave it out, as
PEFT's do, so an adapter trained on the wrapped model loads onto the plain one and back."""

import re

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from safetensors.torch import load_file, save_file  # noqa: E402
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper  # noqa: E402

import fastlora  # noqa: E402
from tests.models import PEFT_BEFORE_0_22, copy_lora_weights, tiny_llama, tokens  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

WRAPPED = "_checkpoint_wrapped_module"
SETTINGS = dict(target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["post_attention_layernorm"],
                bias="lora_only", r=4, lora_alpha=8, lora_dropout=0.1)


def base():
    return tiny_llama(attention_bias=True)  # biases on q_proj and v_proj, which bias="lora_only" saves


def wrap_layers(model):
    """``model`` (a PEFT or fastlora model, or the transformers model) with each decoder layer checkpoint-wrapped."""
    llama = model.get_base_model() if hasattr(model, "get_base_model") else model
    for index, layer in enumerate(llama.model.layers):
        llama.model.layers[index] = checkpoint_wrapper(layer)
    return model


def trained_pair():
    """(PEFT's model, fastlora's) with the same nonzero factors, biases and layernorm copies, in eval mode."""
    theirs = peft.get_peft_model(base(), peft.LoraConfig(**SETTINGS))
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn_like(param) * 0.1 + (1.0 if "layernorm" in name else 0.0))
    ours = fastlora.get_peft_model(base(), fastlora.LoraConfig(**SETTINGS))
    copy_lora_weights(theirs, ours)
    ours.load_adapter_tensors({key: value for key, value in peft.get_peft_model_state_dict(theirs).items()
                               if "lora_" not in key})  # the biases and layernorm copies
    return theirs.eval(), ours.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_a_wrapped_model_saves_the_tensors_peft_saves_under_the_plain_names(tmp_path):
    theirs, ours = trained_pair()
    theirs.save_pretrained(tmp_path / "peft")  # PEFT's file of the plain model
    if not PEFT_BEFORE_0_22:  # (PEFT 0.21 fails to save a wrapped model's modules_to_save)
        wrap_layers(theirs).save_pretrained(tmp_path / "peft-wrapped")
    wrap_layers(ours)
    assert any(WRAPPED in name for name, _ in ours.named_modules())
    ours.save_pretrained(tmp_path / "ours")
    ours.save_pretrained(tmp_path / "gathered", state_dict=ours.state_dict())  # Trainer's save under FSDP
    expected = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert not any(WRAPPED in key for key in expected)
    for folder in ("ours", "gathered") + (() if PEFT_BEFORE_0_22 else ("peft-wrapped",)):
        saved = load_file(tmp_path / folder / "adapter_model.safetensors")
        assert sorted(saved) == sorted(expected), folder
        for key, value in expected.items():
            assert torch.equal(saved[key], value), (folder, key)
    functional = fastlora.get_peft_model_state_dict(ours)
    assert sorted(functional) == sorted(peft.get_peft_model_state_dict(theirs))


@pytest.mark.parametrize("onto", ["plain", "wrapped"])
def test_the_file_of_a_wrapped_model_loads_onto_the_plain_model_and_a_wrapped_one(tmp_path, onto):
    _, ours = trained_pair()
    wrap_layers(ours).save_pretrained(tmp_path)
    ids = tokens()
    model = wrap_layers(base()) if onto == "wrapped" else base()
    loaded = fastlora.PeftModel.from_pretrained(model, tmp_path)
    assert_close(logits(loaded, ids), logits(ours, ids), kind="same_math")
    if onto == "plain" or not PEFT_BEFORE_0_22:  # (PEFT 0.21 fails to load modules_to_save onto a wrapped model)
        by_peft = peft.PeftModel.from_pretrained(wrap_layers(base()) if onto == "wrapped" else base(), tmp_path)
        assert_close(logits(by_peft, ids), logits(ours, ids), kind="same_math")


def test_peft_files_and_state_dicts_load_into_a_wrapped_model(tmp_path):
    theirs, ours = trained_pair()
    theirs.save_pretrained(tmp_path)
    ids = tokens()
    loaded = fastlora.PeftModel.from_pretrained(wrap_layers(base()), tmp_path)
    assert_close(logits(loaded, ids), logits(theirs, ids), kind="same_math")

    fresh = wrap_layers(fastlora.get_peft_model(base(), fastlora.LoraConfig(**SETTINGS))).eval()
    state = peft.get_peft_model_state_dict(theirs)
    dropped = next(key for key in state if "lora_A" in key)
    result = fastlora.set_peft_model_state_dict(fresh, {key: v for key, v in state.items() if key != dropped})
    assert (result.missing_keys, result.unexpected_keys) == ([dropped], [])  # named as the state dict names it
    result = fastlora.set_peft_model_state_dict(fresh, state)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    assert_close(logits(fresh, ids), logits(theirs, ids), kind="same_math")

    fresh = wrap_layers(fastlora.get_peft_model(base(), fastlora.LoraConfig(**SETTINGS))).eval()
    fresh.load_adapter(tmp_path, "default")  # Trainer's resume: the values into the existing adapter
    assert_close(logits(fresh, ids), logits(theirs, ids), kind="same_math")


def test_a_file_written_with_the_wrappers_level_in_its_keys_loads_onto_the_plain_model(tmp_path):
    """Files an earlier fastlora saved from a wrapped model kept the level in their keys."""
    _, ours = trained_pair()
    wrap_layers(ours).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({key.replace(".layers.0.", f".layers.0.{WRAPPED}.").replace(".layers.1.", f".layers.1.{WRAPPED}."):
               value for key, value in tensors.items()}, path)
    assert all(WRAPPED in key for key in load_file(path))
    ids = tokens()
    for model in (base(), wrap_layers(base())):
        loaded = fastlora.PeftModel.from_pretrained(model, tmp_path)
        assert_close(logits(loaded, ids), logits(ours, ids), kind="same_math")


def test_checkpointed_layers_recompute_the_same_dropout_masks():
    """The wrapper runs each layer's forward again in the backward pass: the masks regenerated there are the
    forward's, so the gradients equal those of the plain model under the same seed."""
    models = [fastlora.get_peft_model(base(), fastlora.LoraConfig(**SETTINGS)) for _ in range(2)]
    with torch.no_grad():
        for name, param in models[0].named_parameters():
            if "lora_B" in name:
                param.normal_()
    models[1].load_state_dict(models[0].state_dict())
    wrap_layers(models[1])
    grads = []
    for model in models:
        model.train()
        torch.manual_seed(7)
        # (no KV cache: the replayed forward would extend it again, which transformers 5.0 does in training)
        model(tokens(), labels=tokens(), use_cache=False).loss.backward()
        grads.append({name.replace(f".{WRAPPED}", ""): p.grad for name, p in model.named_parameters()
                      if p.requires_grad})
    assert sorted(grads[0]) == sorted(grads[1])
    for name, grad in grads[0].items():
        assert_close(grads[1][name], grad, kind="same_math_max", msg=name)


def test_injecting_from_a_state_dict_adapts_the_wrapped_modules_its_keys_name():
    """(PEFT 0.22 finds no module there: it matches the keys' plain names against the wrapped ones.)"""
    source = fastlora.get_peft_model(base(), fastlora.LoraConfig(target_modules=["q_proj"], r=4))
    state = fastlora.get_peft_model_state_dict(source)
    assert not any(WRAPPED in key for key in state)
    model = wrap_layers(base())
    with pytest.warns(RuntimeWarning, match="additional target modules"):  # the config names v_proj too, which the state dict does not hold
        fastlora.inject_adapter_in_model(fastlora.LoraConfig(target_modules=["q_proj", "v_proj"], r=4), model,
                                         state_dict={key.removeprefix("base_model.model."): v for key, v in state.items()})
    adapted = [name for name, module in model.named_modules() if isinstance(module, fastlora.LoRALinear)]
    assert adapted == [f"model.layers.{i}.{WRAPPED}.self_attn.q_proj" for i in range(2)]


def test_replicated_layers_of_a_wrapped_model_load_its_file(tmp_path):
    """layer_replication's copies are made while the file loads: their names get the wrapper's level too."""
    config = fastlora.LoraConfig(target_modules=["q_proj"], r=4, layer_replication=[[0, 2], [0, 2]])
    trained = fastlora.get_peft_model(wrap_layers(base()), config)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.normal_()
    trained.eval().save_pretrained(tmp_path)
    assert sum(".layers.3.self_attn.q_proj.lora_B" in key for key in load_file(tmp_path / "adapter_model.safetensors"))
    ids = tokens()
    loaded = fastlora.PeftModel.from_pretrained(wrap_layers(base()), tmp_path)
    assert_close(logits(loaded, ids), logits(trained, ids), kind="same_math")


def test_a_wrapped_pissa_adapter_converts_with_an_initial_file_written_with_the_level(tmp_path):
    """save_pretrained(path_initial_model_for_weight_conversion=...) reads the initial adapter an earlier fastlora
    saved from the wrapped model (the level in its keys); the converted adapter on the untouched plain base gives
    the trained model's logits."""
    ours = wrap_layers(fastlora.get_peft_model(base(), fastlora.LoraConfig(target_modules=["q_proj"], r=4,
                                                                            init_lora_weights="pissa")))
    ours.peft_config["default"].init_lora_weights = True  # PEFT's guide: loading the initial adapter leaves W alone
    ours.save_pretrained(tmp_path / "initial")
    path = tmp_path / "initial" / "adapter_model.safetensors"
    save_file({key.replace(".self_attn.", f".{WRAPPED}.self_attn."): v for key, v in load_file(path).items()}, path)
    with torch.no_grad():
        for param in ours.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    ours.eval().save_pretrained(tmp_path / "final", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    ids = tokens()
    converted = fastlora.PeftModel.from_pretrained(base(), tmp_path / "final")
    assert_close(logits(converted, ids), logits(ours, ids), kind="same_math_max")


def test_a_refused_file_names_its_keys_as_the_file_does(tmp_path):
    _, ours = trained_pair()
    ours.save_pretrained(tmp_path)
    other = fastlora.LoraConfig(**{**SETTINGS, "r": 8})
    with pytest.raises(ValueError, match=r": base_model\.model\.model\.layers\.0\.mlp\.down_proj\.lora_A\.weight has shape "
                                         r"\(4, 96\), the model needs \(8, 96\)"):
        fastlora.PeftModel.from_pretrained(wrap_layers(base()), tmp_path, config=other)
    more = fastlora.LoraConfig(**{**SETTINGS, "target_modules": SETTINGS["target_modules"] + ["k_proj"]})
    with pytest.raises(ValueError, match=r"missing keys: base_model\.model\.model\.layers\.0\.self_attn\.k_proj\.base_"):
        fastlora.PeftModel.from_pretrained(wrap_layers(base()), tmp_path, config=more)


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_a_model_wrapped_whole_trains_saves_and_loads_as_the_plain_model(tmp_path, bias):
    """The wrapper at the model's root renames what its ``named_parameters`` yields (no level), while its modules keep
    the level: the adapter is frozen, saved and loaded as on the plain model, and as PEFT 0.22 does it."""
    settings = {**SETTINGS, "bias": bias, "modules_to_save": ["post_attention_layernorm", "k_proj"]}
    plain = fastlora.get_peft_model(base(), fastlora.LoraConfig(**settings))
    with torch.no_grad():
        for name, param in plain.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn_like(param) * 0.1 + (1.0 if "layernorm" in name else 0.0))
    tensors = fastlora.get_peft_model_state_dict(plain)
    ours = fastlora.get_peft_model(checkpoint_wrapper(base()), fastlora.LoraConfig(**settings))
    assert trainable(ours) == trainable(plain)
    ours.load_adapter_tensors(tensors)
    ids = tokens()
    expected = logits(plain.eval(), ids)
    assert_close(logits(ours.eval(), ids), expected, kind="same_math")
    plain.save_pretrained(tmp_path / "plain")
    ours.save_pretrained(tmp_path / "ours")
    folders = ["ours", "plain"]
    if not PEFT_BEFORE_0_22:  # (PEFT 0.21 leaves such a model's factors frozen and fails to save its copies)
        theirs = peft.get_peft_model(checkpoint_wrapper(base()), peft.LoraConfig(**settings))
        assert trainable(theirs) == trainable(plain)
        peft.set_peft_model_state_dict(theirs, tensors)
        assert_close(logits(theirs.eval(), ids), expected, kind="same_math")
        theirs.save_pretrained(tmp_path / "peft")
        folders.append("peft")
    saved, plain_saved = (load_file(tmp_path / folder / "adapter_model.safetensors") for folder in folders[:2])
    assert sorted(saved) == sorted(plain_saved) and not any(WRAPPED in key for key in saved)
    assert all(torch.equal(saved[key], value) for key, value in plain_saved.items())
    for folder in folders:
        for model in (base(), checkpoint_wrapper(base())):
            loaded = fastlora.PeftModel.from_pretrained(model, tmp_path / folder).eval()
            assert_close(logits(loaded, ids), expected, kind="same_math")
    assert_close(logits(ours.merge_and_unload(), ids), expected, kind="same_math")


def trainable(model):
    """The names of ``model``'s trainable parameters without the adapter's name or the wrapper's level, PEFT's layout
    and fastlora's alike."""
    names = (re.sub(rf"\.base_layer|[._]default|{WRAPPED}\.", "", n) for n, p in model.named_parameters() if p.requires_grad)
    return sorted(re.sub(r"(lora_[AB])\.weight$", r"\1", name) for name in names)

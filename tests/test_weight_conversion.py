"""A PiSSA or OLoRA adapter saved for the original base weight (save_pretrained with
path_initial_model_for_weight_conversion), following PEFT's guide step for step, compared with PEFT: the files
(keys, values, config), and the converted adapter on the untouched base giving the trained model's logits."""

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastlora
from fastlora import UnsupportedFeatureError
from tests.models import clone, copy_lora_weights, load_quantized, tiny_llama, tokens
from tests.tolerances import assert_close

CONFIG = dict(target_modules=["q_proj", "v_proj", "embed_tokens"], r=4, lora_alpha=8)


def _trained(theirs, ours, seed=0):
    """PEFT's factors moved as training would, and fastlora given the same values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(theirs.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    copy_lora_weights(theirs, ours)


def _guide(library, base, directory, init, **changes):
    """PEFT's PiSSA guide: create, say init_lora_weights = True, save the initial adapter; the model returned."""
    model = library.get_peft_model(clone(base), library.LoraConfig(**{**CONFIG, **changes}, init_lora_weights=init))
    model.peft_config["default"].init_lora_weights = True  # so that loading the initial adapter leaves W alone
    model.save_pretrained(directory / "initial")
    return model


@pytest.mark.parametrize("init,changes", [("pissa", {}), ("olora", {}), ("pissa", {"use_rslora": True}),
                                          ("pissa", {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 4}})],
                         ids=["pissa", "olora", "pissa-rslora", "pissa-patterns"])
def test_a_trained_pissa_or_olora_adapter_converts_for_the_original_weight_as_peft(tmp_path, init, changes):
    base = tiny_llama()
    ids = tokens()
    theirs = _guide(peft, base, tmp_path / "theirs", init, **changes)
    ours = _guide(fastlora, base, tmp_path / "ours", init, **changes)
    _trained(theirs, ours)
    with torch.no_grad():
        trained = ours(input_ids=ids).logits
        assert_close(trained, theirs(input_ids=ids).logits, kind="same_math")
    theirs.save_pretrained(tmp_path / "theirs" / "final",
                           path_initial_model_for_weight_conversion=str(tmp_path / "theirs" / "initial"))
    ours.save_pretrained(tmp_path / "ours" / "final",
                         path_initial_model_for_weight_conversion=str(tmp_path / "ours" / "initial"))
    their_file = load_file(tmp_path / "theirs" / "final" / "adapter_model.safetensors")
    our_file = load_file(tmp_path / "ours" / "final" / "adapter_model.safetensors")
    # PEFT's file keeps only the Linear layers' factors; fastlora's keeps the rest of the adapter too (here the
    # embedding's factors, converted the same way, and its table)
    assert their_file.keys() == {key for key in our_file if ".lora_A." in key or ".lora_B." in key}
    for key in their_file:
        assert torch.equal(our_file[key], their_file[key]), key
    assert our_file["base_model.model.model.embed_tokens.lora_embedding_A"].shape[0] == 2 * 4
    their_config = json.loads((tmp_path / "theirs" / "final" / "adapter_config.json").read_text())
    our_config = json.loads((tmp_path / "ours" / "final" / "adapter_config.json").read_text())
    for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights", "use_rslora"):
        assert our_config[field] == their_config[field], field
    for side in ("theirs", "ours"):  # the initial adapter's config now says True, as PEFT rewrites it
        assert json.loads((tmp_path / side / "initial" / "adapter_config.json").read_text())["init_lora_weights"] is True

    # on the untouched base, the converted adapter computes what the trained residual model computes
    for library in (fastlora, peft):
        converted = library.PeftModel.from_pretrained(clone(base), tmp_path / "ours" / "final")
        with torch.no_grad():
            assert_close(converted(input_ids=ids).logits, trained, kind="same_math_max")


def test_a_converted_adapter_needs_the_initial_adapter_of_the_same_config(tmp_path):
    base = tiny_llama()
    ours = _guide(fastlora, base, tmp_path, "pissa")
    other = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(target_modules=["q_proj"], r=2))
    other.save_pretrained(tmp_path / "other")
    before = (tmp_path / "other" / "adapter_config.json").read_text()
    with pytest.raises(ValueError, match=r"the initial adapter in .*other.* does not match the adapter being saved"):
        ours.save_pretrained(tmp_path / "final", path_initial_model_for_weight_conversion=str(tmp_path / "other"))
    assert not (tmp_path / "final").exists()
    assert (tmp_path / "other" / "adapter_config.json").read_text() == before


def test_a_dora_adapter_is_not_converted(tmp_path):
    ours = _guide(fastlora, tiny_llama(), tmp_path, "pissa", use_dora=True, target_modules=["q_proj"])
    with pytest.raises(UnsupportedFeatureError, match="DoRA adapter"):
        ours.save_pretrained(tmp_path / "final", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    assert not (tmp_path / "final").exists()


def test_the_initial_adapters_config_is_rewritten_to_say_true_as_peft_does(tmp_path):
    """An initial adapter saved still saying "pissa" would initialise the base again when loaded: the conversion
    rewrites its config (PEFT does the same) and converts as usual."""
    base = tiny_llama()
    ours = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(**CONFIG, init_lora_weights="pissa"))
    ours.save_pretrained(tmp_path / "initial")
    assert json.loads((tmp_path / "initial" / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    ours.save_pretrained(tmp_path / "final", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    assert json.loads((tmp_path / "initial" / "adapter_config.json").read_text())["init_lora_weights"] is True
    assert json.loads((tmp_path / "final" / "adapter_config.json").read_text())["r"] == 8


def test_a_targeted_heads_saved_table_is_converted_back_to_the_original_weight(tmp_path):
    """A targeted output head's table is saved beside the adapter; after PiSSA it holds the residual, and the
    converted file holds the original weight again, so the adapter loads onto the untouched base."""
    base = tiny_llama()
    ids = tokens()
    ours = _guide(fastlora, base, tmp_path, "pissa", target_modules=["q_proj", "lm_head"])
    _trained(peft.get_peft_model(clone(base), peft.LoraConfig(**{**CONFIG, "target_modules": ["q_proj", "lm_head"]})),
             ours)
    with torch.no_grad():
        trained = ours(input_ids=ids).logits
    ours.save_pretrained(tmp_path / "final", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    table = load_file(tmp_path / "final" / "adapter_model.safetensors")["base_model.model.lm_head.base_layer.weight"]
    assert_close(table, base.lm_head.weight, kind="same_math_max")
    for library in (fastlora, peft):
        converted = library.PeftModel.from_pretrained(clone(base), tmp_path / "final")
        with torch.no_grad():
            assert_close(converted(input_ids=ids).logits, trained, kind="same_math_max")


def test_one_adapter_at_a_time_and_a_quantized_gap_is_said(tmp_path):
    base = tiny_llama()
    ours = _guide(fastlora, base, tmp_path, "pissa", target_modules=["q_proj"])
    ours.add_adapter("other", fastlora.LoraConfig(target_modules=["v_proj"], r=4))
    with pytest.raises(ValueError, match="names one adapter's initial state"):
        ours.save_pretrained(tmp_path / "final", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    ours.save_pretrained(tmp_path / "final", selected_adapters=["default"],
                         path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    assert json.loads((tmp_path / "final" / "adapter_config.json").read_text())["r"] == 8

    base.save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = load_quantized(tmp_path / "base", load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    olora = fastlora.get_peft_model(quantized, fastlora.LoraConfig(target_modules=["q_proj"], r=4,
                                                                   init_lora_weights="olora"))
    olora.save_pretrained(tmp_path / "q" / "initial")
    with pytest.warns(UserWarning, match=r"Quant\(W_res\) \+ AB != Quant\(W\)"):
        olora.save_pretrained(tmp_path / "q" / "final", path_initial_model_for_weight_conversion=str(tmp_path / "q" / "initial"))

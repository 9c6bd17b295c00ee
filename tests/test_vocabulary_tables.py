"""A vocabulary resized before fine-tuning (new tokens for a chat template) with no embedding targeted: the
embedding tables travel with the adapter as PEFT saves them, compared with PEFT both ways: the file's keys and
bytes, and the logits of an adapter loaded onto a freshly resized base (whose new rows differ)."""

import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastlora
from tests.models import assert_unchanged, same_bytes, snapshot, tiny_llama
from tests.tolerances import assert_close

VOCAB = 136
IDS = torch.tensor([[130, 1, 135, 7, 131, 2]])
# how the adapter treats the embeddings: LoRA on projections only, or a copy of a table trained whole, or rows of it
CASES = {
    "projections": dict(target_modules=["q_proj", "v_proj"]),
    "regex": dict(target_modules=r".*\.(q_proj|v_proj)"),
    "head_saved_whole": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "both_saved_whole": dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]),
    "token_rows": dict(target_modules=["q_proj"], trainable_token_indices=[1, 130, 135]),
}


def _resized_base(directory, seed, tied):
    """The checkpoint in ``directory`` (saved once) loaded by name and resized: each seed gives the new rows other
    values, as two resizes of one checkpoint do."""
    import transformers

    if not (directory / "config.json").exists():
        tiny_llama(tie_word_embeddings=tied).save_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    torch.manual_seed(seed)
    model.resize_token_embeddings(VOCAB, mean_resizing=False)
    return model.eval()


def _trained(model, seed=5):
    """Every trainable tensor and the tables' new rows moved off their starting values, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
        for table in {id(t): t for t in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}.values():
            table[128:] = torch.randn(table[128:].shape, generator=generator)
    return model


def _saved(model, directory, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(directory, **kwargs)
    return load_file(directory / "adapter_model.safetensors"), [str(w.message) for w in caught]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_resized_vocabulary_travels_with_the_adapter_as_in_peft(tmp_path, case, tied):
    base_dir = tmp_path / "base"
    theirs = _trained(peft.get_peft_model(_resized_base(base_dir, 0, tied), peft.LoraConfig(**CASES[case])))
    theirs_file, _ = _saved(theirs, tmp_path / "theirs")
    with torch.no_grad():
        expected = theirs.eval()(input_ids=IDS).logits
        with theirs.disable_adapter():  # the frozen originals (a copied module's too) have the trained vocabulary
            expected_base = theirs(input_ids=IDS).logits

    # fastlora loads PEFT's file onto a base resized anew, and gives PEFT's logits, adapter on and off
    ours = fastlora.PeftModel.from_pretrained(_resized_base(base_dir, 1, tied), tmp_path / "theirs")
    with torch.no_grad():
        assert_close(ours(input_ids=IDS).logits, expected, kind="same_math")
        with ours.disable_adapter():
            assert_close(ours(input_ids=IDS).logits, expected_base, kind="same_math")

    # fastlora writes PEFT's file, with PEFT's warning
    ours_file, said = _saved(ours, tmp_path / "ours")
    assert any("embedding layer has been resized during finetuning" in message for message in said)
    assert ours_file.keys() == theirs_file.keys()
    for key in theirs_file:
        assert same_bytes(ours_file[key], theirs_file[key]), key

    # and PEFT loads fastlora's file onto a base resized anew, giving the same logits
    back = peft.PeftModel.from_pretrained(_resized_base(base_dir, 2, tied), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_close(back(input_ids=IDS).logits, expected, kind="same_math")


def test_a_fastlora_adapter_trained_on_a_resized_vocabulary_reloads_with_its_rows(tmp_path):
    """fastlora's own round trip: the new tokens' rows come back, the logits with them."""
    model = _trained(fastlora.get_peft_model(_resized_base(tmp_path / "base", 0, False),
                                             fastlora.LoraConfig(**CASES["projections"])))
    with torch.no_grad():
        expected = model.eval()(input_ids=IDS).logits
    saved, _ = _saved(model, tmp_path / "adapter")
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= saved.keys()
    fresh = _resized_base(tmp_path / "base", 1, False)
    assert not torch.equal(fresh.get_input_embeddings().weight[128:], model.get_input_embeddings().weight[128:])
    loaded = fastlora.PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert_close(loaded(input_ids=IDS).logits, expected, kind="same_math")


def test_the_tables_are_saved_only_where_the_vocabulary_changed_or_when_asked(tmp_path):
    import transformers

    tiny_llama().save_pretrained(tmp_path / "base")
    unresized = fastlora.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                        fastlora.LoraConfig(**CASES["projections"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain, _ = _saved(unresized, tmp_path / "plain")
    assert all("lora_" in key for key in plain)
    theirs = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                 peft.LoraConfig(**CASES["projections"]))
    asked, _ = _saved(unresized, tmp_path / "asked", save_embedding_layers=True)
    theirs_asked, _ = _saved(theirs, tmp_path / "theirs", save_embedding_layers=True)
    assert asked.keys() == theirs_asked.keys() and len(asked) == len(plain) + 2
    resized = fastlora.get_peft_model(_resized_base(tmp_path / "base", 0, False),
                                      fastlora.LoraConfig(**CASES["projections"]))
    refused, _ = _saved(resized, tmp_path / "refused", save_embedding_layers=False)
    assert refused.keys() == plain.keys()


def test_a_base_whose_config_cannot_be_read_is_taken_as_not_resized_with_a_warning(tmp_path):
    model = fastlora.get_peft_model(_resized_base(tmp_path / "base", 0, False),
                                    fastlora.LoraConfig(**CASES["projections"]))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "gone")  # (get_peft_model records the base)
    saved, said = _saved(model, tmp_path / "adapter")
    assert all("lora_" in key for key in saved)
    assert any("could not read the base model's config.json" in message and "save_embedding_layers=True" in message
               for message in said)


def test_loading_onto_a_model_not_resized_says_to_resize_it_and_changes_nothing(tmp_path):
    import transformers

    model = fastlora.get_peft_model(_resized_base(tmp_path / "base", 0, False), fastlora.LoraConfig(**CASES["projections"]))
    _saved(model, tmp_path / "adapter")
    unresized = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    before = snapshot(unresized)
    with pytest.raises(ValueError, match=rf"vocabulary of {VOCAB} tokens .* this model's has 128: .*"
                                         rf"model.resize_token_embeddings\({VOCAB}\)"):
        fastlora.PeftModel.from_pretrained(unresized, tmp_path / "adapter")
    assert_unchanged(unresized, before)


def test_set_peft_model_state_dict_takes_the_tables(tmp_path):
    source = _trained(fastlora.get_peft_model(_resized_base(tmp_path / "base", 0, False),
                                              fastlora.LoraConfig(**CASES["head_saved_whole"])))
    state = fastlora.get_peft_model_state_dict(source, save_embedding_layers=True)
    target = fastlora.get_peft_model(_resized_base(tmp_path / "base", 1, False),
                                     fastlora.LoraConfig(**CASES["head_saved_whole"]))
    result = fastlora.set_peft_model_state_dict(target, state)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        assert_close(target.eval()(input_ids=IDS).logits, source.eval()(input_ids=IDS).logits, kind="same_math")


def test_targeting_only_the_head_of_a_resized_vocabulary_says_the_input_rows_stay_behind(tmp_path):
    """PEFT's rule saves only the targeted tables when target_modules names an embedding: the resized input
    embeddings' new rows are then not in the file, which is said."""
    model = fastlora.get_peft_model(_resized_base(tmp_path / "base", 0, False),
                                    fastlora.LoraConfig(target_modules=["q_proj", "lm_head"]))
    saved, said = _saved(model, tmp_path / "adapter")
    assert "base_model.model.lm_head.base_layer.weight" in saved
    assert "base_model.model.model.embed_tokens.weight" not in saved
    assert any("only the targeted embedding tables are saved" in m and "model.embed_tokens" in m for m in said)

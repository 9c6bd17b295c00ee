"""nn.Embedding targets: PEFT's lora_embedding_A / lora_embedding_B, compared with PEFT on one model: outputs,
gradients, trainable counts, files both ways (with the embedding table PEFT saves beside them), merges, a tied
output head, a resized vocabulary, a scaled embedding (Gemma's embed_scale)."""

import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fastlora
from fastlora.embedding import LoRAEmbedding
from tests.models import (assert_step_as_peft, assert_unchanged, clone, copy_lora_weights, snapshot, tiny_gpt2, tiny_llama,
                          tokens)
from tests.tolerances import assert_close

pytestmark = pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`")
CONFIG = dict(task_type="CAUSAL_LM", target_modules=["embed_tokens", "q_proj"], r=4, lora_alpha=8,
              init_lora_weights=False)


def _pair(base=None, **changes):
    base = base if base is not None else tiny_llama()
    theirs = peft.get_peft_model(clone(base), peft.LoraConfig(**{**CONFIG, **changes}))
    ours = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(**{**CONFIG, **changes}))
    copy_lora_weights(theirs, ours)
    return base, theirs, ours


def test_outputs_gradients_and_counts_as_peft():
    _, theirs, ours = _pair()
    embed = ours.base_model.model.model.embed_tokens
    assert isinstance(embed, LoRAEmbedding) and embed.lora_A.shape == (4, 128) and embed.lora_B.shape == (64, 4)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert_step_as_peft(theirs, ours, tokens())

def test_default_initialisation_and_no_dropout():
    """PEFT's: A = 0 and B normal, so the model starts at the base; lora_dropout does not apply to an id lookup."""
    model = fastlora.get_peft_model(tiny_llama(), fastlora.LoraConfig(target_modules=["embed_tokens"],
                                                                       lora_dropout=0.5))
    embed = model.base_model.model.model.embed_tokens
    assert torch.equal(embed.lora_A, torch.zeros_like(embed.lora_A)) and embed.lora_B.std() > 0.5
    with torch.no_grad():
        embed.lora_A.normal_()
    model.train()
    ids = tokens()
    assert torch.equal(embed(ids), embed(ids))  # no dropout mask in training


def _assert_files_both_ways(tmp_path, base, theirs, ours, table_key):
    """Both models saved: the same file keys, the table among them; each file loads into the other library with
    fastlora's outputs.  Returns those outputs."""
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    files = {n: load_file(tmp_path / n / "adapter_model.safetensors") for n in ("ours", "theirs")}
    assert files["ours"].keys() == files["theirs"].keys()
    assert table_key in files["ours"]
    expected = ours(input_ids=tokens()).logits
    for model in (peft.PeftModel.from_pretrained(clone(base), tmp_path / "ours"),
                  fastlora.PeftModel.from_pretrained(clone(base), tmp_path / "theirs")):
        assert_close(model(input_ids=tokens()).logits, expected, kind="same_math")
    return expected


def test_files_both_ways_with_the_embedding_table(tmp_path):
    base, theirs, ours = _pair()
    expected = _assert_files_both_ways(tmp_path, base, theirs, ours, "base_model.model.model.embed_tokens.base_layer.weight")
    ids = tokens()
    ours.save_pretrained(tmp_path / "no-table", save_embedding_layers=False)
    assert "base_model.model.model.embed_tokens.base_layer.weight" not in load_file(
        tmp_path / "no-table" / "adapter_model.safetensors")
    reloaded = fastlora.PeftModel.from_pretrained(clone(base), tmp_path / "no-table")
    assert_close(reloaded(input_ids=ids).logits, expected, kind="same_math")


@pytest.mark.parametrize("tied", [False, True])
def test_merge_unmerge_and_unload_as_peft(tied):
    base, theirs, ours = _pair(tiny_llama(tie_word_embeddings=tied))
    ids = tokens()
    expected = ours(input_ids=ids).logits
    table = ours.base_model.model.model.embed_tokens.weight
    before = table.detach().clone()
    ours.merge_adapter()
    theirs.merge_adapter()
    if not tied:  # tied, the merge changes the output head too (the shared table), in PEFT as here
        assert_close(ours(input_ids=ids).logits, expected, kind="same_math_cancelling")
    assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, kind="same_math")
    ours.unmerge_adapter()
    theirs.unmerge_adapter()
    assert_close(table, before, kind="roundoff")
    merged_ours, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    assert type(merged_ours.model.embed_tokens) is nn.Embedding
    assert_close(merged_ours.model.embed_tokens.weight, merged_theirs.model.embed_tokens.weight, kind="roundoff")
    assert (merged_ours.lm_head.weight is merged_ours.model.embed_tokens.weight) == tied
    assert_close(merged_ours(input_ids=ids).logits, merged_theirs(input_ids=ids).logits, kind="same_math")


def test_a_resized_vocabulary_travels_with_the_table(tmp_path):
    """resize_token_embeddings before get_peft_model: the adapter has the new size, and the saved table (new rows
    included) loads onto a fresh model resized the same way, for PEFT as for fastlora."""
    base = tiny_llama()
    base.resize_token_embeddings(136)
    _, theirs, ours = _pair(base)
    assert ours.base_model.model.model.embed_tokens.lora_A.shape == (4, 136)
    ids = torch.tensor([[130, 1, 135, 7]])
    expected = ours(input_ids=ids).logits
    assert_close(expected, theirs(input_ids=ids).logits, kind="same_math")
    ours.save_pretrained(tmp_path)
    fresh = tiny_llama()
    fresh.resize_token_embeddings(136)
    for model in (peft.PeftModel.from_pretrained(clone(fresh), tmp_path),
                  fastlora.PeftModel.from_pretrained(clone(fresh), tmp_path)):
        assert_close(model(input_ids=ids).logits, expected, kind="same_math")


class _ScaledEmbedding(nn.Embedding):
    """An embedding whose output is scaled, as Gemma's: the LoRA update is scaled the same way."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.embed_scale = 8.0

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale


class _Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = _ScaledEmbedding(20, 6, padding_idx=0)

    def forward(self, ids):
        return self.embed(ids)


def test_a_scaled_embedding_scales_the_update_as_peft():
    torch.manual_seed(0)
    holder = _Holder()
    theirs = peft.get_peft_model(clone(holder), peft.LoraConfig(target_modules=["embed"], r=2, init_lora_weights=False))
    ours = fastlora.get_peft_model(clone(holder), fastlora.LoraConfig(target_modules=["embed"], r=2))
    copy_lora_weights(theirs, ours)
    ids = torch.tensor([[0, 3, 19, 5]])  # the padding id included
    assert_close(ours(ids), theirs(ids), kind="same_math")


def test_dora_on_an_embedding_is_refused_and_the_model_unchanged():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="use_dora=True on an embedding target"):
        fastlora.get_peft_model(model, fastlora.LoraConfig(target_modules=["embed_tokens", "q_proj"], use_dora=True))
    assert_unchanged(model, before)


def test_all_linear_leaves_embeddings_out():
    model = fastlora.get_peft_model(tiny_llama(), fastlora.LoraConfig(target_modules="all-linear"))
    assert not any(isinstance(m, LoRAEmbedding) for m in model.modules())


def test_a_targeted_linear_head_is_saved_and_loaded_as_peft(tmp_path):
    """PEFT saves the weight of a targeted output head beside the adapter (``lm_head.base_layer.weight``) and
    loads it from such a file: so does fastlora, both ways."""
    base, theirs, ours = _pair(target_modules=["q_proj", "lm_head"])
    _assert_files_both_ways(tmp_path, base, theirs, ours, "base_model.model.lm_head.base_layer.weight")


@pytest.mark.parametrize("build, targets", [(lambda: tiny_llama(tie_word_embeddings=True), ["lm_head"]),
                                            (tiny_gpt2, ["lm_head", "c_attn"])], ids=["llama tied", "gpt2"])
def test_lora_on_a_head_tied_to_the_embeddings_saves_and_loads_as_peft(build, targets, tmp_path):
    """The head's weight is the embedding table's (one parameter under two names): saving fastlora's adapter and
    loading PEFT's both find it, and the files hold PEFT's keys."""
    torch.manual_seed(0)
    base = build()
    theirs = peft.get_peft_model(clone(base), peft.LoraConfig(target_modules=targets, r=4, init_lora_weights=False))
    ours = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(target_modules=targets, r=4,
                                                                    init_lora_weights=False))
    copy_lora_weights(theirs, ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "theirs")
        ours.save_pretrained(tmp_path / "ours")
    assert load_file(tmp_path / "ours" / "adapter_model.safetensors").keys() == \
        load_file(tmp_path / "theirs" / "adapter_model.safetensors").keys()
    loaded = fastlora.PeftModel.from_pretrained(clone(base), tmp_path / "theirs")
    ids = tokens(vocab=base.config.vocab_size)
    with torch.no_grad():
        assert_close(loaded(input_ids=ids).logits, theirs.eval()(input_ids=ids).logits, kind="same_math")



def test_an_all_linear_adapter_beside_an_embedding_adapter_leaves_the_embeddings_as_peft():
    """"all-linear" never takes an embedding, adapted by another adapter or not."""
    base = tiny_llama(tie_word_embeddings=False)
    models = {}
    for lib in (peft, fastlora):
        model = lib.get_peft_model(clone(base), lib.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]))
        model.add_adapter("b1", lib.LoraConfig(r=2, target_modules="all-linear", lora_bias=True))
        models[lib] = model
    assert not any("embed_tokens" in name and "b1" in name for name, _ in models[fastlora].named_parameters())
    assert sorted(models[fastlora].peft_config["b1"].target_modules) == sorted(models[peft].peft_config["b1"].target_modules)

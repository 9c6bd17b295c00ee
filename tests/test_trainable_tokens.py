"""trainable_token_indices: only the listed rows of the embedding table train, compared with PEFT (outputs,
gradients, counts, files both ways, merges), with an untied and a tied output head."""

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastlora
from fastlora.trainable_tokens import TrainableTokensWrapper
from tests.models import assert_unchanged, clone, copy_lora_weights, snapshot, tiny_gpt2, tiny_llama
from tests.tolerances import assert_close

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ROWS = [3, 5, 7]
IDS = torch.tensor([[3, 4, 5, 7, 9, 1, 3]])


def _pair(tied, **changes):
    base = tiny_llama(tie_word_embeddings=tied)
    config = {**dict(target_modules=["q_proj"], trainable_token_indices=ROWS, init_lora_weights=False), **changes}
    theirs = peft.get_peft_model(clone(base), peft.LoraConfig(**config))
    ours = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(**config))
    copy_lora_weights(theirs, ours)
    trained = torch.randn(len(ROWS), 64, generator=torch.Generator().manual_seed(3))  # rows as if trained
    with torch.no_grad():
        theirs.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"].copy_(trained)
        ours.base_model.model.model.embed_tokens.trainable_tokens_delta_default.copy_(trained)
    return base, theirs, ours


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_as_peft(tied, tmp_path):
    base, theirs, ours = _pair(tied)
    model = ours.base_model.model
    assert isinstance(model.model.embed_tokens, TrainableTokensWrapper)
    assert isinstance(model.lm_head, TrainableTokensWrapper) == tied  # a tied head reads the same rows
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    out_theirs, out_ours = theirs(input_ids=IDS, labels=IDS), ours(input_ids=IDS, labels=IDS)
    assert_close(out_ours.logits, out_theirs.logits, kind="same_math")
    out_theirs.loss.backward()
    out_ours.loss.backward()
    assert_close(model.model.embed_tokens.trainable_tokens_delta_default.grad,
                 theirs.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"].grad,
                 kind="same_math")

    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    files = {n: load_file(tmp_path / n / "adapter_model.safetensors") for n in ("ours", "theirs")}
    assert {k: v.shape for k, v in files["ours"].items()} == {k: v.shape for k, v in files["theirs"].items()}
    for loaded in (peft.PeftModel.from_pretrained(clone(base), tmp_path / "ours"),
                   fastlora.PeftModel.from_pretrained(clone(base), tmp_path / "theirs")):
        assert_close(loaded(input_ids=IDS).logits, out_ours.logits, kind="same_math")

    merged_ours, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    assert type(merged_ours.model.embed_tokens) is torch.nn.Embedding and type(merged_ours.lm_head) is torch.nn.Linear
    assert torch.equal(merged_ours.model.embed_tokens.weight, merged_theirs.model.embed_tokens.weight)
    assert_close(merged_ours(input_ids=IDS).logits, merged_theirs(input_ids=IDS).logits, kind="same_math")


def test_only_the_listed_rows_train():
    """After optimizer steps the table itself is bitwise unchanged and the model's effective table differs from
    it only in the listed rows."""
    _, _, ours = _pair(tied=False)
    wrapper = ours.base_model.model.model.embed_tokens
    table = wrapper.base_layer.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        ours(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(wrapper.base_layer.weight, table)
    effective = wrapper.weight_with_rows(["default"]).detach()
    changed = (effective != table).any(dim=1).nonzero().flatten().tolist()
    assert changed == ROWS


def test_merge_unmerge_and_disable():
    _, _, ours = _pair(tied=True)
    before = ours(input_ids=IDS).logits
    wrapper = ours.base_model.model.model.embed_tokens
    table = wrapper.base_layer.weight.detach().clone()
    ours.merge_adapter()
    assert_close(ours(input_ids=IDS).logits, before, kind="same_math")
    ours.unmerge_adapter()
    assert torch.equal(wrapper.base_layer.weight, table)
    with ours.disable_adapter():
        assert_close(ours(input_ids=IDS).logits, ours.get_base_model().lm_head.base_layer(
            ours.get_base_model().model(input_ids=IDS).last_hidden_state), kind="same_math")


def test_a_dict_names_the_module():
    _, theirs, ours = _pair(tied=False, trainable_token_indices={"embed_tokens": ROWS})
    assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, kind="same_math")


@pytest.mark.parametrize("tokens, error, match", [
    ([3, 128], ValueError, r"token ids \[128\] are outside its 128 rows"),
    ({"nope": [1]}, ValueError, "matches no module"),
    ({"q_proj": [1]}, TypeError, "must be an embedding table"),
])
def test_bad_indices_are_refused_and_change_nothing(tokens, error, match):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        fastlora.get_peft_model(model, fastlora.LoraConfig(target_modules=["q_proj"], trainable_token_indices=tokens))
    assert_unchanged(model, before)


@pytest.mark.parametrize("second", [False, True], ids=["one adapter", "an adapter after another"])
def test_a_tied_head_with_a_lora_adapter_is_refused_with_the_model_unchanged(second):
    """The head of a tied model reads the table's trained rows; a LoRA adapter on it too (PEFT adds it on top of
    the rows) is not something fastlora's layers combine: refused, rather than the head's adapter lost."""
    model = tiny_llama(tie_word_embeddings=True)
    head_config = fastlora.LoraConfig(target_modules=["q_proj", "lm_head"])
    if second:
        model = fastlora.get_peft_model(model, head_config)
    before = snapshot(model)
    with pytest.raises(fastlora.UnsupportedFeatureError, match="lm_head has a LoRA adapter.*Leave lm_head out"):
        if second:
            model.add_adapter("tokens", fastlora.LoraConfig(target_modules=["q_proj"], trainable_token_indices=ROWS))
        else:
            fastlora.get_peft_model(model, fastlora.LoraConfig(target_modules=["q_proj", "lm_head"],
                                                               trainable_token_indices=ROWS))
    assert_unchanged(model, before)


@pytest.mark.parametrize("autocast", [True, False])
def test_rows_beside_a_bf16_table_are_held_as_peft_holds_them(autocast, tmp_path):
    """autocast_adapter_dtype=True (the default) holds the trained rows of a bf16 table in float32, as PEFT does
    (small updates are not rounded away), written into the table in bf16; False keeps them bf16.  The saved file
    has PEFT's dtype."""
    models = {}
    for library in (peft, fastlora):
        model = library.get_peft_model(tiny_llama().to(torch.bfloat16), library.LoraConfig(
            target_modules=["q_proj"], r=4, trainable_token_indices=ROWS), autocast_adapter_dtype=autocast)
        models[library.__name__] = model
        model.save_pretrained(tmp_path / library.__name__)
    deltas = {name: next(p for n, p in model.named_parameters() if "trainable_tokens_delta" in n)
              for name, model in models.items()}
    assert deltas["fastlora"].dtype == deltas["peft"].dtype == (torch.float32 if autocast else torch.bfloat16)
    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    assert load_file(tmp_path / "fastlora" / "adapter_model.safetensors")[key].dtype == \
        load_file(tmp_path / "peft" / "adapter_model.safetensors")[key].dtype
    with torch.no_grad():
        deltas["peft"].add_(1e-3)  # below bf16's resolution at these magnitudes, kept in float32
        deltas["fastlora"].copy_(deltas["peft"])
        assert_close(models["fastlora"](input_ids=IDS).logits, models["peft"](input_ids=IDS).logits,
                     kind="same_math")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_wrapped_tables_weight_is_peft_s(tied):
    """Scripts read ``model.get_input_embeddings().weight`` (and the tied head's): PEFT's wrapper gives the table with
    the trained rows in place while the adapter applies, the base table when disabled; so does fastlora's, and the
    table's own attributes (num_embeddings, ...) read through."""
    base = tiny_llama(tie_word_embeddings=tied)
    config = dict(target_modules=["q_proj"], r=4, trainable_token_indices=[3, 7])
    theirs = peft.get_peft_model(clone(base), peft.LoraConfig(**config))
    ours = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(**config))
    with torch.no_grad():
        theirs.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"].add_(1.0)
        ours.base_model.model.model.embed_tokens.delta("default").add_(1.0)
    getters = ["get_input_embeddings"] + (["get_output_embeddings"] if tied else [])
    for getter in getters:
        ours_weight, their_weight = getattr(ours, getter)().weight, getattr(theirs, getter)().weight
        assert torch.equal(ours_weight, their_weight) and not torch.equal(ours_weight, base.model.embed_tokens.weight)
        with ours.disable_adapter(), theirs.disable_adapter():
            assert torch.equal(getattr(ours, getter)().weight, getattr(theirs, getter)().weight)
            assert torch.equal(getattr(ours, getter)().weight, base.model.embed_tokens.weight)
    assert ours.get_input_embeddings().num_embeddings == 128


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_a_mixed_batch_reads_each_rows_adapter_tokens_as_peft(tied):
    """adapter_names=[...] with two adapters' trained rows (and "__base__" rows): each batch row reads its adapter's
    rows, as PEFT's mixed batch computes it; each adapter's rows get gradient from its own batch rows only."""
    base = tiny_llama(tie_word_embeddings=tied)
    theirs = peft.get_peft_model(clone(base), peft.LoraConfig(target_modules=["q_proj"], r=4,
                                                              trainable_token_indices=[3, 7]))
    ours = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(target_modules=["q_proj"], r=4,
                                                                    trainable_token_indices=[3, 7]))
    for model in (theirs, ours):
        model.add_adapter("b", type(model.peft_config["default"])(target_modules=["q_proj"], r=4,
                                                                  trainable_token_indices=[5, 9]))
    copy_lora_weights(theirs, ours)
    with torch.no_grad():
        for name, shift in (("default", 1.0), ("b", -0.5)):
            theirs.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta[name].add_(shift)
            ours.base_model.model.model.embed_tokens.delta(name).add_(shift)
    ids = torch.tensor([[3, 5, 7, 9, 1], [9, 7, 5, 3, 2], [3, 9, 4, 5, 7]])
    names = ["default", "b", "__base__"]
    theirs.eval(), ours.eval()  # PEFT takes adapter_names in eval mode only (its gradients are computed all the same)
    got = ours(input_ids=ids, adapter_names=names).logits
    expected = theirs(input_ids=ids, adapter_names=names).logits
    assert_close(got, expected, kind="same_math")
    got.square().sum().backward()
    expected.square().sum().backward()
    for name in ("default", "b"):
        their_grad = theirs.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta[name].grad
        our_grad = ours.base_model.model.model.embed_tokens.delta(name).grad
        if their_grad is None:
            assert our_grad is None or not our_grad.any()
        else:
            assert_close(our_grad, their_grad, kind="same_math_max")
    with torch.no_grad():  # one row per adapter, each as a forward with that adapter alone
        for row, name in enumerate(names):
            ours.base_model.set_adapter("default" if name == "__base__" else name)
            context = ours.disable_adapter() if name == "__base__" else torch.no_grad()
            with context:
                alone = ours(input_ids=ids[row:row + 1]).logits
            assert_close(got[row:row + 1].detach(), alone, kind="same_math")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_all_linear_after_token_rows_leaves_the_head_alone_as_peft(tied):
    """"all-linear" adapts every Linear but the output head, also where trainable token rows wrap the head."""
    def adapted(library, model):
        model = library.get_peft_model(model, library.LoraConfig(target_modules=["q_proj"],
                                                                 trainable_token_indices={"lm_head": ROWS}))
        model.add_adapter("second", library.LoraConfig(target_modules="all-linear"))
        return sorted(name for name, _ in model.named_parameters() if "second" in name and ".lora_A" in name)

    ours, theirs = adapted(fastlora, tiny_llama(tie_word_embeddings=tied)), adapted(peft, tiny_llama(tie_word_embeddings=tied))
    assert len(ours) == len(theirs) == 14 and not any("lm_head" in name for name in ours)


def test_rows_merged_while_the_layers_are_disabled_are_taken_out_by_the_next_forward_as_peft():
    base = tiny_llama()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    for lib in (peft, fastlora):
        model = lib.get_peft_model(clone(base), lib.LoraConfig(target_modules=["q_proj"], init_lora_weights=False,
                                                               trainable_token_indices=[1, 2, 3, 5, 7, 9, 11]))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "trainable_tokens_delta" in name:
                    param.add_(1.0)
            model.eval().disable_adapter_layers()
            model.merge_adapter()
            assert_close(model(input_ids=ids).logits, expected, kind="same_math", msg=lib.__name__)


@pytest.mark.parametrize("build, settings", [
    (lambda: tiny_llama(tie_word_embeddings=False), dict(modules_to_save=["embed_tokens"], trainable_token_indices=[1, 2])),
    (lambda: tiny_llama(tie_word_embeddings=True), dict(modules_to_save=["embed_tokens"], trainable_token_indices=[1, 2])),
    (tiny_gpt2, dict(modules_to_save=["lm_head"], trainable_token_indices=[4])),  # the head reads the wte rows
    (tiny_gpt2, dict(modules_to_save=["wte"], trainable_token_indices=[4])),
], ids=["untied table", "tied table", "tied head", "GPT-2 table"])
def test_rows_of_a_table_modules_to_save_trains_whole_are_refused(build, settings):
    """PEFT takes such a config and then fails in every forward; fastlora dropped the copy and wrote a file it could
    not load: refused, the model unchanged."""
    model = build()
    before = snapshot(model)
    target = "c_attn" if hasattr(model, "transformer") else "q_proj"
    with pytest.raises(ValueError, match="also trains whole.*: train the whole table"):
        fastlora.get_peft_model(model, fastlora.LoraConfig(target_modules=[target], **settings))
    assert_unchanged(model, before)


@pytest.mark.parametrize("tied", [False, True])
def test_an_adapter_saving_whole_a_table_whose_rows_another_adapter_trains_is_refused(tied):
    """Its copy would carry the other adapter's rows, and the other adapter's file could no longer be written
    (PEFT takes the adapter and then fails to save): refused, the model unchanged."""
    model = fastlora.get_peft_model(tiny_llama(tie_word_embeddings=tied),
                                    fastlora.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[7]))
    before = snapshot(model)
    with pytest.raises(ValueError, match="modules_to_save module 'model.embed_tokens' holds another adapter's layers"):
        model.add_adapter("a2", fastlora.LoraConfig(target_modules=["v_proj"], modules_to_save=["embed_tokens"]))
    assert_unchanged(model, before)
    assert list(model.peft_config) == ["default"]
    fastlora.get_peft_model_state_dict(model)  # the rows' adapter still saves

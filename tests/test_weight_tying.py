"""ensure_weight_tying: a head tied to the input embeddings (tie_word_embeddings) keeps sharing what the adapter
trains there, compared with PEFT: the rewritten config, the initial factors, the trainable counts, three AdamW steps,
the saved file (and each library loading the other's), the warnings; then what fastlora adds: the storage shared
through training, dtype casts and copies, and a merge that adds the tied update once (PEFT's adds it twice)."""

import copy
import json
import pickle
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastlora
from tests.models import PEFT_BEFORE_0_22, assert_unchanged, snapshot, tiny_gpt2, tiny_llama, tokens
from tests.tolerances import assert_close

IDS = tokens()
CASES = {
    "both_saved_whole": dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]),
    "head_saved_whole": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "both_adapted": dict(target_modules=["q_proj", "embed_tokens", "lm_head"]),
    "head_adapted": dict(target_modules=["q_proj", "lm_head"]),
    "embeddings_adapted": dict(target_modules=["q_proj", "embed_tokens"]),
    "regex": dict(target_modules=r".*\.(q_proj)|lm_head"),
    "gaussian": dict(target_modules=["q_proj", "lm_head"], init_lora_weights="gaussian"),
    "random": dict(target_modules=["q_proj", "lm_head"], init_lora_weights=False),
}
ADAPTED = [name for name, case in CASES.items() if "modules_to_save" not in case]


def _pair(case, **extra):
    """(PEFT's model, fastlora's), each from the same seed with ``ensure_weight_tying=True``."""
    models = []
    for lib in (peft, fastlora):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = lib.LoraConfig(ensure_weight_tying=True, **copy.deepcopy({**CASES[case], **extra}))
            torch.manual_seed(3)
            models.append(lib.get_peft_model(tiny_llama(tie_word_embeddings=True), config))
    return models


def _steps(model, count=3):
    """``count`` AdamW steps on IDS (dropout 0); the losses."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(count):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _embedding_and_head(model):
    inner = model.base_model.model
    return inner.model.embed_tokens, inner.lm_head


@pytest.mark.parametrize("case", CASES)
def test_a_tied_adapter_trains_saves_and_loads_as_peft(case, tmp_path):
    theirs, ours = _pair(case)
    theirs_config, ours_config = theirs.peft_config["default"], ours.peft_config["default"]
    for field in ("target_modules", "modules_to_save"):
        value = getattr(theirs_config, field)
        assert (set(value) if isinstance(value, (set, list)) else value) == \
            (set(getattr(ours_config, field)) if isinstance(value, (set, list)) else getattr(ours_config, field)), field
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    if case in ADAPTED:  # the shared factors start as PEFT's, drawn where PEFT draws them
        embedding, head = _embedding_and_head(ours)
        prefix = "base_model.model."
        named = dict(theirs.named_parameters(remove_duplicate=False))
        assert torch.equal(head.lora_A_default, named[prefix + "lm_head.lora_A.default.weight"])
        assert torch.equal(embedding.lora_B_default, named[prefix + "model.embed_tokens.lora_embedding_B.default"])
        assert torch.equal(embedding.lora_A_default, named[prefix + "model.embed_tokens.lora_embedding_A.default"])
    for a, b in zip(_steps(ours), _steps(theirs)):
        assert_close(a, b, kind="same_math")
    logits = _logits(theirs)
    assert_close(_logits(ours), logits, kind="same_math")

    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    ours_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs_file = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert sorted(ours_file) == sorted(theirs_file)
    for key, value in theirs_file.items():
        assert_close(ours_file[key], value, kind="same_math", msg=key)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["ensure_weight_tying"] is True
    for lib, directory in ((peft, tmp_path / "ours"), (fastlora, tmp_path / "theirs")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = lib.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), directory)
        assert_close(_logits(loaded), logits, kind="same_math", msg=f"{lib.__name__} loading the other's file")


def test_a_file_saving_the_tied_embeddings_beside_norm_loads_in_both_libraries(tmp_path):
    """The head saved with the embeddings it is tied to is in the file under either rule PEFT has matched
    ``"norm"`` by (model.norm alone since 0.22; each layer's norms too in 0.21), so it says nothing of which rule
    wrote the file: each file, fastlora's and PEFT's, loads in both libraries as it was saved."""
    models = _pair("both_saved_whole", modules_to_save=["embed_tokens", "norm"])
    for model, name in zip(models, ("peft", "fastlora")):
        _steps(model)
        model.save_pretrained(tmp_path / name)
    for saver, name in zip(models, ("peft", "fastlora")):
        for lib in (peft, fastlora):
            if lib is peft and name == "fastlora" and PEFT_BEFORE_0_22:
                continue  # PEFT 0.21 wants each layer's norms in any file naming "norm" (KeyError): PEFT 0.22's rule
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = lib.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), tmp_path / name)
            assert_close(_logits(loaded), _logits(saver), kind="same_math", msg=f"{lib.__name__} loading {name}'s")


@pytest.mark.parametrize("case", ADAPTED)
def test_the_head_shares_the_embeddings_factors_through_training_casts_and_copies(case):
    _, ours = _pair(case)
    _steps(ours)

    def assert_shared(model):
        embedding, head = _embedding_and_head(model)
        A, B = head.lora_factors("default")
        emb_A, emb_B = embedding.lora_factors("default")
        assert A.data_ptr() == emb_B.data_ptr() and B.data_ptr() == emb_A.data_ptr()
        assert torch.equal(A, emb_B.t()) and torch.equal(B, emb_A.t())

    assert_shared(ours)
    ours.double()
    assert_shared(ours)
    assert ours.lm_head.lora_A_default.dtype == torch.float64
    ours.get_base_model().float()  # a cast of the model inside reshares them too
    assert_shared(ours)
    assert_shared(copy.deepcopy(ours))
    assert_shared(pickle.loads(pickle.dumps(ours)))


def test_a_merge_adds_the_tied_update_to_the_shared_table_once():
    _, ours = _pair("head_adapted")
    _steps(ours)  # an update that moves the logits by about 0.1
    embedding, head = _embedding_and_head(ours)
    table = embedding.weight.detach().clone()
    logits = _logits(ours)
    head.merge()  # the head's merge is its owner's: the table gets the update once
    assert embedding.merged_adapters == ["default"] and head.merged
    assert_close(_logits(ours), logits, kind="same_math")
    embedding.unmerge()
    assert not head.merged
    assert_close(embedding.weight, table, kind="roundoff")
    assert_close(_logits(ours), logits, kind="same_math")
    head.merge()
    head.unmerge()  # unmerges the owner too: the table is the head's
    assert not embedding.merged_adapters and not head.merged
    assert_close(embedding.weight, table, kind="roundoff")
    ours.merge_adapter()
    assert {s.name: s.merged_adapters for s in ours.get_layer_status()}["model.lm_head"] == ["default"]
    ours.unmerge_adapter()
    assert_close(embedding.weight, table, kind="roundoff")
    merged = ours.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert_close(_logits(merged), logits, kind="same_math")


def test_a_second_tied_adapter_is_tied_too(tmp_path):
    """PEFT's add_adapter leaves the head out of a second tied adapter (the embeddings get their update, the head
    none); fastlora ties it as the first, and PEFT loading that adapter on its own computes the same logits."""
    _, ours = _pair("head_adapted")
    torch.manual_seed(5)
    ours.add_adapter("second", fastlora.LoraConfig(ensure_weight_tying=True, target_modules=["q_proj", "lm_head"], r=4,
                                                   lora_alpha=8, init_lora_weights=False))
    ours.set_adapter("second")
    embedding, head = _embedding_and_head(ours)
    assert head.lora_factors("second")[0].data_ptr() == embedding.lora_factors("second")[1].data_ptr()
    assert head.lora_factors("default")[0].data_ptr() == embedding.lora_factors("default")[1].data_ptr()
    ours.save_pretrained(tmp_path, selected_adapters=["second"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), tmp_path / "second")
    assert_close(_logits(ours), _logits(theirs), kind="same_math")


def test_an_entry_naming_wte_ties_nothing_as_in_peft():
    """PEFT's rule ties where an entry names embed_tokens or lm_head (GPT-2's wte alone leaves the head untied)."""
    config = dict(target_modules=["c_attn", "wte"], ensure_weight_tying=True, init_lora_weights=False)
    logits = []
    for lib in (peft, fastlora):
        torch.manual_seed(3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(tiny_gpt2(), lib.LoraConfig(**copy.deepcopy(config)))
        logits.append(model(input_ids=tokens(vocab=64)).logits)
    assert not isinstance(model.base_model.model.lm_head, fastlora.LoRALinear)
    assert_close(logits[1], logits[0], kind="same_math")


def test_a_gpt2_head_tied_to_wte_is_tied_and_reloads_tied(tmp_path):
    """GPT-2's head named in target_modules: the embeddings are found as wte, and a saved adapter reloads tied
    (PEFT's rule, reading the saved ``transformer.wte``, reloads it untied)."""
    config = dict(target_modules=["c_attn", "lm_head"], ensure_weight_tying=True, init_lora_weights=False)
    torch.manual_seed(3)
    ours = fastlora.get_peft_model(tiny_gpt2(), fastlora.LoraConfig(**config))
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(**config))
    ids = tokens(vocab=64)
    assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, kind="same_math")
    inner = ours.base_model.model
    assert inner.lm_head.lora_A_default.data_ptr() == inner.transformer.wte.lora_B_default.data_ptr()
    ours.save_pretrained(tmp_path)
    loaded = fastlora.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    inner = loaded.base_model.model
    assert inner.lm_head.lora_A_default.data_ptr() == inner.transformer.wte.lora_B_default.data_ptr()
    assert_close(loaded(input_ids=ids).logits, ours(input_ids=ids).logits, kind="same_math")


TOKEN_CASES = {
    "same_rows": (True, {"embed_tokens": [1, 2], "lm_head": [1, 2]}),
    "other_rows": (True, {"embed_tokens": [1, 2], "lm_head": [3]}),
    "head_rows": (True, {"lm_head": [1, 2]}),
    "untied_head_rows": (False, {"lm_head": [1, 2]}),
}


@pytest.mark.parametrize("case", TOKEN_CASES)
def test_token_rows_of_a_tied_head_as_peft(case, tmp_path):
    """A head listed with the embeddings' rows shares them, with other rows trains its own (PEFT's rule)."""
    tied, rows = TOKEN_CASES[case]
    models = []
    for lib in (peft, fastlora):
        torch.manual_seed(3)
        model = lib.get_peft_model(tiny_llama(tie_word_embeddings=tied),
                                   lib.LoraConfig(target_modules=["q_proj"], trainable_token_indices=copy.deepcopy(rows)))
        with torch.no_grad():
            torch.manual_seed(4)
            for name, param in model.named_parameters():
                if "trainable_tokens_delta" in name:
                    param.add_(torch.randn_like(param))
        models.append(model)
    theirs, ours = models
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    for a, b in zip(_steps(ours, 2), _steps(theirs, 2)):
        assert_close(a, b, kind="same_math")
    assert_close(_logits(ours), _logits(theirs), kind="same_math")
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    assert sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == \
        sorted(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    loaded = fastlora.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=tied), tmp_path / "theirs")
    assert_close(_logits(loaded), _logits(theirs), kind="same_math")


def _messages(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return {str(w.message) for w in caught if "tie" in str(w.message) or "tied" in str(w.message)}


@pytest.mark.parametrize("tied, ensure, options", [
    (True, False, dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    (True, False, dict(target_modules=["q_proj", "embed_tokens"])),
    (False, True, dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    (False, True, dict(target_modules=["q_proj"], trainable_token_indices=[1, 2])),
    (True, True, dict(target_modules=["q_proj"])),
])
def test_the_warnings_are_peft_s(tied, ensure, options):
    """A tied module adapted without the flag; the flag on a model without tied weights, or tying nothing."""
    said = [_messages(lambda lib=lib: lib.get_peft_model(tiny_llama(tie_word_embeddings=tied), lib.LoraConfig(
        ensure_weight_tying=ensure, **copy.deepcopy(options)))) for lib in (peft, fastlora)]
    assert said[0] and said[1] == said[0]


@pytest.mark.parametrize("options, error, match", [
    (dict(target_modules=["q_proj", "lm_head"], init_lora_weights="pissa"), ValueError, "starts from drawn factors"),
    (dict(target_modules=["q_proj", "lm_head"], modules_to_save=["embed_tokens"]), ValueError,
     "cannot also take an adapter"),
    (dict(target_modules=["q_proj", "lm_head"], rank_pattern={"lm_head": 4}), ValueError, "same r and lora_alpha"),
    (dict(target_modules=["q_proj", "lm_head"], alpha_pattern={"embed_tokens": 2}), ValueError, "same r and"),
    (dict(target_modules=["q_proj", "lm_head"], exclude_modules=["embed_tokens"]), ValueError, "does not adapt"),
    (dict(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1], "lm_head": [2]}), ValueError,
     "Cannot ensure weight tying"),
])
def test_a_tie_that_cannot_hold_is_refused_with_the_model_unchanged(options, error, match):
    model = tiny_llama(tie_word_embeddings=True)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=match):
            fastlora.get_peft_model(model, fastlora.LoraConfig(ensure_weight_tying=True, **options))
    assert_unchanged(model, before)
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("case", ["head_adapted", "head_saved_whole"])
def test_a_tied_head_on_a_4bit_model_trains_as_peft(case, tmp_path):
    """QLoRA on a model with tied embeddings (transformers keeps the head and the embeddings unquantized)."""
    pytest.importorskip("bitsandbytes")
    from tests.models import load_quantized

    tiny_llama(tie_word_embeddings=True).save_pretrained(tmp_path)
    losses = []
    for lib in (peft, fastlora):
        model = lib.prepare_model_for_kbit_training(load_quantized(tmp_path, load_in_4bit=True,
                                                                   bnb_4bit_compute_dtype=torch.float32))
        assert model.lm_head.weight is model.model.embed_tokens.weight
        torch.manual_seed(3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(model, lib.LoraConfig(ensure_weight_tying=True, **copy.deepcopy(CASES[case])))
        losses.append(_steps(model))
    for ours, theirs in zip(losses[1], losses[0]):
        assert_close(ours, theirs, kind="same_math")


def test_peft_s_second_tied_adapter_file_and_a_file_not_trained_tied(tmp_path):
    """PEFT saves a second tied adapter without the head's factors: it loads, the head tied (as PEFT loads it).  A
    file whose head factors are not the embeddings' transposed (PEFT's, from a 16-bit base) loads untied, as it was
    trained, with a warning; into an existing tied adapter it is refused with the model unchanged."""
    options = dict(target_modules=["q_proj", "lm_head"], ensure_weight_tying=True, init_lora_weights=False)
    theirs = peft.get_peft_model(tiny_llama(tie_word_embeddings=True), peft.LoraConfig(**copy.deepcopy(options)))
    theirs.add_adapter("second", peft.LoraConfig(**copy.deepcopy(options)))
    theirs.save_pretrained(tmp_path)
    assert not any("lm_head" in key for key in load_file(tmp_path / "second" / "adapter_model.safetensors"))
    reference = peft.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), tmp_path / "second")
    ours = fastlora.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), tmp_path / "second")
    assert_close(_logits(ours), _logits(reference), kind="same_math")

    untied = fastlora.get_peft_model(tiny_llama(tie_word_embeddings=True), fastlora.LoraConfig(
        target_modules=["q_proj", "embed_tokens", "lm_head"], init_lora_weights=False))
    untied.peft_config["default"].ensure_weight_tying = True  # a file that says tied, whose factors are not
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        untied.save_pretrained(tmp_path / "untied")
    with pytest.warns(UserWarning, match="loaded as adapters of their own, untied"):
        loaded = fastlora.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), tmp_path / "untied")
    assert_close(_logits(loaded), _logits(untied), kind="same_math")
    _, tied = _pair("both_adapted", init_lora_weights=False)
    before = snapshot(tied)
    with pytest.raises(ValueError, match="is not the transpose of"):
        tied.load_adapter(tmp_path / "untied", "default")
    assert_unchanged(tied, before)


def test_a_weighted_combination_of_a_tied_adapter_is_the_embeddings_shared_with_the_head():
    _, ours = _pair("random")
    ours.add_adapter("table", fastlora.LoraConfig(target_modules=["embed_tokens"], init_lora_weights=False))
    ours.add_weighted_adapter(["default", "table"], [1.0, -0.5], "combined", combination_type="cat")
    embedding, head = _embedding_and_head(ours)
    expected = embedding.delta_weight("default") - 0.5 * embedding.delta_weight("table")
    assert_close(embedding.delta_weight("combined"), expected, kind="same_math")
    assert head.lora_factors("combined")[0].data_ptr() == embedding.lora_factors("combined")[1].data_ptr()


def test_an_encoder_decoder_s_embedding_tables_keep_adapters_of_their_own_as_in_peft():
    """BART's encoder and decoder tables compute with the shared one: PEFT adapts them on their own and ties the
    head to the shared table's adapter; so does fastlora."""
    from transformers import BartConfig, BartForConditionalGeneration

    outputs, names = [], []
    for lib in (peft, fastlora):
        torch.manual_seed(0)
        bart = BartForConditionalGeneration(BartConfig(
            vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)).eval()
        torch.manual_seed(3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(bart, lib.LoraConfig(target_modules=["q_proj", "lm_head"],
                                                            ensure_weight_tying=True, init_lora_weights=False))
        names.append(sorted({n.split(".lora")[0] for n, _ in model.named_parameters() if ".lora" in n}))
        with torch.no_grad():
            outputs.append(model(input_ids=tokens(vocab=64), decoder_input_ids=tokens(vocab=64, seed=2)).logits)
    assert names[1] == names[0]
    assert_close(outputs[1], outputs[0], kind="same_math")
    inner = model.base_model.model
    assert inner.lm_head.lora_A_default.data_ptr() == inner.model.shared.lora_B_default.data_ptr()


@pytest.mark.parametrize("variants", [{}, {"base": "fused", "low_rank": "epilogue"}])
def test_the_kernels_read_a_tied_head_s_transposed_factors(variants):
    """A tied head's factors are transposed views of the embeddings' (last stride r, not 1): the Triton kernels
    (under the interpreter here) give the outputs and gradients they give with contiguous copies, dropout included."""
    from fastlora import schedules

    torch.manual_seed(0)
    x = torch.randn(9, 16)
    table_B, table_A = torch.randn(16, 4), torch.randn(4, 12)  # an embedding's B (dim × r) and A (r × vocab)
    results = []
    for transposed in (True, False):
        layer = fastlora.LoRALinear(16, 12, r=4, lora_alpha=8, lora_dropout=0.25, backend="triton").train()
        with torch.no_grad():
            layer.weight.copy_(torch.randn(12, 16, generator=torch.Generator().manual_seed(1)))
            layer.bias.copy_(torch.randn(12, generator=torch.Generator().manual_seed(2)))
        A = table_B.clone().t() if transposed else table_B.t().contiguous()
        B = table_A.clone().t() if transposed else table_A.t().contiguous()
        layer.lora_A_default, layer.lora_B_default = torch.nn.Parameter(A), torch.nn.Parameter(B)
        assert layer.lora_A_default.is_contiguous() != transposed
        inputs = x.clone().requires_grad_()
        torch.manual_seed(7)  # the same dropout seed for both
        with schedules.use_kernel_variants(**variants):
            layer(inputs).square().sum().backward()
            torch.manual_seed(7)
            y = layer(x)
        results.append((y, inputs.grad, layer.lora_A_default.grad, layer.lora_B_default.grad))
    for got, expected in zip(*results):
        assert_close(got, expected, kind="same_math")


@pytest.mark.parametrize("case", CASES)
def test_the_random_generator_goes_on_as_after_peft_s(case):
    """What follows the adapter's creation (dropout masks, noise a script adds) draws PEFT's numbers."""
    states = []
    for lib in (peft, fastlora):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = lib.LoraConfig(ensure_weight_tying=True, **copy.deepcopy(CASES[case]))
            torch.manual_seed(3)
            lib.get_peft_model(tiny_llama(tie_word_embeddings=True), config)
        states.append(torch.get_rng_state())
    assert torch.equal(states[0], states[1])

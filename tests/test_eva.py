"""EVA: get_eva_state_dict / initialize_lora_eva_weights compared with PEFT's from the same seed and batches (A, B,
the new ranks, alphas and target_modules, the generator's state afterwards), the files both ways, the incremental
PCA against a full one, and the refusals (the model unchanged, no hook left behind)."""

import warnings

import peft
import pytest
import torch

import fastlora
from fastlora import EvaConfig, get_eva_state_dict, initialize_lora_eva_weights
from fastlora.incremental_pca import IncrementalPCA
from tests.models import assert_unchanged, clone, snapshot, tiny_gpt2, tiny_llama, tokens
from tests.tolerances import assert_close

QKV_DOWN = ["q_proj", "k_proj", "v_proj", "down_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batches(vocab=128, count=6):
    batches = [{"input_ids": tokens(batch=4, length=16, vocab=vocab, seed=s),
                "attention_mask": torch.ones(4, 16, dtype=torch.long)} for s in range(count)]
    batches[1]["attention_mask"][:, 12:] = 0  # padding the fit leaves out
    batches[2]["labels"] = batches[2]["input_ids"].masked_fill(torch.arange(16) < 4, -100)  # so is a masked prompt
    return batches


def _initialised(library, base, targets, batches, r=4, **eva):
    config = library.LoraConfig(target_modules=targets, r=r, lora_alpha=8, init_lora_weights="eva",
                                eva_config=library.EvaConfig(**eva))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = library.get_peft_model(clone(base), config)
        library.initialize_lora_eva_weights(model, batches, show_progress_bar=False)
    return model, torch.get_rng_state()


def _their_layers(model):
    return {name: module for name, module in model.named_modules()
            if isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict) and "default" in module.lora_A}


def _assert_peft_s(theirs, ours, exact=True, same_targets=True):
    their_layers = _their_layers(theirs)
    our_layers = {name: layer for name, layer in ours.named_modules() if isinstance(layer, fastlora.LoRALinear)}
    assert their_layers.keys() == our_layers.keys()
    for name, layer in our_layers.items():
        A, B = layer.lora_factors("default")
        their_A, their_B = their_layers[name].lora_A["default"].weight, their_layers[name].lora_B["default"].weight
        if exact:
            assert torch.equal(A, their_A) and torch.equal(B, their_B), name
        else:  # where PEFT holds A in another dtype: the same values, rounded as its A is
            assert torch.equal(A.to(their_A.dtype), their_A) and not B.any() and not their_B.any(), name
        assert layer.adapter_settings["default"].scaling == their_layers[name].scaling["default"], name
    their_config, our_config = theirs.peft_config["default"], ours.peft_config["default"]
    assert our_config.rank_pattern == their_config.rank_pattern
    assert our_config.alpha_pattern == their_config.alpha_pattern
    if same_targets:
        assert sorted(our_config.target_modules) == sorted(their_config.target_modules)


@pytest.mark.parametrize("targets,r,eva", [
    (QKV_DOWN, 4, dict(rho=2.0, tau=0.9)),
    (QKV_DOWN, 4, dict(rho=1.0, tau=0.95)),
    (QKV_DOWN, 4, dict(rho=3.0, tau=0.8, adjust_scaling_factors=False)),
    (ALL, 2, dict(rho=4.0, tau=0.9)),  # four layers' shares are 0: their adapters are removed
    (["q_proj", "down_proj"], 4, dict(rho=2.0, tau=0.9, whiten=True)),
    (QKV_DOWN, 4, dict(rho=2.0, tau=0.9, use_label_mask=False)),
], ids=["rho2", "rho1", "rho3-unscaled", "removed-layers", "whiten", "no-label-mask"])
def test_eva_initialisation_is_peft_s(targets, r, eva):
    base, batches = tiny_llama(), _batches()
    theirs, their_generator = _initialised(peft, base, targets, batches, r, **eva)
    ours, our_generator = _initialised(fastlora, base, targets, batches, r, **eva)
    _assert_peft_s(theirs, ours)
    assert torch.equal(our_generator, their_generator)
    trainable = [sum(p.numel() for p in model.parameters() if p.requires_grad) for model in (ours, theirs)]
    assert trainable[0] == trainable[1]
    ranks = [layer.adapter_settings["default"].r for _, layer in ours.lora_layers()]
    assert (len(set(ranks)) > 1) == (eva["rho"] > 1)  # ranks moved between layers where rho allows it
    assert (len(ranks) < 2 * len(targets)) == (targets == ALL)  # adapters removed where a share was 0
    with torch.no_grad():  # B = 0: the model starts at the base model's output
        assert torch.equal(ours(**batches[0]).logits, base(**batches[0]).logits)


def test_eva_on_gpt2_conv1d_and_a_bf16_base_is_peft_s():
    batches = _batches(vocab=64)
    theirs, _ = _initialised(peft, tiny_gpt2(), ["c_attn", "c_proj", "c_fc"], batches, rho=2.0, tau=0.9)
    ours, _ = _initialised(fastlora, tiny_gpt2(), ["c_attn", "c_proj", "c_fc"], batches, rho=2.0, tau=0.9)
    _assert_peft_s(theirs, ours)
    # on a bf16 base PEFT holds the A of a layer whose rank changed in bf16 (the others in float32, as
    # autocast_adapter_dtype says); fastlora keeps float32 for every layer: the same values, not rounded
    base = tiny_llama().to(torch.bfloat16)
    theirs, _ = _initialised(peft, base, ["q_proj", "v_proj", "down_proj"], _batches(), rho=2.0, tau=0.9)
    ours, _ = _initialised(fastlora, base, ["q_proj", "v_proj", "down_proj"], _batches(), rho=2.0, tau=0.9)
    _assert_peft_s(theirs, ours, exact=False)
    assert {layer.lora_factors("default")[0].dtype for _, layer in ours.lora_layers()} == {torch.float32}


def test_layers_eva_does_not_fit_start_again_as_peft_s_with_a_warning():
    base, batches = tiny_llama(), _batches()
    theirs, their_generator = _initialised(peft, base, ["q_proj", "embed_tokens", "down_proj"], batches)
    config = fastlora.LoraConfig(target_modules=["q_proj", "embed_tokens", "down_proj"], r=4, lora_alpha=8,
                                 init_lora_weights="eva", eva_config=EvaConfig())
    torch.manual_seed(0)
    ours = fastlora.get_peft_model(clone(base), config)
    with pytest.warns(UserWarning, match=r"init_lora_weights=True .*\['model.embed_tokens'\]"):
        initialize_lora_eva_weights(ours, batches, show_progress_bar=False)
    assert torch.equal(torch.get_rng_state(), their_generator)
    embedding = ours.base_model.model.model.embed_tokens
    their_embedding = theirs.base_model.model.model.embed_tokens
    assert torch.equal(embedding.lora_factors("default")[0], their_embedding.lora_embedding_A["default"])
    assert torch.equal(embedding.lora_factors("default")[1], their_embedding.lora_embedding_B["default"])


def test_whitening_divides_each_layer_s_components_once_by_the_root_of_their_singular_values(monkeypatch):
    """Layers reading one input (q, k, v) share one fit; each gets its rows divided by √s once (PEFT divides the
    shared rows in place once per such layer, so its q, k and v rows end up divided three times)."""
    fits = []

    class RecordedPCA(IncrementalPCA):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            fits.append(self)

    monkeypatch.setattr(fastlora.eva, "IncrementalPCA", RecordedPCA)
    base, batches = tiny_llama(), _batches()
    config = fastlora.LoraConfig(target_modules=QKV_DOWN, r=4, init_lora_weights="eva", eva_config=EvaConfig(tau=0.9))
    plain = get_eva_state_dict(clone(base), batches, config, show_progress_bar=False)
    fits.clear()
    whitened = get_eva_state_dict(clone(base), batches, config.replace(eva_config={"tau": 0.9, "whiten": True}),
                                  show_progress_bar=False)
    assert plain.keys() == whitened.keys() and len(fits) == 4  # per layer: one fit for q, k and v, one for down
    for layer in (0, 1):
        shared, own = fits[2 * layer], fits[2 * layer + 1]
        for name, fit in [("self_attn.q_proj", shared), ("self_attn.k_proj", shared), ("self_attn.v_proj", shared),
                          ("mlp.down_proj", own)]:
            key = f"model.layers.{layer}.{name}"
            rank = plain[key].shape[0]
            assert torch.equal(whitened[key], plain[key] / fit.singular_values_[:rank].sqrt().reshape(-1, 1)), key


def test_an_eva_state_dict_computed_before_from_either_library_gives_the_same_adapter():
    base, batches = tiny_llama(), _batches()
    reference, _ = _initialised(fastlora, base, QKV_DOWN, batches, rho=2.0, tau=0.9)
    config = dict(target_modules=QKV_DOWN, r=4, lora_alpha=8, init_lora_weights="eva")
    peft_model = peft.get_peft_model(clone(base), peft.LoraConfig(**config, eva_config=peft.EvaConfig(tau=0.9)))
    sources = {
        "peft, from its PeftModel": peft.get_eva_state_dict(peft_model, batches, show_progress_bar=False),
        # PEFT's own initialize_lora_eva_weights finds no layer by these names (keys without "base_model.model.")
        "peft, from the plain model": peft.get_eva_state_dict(
            clone(base), batches, peft.LoraConfig(**config, eva_config=peft.EvaConfig(tau=0.9)), show_progress_bar=False),
        "fastlora, from the plain model": get_eva_state_dict(
            clone(base), batches, fastlora.LoraConfig(**config, eva_config=EvaConfig(tau=0.9)), show_progress_bar=False),
    }
    for source, state_dict in sources.items():
        torch.manual_seed(0)
        ours = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(**config, eva_config=EvaConfig(tau=0.9)))
        initialize_lora_eva_weights(ours, eva_state_dict=state_dict)
        for (name, layer), (_, want) in zip(ours.lora_layers(), reference.lora_layers()):
            assert torch.equal(layer.lora_factors("default")[0], want.lora_factors("default")[0]), (source, name)
        assert ours.peft_config["default"].rank_pattern == reference.peft_config["default"].rank_pattern, source


def test_an_eva_adapter_s_files_load_in_both_libraries(tmp_path):
    """21 of 28 layers keep an adapter: the config names them by their shortest suffixes, which match no layer
    whose adapter was removed (PEFT's match some: fastlora loads PEFT's file without adapting those)."""
    base, batches = tiny_llama(num_hidden_layers=4), _batches()
    theirs, _ = _initialised(peft, base, ALL, batches, r=2, rho=4.0, tau=0.9)
    ours, _ = _initialised(fastlora, base, ALL, batches, r=2, rho=4.0, tau=0.9)
    _assert_peft_s(theirs, ours, same_targets=False)
    adapted = {name: layer.adapter_settings["default"].r for name, layer in ours.lora_layers()}
    assert 20 <= len(adapted) < 28
    with torch.no_grad():  # training steps' worth of change, the same for both
        for (_, layer), their_layer in zip(ours.lora_layers(), _their_layers(theirs).values()):
            for factor, their_factor in zip(layer.lora_factors("default"),
                                            (their_layer.lora_A["default"].weight, their_layer.lora_B["default"].weight)):
                factor.add_(torch.randn(factor.shape, generator=torch.Generator().manual_seed(factor.numel())) * 0.05)
                their_factor.copy_(factor)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    saved = fastlora.LoraConfig.from_pretrained(tmp_path / "ours")
    assert len(saved.target_modules) < len(adapted) and not any(name.startswith("model.") for name in saved.target_modules)
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        assert_close(theirs(input_ids=ids).logits, want, kind="same_math")
        for library in (fastlora, peft):
            loaded = library.PeftModel.from_pretrained(clone(base), tmp_path / "ours")
            assert_close(loaded(input_ids=ids).logits, want, kind="same_math")
            ranks = {name.removeprefix("base_model.model."): module.lora_A["default"].weight.shape[0]
                     for name, module in _their_layers(loaded).items()} if library is peft else \
                {name: layer.adapter_settings["default"].r for name, layer in loaded.lora_layers()}
            assert ranks == adapted, library.__name__
        loaded = fastlora.PeftModel.from_pretrained(clone(base), tmp_path / "theirs")
        assert_close(loaded(input_ids=ids).logits, want, kind="same_math")
        assert {name: layer.adapter_settings["default"].r for name, layer in loaded.lora_layers()} == adapted


def test_eva_leaves_the_other_adapters_and_target_parameters_as_they_were():
    base, batches = tiny_llama(), _batches()
    torch.manual_seed(0)
    model = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(target_modules=ALL, r=2, lora_alpha=8))
    with torch.no_grad():
        for _, layer in model.lora_layers():
            layer.lora_factors("default")[1].normal_()
    model.add_adapter("eva", fastlora.LoraConfig(target_modules=ALL, r=2, lora_alpha=8, init_lora_weights="eva",
                                                 eva_config=EvaConfig(rho=4.0, tau=0.9)))
    model.set_adapter("eva")
    initialize_lora_eva_weights(model, batches, adapter_name="eva", show_progress_bar=False)
    assert sum("eva" not in layer.adapter_names for _, layer in model.lora_layers()) > 0  # removed there
    with torch.no_grad():  # "eva" (B = 0) is the only active adapter: the base output, on every layer
        assert torch.equal(model(**batches[0]).logits, base(**batches[0]).logits)
    model.set_adapter("default")
    with torch.no_grad():
        assert not torch.equal(model(**batches[0]).logits, base(**batches[0]).logits)

    from tests.models import tiny_mixtral
    config = fastlora.LoraConfig(target_modules=["q_proj"], target_parameters=["mlp.experts.down_proj"], r=2,
                                 init_lora_weights="eva", eva_config=EvaConfig(tau=0.9))
    model = fastlora.get_peft_model(tiny_mixtral(), config)
    experts = {name: [p.clone() for p in layer.adapter_parameters("default")] for name, layer in model.lora_layers()
               if isinstance(layer, fastlora.parameter_lora.LoRAParameter)}
    with pytest.warns(UserWarning, match="EVA does not fit target_parameters"):
        initialize_lora_eva_weights(model, batches, show_progress_bar=False)
    for name, values in experts.items():
        layer = model.get_base_model().get_submodule(name)
        assert all(torch.equal(a, b) for a, b in zip(layer.adapter_parameters("default"), values))
    assert all("experts" not in name for name in model.peft_config["default"].target_modules)


def test_a_layer_the_forward_function_does_not_reach_is_named():
    model = fastlora.get_peft_model(tiny_llama(), fastlora.LoraConfig(
        target_modules=["q_proj", "lm_head"], r=2, init_lora_weights="eva", eva_config=EvaConfig()))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"did not run \['base_model.model.lm_head'\]"):
        initialize_lora_eva_weights(model, _batches(), forward_fn=lambda m, batch: m.base_model.model.model(**batch),
                                    show_progress_bar=False)
    assert_unchanged(model, before)
    assert not any(m._forward_hooks for m in model.modules())


def test_incremental_pca_finds_the_principal_directions_of_all_batches_seen():
    generator = torch.Generator().manual_seed(0)
    directions, _ = torch.linalg.qr(torch.randn(24, 3, generator=generator))
    data = (torch.randn(400, 3, generator=generator) * torch.tensor([5.0, 3.0, 2.0])) @ directions.T \
        + 0.05 * torch.randn(400, 24, generator=generator) + 1.5
    pca = IncrementalPCA(n_components=3)
    for batch in data.split(50):
        pca.partial_fit(batch)
    centred = (data - data.mean(0)).double()
    _, S, Vh = torch.linalg.svd(centred, full_matrices=False)
    # float32 data fitted batch by batch with a randomized SVD: float32's tolerance, though the fit's results
    # are float64
    assert_close(pca.mean_, data.double().mean(0), kind="same_math", dtype=torch.float32)
    assert_close(pca.var_, data.double().var(0, unbiased=False), kind="same_math", dtype=torch.float32)
    assert_close(pca.singular_values_, S[:3], kind="same_math", dtype=torch.float32)
    assert_close(pca.explained_variance_ratio_, S[:3] ** 2 / (S ** 2).sum(), kind="same_math", dtype=torch.float32)
    assert_close(pca.components_.abs(), Vh[:3].abs(), kind="same_math", dtype=torch.float32)  # up to sign,
    assert (pca.components_.gather(1, pca.components_.abs().argmax(1, keepdim=True)) > 0).all()  # fixed this way


def test_refusals_leave_the_model_unchanged():
    base, batches = tiny_llama(), _batches()
    config = fastlora.LoraConfig(target_modules=QKV_DOWN, r=4, init_lora_weights="eva", eva_config=EvaConfig())
    model = fastlora.get_peft_model(clone(base), config)
    plain = fastlora.get_peft_model(clone(base), config.replace(init_lora_weights=True))
    good = get_eva_state_dict(model, batches, show_progress_bar=False)
    name = "base_model.model.model.layers.0.self_attn.q_proj"

    def failing_forward(model, inputs):
        model(**inputs)
        raise RuntimeError("out of memory")

    cases = [
        (plain, dict(dataloader=batches), "init_lora_weights='eva'"),
        (model, {}, "dataloader is required"),
        (model, dict(dataloader=[]), "dataloader is empty"),
        (model, dict(eva_state_dict={**good, "model.layers.0.mlp.up_proj": good[name]}), "not layers of the adapter"),
        (model, dict(eva_state_dict={**good, name: good[name][:, :10]}), r"\(rank × 64\) tensor"),
        (model, dict(dataloader=batches, forward_fn=failing_forward), "out of memory"),
    ]
    for target, arguments, match in cases:
        target.train()
        before = snapshot(target)
        with pytest.raises((ValueError, RuntimeError), match=match):
            initialize_lora_eva_weights(target, show_progress_bar=False, **arguments)
        assert_unchanged(target, before)
        assert target.training and not any(m._forward_hooks for m in target.modules())
    model.add_adapter("other", config)
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="single active adapter"):
        initialize_lora_eva_weights(model, batches)
    with pytest.raises(ValueError, match="peft_config is required"):
        get_eva_state_dict(clone(base), batches)


def test_a_fit_that_cannot_end_is_stopped_with_the_reason(monkeypatch):
    """PEFT's goes on for ever: batches with fewer kept tokens than a layer's components, or components that keep
    moving (tau = 1)."""
    config = fastlora.LoraConfig(target_modules=QKV_DOWN, r=4, init_lora_weights="eva", eva_config=EvaConfig())
    model = fastlora.get_peft_model(tiny_llama(), config)
    before = snapshot(model)
    short = [{"input_ids": tokens(batch=1, length=6, seed=s)} for s in range(3)]  # 6 tokens, 8 components
    with pytest.raises(ValueError, match=r"no batch of the dataloader gives .* the 8 rows"):
        initialize_lora_eva_weights(model, short, show_progress_bar=False)
    assert_unchanged(model, before)
    monkeypatch.setattr(fastlora.eva, "_MOST_PASSES", 3)
    model.peft_config["default"].eva_config = {"tau": 1.0}
    with pytest.raises(ValueError, match=r"did not converge in 3 passes over the dataloader \(tau=1.0\)"):
        initialize_lora_eva_weights(model, _batches(), show_progress_bar=False)
    assert_unchanged(model, before)


def test_a_sequence_classifier_s_labels_mask_no_token():
    """Labels per sequence (SEQ_CLS) say nothing about tokens: every token the attention mask keeps is fitted, as
    with use_label_mask=False (PEFT fails comparing their shapes)."""
    batches = [{**batch, "labels": torch.tensor([0, 1, 1, 0])} for batch in _batches()]
    unmasked = [{key: value for key, value in batch.items() if key != "labels"} for batch in _batches()]
    base = tiny_llama()
    config = fastlora.LoraConfig(target_modules=QKV_DOWN, r=4, init_lora_weights="eva", eva_config=EvaConfig(tau=0.9))
    def forward(model, batch):  # the classifier's loss is not this causal LM's: run it without the labels
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    with_labels = get_eva_state_dict(clone(base), batches, config, forward_fn=forward, show_progress_bar=False)
    without = get_eva_state_dict(clone(base), unmasked, config, forward_fn=forward, show_progress_bar=False)
    assert with_labels.keys() == without.keys()
    assert all(torch.equal(with_labels[name], without[name]) for name in without)

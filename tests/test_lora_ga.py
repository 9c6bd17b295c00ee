"""LoRA-GA: preprocess_loraga's gradient estimate and init_lora_weights="lora_ga", compared with PEFT's bit for
bit from the same seed (factors, residual base weights, the random generator left where PEFT leaves it), each
library's estimate usable by the other; the estimate's bookkeeping (mean over backward passes, the model's state
put back, also on failure), its cache file, and the refusals."""

import warnings

import peft
import pytest
import torch

import fastlora
from fastlora import LoraGAConfig, preprocess_loraga
from tests.models import (PEFT_BEFORE_0_22, assert_converts_for_the_original_weight_as_peft, assert_factors_and_base_as_peft,
                          assert_refused_on_a_4bit_model, assert_unchanged, clone, snapshot, tiny_gpt2, tiny_llama,
                          tokens)
from tests.tolerances import assert_close

LLAMA = dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8)
GPT2 = dict(target_modules=["c_attn", "c_proj"], r=2, lora_alpha=8)


def _config(library, settings, **lora_ga):
    return library.LoraConfig(**settings, init_lora_weights="lora_ga", lora_ga_config=library.LoraGAConfig(**lora_ga))


def _adapted(library, base, settings, ids, estimator=None, seed=0, **lora_ga):
    """``base`` adapted by ``library`` after ``estimator``'s (default: the same library's) preprocess_loraga, with
    the generator seeded before each step; returns (model, the generator's state afterwards)."""
    model = clone(base)
    config = _config(library, settings, **lora_ga)
    estimate_config = config if estimator in (None, library) else _config(estimator, settings, **lora_ga)

    def train_step():
        model(input_ids=ids, labels=ids).loss.backward()

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (estimator or library).preprocess_loraga(model, estimate_config, train_step)
        torch.manual_seed(seed + 1)
        return library.get_peft_model(model, config), torch.get_rng_state()


@pytest.mark.parametrize("scale", ["stable", "weight_svd", "gd_scale", "unit"])
@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr", "random"])
def test_lora_ga_starts_from_peft_s_factors_and_residual(direction, scale):
    base, ids = tiny_llama(), tokens()
    theirs, their_generator = _adapted(peft, base, LLAMA, ids, direction=direction, scale=scale)
    ours, our_generator = _adapted(fastlora, base, LLAMA, ids, direction=direction, scale=scale)
    assert_factors_and_base_as_peft(theirs, ours)
    assert torch.equal(our_generator, their_generator)  # the same draws, in the same order
    with torch.no_grad():  # W_res + scaling · B A = W: the model starts where the base model was
        assert_close(ours(input_ids=ids).logits, base(input_ids=ids).logits, kind="same_math_max")
        assert not torch.equal(ours.base_model.model.model.layers[0].self_attn.q_proj.weight,
                               base.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("setup", ["gpt2-conv1d", "bf16", "dora", "estimated-by-peft", "estimated-by-fastlora"])
def test_lora_ga_equals_peft_s_on_other_setups(setup):
    base, settings, ids = tiny_llama(), dict(LLAMA), tokens()
    estimators = {"estimated-by-peft": (peft, fastlora), "estimated-by-fastlora": (fastlora, peft)}
    if setup == "gpt2-conv1d":  # weights stored (in, out); the stable scale reads out_features
        base, settings, ids = tiny_gpt2(), dict(GPT2), tokens(vocab=64)
    elif setup == "bf16":
        base = base.to(torch.bfloat16)
    elif setup == "dora":
        settings["use_dora"] = True
    theirs_estimator, ours_estimator = estimators.get(setup, (None, None))
    # (PEFT 0.21's stable scale read a Conv1D's stored first dimension, its in_features: compared another way there)
    scale = "stable" if setup == "gpt2-conv1d" and not PEFT_BEFORE_0_22 else "weight_svd"
    theirs, their_generator = _adapted(peft, base, settings, ids, theirs_estimator, scale=scale)
    ours, our_generator = _adapted(fastlora, base, settings, ids, ours_estimator, scale=scale)
    # DoRA's magnitude ‖W + scaling · B A‖ is computed another way (fastlora's never forms W + scaling · B A)
    assert_factors_and_base_as_peft(theirs, ours, magnitude_kind="same_math" if setup == "dora" else None)
    assert torch.equal(our_generator, their_generator)


def test_the_estimate_is_the_mean_gradient_and_the_model_is_put_back():
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)  # a flag of the caller's, kept
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    batches = [tokens(seed=s) for s in (1, 2, 3)]

    def train_step():
        for batch in batches:
            model(input_ids=batch, labels=batch).loss.backward()

    preprocess_loraga(model, _config(fastlora, LLAMA), train_step)
    assert not model.training and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    reference = clone(model)
    for p in reference.parameters():
        p.grad = None
    reference.train()
    for batch in batches:
        reference(input_ids=batch, labels=batch).loss.backward()
    holders = [n for n, m in model.named_modules() if hasattr(m, "_peft_loraga_grad")]
    assert len(holders) == 6 and all(n.endswith(("q_proj", "v_proj", "down_proj")) for n in holders)
    for name in holders:
        assert_close(model.get_submodule(name)._peft_loraga_grad, reference.get_submodule(name).weight.grad / 3,
                     kind="same_math")
    originals = [model.get_submodule(name) for name in holders]
    fastlora.get_peft_model(model, _config(fastlora, LLAMA))
    assert not [m for m in originals if hasattr(m, "_peft_loraga_grad")]  # used, then dropped (as PEFT)


def test_a_failing_train_step_leaves_the_model_as_it_was():
    model = tiny_llama()
    model.model.layers[0].train()  # a submodule's own mode, kept too
    before = snapshot(model)

    def train_step():
        model(input_ids=tokens(), labels=tokens()).loss.backward()
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        preprocess_loraga(model, _config(fastlora, LLAMA), train_step)
    assert_unchanged(model, before)
    assert not model.training and model.model.layers[0].training and not model.model.layers[1].training
    assert all(p.grad is None for p in model.parameters())
    assert not [n for n, m in model.named_modules() if hasattr(m, "_peft_loraga_grad")]


def test_the_cache_file_is_peft_s_and_is_read_back(tmp_path):
    base, ids = tiny_llama(), tokens()
    cache = tmp_path / "cache" / "gradients.pt"
    calls = []

    def train_step(model):
        calls.append(1)
        model(input_ids=ids, labels=ids).loss.backward()

    first = clone(base)
    preprocess_loraga(first, _config(fastlora, LLAMA), lambda: train_step(first), cache_file=cache)
    stored = torch.load(cache, weights_only=True)
    assert sorted(stored) == sorted(f"{n}._peft_loraga_grad" for n, m in first.named_modules()
                                    if hasattr(m, "_peft_loraga_grad"))
    again = clone(base)
    preprocess_loraga(again, _config(fastlora, LLAMA), lambda: train_step(again), cache_file=cache)
    assert len(calls) == 1  # read from the file, not estimated again
    theirs = clone(base)
    peft.preprocess_loraga(theirs, _config(peft, LLAMA), lambda: train_step(theirs), cache_file=str(cache))
    assert len(calls) == 1
    for name, module in first.named_modules():
        if hasattr(module, "_peft_loraga_grad"):
            assert torch.equal(again.get_submodule(name)._peft_loraga_grad, module._peft_loraga_grad)
            assert torch.equal(theirs.get_submodule(name)._peft_loraga_grad, module._peft_loraga_grad)
    other = tiny_llama(hidden_size=48)
    before = snapshot(other)
    with pytest.raises(ValueError, match="another model"):
        preprocess_loraga(other, _config(fastlora, LLAMA), lambda: train_step(other), cache_file=cache)
    assert_unchanged(other, before)
    with pytest.raises(ValueError, match="for other ones"):
        preprocess_loraga(clone(base), _config(fastlora, dict(LLAMA, target_modules=["o_proj"])), lambda: None,
                          cache_file=cache)


def test_layers_the_training_step_does_not_reach_keep_no_gradient_in_the_cache_too(tmp_path):
    base, ids = tiny_llama(), tokens()
    cache = tmp_path / "gradients.pt"

    def first_layer_only(model):  # a loss on the first layer's output: the second layer gets no gradient
        model(input_ids=ids, output_hidden_states=True).hidden_states[1].sum().backward()

    model = clone(base)
    with pytest.warns(UserWarning, match=r"no gradient for \['model.layers.1"):
        preprocess_loraga(model, _config(fastlora, LLAMA), lambda: first_layer_only(model), cache_file=cache)
    again = clone(base)
    with pytest.warns(UserWarning, match=r"no gradient for \['model.layers.1"):
        preprocess_loraga(again, _config(fastlora, LLAMA), lambda: None, cache_file=cache)
    holders = {name for name, module in model.named_modules() if hasattr(module, "_peft_loraga_grad")}
    assert len(holders) == 3 and all(name.startswith("model.layers.0.") for name in holders)
    assert {name for name, module in again.named_modules() if hasattr(module, "_peft_loraga_grad")} == holders
    for name in holders:
        assert torch.equal(again.get_submodule(name)._peft_loraga_grad, model.get_submodule(name)._peft_loraga_grad)


def test_a_gradient_of_another_shape_is_refused_before_anything_changes():
    model = tiny_llama()
    model.model.layers[1].mlp.down_proj._peft_loraga_grad = torch.ones(3, 3)
    model.model.layers[0].mlp.down_proj._peft_loraga_grad = torch.ones(64, 96)
    before = snapshot(model)
    with pytest.raises(ValueError, match="estimated for another model"):
        fastlora.get_peft_model(model, _config(fastlora, LLAMA))
    assert_unchanged(model, before)


def test_without_an_estimate_layers_start_as_peft_s_do_with_a_warning():
    base = tiny_llama()
    torch.manual_seed(4)
    theirs = peft.get_peft_model(clone(base), _config(peft, LLAMA))
    torch.manual_seed(4)
    with pytest.warns(UserWarning, match="preprocess_loraga"):
        ours = fastlora.get_peft_model(clone(base), _config(fastlora, LLAMA))
    assert_factors_and_base_as_peft(theirs, ours)
    assert all(not layer.lora_factors("default")[1].any() for _, layer in ours.lora_layers())  # B = 0


def test_refusals_leave_the_model_unchanged(tmp_path):
    ids = tokens()
    model = tiny_llama()
    with pytest.raises(ValueError, match="lora_ga_config=LoraGAConfig"):
        preprocess_loraga(model, fastlora.LoraConfig(**LLAMA, init_lora_weights="lora_ga"), lambda: None)
    preprocess_loraga(model, _config(fastlora, LLAMA), lambda: model(input_ids=ids, labels=ids).loss.backward())
    for config, match in [(_config(fastlora, dict(LLAMA, r=17)), "at most 16"),  # 2r of v_proj (64 → 32)
                          (fastlora.LoraConfig(**LLAMA, init_lora_weights="lora_ga"), "lora_ga_config must be")]:
        before = snapshot(model)
        with pytest.raises(ValueError, match=match):
            fastlora.get_peft_model(model, config)
        assert_unchanged(model, before)
        assert len([m for m in model.modules() if hasattr(m, "_peft_loraga_grad")]) == 6  # kept for another try
    with pytest.raises(ValueError, match="direction must be one of"):
        fastlora.LoraConfig(**LLAMA, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(direction="BA"))
    with pytest.raises(ValueError, match="unknown field"):
        fastlora.LoraConfig(**LLAMA, init_lora_weights="lora_ga", lora_ga_config={"gamma": 4})
    assert_refused_on_a_4bit_model(tmp_path, lambda quantized: preprocess_loraga(
        quantized, _config(fastlora, LLAMA), lambda: None), ValueError, "does not support quantized models")


def test_a_trained_lora_ga_adapter_converts_for_the_original_weight_as_peft(tmp_path):
    """PEFT's conversion (save_pretrained with path_initial_model_for_weight_conversion) takes LoRA-GA adapters."""
    base, ids = tiny_llama(), tokens()
    models = {library: _adapted(library, base, LLAMA, ids)[0] for library in (peft, fastlora)}
    assert_converts_for_the_original_weight_as_peft(models, base, ids, tmp_path)

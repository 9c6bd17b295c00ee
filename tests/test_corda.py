"""CorDA: preprocess_corda's decomposition and init_lora_weights="corda", compared with PEFT's bit for bit (factors,
residual base weights; either library's decomposition fed to the other), its cache and covariance files both ways,
the model's state put back, and the refusals."""

import warnings

import peft
import pytest
import torch
from peft.tuners.lora.config import CordaConfig as PeftCordaConfig
from peft.tuners.lora.corda import preprocess_corda as peft_preprocess_corda

import fastlora
from fastlora import CordaConfig, UnsupportedFeatureError, preprocess_corda
from tests.models import (assert_converts_for_the_original_weight_as_peft, assert_factors_and_base_as_peft,
                          assert_refused_on_a_4bit_model, assert_unchanged, clone, snapshot, tiny_gpt2, tiny_llama,
                          tiny_mixtral, tokens)
from tests.tolerances import assert_close

LLAMA = dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8)
GPT2 = dict(target_modules=["c_attn", "c_proj"], r=2, lora_alpha=8)


def _config(library, settings, **corda):
    corda_class = CordaConfig if library is fastlora else PeftCordaConfig
    return library.LoraConfig(**settings, init_lora_weights="corda", corda_config=corda_class(**corda))


def _samples(vocab=128):
    return [tokens(batch=1, length=16, vocab=vocab, seed=s) for s in range(5)]  # PEFT takes one sample per call


def _adapted(library, base, settings, samples, estimator=None, **corda):
    model = clone(base)
    estimator = estimator or library
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        preprocess = preprocess_corda if estimator is fastlora else peft_preprocess_corda
        preprocess(model, _config(estimator, settings, **corda), lambda: [model(input_ids=ids) for ids in samples])
        torch.manual_seed(1)
        return library.get_peft_model(model, _config(library, settings, **corda))


@pytest.mark.parametrize("method", ["ipm", "kpm"])
@pytest.mark.parametrize("setup", ["llama", "bf16", "gpt2-conv1d", "rank-pattern", "rslora", "estimated-by-peft"])
def test_corda_starts_from_peft_s_factors_and_residual(setup, method):
    base, settings, samples, estimator = tiny_llama(), dict(LLAMA), _samples(), None
    if setup == "bf16":
        base = base.to(torch.bfloat16)
    elif setup == "gpt2-conv1d":  # weights stored (in, out)
        base, settings, samples = tiny_gpt2(), dict(GPT2), _samples(vocab=64)
    elif setup == "rank-pattern":
        settings["rank_pattern"] = {"v_proj": 2}
    elif setup == "rslora":
        settings["use_rslora"] = True
    elif setup == "estimated-by-peft":
        estimator = peft
    theirs = _adapted(peft, base, settings, samples, corda_method=method)
    ours = _adapted(fastlora, base, settings, samples, estimator, corda_method=method)
    assert_factors_and_base_as_peft(theirs, ours)
    if setup == "rank-pattern":
        assert ours.base_model.model.model.layers[0].self_attn.v_proj.adapter_settings["default"].r == 2
    if base.dtype == torch.float32:  # W_res + scaling · B A = W: the model starts where the base model was
        with torch.no_grad():
            ids = samples[0]
            assert_close(ours(input_ids=ids).logits, base(input_ids=ids).logits, kind="same_math_max")


def test_the_cache_and_covariance_files_are_peft_s_and_are_read_back(tmp_path):
    base, samples = tiny_llama(), _samples()
    files = dict(cache_file=str(tmp_path / "cache" / "eigens.pt"), covariance_file=str(tmp_path / "covariance.pt"))
    calls = []

    def run(model):
        calls.append(1)
        for ids in samples:
            model(input_ids=ids)

    first = clone(base)
    preprocess_corda(first, _config(fastlora, LLAMA, **files), lambda: run(first))
    held = {name: module.eigens for name, module in first.named_modules() if hasattr(module, "eigens")}
    assert len(held) == 6 and len(calls) == 1
    again, theirs = clone(base), clone(base)
    preprocess_corda(again, _config(fastlora, LLAMA, **files), lambda: run(again))
    peft_preprocess_corda(theirs, _config(peft, LLAMA, **files), lambda: run(theirs))
    assert len(calls) == 1  # both read the cache file
    for name, eigens in held.items():
        for copy in (again, theirs):
            other = copy.get_submodule(name).eigens
            assert all(torch.equal(getattr(other, part), getattr(eigens, part)) for part in ("S_WC", "U_WC", "V_WC"))
    # the covariance file serves another rank without running the model again, as PEFT's does
    other_rank = dict(LLAMA, r=2)
    ours, reference = clone(base), clone(base)
    preprocess_corda(ours, _config(fastlora, other_rank, covariance_file=files["covariance_file"]), None)
    peft_preprocess_corda(reference, _config(peft, other_rank, covariance_file=files["covariance_file"]), None)
    assert len(calls) == 1
    for name, module in ours.named_modules():
        if hasattr(module, "eigens"):
            assert module.eigens.S_WC.shape == (2,)
            assert torch.equal(module.eigens.V_WC, reference.get_submodule(name).eigens.V_WC)
    with pytest.raises(ValueError, match="other target modules"):
        preprocess_corda(clone(base), _config(fastlora, dict(LLAMA, target_modules=["o_proj"]), **files), None)
    with pytest.raises(ValueError, match="other target modules"):
        preprocess_corda(clone(base), _config(fastlora, dict(LLAMA, target_modules=["o_proj"]),
                                              covariance_file=files["covariance_file"]), None)
    with pytest.raises(ValueError, match="another model"):
        preprocess_corda(tiny_llama(hidden_size=48), _config(fastlora, LLAMA, covariance_file=files["covariance_file"]),
                         None)
    # PEFT's files, read by fastlora: the same decomposition as PEFT's own
    peft_files = dict(cache_file=str(tmp_path / "peft" / "eigens.pt"), covariance_file=str(tmp_path / "peft.pt"))
    theirs, ours, reference = clone(base), clone(base), clone(base)
    peft_preprocess_corda(theirs, _config(peft, other_rank, **peft_files), lambda: run(theirs))
    preprocess_corda(ours, _config(fastlora, other_rank, **peft_files), None)
    preprocess_corda(reference, _config(fastlora, other_rank, covariance_file=peft_files["covariance_file"]), None)
    for name, module in theirs.named_modules():
        if hasattr(module, "eigens"):
            for copy in (ours, reference):
                other = copy.get_submodule(name).eigens
                assert all(torch.equal(getattr(other, part), getattr(module.eigens, part))
                           for part in ("S_WC", "U_WC", "V_WC")), name
    # a covariance that is not finite (a 16-bit overflow) is refused, not damped forever
    broken = torch.load(files["covariance_file"], weights_only=True)
    broken["model.layers.0.self_attn.q_proj"][0, 0] = float("inf")
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="Invalid value found in covariance"):
        preprocess_corda(clone(base), _config(fastlora, LLAMA, covariance_file=str(tmp_path / "broken.pt")), None)


def test_a_hooked_model_gives_the_covariances():
    base, samples = tiny_llama(), _samples()
    direct, other, hooked = clone(base), clone(base), clone(base)
    preprocess_corda(direct, _config(fastlora, LLAMA), lambda: [direct(input_ids=ids) for ids in samples])
    preprocess_corda(other, _config(fastlora, LLAMA), lambda: [hooked(input_ids=ids) for ids in samples],
                     hooked_model=hooked)
    assert not any(hasattr(module, "eigens") for module in hooked.modules())
    for name, module in direct.named_modules():
        if hasattr(module, "eigens"):
            assert torch.equal(other.get_submodule(name).eigens.V_WC, module.eigens.V_WC)
    with pytest.raises(ValueError, match="hooked_model has no layer named 'model.layers.1"):
        preprocess_corda(clone(base), _config(fastlora, LLAMA), lambda: None, hooked_model=tiny_llama(num_hidden_layers=1))


def test_the_model_is_put_back_and_samples_may_come_in_batches():
    base = tiny_llama()
    model = clone(base).train()
    model.model.layers[0].eval()  # a submodule's own mode, kept too
    before = snapshot(model)

    def failing():
        model(input_ids=tokens(batch=1))
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        preprocess_corda(model, _config(fastlora, LLAMA), failing)
    assert_unchanged(model, before)
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    assert not any(m._forward_hooks for m in model.modules())
    assert not any(hasattr(m, "eigens") for m in model.modules())
    # a batch of several samples (PEFT's hook takes one sample per call): its rows together
    preprocess_corda(model, _config(fastlora, LLAMA), lambda: model(input_ids=tokens(batch=3)))
    assert model.training
    decomposed = [module for module in model.modules() if hasattr(module, "eigens")]
    adapted = fastlora.get_peft_model(model, _config(fastlora, LLAMA)).eval()
    assert len(decomposed) == 6 and not any(hasattr(module, "eigens") for module in decomposed)  # used, dropped
    with torch.no_grad():
        assert_close(adapted(input_ids=tokens()).logits, base(input_ids=tokens()).logits, kind="same_math_max")


def test_refusals_leave_the_model_unchanged(tmp_path):
    base, samples = tiny_llama(), _samples()
    with pytest.raises(ValueError, match="run_model must be specified"):
        preprocess_corda(clone(base), _config(fastlora, LLAMA), None)
    model = clone(base)
    with pytest.raises(ValueError, match=r"run_model did not run \['lm_head'\]"):  # the decoder without its head
        preprocess_corda(model, _config(fastlora, dict(LLAMA, target_modules=["q_proj", "lm_head"])),
                         lambda: model.model(input_ids=samples[0]))
    with pytest.raises(ValueError, match="at most min"):
        model = clone(base)
        preprocess_corda(model, _config(fastlora, dict(LLAMA, r=40)), lambda: [model(input_ids=i) for i in samples])
    model = clone(base)
    preprocess_corda(model, _config(fastlora, LLAMA), lambda: [model(input_ids=ids) for ids in samples])
    del model.model.layers[1].mlp.down_proj.eigens
    before = snapshot(model)
    with pytest.raises(ValueError, match="`eigens` attribute not found for layer 'model.layers.1.mlp.down_proj'"):
        fastlora.get_peft_model(model, _config(fastlora, LLAMA))
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"Matrix U size mismatch"):  # decomposed for another rank
        fastlora.get_peft_model(model, _config(fastlora, dict(LLAMA, r=2, target_modules=["q_proj", "v_proj"])))
    assert_unchanged(model, before)
    with pytest.raises(UnsupportedFeatureError, match="init_lora_weights='corda' with target_parameters"):
        model = tiny_mixtral()
        fastlora.get_peft_model(model, _config(fastlora, dict(LLAMA, target_parameters=["mlp.experts.down_proj"])))
    with pytest.raises(ValueError, match="corda_method must be 'ipm' or 'kpm'"):
        fastlora.LoraConfig(**LLAMA, init_lora_weights="corda", corda_config={"corda_method": "svd"})
    assert_refused_on_a_4bit_model(tmp_path, lambda quantized: preprocess_corda(
        quantized, _config(fastlora, LLAMA), lambda: None), ValueError, "CorDA does not support quantized models")


def test_a_trained_corda_adapter_converts_for_the_original_weight_as_peft(tmp_path):
    base, samples = tiny_llama(), _samples()
    models = {library: _adapted(library, base, LLAMA, samples) for library in (peft, fastlora)}
    assert_converts_for_the_original_weight_as_peft(models, base, samples[0], tmp_path)


def test_a_16_bit_covariance_that_overflows_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8)).to(torch.float16)
    x = torch.full((1, 16, 8), -300.0, dtype=torch.float16)
    x[..., 0] = 1.0  # scaled by 1 / max(x) = 1: the products reach 16 · 300² = 1.44e6, past float16's 65504
    config = fastlora.LoraConfig(target_modules=["0"], r=2, init_lora_weights="corda",
                                 corda_config=CordaConfig(use_float16_for_covariance=True))
    with pytest.raises(ValueError, match="an overflow"):
        preprocess_corda(model, config, lambda: model(x))
    assert not hasattr(model[0], "eigens")

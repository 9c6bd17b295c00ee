"""PiSSA, OLoRA and orthogonal initialisations, compared with PEFT's on one model: the factors, the residual base
weight (requantized on a 4-bit or 8-bit base for OLoRA), the logits; the layer's output unchanged at creation;
PEFT's refusals, and clear ones where PEFT fails with a bare error."""

import warnings

import peft
import pytest
import torch

import fastlora
from fastlora import UnsupportedFeatureError
from tests.models import (assert_unchanged, clone, load_quantized, same_bytes, snapshot, tiny_gpt2, tiny_llama,
                          tiny_mixtral, tokens)
from tests.tolerances import assert_close

CONFIG = dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8)


def _pair(base, init, **changes):
    config = {**CONFIG, **changes, "init_lora_weights": init}
    theirs = peft.get_peft_model(clone(base), peft.LoraConfig(**config))
    ours = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(**config))
    return theirs, ours


def _peft_state(model):
    """PEFT's layers: path → (A, B, the base weight as stored)."""
    out = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.lora_A:
            out[name] = (module.lora_A["default"].weight, module.lora_B["default"].weight, module.get_base_layer().weight)
    return out


def _our_state(model):
    return {name: (*layer.lora_factors("default"), layer.weight) for name, layer in model.lora_layers()}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_move_the_principal_part_of_w_into_the_adapter_as_in_peft(init, dtype):
    base = tiny_llama().to(dtype)
    ids = tokens()
    before = _logits(base, ids)
    theirs, ours = _pair(base, init)
    their_state, our_state = _peft_state(theirs), _our_state(ours)
    assert their_state.keys() == our_state.keys() and len(our_state) == 6
    for name, (A, B, W) in our_state.items():
        their_A, their_B, their_W = their_state[name]
        assert A.dtype == their_A.dtype == torch.float32 and W.dtype == dtype
        assert torch.equal(A, their_A) and torch.equal(B, their_B), name  # the same float32 decomposition
        assert torch.equal(W, their_W), name  # W_res, rounded to the base dtype as PEFT rounds it
        assert not torch.equal(W, base.get_submodule(name).weight)
    assert_close(_logits(ours, ids), _logits(theirs, ids), kind="same_math")
    if dtype == torch.float32:  # W_res + scaling · B A = W: the model starts where the base model was
        assert_close(_logits(ours, ids), before, kind="same_math_max")


def test_pissa_with_subspace_iterations_factors_the_weight_and_keeps_the_output():
    """pissa_niter_<n>: torch's randomized SVD, from the global generator.  Each weight gets a clear rank-4 part
    (singular values 4, 3, 2, 1.5 over a small rest), which the randomized method recovers."""
    base = tiny_llama()
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name in ("q_proj", "v_proj", "down_proj"):
            for layer in base.model.layers:
                module = layer.self_attn.get_submodule(name) if name != "down_proj" else layer.mlp.down_proj
                out_features, in_features = module.weight.shape
                U, _ = torch.linalg.qr(torch.randn(out_features, 4, generator=generator))
                V, _ = torch.linalg.qr(torch.randn(in_features, 4, generator=generator))
                module.weight.mul_(0.1).add_(U @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.5])) @ V.T)
    ids = tokens()
    torch.manual_seed(3)
    ours = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(**CONFIG, init_lora_weights="pissa_niter_4"))
    torch.manual_seed(3)
    again = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(**CONFIG, init_lora_weights="pissa_niter_4"))
    exact = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(**CONFIG, init_lora_weights="pissa"))
    assert_close(_logits(ours, ids), _logits(base, ids), kind="same_math_max")
    for (name, layer), (_, twin), (_, full) in zip(ours.lora_layers(), again.lora_layers(), exact.lora_layers()):
        A, B = layer.lora_factors("default")
        assert torch.equal(A, twin.lora_factors("default")[0]) and torch.equal(layer.weight, twin.weight)
        scaling = layer.adapter_settings["default"].scaling
        original = base.get_submodule(name).weight
        assert_close(layer.weight + scaling * B @ A, original, kind="same_math_max")
        # the same principal part as a full SVD: the singular values the adapter holds match to the randomized
        # method's accuracy
        ours_sv = torch.linalg.svdvals(scaling * B @ A)[:4]
        full_A, full_B = full.lora_factors("default")
        assert torch.allclose(ours_sv, torch.linalg.svdvals(scaling * full_B @ full_A)[:4], rtol=1e-3)


def test_pissa_with_subspace_iterations_is_peft_s_bit_for_bit():
    """pissa_niter_<n> draws its randomized SVD as each layer is built, as PEFT does."""
    base = tiny_llama().to(torch.bfloat16)
    torch.manual_seed(5)
    theirs = peft.get_peft_model(clone(base), peft.LoraConfig(**CONFIG, init_lora_weights="pissa_niter_3"))
    their_generator = torch.get_rng_state()
    torch.manual_seed(5)
    ours = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(**CONFIG, init_lora_weights="pissa_niter_3"))
    their_state, our_state = _peft_state(theirs), _our_state(ours)
    assert their_state.keys() == our_state.keys() and len(our_state) == 6
    for name, ours_values in our_state.items():
        assert all(torch.equal(a, b) for a, b in zip(ours_values, their_state[name])), name
    assert torch.equal(torch.get_rng_state(), their_generator)


def test_orthogonal_factors_start_from_a_zero_update_with_neither_factor_zero():
    base = tiny_llama()
    ids = tokens()
    torch.manual_seed(0)
    ours = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(**CONFIG, init_lora_weights="orthogonal"))
    for _, layer in ours.lora_layers():
        A, B = layer.lora_factors("default")
        assert A.abs().min() > 0 or A.abs().max() > 0.01
        assert B.abs().max() > 0.01 and A.abs().max() > 0.01
        assert torch.linalg.matrix_rank(A) == 2 and torch.linalg.matrix_rank(B) == 2  # r/2 directions each
        assert (B @ A).abs().max() < 1e-6 * B.abs().max() * A.abs().max() * A.shape[0] * 10
    assert_close(_logits(ours, ids), _logits(base, ids), kind="same_math")
    # an odd rank is refused where a layer takes it (as PEFT refuses it), the model unchanged; a pattern that matches
    # no module does not count, nor r where the patterns give every target its rank (both accepted by PEFT)
    for changes, odd in (({"r": 3}, 3), ({"rank_pattern": {"q_proj": 5}}, 5)):
        model = clone(base)
        before = snapshot(model)
        with pytest.raises(ValueError, match=f"rank to be even, got {odd}"):
            fastlora.get_peft_model(model, fastlora.LoraConfig(**{**CONFIG, **changes}, init_lora_weights="orthogonal"))
        assert_unchanged(model, before)
    for changes in ({"rank_pattern": {"no_such_module": 5}},
                    {"r": 3, "rank_pattern": {name: 4 for name in CONFIG["target_modules"]}}):
        settings = {**CONFIG, **changes, "init_lora_weights": "orthogonal"}
        ours = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(**settings))
        theirs = peft.get_peft_model(clone(base), peft.LoraConfig(**settings))
        assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_pissa_on_gpt2s_conv1d_reads_the_transposed_weight_as_peft():
    base = tiny_gpt2()
    ids = tokens(vocab=64)
    theirs, ours = _pair(base, "pissa", target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    for name, (A, B, W) in _our_state(ours).items():
        their_A, their_B, their_W = _peft_state(theirs)[name]
        assert torch.equal(A, their_A) and torch.equal(B, their_B) and torch.equal(W, their_W), name
    assert_close(_logits(ours, ids), _logits(base, ids), kind="same_math_max")


def test_olora_on_conv1d_factors_the_out_by_in_weight():
    """PEFT's OLoRA factors a Conv1D's stored (in × out) weight as it is, which gives factors of the wrong shapes;
    fastlora factors W (out × in): the output is unchanged."""
    base = tiny_gpt2()
    ids = tokens(vocab=64)
    ours = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(target_modules=["c_attn", "c_fc"], r=4,
                                                                   init_lora_weights="olora"))
    for name, layer in ours.lora_layers():
        A, B = layer.lora_factors("default")
        assert torch.allclose(B.T @ B, torch.eye(4), atol=1e-5)  # Q's columns
        assert not torch.equal(layer.weight, base.get_submodule(name).weight)
    assert_close(_logits(ours, ids), _logits(base, ids), kind="same_math_max")


def test_dora_magnitudes_follow_the_residual_weight_as_in_peft():
    base = tiny_llama()
    ids = tokens()
    theirs, ours = _pair(base, "pissa", use_dora=True)
    for name, layer in ours.lora_layers():
        their_layer = theirs.base_model.model.get_submodule(name)
        assert_close(layer.magnitude("default"), their_layer.lora_magnitude_vector["default"].weight, kind="same_math")
    assert_close(_logits(ours, ids), _logits(theirs, ids), kind="same_math")


def test_an_embedding_target_takes_the_default_initialisation_as_in_peft():
    base = tiny_llama()
    ours = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(target_modules=["embed_tokens", "q_proj"], r=4,
                                                                   init_lora_weights="pissa"))
    embedding = ours.base_model.model.model.embed_tokens
    A, B = embedding.lora_factors("default")
    assert torch.count_nonzero(A) == 0 and torch.count_nonzero(B) > 0
    assert torch.equal(embedding.weight, base.model.embed_tokens.weight)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("base")
    tiny_llama().save_pretrained(directory)
    return directory


@pytest.mark.parametrize("quantization", [
    dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
         bnb_4bit_compute_dtype=torch.bfloat16),
    dict(load_in_8bit=True)], ids=["nf4", "fp4-double-bf16", "int8"])
def test_olora_on_a_quantized_base_requantizes_the_residual_as_peft(checkpoint, quantization):
    ids = tokens()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(load_quantized(checkpoint, **quantization),
                                     peft.LoraConfig(**CONFIG, init_lora_weights="olora"))
        ours = fastlora.get_peft_model(load_quantized(checkpoint, **quantization),
                                       fastlora.LoraConfig(**CONFIG, init_lora_weights="olora"))
        original = load_quantized(checkpoint, **quantization)
    their_state = _peft_state(theirs)
    for name, layer in ours.lora_layers():
        A, B = layer.lora_factors("default")
        their_A, their_B, their_W = their_state[name]
        assert torch.equal(A, their_A) and torch.equal(B, their_B), name
        ours_base, theirs_base = layer.base_layer, theirs.base_model.model.get_submodule(name).get_base_layer()
        assert same_bytes(ours_base.weight.data, their_W.data), name
        assert not same_bytes(ours_base.weight.data, original.get_submodule(name).weight.data), name
        for key, value in theirs_base.state_dict().items():  # absmax, quantization state, SCB: PEFT's
            if isinstance(value, torch.Tensor):
                assert same_bytes(ours_base.state_dict()[key], value), (name, key)
    with torch.no_grad():
        assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, kind="same_math")


def test_pissa_on_a_quantized_base_is_refused_as_peft_refuses_it(checkpoint):
    """Refused with the model unchanged, a full-precision target included (q_proj, left out of quantization)."""
    model = load_quantized(checkpoint, load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           llm_int8_skip_modules=["q_proj", "lm_head"])
    assert isinstance(model.model.layers[0].self_attn.q_proj.weight, torch.nn.Parameter)
    before = snapshot(model)
    with pytest.raises(TypeError, match="Please initialize PiSSA under float32, float16, or bfloat16"):
        fastlora.get_peft_model(model, fastlora.LoraConfig(**CONFIG, init_lora_weights="pissa"))
    assert_unchanged(model, before)


def test_orthogonal_on_a_quantized_base_gives_float_factors(checkpoint):
    """PEFT casts the factors to the 4-bit weight's storage dtype there and fails; fastlora holds them as any
    adapter on such a base, in float32."""
    ids = tokens()
    model = load_quantized(checkpoint, load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_compute_dtype=torch.float32)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    ours = fastlora.get_peft_model(model, fastlora.LoraConfig(**CONFIG, init_lora_weights="orthogonal"))
    for _, layer in ours.lora_layers():
        A, B = layer.lora_factors("default")
        assert A.dtype == B.dtype == torch.float32 and A.abs().max() > 0.01
    with torch.no_grad():
        assert_close(ours(input_ids=ids).logits, before, kind="same_math")


def test_weight_initialisations_on_target_parameters_are_refused_and_change_nothing():
    model = tiny_mixtral()
    before = snapshot(model)
    with pytest.raises(UnsupportedFeatureError, match="'olora' on a target_parameters adapter"):
        fastlora.get_peft_model(model, fastlora.LoraConfig(target_modules=["q_proj"], r=4, init_lora_weights="olora",
                                                           target_parameters=["experts.gate_up_proj"]))
    assert_unchanged(model, before)


def test_other_initialisations_and_malformed_names_are_refused():
    with pytest.raises(UnsupportedFeatureError, match="kasa_config"):
        fastlora.LoraConfig(**CONFIG, kasa_config={"rank": 4})
    with pytest.raises(UnsupportedFeatureError, match="'astra'.* ASTRA .* fastlora does not implement"):
        fastlora.LoraConfig(**CONFIG, init_lora_weights="astra")
    with pytest.raises(ValueError, match="Unknown initialization init_lora_weights='PISSA'"):
        fastlora.LoraConfig(**CONFIG, init_lora_weights="PISSA")
    assert fastlora.LoraConfig(**CONFIG, init_lora_weights="Gaussian").init_lora_weights == "gaussian"
    with pytest.raises(ValueError, match="'pissa' or 'pissa_niter_"):
        fastlora.LoraConfig(**CONFIG, init_lora_weights="pissa_niter_x")


@pytest.mark.parametrize("model", ["llama", "llama-embedding", "mixtral-experts"])
def test_nora_normalises_each_column_of_the_drawn_a_and_zeroes_b(model):
    """NoRA: A as the layer constructs it (the draws of init_lora_weights=False, the generator left where False
    leaves it), each column divided by its norm (a stack of experts' A: each expert's r rows on their own), B = 0;
    an embedding target takes the default initialisation, as in PEFT.  (PEFT 0.22 fails on experts stored as a 3-D
    parameter; its intended per-expert formula is followed.)"""
    make, config = {"llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj"], r=4)),
                    "llama-embedding": (tiny_llama, dict(target_modules=["q_proj", "embed_tokens"], r=4)),
                    "mixtral-experts": (tiny_mixtral, dict(target_modules=["q_proj"], r=4,
                                                           target_parameters=["experts.gate_up_proj"]))}[model]
    base = make()
    torch.manual_seed(0)
    nora = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(**config, init_lora_weights="nora"))
    after_nora = torch.get_rng_state()
    torch.manual_seed(0)
    drawn = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(**config, init_lora_weights=False))
    same_draws = "embed_tokens" not in config["target_modules"]  # an embedding's default draws more than False's
    assert torch.equal(torch.get_rng_state(), after_nora) or not same_draws
    layers = dict(nora.lora_layers())
    for name, layer in drawn.lora_layers():
        A, B = layers[name].lora_factors("default")
        if name.endswith("embed_tokens"):
            assert not A.any() and B.any()
            continue
        drawn_A = layer.lora_factors("default")[0].detach()
        per_expert = drawn_A.view(-1, 4, drawn_A.shape[-1])
        assert torch.equal(A, (per_expert / per_expert.norm(dim=1, keepdim=True)).view_as(drawn_A)) or not same_draws
        assert_close(A.view(-1, 4, A.shape[-1]).norm(dim=1), torch.ones(per_expert.shape[0], A.shape[-1]),
                     kind="same_math", msg=name)
        assert not B.any(), name
    ids = tokens()
    with torch.no_grad():  # B = 0: the base model's output
        torch.testing.assert_close(nora(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=0)


def test_loading_an_adapter_whose_config_says_pissa_initialises_the_base_again_as_peft(tmp_path):
    """PEFT's files keep the initialisation's name; loading one runs it on the base (why PEFT's guide sets
    init_lora_weights = True before saving the initial adapter), and fastlora does the same."""
    base = tiny_llama()
    ids = tokens()
    theirs, _ = _pair(base, "pissa")
    theirs.save_pretrained(tmp_path)
    their_loaded = peft.PeftModel.from_pretrained(clone(base), tmp_path)
    ours = fastlora.PeftModel.from_pretrained(clone(base), tmp_path)
    assert ours.peft_config["default"].init_lora_weights == "pissa"
    for name, layer in ours.lora_layers():
        assert torch.equal(layer.weight, their_loaded.base_model.model.get_submodule(name).get_base_layer().weight)
    assert_close(_logits(ours, ids), _logits(their_loaded, ids), kind="same_math")


def test_refusals_before_any_weight_changes_rank_and_meta_device():
    """A rank beyond a layer's min(in, out) (v_proj here: 64 → 32) and weights on the meta device are refused with
    the model unchanged (the other targets' weights included)."""
    model = tiny_llama()
    before = snapshot(model)
    for init in ("pissa", "olora", "loftq"):
        extra = {"loftq_config": {"loftq_bits": 4}} if init == "loftq" else {}
        with pytest.raises(ValueError, match=r"r=48 on a layer of 64 → 32 features: the rank can be at most 32"):
            fastlora.get_peft_model(model, fastlora.LoraConfig(target_modules=["q_proj", "v_proj"], r=48,
                                                               init_lora_weights=init, **extra))
        assert_unchanged(model, before)
    with torch.device("meta"):
        on_meta = tiny_llama()
    with pytest.raises(ValueError, match="on the meta device"):
        fastlora.get_peft_model(on_meta, fastlora.LoraConfig(**CONFIG, init_lora_weights="olora"))
    assert not any(isinstance(m, fastlora.LoRALinear) for m in on_meta.modules())


def test_changing_weights_other_adapters_or_tied_modules_read_is_said():
    ours = fastlora.get_peft_model(tiny_llama(), fastlora.LoraConfig(target_modules=["q_proj"], r=4))
    with pytest.warns(UserWarning, match=r"under the adapters \['default'\] as well"):
        ours.add_adapter("pissa", fastlora.LoraConfig(target_modules=["q_proj"], r=4, init_lora_weights="pissa"))
    tied = tiny_llama(tie_word_embeddings=True)
    with pytest.warns(UserWarning, match=r"changes the base weights of \['lm_head'\], which \['model.embed_tokens"):
        fastlora.get_peft_model(tied, fastlora.LoraConfig(target_modules=["q_proj", "lm_head"], r=4,
                                                          init_lora_weights="olora"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # orthogonal changes no base weight: nothing to say
        ours.add_adapter("orthogonal", fastlora.LoraConfig(target_modules=["q_proj"], r=4, init_lora_weights="orthogonal"))


@pytest.mark.parametrize("init", ["eva", "lora_ga"])
def test_trained_eva_and_lora_ga_adapters_load_and_the_config_starts_as_true(init, tmp_path):
    """EVA and LoRA-GA get their values from a data-driven step; a trained adapter's file (its config still naming
    the initialisation, with its eva_config) loads as PEFT loads it, and a new adapter whose step has not run
    starts as PEFT's does before it (B = 0)."""
    base = tiny_llama()
    ids = tokens()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(clone(base), peft.LoraConfig(**CONFIG, init_lora_weights=init))
    with torch.no_grad():
        for _, param in theirs.named_parameters():
            if param.requires_grad:
                param.add_(0.05)
    theirs.save_pretrained(tmp_path)
    ours = fastlora.PeftModel.from_pretrained(clone(base), tmp_path)
    assert ours.peft_config["default"].init_lora_weights == init
    assert_close(_logits(ours, ids), _logits(theirs, ids), kind="same_math")
    ours.save_pretrained(tmp_path / "again")
    # LoRA-GA's estimate comes before get_peft_model: without it, a warning; EVA's step comes after
    with pytest.warns(UserWarning, match="no target layer holds" if init == "lora_ga" else "Using default EVA"):
        fresh = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(**CONFIG, init_lora_weights=init))
    assert all(torch.count_nonzero(layer.lora_factors("default")[1]) == 0 for _, layer in fresh.lora_layers())


def test_peft_s_eva_config_object_is_kept_as_the_dict_its_files_hold(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = fastlora.LoraConfig(**CONFIG, init_lora_weights="eva", eva_config=peft.EvaConfig(rho=2.0))
    assert isinstance(config.eva_config, dict) and config.eva_config["rho"] == 2.0
    config.save_pretrained(tmp_path)
    assert fastlora.LoraConfig.from_pretrained(tmp_path).eva_config == config.eva_config

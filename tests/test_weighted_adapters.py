"""add_weighted_adapter: every combination type PEFT defines for LoRA, compared with PEFT on the same adapters
(the dare types from the same torch seed): the new adapter's factors in every layer, and the outputs."""

import peft
import pytest
import torch

import fastlora
from tests.models import PEFT_BEFORE_0_22, SEED_TARGETS, assert_unchanged, clone, copy_lora_weights, snapshot, tiny_llama, tokens
from tests.tolerances import assert_close

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _pair(ranks=(4, 4), targets=(SEED_TARGETS, ["q_proj", "v_proj", "up_proj"])):
    base = tiny_llama()
    models = []
    for library in (peft, fastlora):
        torch.manual_seed(1)
        model = library.get_peft_model(clone(base), library.LoraConfig(
            target_modules=list(targets[0]), r=ranks[0], lora_alpha=8, init_lora_weights=False))
        model.add_adapter("b", library.LoraConfig(target_modules=list(targets[1]), r=ranks[1], lora_alpha=3,
                                                  init_lora_weights=False))
        models.append(model)
    theirs, ours = models
    copy_lora_weights(theirs, ours)
    return theirs, ours


CASES = [
    ("cat", {}), ("linear", {}), ("svd", {}), ("svd", {"svd_rank": 2}), ("svd", {"svd_clamp": 0.9}),
    ("ties", {"density": 0.5}), ("ties", {"density": 0.5, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 0.3}), ("dare_linear", {"density": 0.6}), ("dare_ties", {"density": 0.6}),
    ("ties_svd", {"density": 0.5}), ("dare_linear_svd", {"density": 0.6}), ("dare_ties_svd", {"density": 0.7}),
    ("magnitude_prune_svd", {"density": 0.4}),
]


@pytest.mark.parametrize("combination_type, options", CASES, ids=[f"{c}-{'-'.join(map(str, o.values()))}" for c, o in CASES])
def test_combination_as_peft(combination_type, options):
    theirs, ours = _pair()
    for model in (theirs, ours):
        torch.manual_seed(7)  # the dare types' random pruning
        model.add_weighted_adapter(["default", "b"], [0.7, -1.3], "mix", combination_type=combination_type, **options)
    state = theirs.state_dict()
    layers = list(ours.lora_layers("mix"))
    assert len(layers) == len([k for k in state if k.endswith("lora_A.mix.weight")])
    for name, layer in layers:
        A, B = layer.lora_factors("mix")
        assert_close(A, state[f"base_model.model.{name}.lora_A.mix.weight"], kind="same_math_cancelling", msg=name)
        assert_close(B, state[f"base_model.model.{name}.lora_B.mix.weight"], kind="same_math_cancelling", msg=name)
        if combination_type == "cat":  # the same products in the same order: PEFT's bits
            assert torch.equal(A, state[f"base_model.model.{name}.lora_A.mix.weight"]), name
    assert ours.peft_config["mix"].r == theirs.peft_config["mix"].r
    assert not any(p.requires_grad for n, p in ours.named_parameters() if n.endswith("_mix"))  # frozen, not active
    ids = tokens()
    for model in (theirs, ours):
        model.set_adapter("mix")
    assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, kind="same_math_cancelling")


def test_cat_adds_the_deltas_exactly_and_takes_different_ranks():
    _, ours = _pair(ranks=(4, 2))
    ours.add_weighted_adapter(["default", "b"], [0.5, 2.0], "mix", combination_type="cat")
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_factors("mix")[0].shape[0] == 6
    expected = 0.5 * layer.delta_weight("default") + 2.0 * layer.delta_weight("b")
    assert_close(layer.delta_weight("mix"), expected, kind="same_math")


@pytest.mark.parametrize("call, error, match", [
    (lambda m: m.add_weighted_adapter(["default", "b"], [1.0, 1.0], "x", combination_type="linear"), ValueError,
     "same r value"),
    (lambda m: m.add_weighted_adapter(["default", "nope"], [1.0, 1.0], "x"), ValueError, "nope does not exist"),
    (lambda m: m.add_weighted_adapter(["default", "b"], [1.0], "x"), ValueError, "one weight per adapter"),
    (lambda m: m.add_weighted_adapter(["default", "b"], [1.0, 1.0], "x", combination_type="mean"), ValueError,
     "Invalid combination_type"),
    (lambda m: m.add_weighted_adapter(["default", "b"], [1.0, 1.0], "x", combination_type="ties_svd"), ValueError,
     "needs a density"),
    (lambda m: m.add_weighted_adapter(["default", "b"], ["1", 1.0], "x", combination_type="cat"), ValueError,
     "weights must be finite numbers"),
    (lambda m: m.add_weighted_adapter(["default", "b"], [1.0, 1.0], "x", svd_clamp=-1), ValueError,
     r"svd_clamp is a quantile in \[0, 1\]"),
    (lambda m: m.add_weighted_adapter(["default", "b"], [1.0, 1.0], "x", svd_driver="fast"), ValueError,
     "svd_driver must be one of"),
])
def test_bad_calls_are_refused_and_change_nothing(call, error, match):
    _, ours = _pair(ranks=(4, 2))
    before = snapshot(ours)
    with pytest.raises(error, match=match):
        call(ours)
    assert_unchanged(ours, before)
    assert "x" not in ours.peft_config


def test_same_rank_types_refuse_adapters_whose_ranks_differ_in_a_layer():
    """Equal ranks in the configs, but a rank_pattern gives one layer another: refused before anything changes."""
    _, ours = _pair(ranks=(4, 4))
    ours.add_adapter("c", fastlora.LoraConfig(target_modules=list(SEED_TARGETS), r=4, rank_pattern={"q_proj": 2}))
    before = snapshot(ours)
    for combination_type in ("linear", "ties", "dare_linear", "magnitude_prune"):
        with pytest.raises(ValueError, match=r"in model\.layers\.0\.self_attn\.q_proj their ranks are"):
            ours.add_weighted_adapter(["default", "c"], [1.0, 1.0], "x", combination_type=combination_type,
                                      density=0.5)
    assert_unchanged(ours, before)
    ours.add_weighted_adapter(["default", "c"], [1.0, 1.0], "x", combination_type="cat")



def test_weights_may_be_one_element_tensors_or_numpy_numbers():
    """As PEFT takes them (``list(torch.tensor([...]))``): the same adapter as from the numbers themselves; options
    of the SVD alone (svd_clamp, svd_driver) are not checked for a type that runs none, as PEFT ignores them."""
    np = pytest.importorskip("numpy")
    _, ours = _pair()
    for combination_type in ("cat", "linear", "svd"):
        ours.add_weighted_adapter(["default", "b"], [0.7, -1.3], "floats", combination_type=combination_type)
        ours.add_weighted_adapter(["default", "b"], list(torch.tensor([0.7, -1.3], dtype=torch.float64)), "tensors",
                                  combination_type=combination_type, svd_clamp=None if combination_type == "svd" else 5)
        ours.add_weighted_adapter(["default", "b"], [np.float64(0.7), np.float32(-1.3)], "numpy",
                                  combination_type=combination_type)
        for name, layer in ours.lora_layers("floats"):
            assert all(torch.equal(a, b) for a, b in zip(layer.lora_factors("floats"), layer.lora_factors("tensors"))), name
            assert_close(layer.delta_weight("numpy"), layer.delta_weight("floats"), kind="same_math", msg=name)
        for name in ("floats", "tensors", "numpy"):
            ours.delete_adapter(name)


def _rslora_or_biased_pair(**options):
    base = tiny_llama()
    models = []
    for library in (peft, fastlora):
        torch.manual_seed(1)
        model = library.get_peft_model(clone(base), library.LoraConfig(
            target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights=False, **options))
        model.add_adapter("b", library.LoraConfig(target_modules=["q_proj", "up_proj"], r=2, lora_alpha=3,
                                                  init_lora_weights=False, **options))
        models.append(model)
    theirs, ours = models
    copy_lora_weights(theirs, ours)
    return theirs, ours


@pytest.mark.parametrize("combination_type", ["cat", "svd"])
def test_the_combined_adapter_has_scaling_one_without_rslora_as_peft(combination_type):
    """Each adapter's scaling (rsLoRA's α/√r here) is in the combined factors, so the new adapter has lora_alpha = r
    and no rsLoRA (its scaling 1; with rsLoRA it would be √r): "cat" adds the deltas exactly (as PEFT since 0.22)."""
    theirs, ours = _rslora_or_biased_pair(use_rslora=True)
    for model in (theirs, ours):
        model.add_weighted_adapter(["default", "b"], [0.5, 2.0], "mix", combination_type=combination_type,
                                   **({"svd_rank": 6} if combination_type == "svd" else {}))  # every direction kept
    assert ours.peft_config["mix"].use_rslora is False
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.adapter_settings["mix"].scaling == 1.0
    expected = 0.5 * layer.delta_weight("default") + 2.0 * layer.delta_weight("b")
    assert_close(layer.delta_weight("mix"), expected, kind="same_math_cancelling")
    if not PEFT_BEFORE_0_22:  # 0.21 kept rsLoRA, and so scaled the combination by √r
        ids = tokens()
        for model in (theirs, ours):
            model.set_adapter("mix")
        assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, kind="same_math_cancelling")


@pytest.mark.parametrize("combination_type", ["cat", "linear", "svd"])
def test_biases_on_b_combine_weighted_and_scaled_as_peft(combination_type):
    """With lora_bias in the adapters the combined one has a bias on B: Σ w_i s_i b_i over the adapters holding
    one in the layer (as PEFT since 0.22)."""
    theirs, ours = _rslora_or_biased_pair(lora_bias=True)
    if combination_type == "linear":  # equal ranks needed: the second adapter again, at r = 4
        theirs, ours = _pair()
        for model in (theirs, ours):
            model.add_adapter("c", type(model.peft_config["default"])(target_modules=["q_proj", "up_proj"], r=4,
                                                                       lora_alpha=3, init_lora_weights=False,
                                                                       lora_bias=True))
        copy_lora_weights(theirs, ours)
    second = "b" if combination_type != "linear" else "c"
    for model in (theirs, ours):
        model.add_weighted_adapter(["default", second], [0.5, -2.0], "mix", combination_type=combination_type)
    assert ours.peft_config["mix"].lora_bias is True
    for name, layer in ours.lora_layers("mix"):
        expected = torch.zeros_like(layer.lora_bias("mix")).detach()
        holders = [(a, w) for a, w in (("default", 0.5), (second, -2.0))
                   if a in layer.adapter_settings and layer.lora_bias(a) is not None]
        for adapter, weight in holders:
            expected += weight * layer.adapter_settings[adapter].scaling * layer.lora_bias(adapter).detach()
        assert torch.equal(layer.lora_bias("mix"), expected) and bool(expected.all()) == bool(holders), name
    if not PEFT_BEFORE_0_22:  # 0.21 refused lora_bias here
        state = theirs.state_dict()
        for name, layer in ours.lora_layers("mix"):
            assert torch.equal(layer.lora_bias("mix"), state[f"base_model.model.{name}.lora_B.mix.bias"]), name
        ids = tokens()
        for model in (theirs, ours):
            model.set_adapter("mix")
        assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, kind="same_math_cancelling")


def test_a_bias_on_b_beside_an_embedding_adapter_is_refused_as_peft():
    model = fastlora.get_peft_model(tiny_llama(), fastlora.LoraConfig(target_modules=["q_proj"], lora_bias=True))
    model.add_adapter("emb", fastlora.LoraConfig(target_modules=["embed_tokens"]))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"adapters \['default'\] use lora_bias=True while adapters \['emb'\] adapt an "
                                         r"nn.Embedding"):
        model.add_weighted_adapter(["default", "emb"], [1.0, 1.0], "mix", combination_type="cat")
    assert_unchanged(model, before)
    assert "mix" not in model.peft_config

"""rank_pattern / alpha_pattern: per-module rank and alpha with PEFT's key matching (a key matches a module
whose qualified name it is, or ends with after a dot, as a regex; the first matching key in the dict's
order wins), compared with PEFT on one model."""

import json
import warnings

import peft
import pytest

import fastlora
from fastlora import LoRALinear
from tests.models import PEFT_BEFORE_0_22, SEED_TARGETS, assert_step_as_peft, clone, copy_lora_weights, tiny_llama, tokens
from tests.tolerances import assert_close

PATTERNS = dict(
    rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 4, r"^model\.layers\.0\.mlp\.up.*": 3, "v_proj": 5},
    alpha_pattern={"k_proj": 5, "o_proj": 64},
)
CONFIG = dict(task_type="CAUSAL_LM", target_modules=SEED_TARGETS, r=8, lora_alpha=32, init_lora_weights=False)


def _pair(**changes):
    base = tiny_llama()
    theirs = peft.get_peft_model(clone(base), peft.LoraConfig(**{**CONFIG, **PATTERNS, **changes}))
    ours = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(**{**CONFIG, **PATTERNS, **changes}))
    copy_lora_weights(theirs, ours)
    return base, theirs, ours


@pytest.mark.parametrize("use_rslora", [False, True])
def test_ranks_scalings_outputs_and_gradients_as_peft(use_rslora):
    _, theirs, ours = _pair(use_rslora=use_rslora)
    peers = dict(theirs.base_model.model.named_modules())
    layers = [(n, m) for n, m in ours.base_model.model.named_modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 2 * len(SEED_TARGETS)
    ranks = {}
    for name, layer in layers:
        peer = peers[name]
        assert layer.r == peer.r["default"], name
        assert layer.scaling == pytest.approx(peer.scaling["default"], rel=1e-12), name
        ranks[name] = layer.r
    assert ranks["model.layers.0.self_attn.q_proj"] == 2 and ranks["model.layers.1.mlp.down_proj"] == 4
    assert ranks["model.layers.0.mlp.up_proj"] == 3 and ranks["model.layers.1.mlp.up_proj"] == 8
    assert ranks["model.layers.1.self_attn.v_proj"] == 5
    assert_step_as_peft(theirs, ours, tokens())

def test_adapter_files_both_ways(tmp_path):
    base, theirs, ours = _pair()
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == PATTERNS["rank_pattern"] and saved["alpha_pattern"] == PATTERNS["alpha_pattern"]
    ids = tokens()
    expected = ours(input_ids=ids).logits
    for model in (peft.PeftModel.from_pretrained(clone(base), tmp_path / "ours"),
                  fastlora.PeftModel.from_pretrained(clone(base), tmp_path / "theirs")):
        assert_close(model(input_ids=ids).logits, expected, kind="same_math")


def test_merge_uses_each_layers_own_scaling():
    base, theirs, ours = _pair()
    ids = tokens()
    expected = ours(input_ids=ids).logits
    merged = ours.merge_and_unload()
    assert_close(merged(input_ids=ids).logits, expected, kind="same_math_cancelling")
    assert_close(merged(input_ids=ids).logits, theirs.merge_and_unload()(input_ids=ids).logits, kind="same_math")


@pytest.mark.parametrize("changes, error, match", [
    (dict(rank_pattern={"q_proj": 0}), ValueError, r"rank_pattern\['q_proj'\]: r must be an integer >= 1"),
    (dict(alpha_pattern={"q_proj": -1.0}), ValueError, r"alpha_pattern\['q_proj'\]: lora_alpha must be"),
    (dict(rank_pattern={"q_proj(": 2}), ValueError, "not a valid regex"),
    (dict(rank_pattern=[("q_proj", 2)]), TypeError, "rank_pattern must be a dict"),
])
def test_bad_patterns_are_refused(changes, error, match):
    with pytest.raises(error, match=match):
        fastlora.LoraConfig(target_modules=["q_proj"], **changes)


def test_the_first_matching_key_wins_and_the_file_keeps_the_order(tmp_path):
    """Two keys matching one module with different ranks: the first in the dict's order decides (PEFT's rule), and
    adapter_config.json keeps the patterns' order (other keys sorted), so the adapter reloads with the same ranks
    (as PEFT writes it since 0.22)."""
    patterns = {"v_proj": 5, r"layers\.1\.self_attn\.v_proj": 6}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn of
        ours = fastlora.get_peft_model(tiny_llama(), fastlora.LoraConfig(**{**CONFIG, "rank_pattern": patterns}))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**{**CONFIG, "rank_pattern": patterns}))
    name = "model.layers.1.self_attn.v_proj"
    assert ours.base_model.model.get_submodule(name).r == theirs.base_model.model.get_submodule(name).r["default"] == 5
    ours.save_pretrained(tmp_path / "ours")
    text = (tmp_path / "ours" / "adapter_config.json").read_text()
    assert list(json.loads(text)["rank_pattern"]) == list(patterns)
    assert list(json.loads(text)) == sorted(json.loads(text))
    assert fastlora.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").base_model.model.get_submodule(
        name).r == 5
    assert peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").base_model.model.get_submodule(
        name).r["default"] == 5
    if not PEFT_BEFORE_0_22:  # 0.21 sorted them
        theirs.save_pretrained(tmp_path / "theirs")
        assert list(json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())["rank_pattern"]) == \
            list(patterns)


def test_none_means_no_pattern():
    config = fastlora.LoraConfig(target_modules=["q_proj"], rank_pattern=None, alpha_pattern=None)
    assert config.rank_pattern == {} and config.settings_for("model.q_proj") == config.settings


def test_pattern_keys_that_match_no_target_are_warned_about_as_peft_warns():
    """PEFT's warning, on get_peft_model and add_adapter alike; a key matching an adapted parameter's name
    (target_parameters) is used, so not warned about (as PEFT since 0.22)."""
    changes = {"rank_pattern": {"q_proj": 2, "nowhere": 3}, "alpha_pattern": {r"layers\.9\..*": 4}}
    caught = {}
    for library in (peft, fastlora):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            model = library.get_peft_model(tiny_llama(), library.LoraConfig(**{**CONFIG, **changes}))
            model.add_adapter("other", library.LoraConfig(**{**CONFIG, "target_modules": ["q_proj"],
                                                              "rank_pattern": {"up_proj": 2}}))
        caught[library] = sorted(str(w.message) for w in record if "did not match any targeted" in str(w.message))
    said = "did not match any targeted module or parameter and were ignored"
    assert caught[fastlora] == [
        f"The following alpha_pattern keys {said}: ['layers\\\\.9\\\\..*'].",
        f"The following rank_pattern keys {said}: ['nowhere'].",
        f"The following rank_pattern keys {said}: ['up_proj']."]
    if not PEFT_BEFORE_0_22:  # 0.21 said "module" alone
        assert caught[peft] == caught[fastlora]
    from transformers import MixtralConfig, MixtralForCausalLM

    moe = MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=2))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "The following", RuntimeWarning)
        fastlora.get_peft_model(moe, fastlora.LoraConfig(target_modules=["q_proj"], target_parameters=[
            "mlp.experts.gate_up_proj"], rank_pattern={"gate_up_proj": 2}))

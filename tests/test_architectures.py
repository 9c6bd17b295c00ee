"""The decoder architectures LoRA users fine-tune, each as a tiny model built from transformers' own classes
(nothing downloaded): with target_modules="all-linear" and with the architecture's default targets, fastlora's
model and PEFT's agree from the same initial adapter (loss and every LoRA gradient), and the adapter files load
both ways.  Where PEFT has no default targets for an architecture, both refuse a config without them."""

import warnings

import peft
import pytest
import torch
import transformers

import fastlora
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from tests.models import PEFT_BEFORE_0_22, clone, copy_lora_weights, tokens
from tests.tolerances import assert_close

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

_SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128, max_position_embeddings=64)
_MOE = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            shared_expert_intermediate_size=16)

# architecture → (config class, the config's arguments)
ARCHITECTURES = {
    "llama": ("LlamaConfig", _SMALL),
    "mistral": ("MistralConfig", _SMALL),
    "qwen2": ("Qwen2Config", _SMALL),
    "qwen3": ("Qwen3Config", dict(_SMALL, head_dim=8)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(_SMALL, **_MOE)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_SMALL, head_dim=8, **_MOE)),
    "mixtral": ("MixtralConfig", dict(_SMALL, **_MOE)),
    "gemma": ("GemmaConfig", dict(_SMALL, head_dim=8)),
    "gemma2": ("Gemma2Config", dict(_SMALL, head_dim=8)),
    "gemma3_text": ("Gemma3TextConfig", dict(_SMALL, head_dim=8)),
    "phi": ("PhiConfig", _SMALL),
    "phi3": ("Phi3Config", dict(_SMALL, pad_token_id=0)),
    "olmo2": ("Olmo2Config", _SMALL),
    "gpt_neox": ("GPTNeoXConfig", _SMALL),
    "falcon": ("FalconConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)),
    "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                              vocab_size=128, max_position_embeddings=64, word_embed_proj_dim=32)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64)),
    "granite": ("GraniteConfig", _SMALL),
    "starcoder2": ("Starcoder2Config", _SMALL),
    "cohere": ("CohereConfig", _SMALL),
    "stablelm": ("StableLmConfig", _SMALL),
}


def _model(architecture: str):
    config_class, arguments = ARCHITECTURES[architecture]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**arguments)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_config(config).eval()


def _grads(model, rename):
    return {rename(n): p.grad for n, p in model.named_parameters() if p.requires_grad}


def _case(architecture, targets):
    return pytest.param(architecture, targets, id=f"{architecture}-{targets or 'default-targets'}")


@pytest.mark.parametrize("architecture, targets", [_case(a, t) for a in ARCHITECTURES for t in ("all-linear", None)])
def test_fastlora_agrees_with_peft(architecture, targets, tmp_path):
    """With default targets (target_modules left out), fastlora takes PEFT's table; PEFT is given the same list
    explicitly (left out, PEFT 0.21 refuses MoE models under transformers 5, whose v4→v5 conversion empties it)."""
    base = _model(architecture)
    config = dict(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM")
    if targets is None:
        table = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(base.config.model_type)
        if table is None:  # no default targets: both refuse
            with pytest.raises(ValueError):
                peft.get_peft_model(clone(base), peft.LoraConfig(**config))
            with pytest.raises(ValueError, match="no default targets"):
                fastlora.get_peft_model(clone(base), fastlora.LoraConfig(**config))
            return
        theirs = peft.get_peft_model(clone(base), peft.LoraConfig(**config, target_modules=list(table)))
        ours = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(**config))
        assert sorted(ours.peft_config["default"].target_modules) == sorted(table)
    else:
        ours = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(**config, target_modules=targets))
        if PEFT_BEFORE_0_22 and architecture == "qwen2_moe":  # 0.21 did not rewrite Qwen2-MoE's config yet:
            written = ours.peft_config["default"]  # it is given the rewritten one
            config.update(target_parameters=written.target_parameters, rank_pattern=written.rank_pattern,
                          alpha_pattern=written.alpha_pattern)
            targets = list(written.target_modules)
        theirs = peft.get_peft_model(clone(base), peft.LoraConfig(**config, target_modules=targets))
    copy_lora_weights(theirs, ours)
    assert 2 * len(list(ours.lora_layers())) == len([k for k in theirs.state_dict() if "lora_" in k])
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()

    ids = tokens(length=12)
    out_theirs, out_ours = theirs(input_ids=ids, labels=ids), ours(input_ids=ids, labels=ids)
    assert_close(out_ours.loss, out_theirs.loss, kind="same_math")
    out_theirs.loss.backward()
    out_ours.loss.backward()
    grads = _grads(theirs, lambda n: n.replace(".default", ""))
    mine = _grads(ours, lambda n: n.replace("_default", ".weight"))
    assert mine.keys() == grads.keys()
    for name, grad in mine.items():
        assert_close(grad, grads[name], kind="same_math_cancelling", msg=name)

    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    expected = ours(input_ids=ids).logits
    for model in (peft.PeftModel.from_pretrained(clone(base), tmp_path / "ours"),
                  fastlora.PeftModel.from_pretrained(clone(base), tmp_path / "theirs")):
        assert_close(model(input_ids=ids).logits, expected, kind="same_math")


@pytest.mark.parametrize("architecture", ["mixtral", "qwen3_moe"])
def test_all_linear_adapts_fused_experts_as_peft_rewrites_the_config(architecture):
    """transformers 5 fused these models' experts into parameters; "all-linear" still adapts them (and the router),
    through target_parameters, with rank 2r on gate_up_proj: the config both libraries write is the same."""
    base = _model(architecture)
    theirs = peft.get_peft_model(clone(base), peft.LoraConfig(target_modules="all-linear", r=4, lora_alpha=8))
    ours = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(target_modules="all-linear", r=4, lora_alpha=8))
    mine, peft_config = ours.peft_config["default"], theirs.peft_config["default"]
    assert sorted(mine.target_parameters) == sorted(peft_config.target_parameters) == [
        "down_proj", "gate.weight", "gate_up_proj"]
    assert sorted(mine.target_modules) == sorted(peft_config.target_modules)
    assert mine.rank_pattern == peft_config.rank_pattern == {r".*\.gate_up_proj": 8}
    assert mine.alpha_pattern == peft_config.alpha_pattern == {r".*\.gate_up_proj": 16}
    experts = [p for n, p in ours.named_parameters() if ".experts." in n and p.requires_grad]
    assert len(experts) == 4 * base.config.num_hidden_layers  # A and B of gate_up_proj and of down_proj


def test_all_linear_names_the_expert_parameters_it_leaves_frozen():
    """Phi-MoE's experts are parameters too, and PEFT does not rewrite its config: "all-linear" leaves them
    frozen, and says how to adapt them.  (Its router computes in its own way: not adapted, left out here.)"""
    torch.manual_seed(0)
    config = transformers.PhimoeConfig(**dict(_SMALL, **_MOE))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = transformers.AutoModelForCausalLM.from_config(config).eval()
    with pytest.warns(UserWarning, match=r"experts stored as parameters in model\.layers\.0\.mlp\.experts .*left "
                                         r"frozen; name them in target_parameters"):
        model = fastlora.get_peft_model(base, fastlora.LoraConfig(target_modules="all-linear",
                                                                  exclude_modules=["router"]))
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".experts." in n)

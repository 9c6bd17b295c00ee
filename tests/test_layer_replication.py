"""layer_replication: a stack of decoder layers rebuilt from the model's, the copies sharing the base weights with
adapters of their own, compared with PEFT (counts, logits, gradients, generate, files both ways); then what fastlora
adds: models whose config lists a type per layer (Qwen2), a merge into a standalone model of the new depth (PEFT's
merges every copy's update into the one shared weight), refusals that leave the model as it was."""

import copy
import warnings

import peft
import pytest
import torch

import fastlora
from tests.models import assert_unchanged, snapshot, tiny_llama, tokens
from tests.tolerances import assert_close

IDS = tokens()
MAP = [[0, 2], [1, 2]]  # layers [0, 1] → [0, 1, 1]
OPTIONS = dict(target_modules=["q_proj", "v_proj", "down_proj"], layer_replication=MAP, init_lora_weights=False)


def _adapted(lib, model=None, **options):
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.get_peft_model(model if model is not None else tiny_llama(),
                                  lib.LoraConfig(**copy.deepcopy({**OPTIONS, **options})))


def _layers(model):
    return model.base_model.model.model.layers


def test_the_replicated_stack_trains_generates_and_saves_as_peft(tmp_path):
    theirs, ours = _adapted(peft), _adapted(fastlora)
    assert len(_layers(ours)) == 3 and ours.config.num_hidden_layers == 3
    assert _layers(ours)[2].self_attn.layer_idx == 2
    assert _layers(ours)[2].self_attn.q_proj.weight is _layers(ours)[1].self_attn.q_proj.weight  # shared base
    assert _layers(ours)[2].self_attn.q_proj.lora_A_default is not _layers(ours)[1].self_attn.q_proj.lora_A_default
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    out_theirs, out_ours = theirs(input_ids=IDS, labels=IDS), ours(input_ids=IDS, labels=IDS)
    assert_close(out_ours.logits, out_theirs.logits, kind="same_math")
    out_theirs.loss.backward()
    out_ours.loss.backward()
    for layer in range(3):
        for name in ("q_proj", "v_proj"):
            mine = getattr(_layers(ours)[layer].self_attn, name)
            peft_layer = getattr(theirs.base_model.model.model.layers[layer].self_attn, name)
            assert_close(mine.lora_B_default.grad, peft_layer.lora_B["default"].weight.grad, kind="same_math_max")
            assert_close(mine.lora_A_default.grad, peft_layer.lora_A["default"].weight.grad, kind="same_math_max")
    prompt = IDS[:1, :4]
    assert torch.equal(ours.generate(input_ids=prompt, max_new_tokens=4, do_sample=False),
                       theirs.generate(input_ids=prompt, max_new_tokens=4, do_sample=False))
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    logits = out_theirs.logits.detach()
    for lib, directory in ((peft, tmp_path / "ours"), (fastlora, tmp_path / "theirs")):
        loaded = lib.PeftModel.from_pretrained(tiny_llama(), directory)
        with torch.no_grad():
            assert_close(loaded(input_ids=IDS).logits, logits, kind="same_math", msg=f"{lib.__name__} loading")


def test_a_model_with_a_type_per_layer_runs_and_caches_by_the_new_positions():
    """Qwen2's config lists a type per layer (transformers indexes it by position; PEFT's replication leaves it
    short and the forward fails): the list follows the new stack, and generating with the KV cache equals
    generating without it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        layer_types=["sliding_attention", "full_attention"], use_sliding_window=True,
                                        sliding_window=3))
    model = _adapted(fastlora, base.eval(), layer_replication=[[0, 2], [0, 1]], target_modules=["q_proj"]).eval()
    assert model.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    prompt = IDS[:1, :6]
    cached = model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(cached, model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False, use_cache=False))


def test_merge_and_unload_gives_a_standalone_model_of_the_new_depth(tmp_path):
    """Each copy gets its own base weights, then its own update (PEFT's merge adds every copy's update into the
    weight they share); the result saves and loads as a plain transformers model."""
    import transformers

    model = _adapted(fastlora)
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    before = snapshot(model)
    with pytest.raises(ValueError, match="base model layers are replicated"):
        model.merge_adapter()  # in place, over shared weights: refused
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="nope"):
        model.merge_and_unload(adapter_names=["nope"])  # refused after the copies got their own weights: shared again
    assert_unchanged(model, before)
    assert _layers(model)[2].self_attn.q_proj.weight is _layers(model)[1].self_attn.q_proj.weight
    merged = model.merge_and_unload()
    pointers = [p.data_ptr() for p in merged.parameters()]
    assert len(pointers) == len(set(pointers))
    with torch.no_grad():
        assert_close(merged(input_ids=IDS).logits, logits, kind="same_math")
    merged.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.num_hidden_layers == 3
    with torch.no_grad():
        assert_close(reloaded(input_ids=IDS).logits, logits, kind="same_math")


def test_a_second_adapter_adapts_the_same_stack(tmp_path):
    model = _adapted(fastlora)
    model.add_adapter("second", fastlora.LoraConfig(**OPTIONS))
    assert len(_layers(model)) == 3
    assert "second" in _layers(model)[2].self_attn.q_proj.adapter_settings
    before = snapshot(model)
    with pytest.raises(ValueError, match="every adapter of a model adapts the same stack"):
        model.add_adapter("third", fastlora.LoraConfig(**{**OPTIONS, "layer_replication": [[0, 2]]}))
    assert_unchanged(model, before)
    _adapted(fastlora).save_pretrained(tmp_path)
    model.load_adapter(tmp_path, "loaded")
    assert "loaded" in _layers(model)[2].self_attn.q_proj.adapter_settings


@pytest.mark.parametrize("layer_map", [[[0, 3]], [[1, 1]], [[2, 1]], [[0]], "0-2", [[0, 1.5]]])
def test_a_bad_layer_map_is_refused_with_the_model_unchanged(layer_map):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="layer_replication"):
        fastlora.get_peft_model(model, fastlora.LoraConfig(target_modules=["q_proj"], layer_replication=layer_map))
    assert_unchanged(model, before)
    assert model.config.num_hidden_layers == 2


def test_a_failed_adaptation_puts_the_original_stack_back():
    model = tiny_llama()
    layers = model.model.layers
    before = snapshot(model)
    with pytest.raises(ValueError, match="matched no module"):
        fastlora.get_peft_model(model, fastlora.LoraConfig(target_modules=["nothing"], layer_replication=MAP))
    assert model.model.layers is layers and model.config.num_hidden_layers == 2
    assert_unchanged(model, before)


def test_an_empty_range_adds_nothing_as_in_peft():
    model = _adapted(fastlora, layer_replication=[[0, 2], [1, 1]])
    assert len(_layers(model)) == 2


@pytest.mark.parametrize("init, layers", [("pissa", None), ("olora", None), ("pissa", [2]), ("olora", [1])])
def test_an_initialisation_changing_a_weight_two_copies_share_is_refused(init, layers):
    """Each copy would subtract its part from the one weight, or a copy not adapted would compute with the other's
    residual (PEFT's model then no longer starts at the base's outputs)."""
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="share|computes with too"):
        _adapted(fastlora, model, init_lora_weights=init, layers_to_transform=layers)
    assert_unchanged(model, before)
    assert model.config.num_hidden_layers == 2


def test_the_config_of_the_model_holding_the_stack_follows_it():
    """A wrapper without a config of its own around a transformers model: the inner model's config is the stack's
    (PEFT's)."""
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = tiny_llama()

        def forward(self, input_ids):
            return self.model(input_ids=input_ids).logits

    model = _adapted(fastlora, Wrapper(), target_modules=["q_proj"])
    assert model.base_model.model.model.config.num_hidden_layers == 3
    assert model(IDS).shape[0] == IDS.shape[0]


def test_a_file_of_another_stack_does_not_load_into_an_existing_adapter(tmp_path):
    """Trainer's resume loads into the existing adapter: a file trained on another stack is refused, unchanged."""
    _adapted(fastlora, layer_replication=[[0, 2], [0, 1]]).save_pretrained(tmp_path)
    model = _adapted(fastlora)
    before = snapshot(model)
    with pytest.raises(ValueError, match="layer_replication"):
        model.load_adapter(tmp_path, "default")
    assert_unchanged(model, before)


def test_loftq_s_replacement_is_refused_on_replicated_4bit_layers(tmp_path):
    pytest.importorskip("bitsandbytes")
    from tests.models import load_quantized

    tiny_llama().save_pretrained(tmp_path)
    model = _adapted(fastlora, load_quantized(tmp_path, load_in_4bit=True), target_modules=["q_proj"],
                     init_lora_weights=True)
    before = snapshot(model)
    with pytest.raises(ValueError, match="replicated"):
        fastlora.replace_lora_weights_loftq(model, tmp_path)
    assert_unchanged(model, before)

"""PEFT's low-level API: inject_adapter_in_model on a plain module (no PeftModel around it), a second adapter
injected, the module's adapter state dict both ways, and the keys of a state dict naming what to adapt, against
PEFT's."""

import copy
import warnings

import peft
import pytest
import torch

import fastlora
from tests.models import assert_unchanged, snapshot
from tests.tolerances import assert_close


def _module():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def _injected(lib, **options):
    module = _module()
    torch.manual_seed(1)
    config = lib.LoraConfig(**{"target_modules": ["0"], "init_lora_weights": False, **options})
    assert lib.inject_adapter_in_model(config, module) is module
    return module


def _flags(module):
    """(parameter kind, requires_grad) of the module's parameters, in PEFT's names and fastlora's alike."""
    return sorted((name.replace("base_layer.", "").replace(".default.weight", "_default").replace(".b.weight", "_b"),
                   p.requires_grad) for name, p in module.named_parameters())


def test_a_module_adapted_in_place_as_peft_adapts_it():
    theirs, ours = _injected(peft), _injected(fastlora)
    assert type(ours[0]).__name__ == "LoRALinear" and list(ours.peft_config) == ["default"]
    assert _flags(ours) == _flags(theirs)
    x = torch.randn(4, 6)
    assert_close(ours(x), theirs(x), kind="same_math")
    theirs_state, ours_state = peft.get_peft_model_state_dict(theirs), fastlora.get_peft_model_state_dict(ours)
    assert sorted(ours_state) == sorted(theirs_state) == ["0.lora_A.weight", "0.lora_B.weight"]
    for key, value in theirs_state.items():
        assert torch.equal(ours_state[key], value)


def test_a_second_adapter_injected_becomes_active_as_in_peft():
    models = []
    for lib in (peft, fastlora):
        module = _injected(lib)
        with pytest.warns(UserWarning, match="Already found a `peft_config`"):
            lib.inject_adapter_in_model(lib.LoraConfig(target_modules=["2"], init_lora_weights=False), module, "b")
        models.append(module)
    theirs, ours = models
    assert list(ours.peft_config) == ["default", "b"]
    assert ours[0].active_adapters == theirs[0].active_adapters == ["b"]
    assert _flags(ours) == _flags(theirs)
    x = torch.randn(4, 6)
    assert_close(ours(x), theirs(x), kind="same_math")
    assert sorted(fastlora.get_peft_model_state_dict(ours, adapter_name="b")) == ["2.lora_A.weight", "2.lora_B.weight"]


def test_the_state_dict_goes_back_in_and_its_keys_name_what_to_adapt():
    source = _injected(fastlora)
    state = {key: torch.full_like(value, 0.5) for key, value in fastlora.get_peft_model_state_dict(source).items()}
    target = _injected(fastlora)
    result = fastlora.set_peft_model_state_dict(target, state)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(target[0].lora_B_default, torch.full_like(target[0].lora_B_default, 0.5))
    # a state dict's keys choose the modules, whatever the config's target_modules say (PEFT's rule)
    models = []
    for lib in (peft, fastlora):
        module = _module()
        lib.inject_adapter_in_model(lib.LoraConfig(target_modules=["2"]), module, state_dict=copy.deepcopy(state))
        models.append(module)
    assert type(models[1][0]).__name__ == "LoRALinear" and type(models[1][2]) is torch.nn.Linear
    assert _flags(models[1]) == _flags(models[0])


def test_a_module_without_fastlora_s_adapter_is_refused():
    module = _module()
    before = snapshot(module)
    with pytest.raises(ValueError, match="holds no adapter fastlora made"):
        fastlora.get_peft_model_state_dict(module)
    with pytest.raises(TypeError, match="must be a fastlora.LoraConfig"):
        fastlora.inject_adapter_in_model(peft.LoraConfig(target_modules=["0"]), module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="no key of the state dict"):
            fastlora.inject_adapter_in_model(fastlora.LoraConfig(target_modules=["0"]), module,
                                             state_dict={"0.weight": torch.zeros(5, 6)})
    assert_unchanged(module, before)


def test_peft_s_injection_rules_task_heads_name_or_path_enabled_layers_and_state_dict_keys(tmp_path):
    """No task head saved whole and no base_model_name_or_path recorded (PEFT's task models add those, its injection
    does not); a layer disabled stays so through a second injection; a state dict's keys name modules exactly
    (compiled-model prefix taken off, the last ``.lora_`` split), as PEFT's."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    classifier = LlamaForSequenceClassification(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                            num_hidden_layers=1, num_attention_heads=2,
                                                            num_key_value_heads=1, num_labels=2))
    classifier.save_pretrained(tmp_path)
    classifier = type(classifier).from_pretrained(tmp_path)
    fastlora.inject_adapter_in_model(fastlora.LoraConfig(target_modules=["q_proj"], task_type="SEQ_CLS"), classifier)
    assert type(classifier.score) is torch.nn.Linear and not classifier.score.weight.requires_grad
    recorded = classifier.peft_config["default"]
    assert recorded.modules_to_save is None and recorded.base_model_name_or_path is None
    assert recorded.task_type.value == "SEQ_CLS"

    models = []
    for lib in (peft, fastlora):
        module = _injected(lib)
        module[0].enable_adapters(False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lib.inject_adapter_in_model(lib.LoraConfig(target_modules=["0", "2"], init_lora_weights=False), module, "b")
        models.append(module)
    assert models[1][0].adapter_enabled is False
    x = torch.randn(4, 6)
    assert_close(models[1](x), models[0](x), kind="same_math")

    nested = []
    for lib in (peft, fastlora):
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Sequential(torch.nn.Linear(6, 6)))
        state = {"_orig_mod.0.lora_A.weight": torch.zeros(8, 6), "_orig_mod.0.lora_B.weight": torch.zeros(6, 8)}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lib.inject_adapter_in_model(lib.LoraConfig(target_modules=["1.0"]), module, state_dict=state)
        nested.append(([isinstance(m, (fastlora.LoRALinear, peft.tuners.lora.LoraLayer)) for m in (module[0], module[1][0])],
                       any("inconsistency" in str(w.message) for w in caught)))
    assert nested[1] == nested[0] == ([True, False], True)


def test_status_of_a_module_adapted_in_place_is_peft_s():
    """No adapter model around it: PEFT's layer names (no ``model.`` prefix), no adapter model type or PEFT types,
    and the base type "other" for a plain module, the class name for a transformers model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1))

    for make, target in ((_module, "0"), (llama, "q_proj")):
        theirs, ours = (lib.inject_adapter_in_model(lib.LoraConfig(target_modules=[target]), make())
                        for lib in (peft, fastlora))
        assert [s.name for s in fastlora.get_layer_status(ours)] == [s.name for s in peft.get_layer_status(theirs)]
        their_status, our_status = peft.get_model_status(theirs), fastlora.get_model_status(ours)
        assert (our_status.base_model_type, our_status.adapter_model_type, our_status.peft_types) == \
            (their_status.base_model_type, their_status.adapter_model_type, their_status.peft_types)
        assert our_status.trainable_params == their_status.trainable_params

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

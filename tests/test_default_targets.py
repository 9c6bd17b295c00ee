"""LoraConfig without target_modules: the architecture's default targets, as PEFT fills them in."""

import copy
import warnings

import peft
import pytest
import torch

from fastlora import LoraConfig, LoraModel, get_peft_model
from tests.models import assert_unchanged, snapshot, tiny_gpt2, tiny_llama


def _gpt2():
    return tiny_gpt2()


def _peft_targets(model) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules()
            if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)}


@pytest.mark.parametrize("build", [tiny_llama, _gpt2], ids=["llama", "gpt2"])
def test_default_targets_are_peft_s(build, tmp_path):
    base = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2's fan_in_fan_out warning, said by both libraries
        ours = get_peft_model(copy.deepcopy(base), LoraConfig(r=2))
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2))
    assert {name for name, _ in ours.lora_layers("default")} == _peft_targets(theirs)
    assert ours.peft_config["default"].target_modules == sorted(theirs.peft_config["default"].target_modules)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert {name for name, _ in reloaded.lora_layers("default")} == _peft_targets(theirs)


def test_an_architecture_without_defaults_is_refused_with_the_names_to_choose_from():
    model = torch.nn.Sequential()
    model.add_module("encoder", torch.nn.Linear(4, 8))
    model.add_module("act", torch.nn.ReLU())
    model.add_module("decoder", torch.nn.Linear(8, 4))
    before = snapshot(model)
    with pytest.raises(ValueError, match="no default targets for Sequential.*named decoder, encoder"):
        get_peft_model(model, LoraConfig())
    assert_unchanged(model, before)

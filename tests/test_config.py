"""LoraConfig validation and its PEFT JSON form."""

import json

import pytest

from fastlora import LoraConfig, TaskType

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_seed_config_and_scaling():
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=TARGETS, inference_mode=False,
                        r=8, lora_alpha=32, lora_dropout=0.1)
    assert config.scaling == 4.0
    assert LoraConfig(target_modules="all-linear", r=16, lora_alpha=8, use_rslora=True).scaling == 2.0
    assert LoraConfig(task_type="CAUSAL_LM", target_modules=TARGETS).task_type is TaskType.CAUSAL_LM
    assert [t.value for t in TaskType] == ["SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS",
                                           "FEATURE_EXTRACTION"]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"r": 0}, ValueError, "r must be"),
        ({"r": 10**20}, ValueError, "r must be at most 2147483647"),
        ({"lora_alpha": 0}, ValueError, "lora_alpha"),
        ({"lora_dropout": 1.0}, ValueError, "lora_dropout"),
        ({"bias": "some"}, ValueError, "bias must be"),
        ({"task_type": "CAUSAL"}, ValueError, "task_type"),
        ({"target_modules": []}, ValueError, "target_modules"),
        ({"target_modules": [1]}, TypeError, "target_modules"),
        ({"init_lora_weights": "loftq"}, ValueError, "init_lora_weights"),
        ({"layers_to_transform": [-1]}, ValueError, "layers_to_transform"),
        ({"modules_to_save": "lm_head"}, TypeError, "modules_to_save"),
        ({"target_modules": "[q"}, ValueError, "target_modules='\\[q' is not a valid regex"),
        ({"exclude_modules": "(k"}, ValueError, "exclude_modules='\\(k' is not a valid regex"),
        ({"layers_pattern": 5}, TypeError, "layers_pattern must be the name"),
        # PEFT's rules (its configs refuse these, so a file holding them would not load in PEFT)
        ({"target_modules": r".*\.q_proj", "layers_to_transform": [1]}, ValueError, "`layers_to_transform` cannot"),
        ({"target_modules": "all-linear", "layers_to_transform": 0}, ValueError, "`layers_to_transform` cannot"),
        ({"target_modules": r".*\.q_proj", "layers_pattern": "layers"}, ValueError, "`layers_pattern` cannot"),
        ({"layers_pattern": "layers"}, ValueError, "`layers_to_transform` must also be specified"),
        ({"trainable_token_indices": []}, ValueError, "lists no token id"),
        ({"trainable_token_indices": {"embed_tokens": []}}, ValueError, "lists no token id"),
    ],
)
def test_bad_config(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoraConfig(**{"target_modules": TARGETS, **kwargs})


def test_json_round_trip_and_unsupported_features():
    config = LoraConfig(task_type="CAUSAL_LM", target_modules=TARGETS, r=4, lora_alpha=16, lora_dropout=0.05)
    data = config.to_dict()
    assert data["peft_type"] == "LORA" and data["task_type"] == "CAUSAL_LM"
    assert data["target_modules"] == sorted(TARGETS) and data["use_dora"] is False
    assert LoraConfig.from_dict(data) == config.replace(target_modules=sorted(TARGETS))
    with pytest.warns(UserWarning, match="some_new_peft_field"):
        assert LoraConfig.from_dict({**data, "some_new_peft_field": None}).r == 4
    with pytest.raises(ValueError, match="some_new_peft_field=3"):
        LoraConfig.from_dict({**data, "some_new_peft_field": 3})
    assert LoraConfig.from_dict({**data, "use_dora": True}).use_dora is True
    with pytest.raises(ValueError, match="use_qalora"):
        LoraConfig.from_dict({**data, "use_qalora": True})
    assert LoraConfig.from_dict({**data, "layer_replication": [[0, 1], [0, 1]]}).layer_replication == [[0, 1], [0, 1]]
    with pytest.raises(ValueError, match="layer_replication must be a list"):
        LoraConfig.from_dict({**data, "layer_replication": [[1, 0]]})
    assert LoraConfig.from_dict({**data, "rank_pattern": {"q_proj": 16}}).settings_for("model.q_proj").r == 16
    with pytest.raises(ValueError, match="not a LoRA adapter"):
        LoraConfig.from_dict({**data, "peft_type": "IA3"})


def test_assigning_a_field_checks_it_as_the_constructor_does():
    """PEFT scripts assign to a model's config (PiSSA's guide: ``init_lora_weights = True`` before saving the initial
    adapter): the value is checked and put in its normal form; a bad one raises and leaves the config as it was."""
    config = LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa")
    config.init_lora_weights = True
    config.layers_to_transform = (1,)
    config.modules_to_save = ("lm_head",)
    assert (config.init_lora_weights, config.layers_to_transform, config.modules_to_save) == (True, [1], ["lm_head"])
    assert config == LoraConfig(target_modules=["q_proj"], layers_to_transform=[1], modules_to_save=["lm_head"])
    config.layers_to_transform = 1  # one index stays one, as PEFT writes it
    assert config.layers_to_transform == 1 and json.loads(config.to_json())["layers_to_transform"] == 1
    for field, value, error in [("r", 0, ValueError), ("init_lora_weights", "kasa", ValueError),
                                ("bias", "some", ValueError), ("peft_type", "IA3", ValueError)]:
        with pytest.raises(error):
            setattr(config, field, value)
    assert config.r == 8 and config.init_lora_weights is True and config.bias == "none"
    config.r = 16
    assert config.settings.r == 16 and config.settings.scaling == 8 / 16


def test_a_field_assigned_after_the_adapter_was_built_is_refused_at_save(tmp_path):
    """Assigning a field does not rebuild the layers (as in PEFT); saving such a config would record another adapter
    than the one saved, so the save says so and writes nothing."""
    from fastlora import get_peft_model
    from tests.models import tiny_llama

    for field, value in [("r", 16), ("lora_alpha", 64), ("use_dora", True), ("lora_bias", True),
                         ("trainable_token_indices", [1, 2])]:
        model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], r=4))
        setattr(model.peft_config["default"], field, value)
        with pytest.raises(ValueError, match="assigned after the adapter was created"):
            model.save_pretrained(tmp_path / field)
        assert not (tmp_path / field).exists()
        setattr(model.peft_config["default"], field, getattr(LoraConfig(target_modules=["q_proj"], r=4), field))
        model.save_pretrained(tmp_path / field)


def test_numbers_of_other_libraries_are_taken_as_python_s(tmp_path):
    """numpy's integers and floats (as hyper-parameter sweeps hand them), in the fields and the patterns: the layers
    take them, and the config saves as plain JSON numbers."""
    import json

    np = pytest.importorskip("numpy")
    import torch

    from fastlora import get_peft_model

    config = LoraConfig(target_modules=["0"], r=np.int64(4), lora_alpha=np.int32(8), lora_dropout=np.float32(0.25),
                        rank_pattern={"0": np.int64(2)}, alpha_pattern={"0": np.float64(3.0)})
    assert (type(config.r), type(config.lora_alpha), type(config.lora_dropout)) == (int, int, float)
    assert config.lora_dropout == 0.25 and type(config.rank_pattern["0"]) is int
    config.r = np.int16(6)
    assert type(config.r) is int and config.r == 6
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), config)
    assert model.base_model.model[0].lora_A.shape == (2, 8) and model.base_model.model[0].scaling == 1.5
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["lora_dropout"], saved["rank_pattern"]) == (6, 8, 0.25, {"0": 2})
    from fastlora import LoRALinear

    assert LoRALinear(8, 8, r=np.int64(2), lora_alpha=np.float32(4), lora_dropout=np.float64(0.1)).scaling == 2.0

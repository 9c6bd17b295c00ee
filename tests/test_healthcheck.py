"""``PeftModel.healthcheck()`` / ``print_healthcheck()``: the report on a model before training, its findings for
each suspicious state, and (with PEFT 0.22) the same report and findings as PEFT's for the same model and state."""

import json

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fastlora  # noqa: E402
from tests.models import PEFT_BEFORE_0_22, tiny_llama  # noqa: E402

SETTINGS = dict(target_modules=["q_proj", "v_proj"], r=4)


def lora_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, (fastlora.LoRALinear, BaseTunerLayer))]


def first_factor(model):
    return next(p for name, p in model.named_parameters() if "lora_A" in name)


def set_requires_grad(model, flag):
    for param in model.parameters():
        param.requires_grad_(flag)


# state name -> (what puts the model in it, healthcheck's arguments, the findings' codes).  A layer's adapters
# switched off are frozen too (PEFT's rule), so those states also find frozen adapters.
STATES = {
    "ready": (lambda m: None, {}, []),
    "disabled": (lambda m: [layer.enable_adapters(False) for layer in lora_layers(m)], {},
                 ["TOO_FEW_TRAINABLE_PARAMETERS", "ADAPTERS_DISABLED", "ACTIVE_ADAPTERS_NOT_TRAINABLE"]),
    "one layer disabled": (lambda m: lora_layers(m)[0].enable_adapters(False), {},
                           ["IRREGULAR_ADAPTER_ENABLED_STATE", "IRREGULAR_REQUIRES_GRAD"]),
    "merged": (lambda m: m.merge_adapter(), {}, ["MERGED_ADAPTERS"]),
    "frozen": (lambda m: set_requires_grad(m, False), {},
               ["TOO_FEW_TRAINABLE_PARAMETERS", "ACTIVE_ADAPTERS_NOT_TRAINABLE"]),
    "one factor frozen": (lambda m: first_factor(m).requires_grad_(False), {}, ["IRREGULAR_REQUIRES_GRAD"]),
    "too few asked": (lambda m: None, {"min_trainable_params": 10**9}, ["TOO_FEW_TRAINABLE_PARAMETERS"]),
    "too many": (lambda m: None, {"max_trainable_params_percent": 1}, ["HIGH_TRAINABLE_PARAMETER_FRACTION"]),
    "everything trainable": (lambda m: set_requires_grad(m, True), {}, ["HIGH_TRAINABLE_PARAMETER_FRACTION"]),
}
ERRORS = {"TOO_FEW_TRAINABLE_PARAMETERS", "IRREGULAR_ADAPTER_ENABLED_STATE", "IRREGULAR_REQUIRES_GRAD"}


def comparable(report):
    """A report without what differs between the libraries by design: the versions and the LoRA layers' class."""
    report = json.loads(json.dumps(report))
    report.pop("environment")
    report["summary"]["adapter_layer_types"] = {
        adapter: {("LoRALinear" if kind == "lora.Linear" else kind): n for kind, n in counts.items()}
        for adapter, counts in report["summary"]["adapter_layer_types"].items()}
    return report


@pytest.mark.parametrize("state", STATES)
def test_each_state_gives_its_findings(state):
    put, kwargs, codes = STATES[state]
    model = fastlora.get_peft_model(tiny_llama(), fastlora.LoraConfig(**SETTINGS))
    put(model)
    report = model.healthcheck(**kwargs)
    json.dumps(report)  # serialisable as it is
    assert [finding["code"] for finding in report["findings"]] == codes
    assert report["is_ready"] == (not ERRORS & set(codes))
    assert report["summary"]["num_adapter_layers"] == 4
    assert report["summary"]["adapter_layer_types"] == {"default": {"LoRALinear": 4}}
    if not PEFT_BEFORE_0_22:  # the same report as PEFT's
        theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**SETTINGS))
        put(theirs)
        assert comparable(report) == comparable(theirs.healthcheck(**kwargs))


def test_the_report_describes_the_model_and_its_runtime():
    model = fastlora.get_peft_model(tiny_llama(), fastlora.LoraConfig(**SETTINGS, modules_to_save=["lm_head"]))
    model.train()
    enable = getattr(model.get_base_model(), "activation_checkpointing_enable", None)  # transformers >= 5.23
    (enable or model.gradient_checkpointing_enable)()
    report = model.healthcheck()
    assert report["environment"]["fastlora_version"] == fastlora.__version__
    assert report["environment"]["torch_version"] == torch.__version__
    import transformers
    assert report["environment"]["peft_version"] == peft.__version__
    assert report["environment"]["transformers_version"] == transformers.__version__
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert (report["summary"]["trainable_params"], report["summary"]["total_params"]) == (trainable, total)
    assert report["summary"]["trainable_percent"] == pytest.approx(100 * trainable / total)
    assert report["summary"]["adapter_layer_types"] == {"default": {"LoRALinear": 4, "ModulesToSaveWrapper": 1}}
    assert report["adapter_configurations"] == {"default": {
        "inference_mode": False, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}}
    runtime = report["model_runtime"]
    assert runtime["training"] is True and runtime["activation_checkpointing"] is True
    assert runtime["model_type"] == "llama" and runtime["parameter_devices"] == ["cpu"]
    assert runtime["parameter_dtypes"] == {"float32": total}
    model.eval()
    assert model.healthcheck()["model_runtime"]["training"] is False


@pytest.mark.parametrize("task_type", [None, "SEQ_CLS"])
def test_a_new_task_head_left_unsaved_is_reported(task_type):
    """A classification model built on a causal-LM checkpoint gets a fresh ``score`` head: without the task type
    (which saves it), an adapter file would not hold it."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    def model():
        torch.manual_seed(0)
        return LlamaForSequenceClassification(LlamaConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=64, num_labels=3, pad_token_id=0, architectures=["LlamaForCausalLM"]))

    config = dict(SETTINGS, task_type=task_type)
    ours = fastlora.get_peft_model(model(), fastlora.LoraConfig(**config)).healthcheck()
    codes = [finding["code"] for finding in ours["findings"]]
    assert codes == ([] if task_type else ["TASK_HEAD_NOT_SAVED"])
    if task_type is None:
        assert "'score'" in ours["findings"][0]["message"]
    if not PEFT_BEFORE_0_22:
        theirs = peft.get_peft_model(model(), peft.LoraConfig(**config)).healthcheck()
        assert comparable(ours) == comparable(theirs)


def test_print_healthcheck_writes_the_report_to_the_sink():
    model = fastlora.get_peft_model(tiny_llama(), fastlora.LoraConfig(**SETTINGS))
    model.merge_adapter()
    lines = []
    model.print_healthcheck(sink=lines.append, sep=" | ", indent="    ")
    assert len(lines) == 1
    text = lines[0]
    assert text.startswith("fastlora healthcheck\nModel:\n    ID: ")
    trainable, total = model.get_nb_trainable_parameters()
    assert f"    trainable: {trainable:,} | total: {total:,} | percent trainable: " in text
    assert "    adapter is enabled: True | active: default | merged: default" in text
    assert "Layer types:\n    default:\n        LoRALinear=4" in text
    assert text.endswith("Findings:\n    WARNING: Adapter(s) 'default' is/are merged; unmerge them before training.")
    model.unmerge_adapter()
    model.print_healthcheck(sink=lines.append)
    assert "Findings:" not in lines[1] and "merged: none" in lines[1]


def test_a_model_adapted_in_place_gets_the_report():
    from fastlora.healthcheck import healthcheck

    ours = healthcheck(fastlora.inject_adapter_in_model(fastlora.LoraConfig(**SETTINGS), tiny_llama()))
    assert ours["summary"]["adapter_model_type"] == "None" and ours["summary"]["num_adapter_layers"] == 4
    assert ours["adapter_configurations"] == {"default": {"inference_mode": False,
                                                          "target_modules": ["q_proj", "v_proj"]}}
    assert ours["is_ready"] and ours["findings"] == []
    if not PEFT_BEFORE_0_22:
        from peft.utils.healthcheck import run_healthcheck

        theirs = run_healthcheck(peft.inject_adapter_in_model(peft.LoraConfig(**SETTINGS), tiny_llama()))
        assert comparable(ours) == comparable(theirs)

"""transformers' Conv1D (GPT-2) targets against PEFT 0.21 on a tiny GPT-2: PEFT's fan_in_fan_out warning and
setting, outputs and LoRA gradients, merging, unloading to a Conv1D, adapter files both ways, "all-linear"; the
Triton kernels reading the (in, out) weight through its strides."""

import copy
import json
import warnings

import peft
import pytest
import torch

import fastlora
from fastlora import LoraConfig, LoraModel, get_peft_model
from fastlora.conv1d import LoRAConv1D
from fastlora.functional import triton_interpreter_on
from tests.models import tiny_gpt2
from tests.tolerances import assert_close

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
TARGETS = ["c_attn", "c_proj", "c_fc"]
CONV1D_WARNING = "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True."


def _gpt2():
    return tiny_gpt2()


def _both(base, **config):
    """fastlora's and PEFT's models of ``base``, fastlora's factors copied from PEFT's non-zero ones."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ours = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=TARGETS, r=4, lora_alpha=8, **config))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=TARGETS, r=4, lora_alpha=8,
                                                                      init_lora_weights=False, **config))
    state = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, layer in ours.lora_layers("default"):
            A, B = layer.lora_factors("default")
            A.copy_(state[f"base_model.model.{name}.lora_A.default.weight"])
            B.copy_(state[f"base_model.model.{name}.lora_B.default.weight"])
    return ours, theirs, [str(w.message) for w in seen]


def _ids():
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))


def test_outputs_gradients_and_the_fan_in_fan_out_warning_as_peft():
    ours, theirs, warned = _both(_gpt2())
    assert CONV1D_WARNING in warned
    assert ours.peft_config["default"].fan_in_fan_out is True and theirs.peft_config["default"].fan_in_fan_out is True
    layer = ours.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRAConv1D) and (layer.in_features, layer.out_features) == (32, 96)
    assert layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (96, 4) and not layer.weight.requires_grad
    ids = _ids()
    for model in (ours, theirs):
        model.train().zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
    assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, kind="same_math")
    state = dict(theirs.named_parameters())
    for name, layer in ours.lora_layers("default"):
        for which, ours_param in zip(("lora_A", "lora_B"), layer.lora_factors("default")):
            want = state[f"base_model.model.{name}.{which}.default.weight"].grad
            assert_close(ours_param.grad, want, kind="roundoff", msg=f"{name} {which}")


def test_merge_unmerge_and_unload_give_conv1d_layers():
    ours, theirs, _ = _both(_gpt2())
    ids = _ids()
    want = theirs(input_ids=ids).logits
    plain = ours.get_base_model().transformer.h[0].mlp.c_fc.weight.detach().clone()
    ours.merge_adapter()
    assert_close(ours(input_ids=ids).logits, want, kind="same_math")
    ours.unmerge_adapter()
    assert_close(ours.get_base_model().transformer.h[0].mlp.c_fc.weight, plain, kind="roundoff")
    merged, peft_merged = copy.deepcopy(ours).merge_and_unload(), copy.deepcopy(theirs).merge_and_unload()
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    for a, b in zip(merged.state_dict().values(), peft_merged.state_dict().values()):
        assert_close(a, b, kind="roundoff")  # W + s·B A, per element
    assert_close(merged(input_ids=ids).logits, want, kind="same_math")
    unloaded = copy.deepcopy(ours).unload()
    torch.testing.assert_close(unloaded(input_ids=ids).logits, _gpt2()(input_ids=ids).logits)


def test_adapter_files_load_both_ways(tmp_path):
    base = _gpt2()
    ours, theirs, _ = _both(base)
    ids = _ids()
    want = theirs(input_ids=ids).logits
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    loaded = [peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours"),
              LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft"),
              LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")]
    for model in loaded:
        assert_close(model.eval()(input_ids=ids).logits, want, kind="same_math")


def test_all_linear_takes_the_conv1d_layers_and_leaves_the_head():
    base = _gpt2()
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules="all-linear", r=2))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules="all-linear", r=2))
    peft_targets = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                    if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)}
    assert {n for n, _ in ours.lora_layers("default")} == peft_targets and len(peft_targets) == 8


def test_a_linear_target_with_fan_in_fan_out_is_set_back_as_peft():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"):
        ours = get_peft_model(model, LoraConfig(target_modules=["0"], fan_in_fan_out=True))
    assert ours.peft_config["default"].fan_in_fan_out is False


@pytest.mark.skipif(not triton_interpreter_on() and not torch.cuda.is_available(), reason="needs Triton")
@pytest.mark.parametrize("base", ["cublas", "fused"])
def test_kernels_read_the_in_out_weight_through_its_strides(base):
    from fastlora import schedules

    conv_model = _gpt2()
    ours = get_peft_model(conv_model, LoraConfig(target_modules=["c_fc"], r=4, lora_alpha=8, lora_dropout=0.2,
                                                 init_lora_weights=False))
    layer = ours.base_model.model.transformer.h[0].mlp.c_fc
    assert layer.base_weight().stride() == (1, 128)  # a view of the (32, 128) weight, not a copy
    x = torch.randn(2, 5, 32, requires_grad=True)
    outputs = {}
    for backend in ("torch", "triton"):
        layer.backend = backend
        with schedules.use_kernel_variants(base=base):
            torch.manual_seed(3)
            y = layer.eval()(x)
        outputs[backend] = (y, *torch.autograd.grad(y.square().sum(), (x, layer.lora_A, layer.lora_B)))
    for got, want in zip(outputs["triton"], outputs["torch"]):
        assert_close(got, want, kind="same_math_cancelling")  # y and the gradients of y.square().sum()


def test_a_conv1d_adapter_does_not_load_onto_linear_layers_of_the_same_shapes(tmp_path):
    """Two models whose targets have the same shapes but not the same kind: the file is refused, nothing changes."""
    from tests.models import assert_unchanged, snapshot

    class LinearGPT(torch.nn.Module):  # c_fc as an nn.Linear of GPT-2's c_fc shape (32 → 128)
        def __init__(self):
            super().__init__()
            self.c_fc = torch.nn.Linear(32, 128)

    conv_model = torch.nn.Module()
    conv_model.c_fc = _gpt2().transformer.h[0].mlp.c_fc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(conv_model, LoraConfig(target_modules=["c_fc"], r=2)).save_pretrained(tmp_path / "conv")
    linear_model = LinearGPT()
    before = snapshot(linear_model)
    with pytest.raises(ValueError, match="saved from Conv1D layers"):
        LoraModel.from_pretrained(linear_model, tmp_path / "conv")
    assert_unchanged(linear_model, before)


@pytest.mark.parametrize("second", [["c_attn"], ["c_attn", "c_fc"]], ids=["the same layers", "and new ones"])
def test_a_second_adapter_records_fan_in_fan_out_as_peft(tmp_path, second):
    """Only the layers an adapter makes LoRA layers set the recorded flag (PEFT's rule): a second adapter on the
    Conv1D layers the first adapted records the False it was given; its file loads onto a fresh model."""
    flags = {}
    for library in (fastlora, peft):
        model = library.get_peft_model(tiny_gpt2(), library.LoraConfig(target_modules=["c_attn"]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.add_adapter("second", library.LoraConfig(target_modules=second))
        model.save_pretrained(tmp_path / library.__name__)
        flags[library.__name__] = (model.peft_config["second"].fan_in_fan_out, json.loads(
            (tmp_path / library.__name__ / "second" / "adapter_config.json").read_text())["fan_in_fan_out"])
    assert flags["fastlora"] == flags["peft"] == ((len(second) > 1,) * 2)
    recorded_false = len(second) == 1  # PEFT's warning as it corrects the flag for the fresh model's Conv1D layers
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to True") if recorded_false else warnings.catch_warnings():
        loaded = fastlora.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "fastlora" / "second")
    assert loaded.peft_config["default"].fan_in_fan_out is True


def test_a_second_adapter_asking_fan_in_fan_out_on_linear_layers_records_false(tmp_path):
    """fan_in_fan_out=True given for Linear layers an earlier adapter adapted is set False (PEFT's warning), so its
    file loads onto Linear layers (PEFT records True there, which fastlora refuses as a Conv1D model's file)."""
    from tests.models import tiny_llama

    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to False"):
        model.add_adapter("second", LoraConfig(target_modules=["q_proj"], fan_in_fan_out=True))
    assert model.peft_config["second"].fan_in_fan_out is False
    model.save_pretrained(tmp_path)
    fastlora.PeftModel.from_pretrained(tiny_llama(), tmp_path / "second")
    model.load_adapter(tmp_path / "second", "second")  # a resume

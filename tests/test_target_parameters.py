"""LoRA on parameters (``target_parameters``), compared with PEFT's ``ParamWrapper`` on the same inputs: a tiny
Mixtral (experts stored (E, out, in), two parameters of one module, and the router's 2-D weight), a tiny gpt-oss
(experts stored (E, in, out): ``is_transposed``) and a plain module of PEFT's test shape; loss, gradients, file
keys, loading both ways, merging and unloading."""

import copy
import warnings

import peft
import pytest
import torch
import transformers
from torch import nn

import fastlora
from fastlora.modules_to_save import ModulesToSaveWrapper
from fastlora.parameter_lora import LoRAParameter
from tests.models import (PEFT_BEFORE_0_22, assert_biases_saved_and_loaded_as_peft, assert_unchanged, clone,
                          copy_lora_weights, snapshot, tiny_llama, tiny_mixtral, tokens)
from tests.tolerances import assert_close

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

_SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)


class _Experts(nn.Module):
    """A mixture of experts of PEFT's test shape: one 3-D weight (E, out, in) used in the module's own forward,
    each token sent to every expert with the router's softmax weights."""

    def __init__(self, experts=3, dim=12, hidden=20):
        super().__init__()
        self.router = nn.Linear(dim, experts, bias=False)
        self.up = nn.Parameter(torch.randn(experts, hidden, dim) / dim ** 0.5)
        self.down = nn.Parameter(torch.randn(experts, dim, hidden) / hidden ** 0.5)

    def forward(self, x):
        weights = self.router(x).softmax(-1)                            # (tokens, E)
        hidden = torch.relu(torch.einsum("td,ehd->teh", x, self.up))     # (tokens, E, hidden)
        out = torch.einsum("teh,edh->ted", hidden, self.down)            # (tokens, E, dim)
        return (out * weights.unsqueeze(-1)).sum(1)


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block = _Experts()
        self.head = nn.Linear(12, 5)

    def forward(self, x, labels=None):
        logits = self.head(self.block(x))
        return transformers.modeling_outputs.CausalLMOutput(
            loss=None if labels is None else nn.functional.cross_entropy(logits, labels), logits=logits)


def _mixtral():
    return tiny_mixtral()


def _gpt_oss():
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(
        **_SMALL, head_dim=8, layer_types=["sliding_attention", "full_attention"]))
    with torch.no_grad():  # the experts' biases start at zero: give them values, so that they count
        for name, parameter in model.named_parameters():
            if name.endswith("_bias"):
                parameter.normal_(std=0.1)
    return model


# case → (model builder, target_modules, target_parameters, inputs(model) → call keyword arguments)
CASES = {
    "mixtral": (_mixtral, ["q_proj"], ["experts.gate_up_proj", "experts.down_proj", "gate.weight"], None),
    "gpt_oss": (_gpt_oss, None, ["experts.gate_up_proj", "experts.down_proj", "router.weight"], None),
    "plain module": (_Model, ["head"], ["block.up", "block.down"], "plain"),
}


def _inputs(case):
    if CASES[case][3] == "plain":
        torch.manual_seed(3)
        return dict(x=torch.randn(6, 12), labels=torch.randint(0, 5, (6,)))
    ids = tokens(length=9)
    return dict(input_ids=ids, labels=ids)


def _pair(case, **config):
    build, modules, parameters, _ = CASES[case]
    base = build()
    kwargs = dict(target_modules=modules, target_parameters=parameters, r=4, lora_alpha=8, init_lora_weights=False,
                  **config)
    theirs = peft.get_peft_model(clone(base), peft.LoraConfig(**kwargs))
    ours = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(**kwargs))
    copy_lora_weights(theirs, ours)
    return base, theirs, ours


def _peft_grads(model):
    return {n.replace(".default", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}


def _grads(model):
    return {n.replace("_default", ".weight"): p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradients_agree_with_peft(case):
    _, theirs, ours = _pair(case)
    assert any(isinstance(m, LoRAParameter) for m in ours.modules())
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    inputs = _inputs(case)
    loss_theirs, loss_ours = theirs(**inputs).loss, ours(**inputs).loss
    assert_close(loss_ours, loss_theirs, kind="same_math")
    loss_theirs.backward()
    loss_ours.backward()
    theirs_grads, ours_grads = _peft_grads(theirs), _grads(ours)
    assert ours_grads.keys() == theirs_grads.keys()
    for name, grad in ours_grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert_close(grad, theirs_grads[name], kind="same_math_cancelling", msg=name)


@pytest.mark.parametrize("case", CASES)
def test_adapter_files_have_peft_keys_and_load_both_ways(case, tmp_path):
    base, theirs, ours = _pair(case)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    from safetensors.torch import load_file

    ours_file, theirs_file = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert {k: v.shape for k, v in ours_file.items()} == {k: v.shape for k, v in theirs_file.items()}
    inputs = {k: v for k, v in _inputs(case).items() if k != "labels"}
    ours.eval()
    expected = ours(**inputs).logits
    for model in (peft.PeftModel.from_pretrained(clone(base), tmp_path / "ours"),
                  fastlora.PeftModel.from_pretrained(clone(base), tmp_path / "theirs")):
        assert_close(model(**inputs).logits, expected, kind="same_math")


@pytest.mark.parametrize("bias", ["all", "lora_only"])
@pytest.mark.parametrize("build, parameter", [(lambda: tiny_llama(attention_bias=True), "o_proj.weight"),
                                              (_gpt_oss, "router.weight")], ids=["linear weight", "gpt_oss router"])
def test_the_bias_of_a_module_whose_weight_is_adapted_trains_saves_and_loads_as_peft(build, parameter, bias, tmp_path):
    """The module keeps its bias beside the adapted weight: ``bias`` trains it as PEFT's (``lora_only`` too, the
    module being a LoRA layer's), and the files hold it under PEFT's key ``<module>.base_layer.bias``."""
    base = build()
    kwargs = dict(target_modules=["q_proj"], target_parameters=[parameter], r=2, init_lora_weights=False, bias=bias)
    theirs = peft.get_peft_model(clone(base), peft.LoraConfig(**kwargs))
    ours = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(**kwargs))
    copy_lora_weights(theirs, ours)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    module = parameter.removesuffix(".weight")
    trained = [p for n, p in ours.named_parameters() if p.requires_grad and n.endswith(f"{module}.base_layer.bias")]
    assert len(trained) == base.config.num_hidden_layers
    ids = tokens(length=9)
    ours(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    assert_biases_saved_and_loaded_as_peft(theirs, ours, lambda: clone(base), tmp_path, torch.float32)
    loaded = fastlora.PeftModel.from_pretrained(clone(base), tmp_path / "ours").eval()  # its own file
    with torch.no_grad():
        assert_close(loaded(input_ids=ids).logits, theirs(input_ids=ids).logits, kind="same_math")


@pytest.mark.parametrize("case", CASES)
def test_merge_and_unload_equal_peft_and_unload_gives_the_base_back(case):
    base, theirs, ours = _pair(case)
    inputs = {k: v for k, v in _inputs(case).items() if k != "labels"}
    ours.eval()
    adapted = ours(**inputs).logits
    merged_theirs = theirs.merge_and_unload()
    merged_ours = ours.merge_and_unload()
    assert not any(isinstance(m, LoRAParameter) for m in merged_ours.modules())
    theirs_state = merged_theirs.state_dict()
    for name, value in merged_ours.state_dict().items():
        assert_close(value, theirs_state[name], kind="same_math", msg=name)
    assert_close(merged_ours(**inputs).logits, adapted, kind="same_math")

    _, _, again = _pair(case)
    plain = again.unload()
    assert type(plain) is type(base) and not any(isinstance(m, LoRAParameter) for m in plain.modules())
    base_state = base.state_dict()
    assert plain.state_dict().keys() == base_state.keys()
    assert all(torch.equal(value, base_state[name]) for name, value in plain.state_dict().items())


def test_merge_then_unmerge_restores_the_parameter_and_the_output():
    _, _, ours = _pair("mixtral")
    ours.eval()
    ids = tokens(length=9)
    adapted = ours(input_ids=ids).logits
    experts = ours.base_model.model.model.layers[0].mlp.experts
    before = experts.weight.detach().clone()
    ours.merge_adapter()
    assert not torch.equal(experts.weight, before)
    assert_close(ours(input_ids=ids).logits, adapted, kind="same_math")
    ours.unmerge_adapter()
    assert_close(experts.weight, before, kind="same_math")
    with ours.disable_adapter():
        base_out = ours(input_ids=ids).logits
    assert not torch.allclose(base_out, adapted)


def test_a_training_step_moves_the_factors_and_leaves_the_experts_bitwise_unchanged():
    _, _, ours = _pair("mixtral")
    frozen = {n: p.detach().clone() for n, p in ours.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    ours(**_inputs("mixtral")).loss.backward()
    optimizer.step()
    params = dict(ours.named_parameters())
    assert all(torch.equal(params[n], value) for n, value in frozen.items())
    assert all(not torch.equal(params[n], value) for n, value in trained.items())


def test_rank_pattern_keys_match_the_parameter_name_as_in_peft():
    _, theirs, ours = _pair("mixtral", rank_pattern={"gate_up_proj": 2}, alpha_pattern={"gate_up_proj": 6})
    layer = ours.base_model.model.model.layers[0].mlp.experts.base_layer
    assert (layer.parameter_name, layer.r, layer.lora_alpha) == ("gate_up_proj", 2, 6)
    assert layer.lora_A.shape == (2 * 4, 32)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    inputs = _inputs("mixtral")
    assert_close(ours(**inputs).loss, theirs(**inputs).loss, kind="same_math")


def test_several_active_adapters_add_up_as_in_peft():
    base, theirs, ours = _pair("mixtral")
    second = dict(target_modules=["q_proj"], target_parameters=CASES["mixtral"][2], r=2, lora_alpha=3,
                  init_lora_weights=False)
    theirs.add_adapter("other", peft.LoraConfig(**second))
    ours.add_adapter("other", fastlora.LoraConfig(**second))
    copy_lora_weights(theirs, ours)
    theirs.base_model.set_adapter(["default", "other"])
    ours.base_model.set_adapter(["default", "other"])
    ids = tokens(length=9)
    assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, kind="same_math")
    with torch.no_grad():
        theirs.base_model.set_adapter("default")
        only_default = theirs(input_ids=ids).logits
    assert not torch.allclose(only_default, ours(input_ids=ids).logits)


def test_deleting_one_of_two_adapters_keeps_the_other_and_the_last_unwraps():
    _, _, ours = _pair("mixtral")
    ours.add_adapter("other", fastlora.LoraConfig(target_modules=["q_proj"], target_parameters=CASES["mixtral"][2]))
    ours.delete_adapter("other")
    experts = ours.base_model.model.model.layers[0].mlp.experts
    assert isinstance(experts, LoRAParameter) and experts.adapter_names == ["default"]
    assert experts.base_layer.adapter_names == ["default"]


def _mixtral_model():
    return fastlora.get_peft_model(_mixtral(), fastlora.LoraConfig(target_modules=["q_proj"],
                                                                   target_parameters=CASES["mixtral"][2]))


BAD = [
    ("a second adapter adapting other parameters",
     lambda m: m.add_adapter("other", fastlora.LoraConfig(target_parameters=["experts.down_proj"])),
     ValueError, "all adapters must target the same set of parameters"),
    ("a mixed-adapter batch", lambda m: m(input_ids=tokens(batch=2), adapter_names=["default", "__base__"]),
     ValueError, r"mixed-adapter batch\) is not supported"),
    ("a weighted combination", lambda m: m.add_weighted_adapter(["default"], [1.0], "mix"),
     ValueError, "adapts parameters"),  # PEFT's error type (an UnsupportedFeatureError: a NotImplementedError too)
    ("a parameter of the model itself",
     lambda m: fastlora.get_peft_model(_Experts(), fastlora.LoraConfig(target_parameters=["up"])),
     ValueError, "a parameter of the model itself"),
    ("parameters of a module and of a module inside it",
     lambda m: fastlora.get_peft_model(_Model(), fastlora.LoraConfig(target_parameters=["block.up", "router.weight"])),
     ValueError, "a module inside it"),
]


@pytest.mark.parametrize("call, error, match", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_calls_on_a_model_with_adapted_parameters_change_nothing(call, error, match):
    model = _mixtral_model()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        call(model)
    assert_unchanged(model, before)


def test_a_second_adapter_naming_a_module_whose_weight_is_adapted_joins_it_on_the_weight_as_peft(tmp_path):
    """target_modules of a second adapter naming the Linear whose weight the first adapts through target_parameters:
    the adapter joins the parameter's layer (PEFT's ParamWrapper takes it there too), nothing nested inside it,
    with PEFT's output, trainable counts and file, which loads both ways; "all-linear" leaves that Linear."""
    base, ids = tiny_llama(), tokens(length=9)
    models = []
    for lib in (peft, fastlora):
        model = lib.get_peft_model(clone(base), lib.LoraConfig(target_parameters=["layers.0.mlp.gate_proj.weight"],
                                                               r=1, init_lora_weights=False))
        model.add_adapter("named", lib.LoraConfig(target_modules=["gate_proj", "q_proj"], r=2, init_lora_weights=False))
        model.add_adapter("all", lib.LoraConfig(target_modules="all-linear", r=2, init_lora_weights=False))
        models.append(model)
    theirs, ours = models
    before = snapshot(ours)
    with pytest.raises(ValueError, match=r"target_modules matched model\.layers\.0\.mlp\.gate_proj, whose weight "
                       r"another adapter adapts through target_parameters: the adapter joins it there, which does not "
                       r"work with lora_dropout=0\.1 \(as in PEFT\)"):
        ours.add_adapter("dropout", fastlora.LoraConfig(target_modules=["gate_proj"], lora_dropout=0.1))
    assert_unchanged(ours, before)
    copy_lora_weights(theirs, ours)
    layer = ours.base_model.model.model.layers[0].mlp.gate_proj
    assert isinstance(layer, LoRAParameter) and sorted(layer.adapter_names) == ["default", "named"]
    assert not any(isinstance(m, fastlora.LoRALinear) for m in layer.base_layer.modules())
    for name in ("named", "all"):
        theirs.set_adapter(name)
        ours.set_adapter(name)
        assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters(), name
        with torch.no_grad():
            assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, kind="same_math", msg=name)
    theirs.set_adapter("named")
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
    from safetensors.torch import load_file
    for lib, model in (("peft", theirs), ("ours", ours)):
        model.save_pretrained(tmp_path / lib, selected_adapters=["named"])
    files = [load_file(tmp_path / lib / "named" / "adapter_model.safetensors") for lib in ("peft", "ours")]
    assert sorted(files[0]) == sorted(files[1])
    assert "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight" in files[1]
    for lib, directory in ((peft, tmp_path / "ours" / "named"), (fastlora, tmp_path / "peft" / "named")):
        loaded = lib.PeftModel.from_pretrained(clone(base), directory)
        with torch.no_grad():
            assert_close(loaded(input_ids=ids).logits, expected, kind="same_math", msg=lib.__name__)
    ours.load_adapter(tmp_path / "peft" / "named", adapter_name="again")  # beside the first adapter's parameter
    ours.set_adapter("again")
    with torch.no_grad():
        assert_close(ours(input_ids=ids).logits, expected, kind="same_math")


def test_a_parameter_s_module_in_modules_to_save_is_saved_whole_without_an_adapter():
    """As a Linear named in both target_modules and modules_to_save: the copy trains, the parameter of that module
    takes no adapter (the other layers' do)."""
    model = fastlora.get_peft_model(_mixtral(), fastlora.LoraConfig(
        target_parameters=["gate.weight"], modules_to_save=["layers.0.mlp.gate"], r=2, init_lora_weights=False))
    layers = model.base_model.model.model.layers
    assert isinstance(layers[0].mlp.gate, ModulesToSaveWrapper)
    assert not any(isinstance(m, LoRAParameter) for m in layers[0].mlp.gate.modules())
    assert isinstance(layers[1].mlp.gate, LoRAParameter)
    ids = tokens(length=9)
    model(input_ids=ids, labels=ids).loss.backward()
    assert layers[0].mlp.gate.modules_to_save["default"].weight.grad is not None


def test_the_layer_reads_a_transposed_expert_stack_through_its_module():
    _, _, ours = _pair("gpt_oss")
    layer = ours.base_model.model.model.layers[0].mlp.experts
    assert layer.parameter_name == "down_proj" and layer.stored_transposed
    assert (layer.in_features, layer.out_features, layer.num_experts) == (48, 32, 4)
    assert layer.delta_weight().shape == layer.weight.shape == (4, 48, 32)
    copy.deepcopy(layer)  # a layer copies with its module (Trainer's best-model restore, EMA)


@pytest.mark.parametrize("targets", [["q_proj", "w1", "w3", "w2", "gate"], ["w1", "w3"], "all-linear",
                                     r".*\.(q_proj|w1|w3)"], ids=["list", "fused pair", "all-linear", "regex"])
def test_version_4_expert_names_move_to_parameters_as_peft_moves_them(targets):
    base = _mixtral()
    theirs = peft.get_peft_model(clone(base), peft.LoraConfig(target_modules=targets, r=4, lora_alpha=8))
    ours = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(target_modules=targets, r=4, lora_alpha=8))
    mine, peft_config = ours.peft_config["default"], theirs.peft_config["default"]
    assert sorted(mine.target_parameters) == sorted(peft_config.target_parameters)
    assert sorted(mine.target_modules or []) == sorted(peft_config.target_modules)
    assert (mine.rank_pattern, mine.alpha_pattern) == (peft_config.rank_pattern, peft_config.alpha_pattern)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def _qwen2_moe():
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(transformers.Qwen2MoeConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=16)).eval()


LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "shared_expert_gate", "up_proj", "v_proj"]


@pytest.mark.parametrize("targets, modules, parameters, adapted", [
    ("all-linear", LINEARS, ["down_proj", "gate.weight", "gate_up_proj"], 6),
    (["down_proj"], ["down_proj"], ["down_proj"], 2),  # the shared expert's Linear and the experts' parameter
    (["gate_proj", "up_proj"], ["gate_proj", "up_proj"], ["gate_up_proj"], 2),
    (["layers.0.mlp.gate", "q_proj"], ["q_proj"], ["layers.0.mlp.gate.weight"], 1),  # the prefix kept: one layer
    (r".*\.(q_proj|gate)", ["q_proj"], ["gate.weight"], 2),
], ids=["all-linear", "shared and routed", "fused pair", "one layer's router", "regex"])
def test_a_name_of_linear_layers_stays_in_target_modules_beside_the_experts_as_in_peft(targets, modules, parameters,
                                                                                      adapted):
    """Qwen2-MoE keeps a shared expert of Linear layers beside its fused experts: a name its Linear layers still
    carry stays in target_modules, and names the experts' parameter too; a prefix stays with the parameter.
    PEFT (since 0.22) rewrites the config the same way."""
    base = _qwen2_moe()
    ours = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(target_modules=targets, r=4, lora_alpha=8))
    mine = ours.peft_config["default"]
    assert (sorted(mine.target_modules), sorted(mine.target_parameters)) == (modules, parameters)
    fused = {r".*\.gate_up_proj": 8} if "gate_up_proj" in parameters else {}
    assert mine.rank_pattern == fused
    assert len([m for m in ours.modules() if isinstance(m, LoRAParameter)]) == adapted
    assert {n.rsplit(".", 1)[-1] for n, m in ours.lora_layers() if not isinstance(m, LoRAParameter)} == set(modules)
    if PEFT_BEFORE_0_22:
        return  # 0.21 leaves Qwen2-MoE's config as it is
    theirs = peft.get_peft_model(clone(base), peft.LoraConfig(target_modules=targets, r=4, lora_alpha=8))
    peft_config = theirs.peft_config["default"]
    assert (sorted(peft_config.target_modules), sorted(peft_config.target_parameters)) == (modules, parameters)
    assert peft_config.rank_pattern == fused
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_a_parameter_named_twice_by_all_linear_and_by_the_user_is_adapted_once_as_in_peft():
    """"all-linear" on Mixtral adds ``gate_up_proj`` beside the user's ``experts.gate_up_proj``: both name the same
    parameters, which are adapted once, as in PEFT."""
    base = _mixtral()
    config = dict(target_modules="all-linear", target_parameters=["experts.gate_up_proj"], r=4, lora_alpha=8)
    theirs = peft.get_peft_model(clone(base), peft.LoraConfig(**config))
    ours = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(**config))
    assert sorted(ours.peft_config["default"].target_parameters) == sorted(theirs.peft_config["default"].target_parameters)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert len([m for m in ours.modules() if isinstance(m, LoRAParameter)]) == 3 * base.config.num_hidden_layers


def test_a_target_module_inside_a_parameter_s_module_computes_and_trains():
    """A Linear target inside the module whose parameter is adapted: its adapted layer is the one the module's
    forward calls (under the parameter's layer, at ``block.base_layer.out``), and it trains."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale, self.out = nn.Parameter(torch.randn(8, 8)), nn.Linear(8, 8)

        def forward(self, x):
            return self.out(x @ self.scale.T)

    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("block", Block())
    model = fastlora.get_peft_model(copy.deepcopy(base), fastlora.LoraConfig(
        target_modules=["out"], target_parameters=["block.scale"], init_lora_weights=False))
    assert [n for n, _ in model.lora_layers()] == ["block", "block.base_layer.out"]
    model(torch.randn(3, 8)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_one_of_two_fused_projections_is_refused_as_in_peft():
    base = _mixtral()
    with pytest.raises(ValueError, match="w1 without also targeting w3"):
        peft.get_peft_model(clone(base), peft.LoraConfig(target_modules=["q_proj", "w1"]))
    model = clone(base)
    before = snapshot(model)
    with pytest.raises(ValueError, match="names w1 without w3: .* fused into one parameter, gate_up_proj"):
        fastlora.get_peft_model(model, fastlora.LoraConfig(target_modules=["q_proj", "w1"]))
    assert_unchanged(model, before)


@pytest.mark.parametrize("case", ["mixtral", "gpt_oss"])
def test_transformers_experts_never_keep_an_expert_stack_for_backward(case):
    """On a transformers experts module the low-rank products run per expert (fastlora.grouped_experts): no tensor
    the size of an expert stack (W + ΔW, as PEFT forms it) is kept for backward, and fewer bytes are in all."""
    from fastlora.bench.measure import SavedTensorCounter, module_tensors

    _, theirs, ours = _pair(case)
    stack = min(p.numel() * p.element_size() for n, p in ours.named_parameters() if n.endswith(("gate_up_proj", "down_proj")))
    largest, total = {}, {}
    for name, model in (("peft", theirs), ("fastlora", ours)):
        with SavedTensorCounter(exclude=module_tensors(model)) as counter:
            loss = model(**_inputs(case)).loss
        loss.backward()
        largest[name], total[name] = max(counter.storages.values()), counter.bytes
    assert largest["peft"] >= stack > largest["fastlora"]
    assert total["fastlora"] < total["peft"]


def test_an_inner_parameter_merged_alone_leaves_the_output_unchanged():
    _, _, ours = _pair("mixtral")
    ours.eval()
    ids = tokens(length=9)
    adapted = ours(input_ids=ids).logits
    for layer in ours.base_model.model.model.layers:
        layer.mlp.experts.base_layer.merge()  # gate_up_proj merged, down_proj still applied per expert
    assert_close(ours(input_ids=ids).logits, adapted, kind="same_math")


def test_an_experts_only_adapter_saved_by_peft_loads(tmp_path):
    """PEFT's rewrite of a list of version-4 expert names leaves target_modules empty (saved as []): fastlora
    loads that adapter and computes what PEFT computes."""
    base = _mixtral()
    theirs = peft.get_peft_model(clone(base), peft.LoraConfig(target_modules=["w1", "w2", "w3"], r=4,
                                                              init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    ours = fastlora.PeftModel.from_pretrained(clone(base), tmp_path)
    assert ours.peft_config["default"].target_modules == []
    ids = tokens(length=9)
    theirs.eval()
    assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, kind="same_math")


def test_default_targets_are_filled_beside_target_parameters_as_in_peft():
    from tests.models import tiny_llama

    base = tiny_llama()
    config = dict(target_parameters=["mlp.down_proj.weight"], r=4)
    theirs = peft.get_peft_model(clone(base), peft.LoraConfig(**config))
    ours = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(**config))
    assert sorted(ours.peft_config["default"].target_modules) == sorted(theirs.peft_config["default"].target_modules)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_no_defaults_beside_target_parameters_on_fused_experts_as_in_peft(tmp_path):
    """On a model whose experts transformers 5 fused, PEFT's rewrite of the config turns no target_modules into
    none at all before defaults would be filled in: only the parameters are adapted, the config saved with [],
    and such a file (its target_modules null) loads so.  (With no target_parameters either, PEFT refuses and
    fastlora takes the architecture's default targets: tests/test_architectures.py.)"""
    import json

    base = _mixtral()
    config = dict(target_parameters=["experts.gate_up_proj", "experts.down_proj", "gate.weight"], r=4,
                  init_lora_weights=False)
    theirs = peft.get_peft_model(clone(base), peft.LoraConfig(**config))
    ours = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(**config))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert not any("self_attn" in name for name, _ in ours.lora_layers())
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == []
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**saved, "target_modules": None}))
    loaded = fastlora.PeftModel.from_pretrained(clone(base), tmp_path)
    ids = tokens(length=9)
    with torch.no_grad():
        assert_close(loaded(input_ids=ids).logits, ours.eval()(input_ids=ids).logits, kind="same_math")


def test_a_file_of_per_expert_weights_from_transformers_4_is_refused_with_what_to_do(tmp_path):
    from safetensors.torch import load_file, save_file

    base = _mixtral()
    fastlora.get_peft_model(clone(base), fastlora.LoraConfig(target_modules=["w1", "w2", "w3"], r=4)).save_pretrained(
        tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.block_sparse_moe.experts.0.w1.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = clone(base)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"holds per-expert weights written on transformers 4 \(.*experts\.0\.w1\.lora_A"
                                         r"\.weight\); .* load the adapter once with PEFT \(which converts it\)"):
        fastlora.PeftModel.from_pretrained(model, tmp_path)
    assert_unchanged(model, before)


def test_a_second_all_linear_adapter_on_fused_experts_as_in_peft():
    base = _mixtral()
    models = []
    for library in (peft, fastlora):
        model = library.get_peft_model(clone(base), library.LoraConfig(target_modules="all-linear", r=4))
        model.add_adapter("second", library.LoraConfig(target_modules="all-linear", r=2))
        models.append(model)
    theirs, ours = models
    assert sorted(ours.peft_config["second"].target_parameters) == sorted(theirs.peft_config["second"].target_parameters)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert sum(p.numel() for n, p in ours.named_parameters() if n.endswith("_second")) == sum(
        p.numel() for n, p in theirs.named_parameters() if ".second" in n)


@pytest.mark.parametrize("target_parameters, warned", [
    (["experts.gate_up_proj", "mlp.shared_expert.down_proj"], False),
    (["no_such.weight"], True),
], ids=["beside a matching entry", "no entry matching"])
def test_target_parameters_entries_matching_nothing_are_left_out_as_peft(tmp_path, target_parameters, warned):
    """An entry matching no parameter is left out where something else is adapted (PEFT's warning where no
    entry matches); PEFT's file of such a config loads."""
    settings = dict(r=4, target_modules=["q_proj"], target_parameters=target_parameters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = fastlora.get_peft_model(tiny_mixtral(), fastlora.LoraConfig(**settings))
    assert any("no parameter was matched" in str(w.message) for w in caught) == warned
    theirs = peft.get_peft_model(tiny_mixtral(), peft.LoraConfig(**settings))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    theirs.save_pretrained(tmp_path)
    loaded = fastlora.PeftModel.from_pretrained(tiny_mixtral(), tmp_path)
    assert loaded.get_nb_trainable_parameters()[1] == ours.get_nb_trainable_parameters()[1]


@pytest.mark.parametrize("case", ["plain module", "mixtral"])
def test_a_merge_while_the_layers_are_disabled_is_taken_out_by_the_next_forward_as_peft(case):
    base, theirs, ours = _pair(case)
    inputs = _inputs(case)
    with torch.no_grad():
        expected = base.eval()(**inputs).logits
        for model in (theirs, ours):
            model.eval().disable_adapter_layers()
            model.merge_adapter()
            assert_close(model(**inputs).logits, expected, kind="same_math", msg=type(model).__module__)
    assert not any(layer.merged for _, layer in ours.lora_layers())

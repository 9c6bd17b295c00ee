"""LoRALinear: construction, from_linear, init, merge/unmerge precision, bad hyper-parameters."""

import math

import pytest
import torch
from torch import nn

from fastlora import LoRALinear
from tests.models import PEFT_BEFORE_0_22, clone, tiny_gpt2, tiny_llama, tiny_mixtral
from tests.tolerances import assert_close


def test_is_a_linear_with_lora_parameters_and_frozen_base():
    layer = LoRALinear(10, 6, r=3, lora_alpha=6)
    assert isinstance(layer, nn.Linear)
    assert dict(layer.named_parameters()).keys() == {"weight", "bias", "lora_A_default", "lora_B_default"}
    assert layer.lora_A is layer.lora_A_default and layer.lora_B is layer.lora_B_default
    assert layer.lora_A.shape == (3, 10) and layer.lora_B.shape == (6, 3)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.scaling == 2.0
    assert list(layer.children()) == []
    # a base checkpoint loads unchanged (LoRA keys absent → strict=False reports only those)
    base = nn.Linear(10, 6)
    missing, unexpected = layer.load_state_dict(base.state_dict(), strict=False)
    assert sorted(missing) == ["lora_A_default", "lora_B_default"] and unexpected == []
    assert torch.equal(layer.weight, base.weight)


def test_rslora_scaling_and_inits():
    assert LoRALinear(4, 4, r=16, lora_alpha=8, use_rslora=True).scaling == pytest.approx(2.0)
    layer = LoRALinear(512, 4, r=64, init_lora_weights="gaussian")
    assert layer.lora_A.std().item() == pytest.approx(1 / 64, rel=0.05)
    assert torch.count_nonzero(layer.lora_B) == 0
    default = LoRALinear(512, 4, r=8)
    bound = 1 / math.sqrt(512)  # kaiming_uniform(a=√5) on fan_in 512
    assert default.lora_A.abs().max() <= bound and torch.count_nonzero(default.lora_B) == 0
    assert torch.count_nonzero(LoRALinear(8, 4, init_lora_weights=False).lora_B) > 0


def test_from_linear_shares_and_freezes():
    linear = nn.Linear(8, 5)
    layer = LoRALinear.from_linear(linear, r=2, lora_alpha=4)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not linear.weight.requires_grad
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), linear(x))  # B = 0 at init
    no_bias = LoRALinear.from_linear(nn.Linear(8, 5, bias=False), r=2, lora_alpha=4)
    assert no_bias.bias is None
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear.from_linear(nn.Conv1d(2, 2, 1), r=2, lora_alpha=4)


class _Doubled(nn.Linear):
    """A Linear subclass computing something else than x Wᵀ + b."""

    def forward(self, x):
        return super().forward(x) * 2


def test_a_linear_computing_something_else_is_refused_and_left_alone():
    """Its forward would be lost in an adapted layer of W and b: refused by from_linear and by get_peft_model (named
    or through all-linear, as PEFT matches it), the module unchanged; a refused from_linear leaves a plain Linear's
    flags as they were.  transformers' FalconLinear, x Wᵀ + b in another order, is adapted (tests/test_architectures)."""
    from fastlora import LoraConfig, get_peft_model
    from tests.models import assert_unchanged, snapshot

    with pytest.raises(TypeError, match="has a forward of its own"):
        LoRALinear.from_linear(_Doubled(4, 4))
    model = nn.Sequential(_Doubled(4, 4), nn.ReLU(), nn.Linear(4, 4))
    before = snapshot(model)
    for targets in (["0"], "all-linear"):
        with pytest.raises(TypeError, match=r"0 \(_Doubled: an nn.Linear subclass with a forward of its own"):
            get_peft_model(model, LoraConfig(target_modules=targets))
        assert_unchanged(model, before)
    remote_falcon = type("FalconLinear", (nn.Linear,), {"forward": lambda self, x: x @ self.weight.T + self.bias,
                                                         "__module__": "transformers_modules.some.modeling_falcon"})
    assert type(LoRALinear.from_linear(remote_falcon(4, 4))) is LoRALinear  # a trust_remote_code copy of the file
    linear = nn.Linear(4, 4)
    for kwargs, error in (({"adapter_dtype": torch.int32}, TypeError), ({"adapter_dtype": "float32"}, TypeError),
                          ({"r": 3, "init_lora_weights": "orthogonal"}, ValueError)):
        with pytest.raises(error):
            LoRALinear.from_linear(linear, **kwargs)
        assert linear.weight.requires_grad and linear.bias.requires_grad, kwargs


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 0}, "r must be"),
        ({"r": 2.5}, "r must be"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_alpha": -1}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_dropout": -0.1}, "lora_dropout"),
        ({"init_lora_weights": "corda"}, "init_lora_weights"),
        ({"backend": "cuda"}, "backend"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRALinear(4, 4, **kwargs)
    linear = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=match):
        LoRALinear.from_linear(linear, **{"r": 2, "lora_alpha": 2, **kwargs})
    assert linear.weight.requires_grad  # the failed wrap left the user's layer alone


def test_merge_unmerge_equivalence_fp32():
    layer = LoRALinear(16, 12, r=4, lora_alpha=8, init_lora_weights=False).eval()
    x = torch.randn(5, 16)
    before = layer(x)
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged
    assert_close(layer(x), before, kind="same_math")
    layer.merge()  # idempotent
    layer.unmerge()
    assert_close(layer.weight, w0, kind="roundoff")
    assert_close(layer(x), before, kind="same_math")


def _bf16_ulp(v: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.floor(torch.log2(v.abs().double().clamp_min(2.0**-126))) - 7)


def test_bf16_merge_rounds_once_and_beats_a_bf16_merge():
    torch.manual_seed(0)
    layer = LoRALinear(256, 128, r=16, lora_alpha=32, dtype=torch.bfloat16, init_lora_weights=False)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02)
    w0 = layer.weight.detach().clone()
    exact = w0.double() + layer.scaling * (layer.lora_B.double() @ layer.lora_A.double())
    naive = w0 + (layer.lora_B @ layer.lora_A) * layer.scaling  # a bf16 merge (PEFT's on GPU)
    layer.merge()
    merged = layer.weight.detach().double().clone()
    err = (merged - exact).abs()
    # one rounding: within half a bf16 ulp of the exact sum (a hair more for the fp32 product's own error)
    assert torch.all(err <= 0.5 * _bf16_ulp(exact) * (1 + 1e-3))
    assert err.mean() < (naive.double() - exact).abs().mean()
    layer.unmerge()
    # back to within one rounding of the original: the two roundings are each half an ulp of their result
    bound = torch.maximum(_bf16_ulp(w0.double()), _bf16_ulp(merged))
    assert torch.all((layer.weight.double() - w0.double()).abs() <= bound)


def test_each_training_forward_draws_its_own_dropout_mask():
    """The seed is drawn per call, not per module: two training forwards of one layer drop different elements,
    and the same torch seed gives the same mask again."""
    layer = LoRALinear(64, 48, r=4, lora_alpha=8, lora_dropout=0.5, backend="torch").train()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(32, 64)
    torch.manual_seed(0)
    first, second = layer(x), layer(x)
    assert not torch.equal(first, second)
    torch.manual_seed(0)
    assert torch.equal(layer(x), first)
    layer.eval()
    assert torch.equal(layer(x), layer(x))


_SEEDED_CASES = {
    "default": (lambda: tiny_llama(), dict(target_modules=["q_proj", "v_proj", "embed_tokens"], r=4)),
    "gaussian": (lambda: tiny_llama(), dict(target_modules=["q_proj", "v_proj"], r=4,
                                                      init_lora_weights="gaussian")),
    "false-lora-bias": (lambda: tiny_llama(), dict(target_modules=["q_proj", "v_proj"], r=4,
                                                             init_lora_weights=False, lora_bias=True)),
    "bf16": (lambda: tiny_llama().to(torch.bfloat16), dict(target_modules=["q_proj", "down_proj"], r=4)),
    "gpt2-conv1d": (lambda: tiny_gpt2(), dict(target_modules=["c_attn", "c_fc"], r=4)),
    "dora": (lambda: tiny_llama(), dict(target_modules=["q_proj"], r=4, use_dora=True)),
    "moe-parameters": (lambda: tiny_mixtral(), dict(target_modules=["q_proj"], r=4,
                                                              target_parameters=["experts.gate_up_proj"])),
    "orthogonal": (lambda: tiny_llama(), dict(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights="orthogonal")),
    "pissa-embedding": (lambda: tiny_llama(), dict(target_modules=["q_proj", "embed_tokens"], r=4,
                                                   init_lora_weights="pissa")),
    "olora-bf16": (lambda: tiny_llama().to(torch.bfloat16), dict(target_modules=["q_proj"], r=4,
                                                                 init_lora_weights="olora")),
    "eva-moe": (lambda: tiny_mixtral(), dict(target_modules=["q_proj"], r=4, init_lora_weights="eva",
                                             target_parameters=["experts.gate_up_proj"])),
    "nora": (lambda: tiny_llama(), dict(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights="nora")),
    "nora-gpt2-conv1d": (lambda: tiny_gpt2(), dict(target_modules=["c_attn"], r=4, init_lora_weights="nora")),
    "nora-dora": (lambda: tiny_llama(), dict(target_modules=["q_proj"], r=4, init_lora_weights="nora", use_dora=True)),
    "nora-parameter": (lambda: tiny_llama(), dict(target_modules=["v_proj"], r=4, init_lora_weights="nora",
                                                  target_parameters=["self_attn.q_proj.weight"])),
}


_AFTER_0_21 = pytest.mark.skipif(PEFT_BEFORE_0_22, reason="PEFT 0.21 drew the parameters' adapters after the "
                                                        "modules' (fastlora draws in 0.22's order), and had no NoRA")


@pytest.mark.parametrize("case", [pytest.param(c, marks=_AFTER_0_21) if _SEEDED_CASES[c][1].get("target_parameters")
                                  or c.startswith("nora") else c for c in _SEEDED_CASES])
def test_a_seeded_model_starts_from_peft_s_values(case):
    """From the same seed, fastlora's adapters start from PEFT's values bit for bit (PEFT's draws: nn.Linear's own
    initialisation of A and B, then the adapter's; an embedding's two normal draws), held as PEFT holds them
    (rounded to a bf16 base's dtype, then float32), and the generator is left where PEFT leaves it."""
    import peft

    from fastlora import LoraConfig as FastConfig, get_peft_model

    import warnings

    make, config = _SEEDED_CASES[case]
    base = make()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's EVA default-config notice
        theirs = peft.get_peft_model(clone(base), peft.LoraConfig(**config))
    their_state = torch.get_rng_state()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EVA's data-driven step is not part of fastlora
        ours = get_peft_model(clone(base), FastConfig(**config))
    assert torch.equal(torch.get_rng_state(), their_state)
    for name, layer in ours.lora_layers():
        their_layer = theirs.base_model.model.get_submodule(name)
        A, B = layer.lora_factors("default")
        if "default" in getattr(their_layer, "lora_embedding_A", {}):
            their_A, their_B = their_layer.lora_embedding_A["default"], their_layer.lora_embedding_B["default"]
        else:
            their_A, their_B = their_layer.lora_A["default"].weight, their_layer.lora_B["default"].weight
        assert A.dtype == their_A.dtype and torch.equal(A, their_A) and torch.equal(B, their_B), name
        if layer.lora_bias("default") is not None:
            assert torch.equal(layer.lora_bias("default"), their_layer.lora_B["default"].bias), name


def test_adapters_are_created_inside_a_meta_device_context():
    """A model with real weights adapted inside ``with torch.device("meta")`` (as loading code does): the initial
    values are drawn where they can be copied from."""
    from fastlora import LoraConfig as FastConfig, get_peft_model

    model = tiny_llama()
    with torch.device("meta"):
        adapted = get_peft_model(model, FastConfig(target_modules=["q_proj", "embed_tokens"], r=4))
    for _, layer in adapted.lora_layers():
        assert all(factor.device.type == "cpu" for factor in layer.lora_factors("default"))


@pytest.mark.parametrize("use_dora", [False, True], ids=["LoRA", "DoRA"])
def test_a_layer_on_the_meta_device_computes_shapes_in_training_and_eval(use_dora):
    """As torch's own layers (and PEFT's) do on meta tensors: the output's shape, gradients' shapes, no error (a
    meta tensor has no values to drop, so no mask is drawn)."""
    with torch.device("meta"):
        layer = LoRALinear(8, 4, r=2, lora_dropout=0.1, use_dora=use_dora)
        x = torch.randn(3, 5, 8, requires_grad=True)
    for training in (False, True):
        layer.train(training)
        y = layer(x)
        assert y.shape == (3, 5, 4) and y.device.type == "meta"
        y.sum().backward()
        assert layer.lora_A.grad.shape == (2, 8) and x.grad.shape == x.shape

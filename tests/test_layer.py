"""LoRALinear: construction, from_linear, init, merge/unmerge precision, bad hyper-parameters."""

import math

import pytest
import torch
from torch import nn

from fastlora import LoRALinear
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

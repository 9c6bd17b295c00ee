"""Dropout on the LoRA branch (torch backend): one mask for forward and backward, rate 1-p, 1/(1-p) scale,
reproducible from torch's seed, replayed under activation checkpointing, absent in eval."""

import torch
from torch.utils.checkpoint import checkpoint

from fastlora import LoRALinear, lora_linear
from tests.tolerances import assert_close

P = 0.3


def _identity_case(M=64, K=32, N=32, p=P):
    """A = I (r = K), x = 1: then S = m / (1-p) exposes the mask itself."""
    x = torch.ones(M, K, dtype=torch.float64, requires_grad=True)
    W = torch.zeros(N, K, dtype=torch.float64)
    A = torch.eye(K, dtype=torch.float64).requires_grad_()
    B = torch.randn(N, K, dtype=torch.float64).requires_grad_()
    return x, W, A, B


def test_forward_and_backward_share_one_mask():
    x, W, A, B = _identity_case()
    torch.manual_seed(0)
    y = lora_linear(x, W, None, A, B, 1.0, P)
    # y = (m/(1-p)) Bᵀ with B square: solve for the mask
    h = torch.linalg.solve(B.detach(), y.detach().t()).t()
    keep = h > 0.5 / (1 - P)
    assert_close(h, keep.double() / (1 - P), kind="reference")  # h is float64, solved back from y
    dy = torch.randn_like(y)
    y.backward(dy)
    dS = dy @ B.detach()
    # dx = dy W + (dS A) ⊙ m/(1-p) with W = 0 and A = I
    torch.testing.assert_close(x.grad, dS * keep / (1 - P))
    # dA = dSᵀ h
    torch.testing.assert_close(A.grad, dS.t() @ (keep.double() / (1 - P)))
    assert 0 < keep.sum() < keep.numel()


def _mask(seed, p=P, M=64, K=32):
    x, W, A, B = _identity_case(M, K, N=K, p=p)
    B = torch.eye(K, dtype=torch.float64)
    torch.manual_seed(seed)
    y = lora_linear(x, W, None, A, B, 1.0, p)
    return y.detach()


def test_kept_values_are_scaled_and_rate_is_one_minus_p():
    h = _mask(1, M=256, K=256)
    kept_value = torch.tensor(1 / (1 - P), dtype=h.dtype)
    assert torch.all((h == 0) | torch.isclose(h, kept_value))
    rate = (h > 0).double().mean().item()
    n = h.numel()
    assert abs(rate - (1 - P)) < 6 * (P * (1 - P) / n) ** 0.5


def test_same_torch_seed_same_mask_other_seed_other_mask():
    assert torch.equal(_mask(5), _mask(5))
    assert not torch.equal(_mask(5), _mask(6))


def test_eval_mode_and_training_false_have_no_dropout():
    layer = LoRALinear(32, 16, r=4, lora_dropout=0.5, init_lora_weights=False)
    x = torch.randn(8, 32)
    expected = x @ layer.weight.t() + layer.bias + layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    layer.eval()
    torch.testing.assert_close(layer(x), expected.detach())
    torch.testing.assert_close(
        lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, 0.5, training=False),
        expected.detach(),
    )
    layer.train()
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected.detach())


def test_activation_checkpointing_replays_the_mask():
    layer = LoRALinear(32, 16, r=4, lora_dropout=0.5, init_lora_weights=False)
    x = torch.randn(8, 32, requires_grad=True)
    torch.manual_seed(11)
    layer(x).square().sum().backward()
    plain = (x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    x.grad = layer.lora_A.grad = layer.lora_B.grad = None
    torch.manual_seed(11)
    checkpoint(layer, x, use_reentrant=False).square().sum().backward()
    for got, want in zip((x.grad, layer.lora_A.grad, layer.lora_B.grad), plain):
        torch.testing.assert_close(got, want)

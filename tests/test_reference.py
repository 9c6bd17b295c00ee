"""fastlora.reference, the oracle: its explicit gradient formulas against autograd through its own forward, in
float64, with and without a mask; DoRA's output against the formula spelled out elementwise."""

import pytest
import torch

from fastlora import reference
from tests.tolerances import assert_close


def _operands(M=7, K=6, N=5, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((M, K), (N, K), (N,), (r, K), (N, r))]


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_lora_grads_are_the_gradients_of_lora(p):
    x, W, b, A, B = _operands()
    keep = (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) >= p) if p else None
    dy = torch.randn(7, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    y, S = reference.lora(leaves[0], W, b, leaves[1], leaves[2], 1.5, keep, p)
    assert y.dtype == S.dtype == torch.float64
    want = torch.autograd.grad(y, leaves, dy)
    got = reference.lora_grads(dy, x, W, A, B, 1.5, keep, p)
    for name, g, w in zip(("dx", "dA", "dB"), got, want):
        assert_close(g, w, kind="same_math", msg=name)  # two float64 computations of the gradients
    if p:  # the mask is applied: dropped columns of x do not reach S
        y0, S0 = reference.lora(x * keep, W, b, A, B, 1.5, None, 0.0)
        torch.testing.assert_close(S, S0 / (1 - p))


def test_dora_is_the_elementwise_formula():
    x, W, b, A, B = _operands()
    m = torch.linspace(0.5, 2.0, 5, dtype=torch.float64)
    y = reference.dora(x, W, b, A, B, m, 0.5)
    for i in range(5):
        row = W[i] + 0.5 * (B[i] @ A)
        g = m[i] / row.norm()
        torch.testing.assert_close(y[:, i], g * (x @ row) + b[i])

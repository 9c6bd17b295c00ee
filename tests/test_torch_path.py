"""The torch path through the registered op: gradients, what it saves, mixed dtypes."""

import pytest
import torch

from fastlora.op_scalars import OpScalars
from fastlora import lora_linear, ops, torch_path
from tests.tolerances import assert_close

# torch.autograd.gradcheck's bound on the float64 Jacobians, not a tolerance of the table: central differences
# with step 1e-6 are good to about 1e-10 here (truncation ~eps², rounding ~1e-16/eps), so atol 1e-7 (gradcheck's
# default is 1e-5, with rtol 1e-3 kept) still catches a wrong gradient term.
GRADCHECK = {"eps": 1e-6, "atol": 1e-7}


def _inputs(M=6, K=5, N=4, r=3, dtype=torch.float64, bias=True, x_grad=True, batch=None):
    g = torch.Generator().manual_seed(0)
    shape = (batch, M, K) if batch else (M, K)
    x = torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(x_grad)
    W = torch.randn(N, K, generator=g, dtype=dtype)
    b = torch.randn(N, generator=g, dtype=dtype).requires_grad_() if bias else None
    A = torch.randn(r, K, generator=g, dtype=dtype).requires_grad_()
    B = torch.randn(N, r, generator=g, dtype=dtype).requires_grad_()
    return x, W, b, A, B


def _op(seed, p, scaling=0.7):
    def f(x, W, b, A, B):
        y, _ = ops.lora_linear_op(x.reshape(-1, x.shape[-1]), W, b, A, B, seed, scaling, p, "torch")
        return y
    return f


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_grad", [True, False])
def test_gradcheck_op(p, bias, x_grad):
    x, W, b, A, B = _inputs(bias=bias, x_grad=x_grad)
    seed = torch.tensor([1234]) if p > 0 else None
    args = (x, W, b, A, B)
    assert torch.autograd.gradcheck(_op(seed, p), args, **GRADCHECK)


def test_gradcheck_unfrozen_base_weight_and_3d_input():
    x, W, b, A, B = _inputs(batch=2)
    W.requires_grad_()
    assert torch.autograd.gradcheck(_op(torch.tensor([7]), 0.25), (x, W, b, A, B), **GRADCHECK)


@pytest.mark.parametrize("p", [0.1, 0.4, 0.9])  # rare drops, per-element sampling, rare keeps
def test_gradcheck_functional_3d_with_dropout(p):
    x, W, b, A, B = _inputs(batch=2)

    def f(x, W, b, A, B):
        torch.manual_seed(3)  # the functional draws its seed from torch's RNG: same seed, same mask
        return lora_linear(x, W, b, A, B, 1.5, p, backend="torch")

    assert torch.autograd.gradcheck(f, (x, W, b, A, B), **GRADCHECK)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.4])
@pytest.mark.parametrize("x_grad", [True, False])
def test_eager_function_and_registered_op_agree(p, x_grad):
    """Eager calls skip the op dispatch (ops.lora_linear); compiled code runs the registered op: same
    numbers from the same seed, forward and backward."""
    x, W, b, A, B = _inputs(M=20, K=16, N=12, r=4, dtype=torch.float32, x_grad=x_grad)
    seed = torch.tensor([99]) if p else None
    wrt = (x, b, A, B) if x_grad else (b, A, B)
    results = []
    scalars = OpScalars.from_flat(0.7, p, "torch")
    for call in (lambda: ops.lora_linear(x, W, b, A, B, seed, scalars),
                 lambda: ops.lora_linear_op(x, W, b, A, B, seed, *scalars.flat())[0]):
        y = call()
        results.append((y, torch.autograd.grad(y.square().sum(), wrt)))
    (y_eager, g_eager), (y_op, g_op) = results
    assert torch.equal(y_eager, y_op)
    for a, c in zip(g_eager, g_op):
        assert torch.equal(a, c)


def test_matches_plain_autograd_without_dropout():
    x, W, b, A, B = _inputs(M=9, K=7, N=5, r=2)
    y = lora_linear(x, W, b, A, B, 2.0, 0.0)
    expected = x @ W.t() + b + 2.0 * (x @ A.t()) @ B.t()
    torch.testing.assert_close(y, expected)
    grads = torch.autograd.grad(y.square().sum(), (x, b, A, B))
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, b, A, B))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def _saved_bytes(fn):
    """Bytes of the non-parameter tensors autograd keeps, by unique storage."""
    storages = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter) and t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    params = set()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(params)
    return sum(storages.values()), out


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saves_only_x_S_and_seed(p):
    layer_args = dict(r=4, lora_alpha=8, lora_dropout=p)
    from fastlora import LoRALinear

    layer = LoRALinear(64, 48, **layer_args)
    x = torch.randn(32, 64, requires_grad=True)

    def run(params):
        params.update(q.untyped_storage().data_ptr() for q in layer.parameters())
        return layer(x)

    nbytes, y = _saved_bytes(run)
    S_bytes = 32 * 4 * 4
    seed_bytes = 8 if p > 0 else 0
    assert nbytes == x.nbytes + S_bytes + seed_bytes
    y.sum().backward()
    assert x.grad is not None and layer.lora_A.grad is not None and layer.weight.grad is None


@pytest.mark.parametrize("base", [torch.float16, torch.bfloat16])
def test_fp32_adapters_beside_half_base(base):
    x, W, b, A, B = _inputs(M=8, K=16, N=12, r=4, dtype=torch.float32)
    xh, Wh, bh = x.detach().to(base).requires_grad_(), W.to(base), b.detach().to(base).requires_grad_()
    y = lora_linear(xh, Wh, bh, A, B, 0.5, 0.0)
    assert y.dtype == base
    expected = (xh.double() @ Wh.double().t() + bh.double()) + 0.5 * (xh.double() @ A.double().t()) @ B.double().t()
    assert_close(y, expected, kind="reference")
    y.float().sum().backward()
    assert A.grad.dtype == torch.float32 and xh.grad.dtype == base


@pytest.mark.parametrize("stack", [(), (3,)], ids=["mm", "bmm"])
@pytest.mark.parametrize("r", [1, 8, 9, 16])
def test_rank_column_products_equal_plain_matmul(r, stack):
    g = torch.Generator().manual_seed(r)
    a = torch.randn(*stack, 33, 50, generator=g, dtype=torch.float64)
    b = torch.randn(*stack, 50, r, generator=g, dtype=torch.float64)
    got = torch_path.mm_rank_columns(a, b)
    assert got.shape == (*stack, 33, r)
    torch.testing.assert_close(got, a @ b)


@pytest.mark.parametrize("p", [0.1, 0.4, 0.9])
def test_transposed_input_trains_with_dropout(p):
    """x may be any view (a transposed input at batch size 1 stays a view through reshape)."""
    from fastlora import LoRALinear

    layer = LoRALinear(64, 32, r=4, lora_alpha=8, lora_dropout=p).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    base = torch.randn(1, 64, 10)
    x_view = base.transpose(1, 2).requires_grad_()
    x_copy = x_view.detach().contiguous().requires_grad_()
    outs = []
    for x in (x_view, x_copy):
        torch.manual_seed(4)
        y = layer(x)
        y.square().sum().backward()
        outs.append((y.detach(), x.grad, layer.lora_A.grad.clone()))
        layer.lora_A.grad = layer.lora_B.grad = None
    for a, b in zip(*outs):  # the same math; BLAS may order the view's sums differently, and they cancel
        assert_close(a, b, kind="same_math_cancelling")

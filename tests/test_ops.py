"""The registered ops: torch.library.opcheck, and torch.compile(fullgraph=True) with no graph break.

Compile cannot trace a triton_op while TRITON_INTERPRET=1 is set (which this test session sets for the
interpreter kernel tests), so the compile checks run in a fresh interpreter without the variable.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastlora import ops
from tests.tolerances import tolerance


def _f32_tol(kind: str) -> dict:
    """The table's float32 tolerance of ``kind`` as keyword arguments of torch.testing.assert_close, for the scripts
    below (a fresh interpreter, which may run outside the repository and so without the tests package)."""
    atol, rtol = tolerance(torch.float32, kind=kind)
    return {"atol": atol, "rtol": rtol}


def _args(M=7, K=10, N=6, r=3, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g, dtype=dtype, requires_grad=True)
    W = torch.randn(N, K, generator=g, dtype=dtype)
    b = torch.randn(N, generator=g, dtype=dtype) if bias else None
    A = torch.randn(r, K, generator=g, dtype=dtype, requires_grad=True)
    B = torch.randn(N, r, generator=g, dtype=dtype, requires_grad=True)
    return x, W, b, A, B


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_forward(p, bias):
    x, W, b, A, B = _args(bias=bias)
    seed = torch.tensor([42]) if p else None
    torch.library.opcheck(ops.lora_linear_op, (x, W, b, A, B, seed, 0.5, p, "torch"))


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck_backward(p):
    x, W, b, A, B = _args()
    seed = torch.tensor([42]) if p else None
    S = torch.randn(x.shape[0], A.shape[0])
    dy = torch.randn(x.shape[0], W.shape[0])
    torch.library.opcheck(ops.lora_linear_backward_op, (dy, x.detach(), W, A.detach(), B.detach(), S, seed,
                                                        0.5, p, "torch", True, True, True))
    for p in (0.1, 0.3):
        torch.library.opcheck(ops.cpu_zero_dropped_, (torch.randn(5, 4), torch.tensor([3]), p))


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import torch, torch._dynamo
    from fastlora import LoRALinear
    torch._dynamo.config.error_on_recompile = False
    layer = LoRALinear(32, 24, r=4, lora_alpha=8, lora_dropout={p})
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 32, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    torch.manual_seed(0); eager = layer(x); eager.square().sum().backward()
    eager_grads = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)]
    for t in (x, layer.lora_A, layer.lora_B): t.grad = None
    torch.manual_seed(0); out = compiled(x); out.square().sum().backward()
    if {p} == 0.0:  # with dropout, compiled and eager draw their seeds differently: check shapes and finiteness
        torch.testing.assert_close(out, eager)
        for t, g in zip((x, layer.lora_A, layer.lora_B), eager_grads):
            torch.testing.assert_close(t.grad, g, **{grad_tol})  # gradients of out.square().sum()
    else:
        assert out.shape == eager.shape and torch.isfinite(out).all() and torch.isfinite(x.grad).all()
        torch.manual_seed(1); a = compiled(x); torch.manual_seed(1); b = compiled(x)
        torch.testing.assert_close(a, b)  # the seed comes from torch's RNG, also when compiled
    print("COMPILED_OK")
    """
)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_compile_fullgraph_no_graph_break(p):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT.format(p=p, grad_tol=_f32_tol("same_math_cancelling"))], env=env,
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0 and "COMPILED_OK" in result.stdout, result.stderr[-4000:]


_COMPILE_MASK_SCRIPT = textwrap.dedent(
    """
    import torch
    from fastlora import ops
    from fastlora.op_scalars import OpScalars
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 40, generator=g, requires_grad=True)
    W = torch.randn(16, 40, generator=g)
    A = torch.randn(4, 40, generator=g, requires_grad=True)
    B = torch.randn(16, 4, generator=g, requires_grad=True)
    seed = torch.tensor([1234])
    for p in (0.1, 0.4, 0.9):  # rare drops, per-element sampling, rare keeps
        def f(x, A, B):
            return ops.lora_linear(x, W, None, A, B, seed, OpScalars.from_flat(0.7, p, "torch"))
        results = []
        for fn in (f, torch.compile(f, fullgraph=True)):
            y = fn(x, A, B)
            results.append([y.detach()] + list(torch.autograd.grad(y.square().sum(), (x, A, B))))
        for eager, compiled in zip(*results):
            torch.testing.assert_close(compiled, eager, **{tol})
    print("MASKS_OK")
    """
)


def test_compiled_op_regenerates_the_eager_mask():
    """With one seed, the compiled op (forward and backward) and the eager path apply the same masks."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_MASK_SCRIPT.format(tol=_f32_tol("same_math"))], env=env, capture_output=True,
        text=True, timeout=600,
    )
    assert result.returncode == 0 and "MASKS_OK" in result.stdout, result.stderr[-4000:]


_COMPILE_SEVERAL_DROPOUTS_SCRIPT = textwrap.dedent(
    """
    import torch
    from fastlora import LoRALinear
    # A float that changes between compiles becomes a symbolic input of the next graph: the layer's argument
    # checks must trace it (math.isfinite on it is a graph break, so fullgraph=True failed on the second p).
    for use_dora in (False, True):
        for p in (0.0, 0.1, 0.2):
            layer = LoRALinear(16, 12, r=4, lora_dropout=p, use_dora=use_dora)
            torch.compile(layer, fullgraph=True)(torch.randn(3, 16, requires_grad=True)).sum().backward()
    print("SEVERAL_OK")
    """
)


def test_compile_layers_with_different_dropout_in_one_process():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_SEVERAL_DROPOUTS_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and "SEVERAL_OK" in result.stdout, result.stderr[-4000:]

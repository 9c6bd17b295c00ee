"""lora_linear's argument checks and backend choice: every bad input gets a clear error."""

import pytest
import torch

from fastlora import lora_linear


def _args(K=6, N=4, r=2):
    return torch.randn(3, K), torch.randn(N, K), torch.randn(N), torch.randn(r, K), torch.randn(N, r)


def test_wrong_last_dimension():
    x, W, b, A, B = _args()
    with pytest.raises(ValueError, match=r"last dimension must be in_features=6.*\(3, 5\)"):
        lora_linear(torch.randn(3, 5), W, b, A, B, 1.0)


def test_mismatched_adapter_shapes_and_bias():
    x, W, b, A, B = _args()
    with pytest.raises(ValueError, match="lora_A must be"):
        lora_linear(x, W, b, torch.randn(2, 5), B, 1.0)
    with pytest.raises(ValueError, match="lora_A must be"):
        lora_linear(x, W, b, A, torch.randn(4, 3), 1.0)
    with pytest.raises(ValueError, match="bias must have shape"):
        lora_linear(x, W, torch.randn(5), A, B, 1.0)


def test_mismatched_dtypes():
    x, W, b, A, B = _args()
    with pytest.raises(TypeError, match="share one dtype"):
        lora_linear(x.double(), W, b, A, B, 1.0)
    with pytest.raises(TypeError, match="lora_A and lora_B"):
        lora_linear(x, W, b, A.double(), B, 1.0)
    with pytest.raises(TypeError, match="floating-point"):
        lora_linear(x.long(), W.long(), None, A, B, 1.0)


def test_mismatched_devices():
    x, W, b, A, B = _args()
    with pytest.raises(ValueError, match="one device"):
        lora_linear(x.to("meta"), W, b, A, B, 1.0)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_out_of_range(p):
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        lora_linear(*_args(), 1.0, p)


def test_backend_choice(monkeypatch):
    args = _args()
    with pytest.raises(ValueError, match="backend must be one of"):
        lora_linear(*args, 1.0, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        lora_linear(*args, 1.0, backend="triton")
    # auto on CPU is the torch path, whatever the interpreter setting
    torch.testing.assert_close(lora_linear(*args, 1.0, backend="auto"), lora_linear(*args, 1.0, backend="torch"))


def test_zero_and_one_token_inputs():
    x, W, b, A, B = _args()
    assert lora_linear(torch.randn(0, 6), W, b, A, B, 1.0, 0.2).shape == (0, 4)
    assert lora_linear(torch.randn(2, 0, 6), W, b, A, B, 1.0).shape == (2, 0, 4)
    assert lora_linear(torch.randn(6), W, b, A, B, 1.0).shape == (4,)


def test_autocast_runs_in_the_autocast_dtype():
    x, W, b, A, B = _args()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, W, b, A, B, 1.0)
    assert y.dtype == torch.bfloat16


def test_a_triton_that_fails_to_import_keeps_cuda_calls_on_the_torch_path(tmp_path):
    """A triton installed but broken (its import raises) counts as no triton: "auto" resolves to the torch path
    for a CUDA tensor, and that path keeps the CPU generator's masks rather than launch the kernels' mask."""
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text("raise ImportError('a broken triton install')\n")
    script = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
        "from types import SimpleNamespace\n"
        "from fastlora import ops, schedules\n"
        "on_cuda = SimpleNamespace(is_cuda=True)\n"
        "assert schedules.resolve('auto', on_cuda) is schedules.TORCH\n"
        "assert not ops.kernel_masks_on(on_cuda)\n"
        "print('BROKEN_TRITON_OK')\n"
    )
    _run_in_a_fresh_interpreter(script, "BROKEN_TRITON_OK")


def test_cpu_path_works_without_triton():
    script = (
        "import sys; sys.modules['triton'] = None\n"  # import triton now fails, as where it is not installed
        "import torch, fastlora\n"
        "layer = fastlora.LoRALinear(8, 4, r=2, lora_dropout=0.1)\n"
        "x = torch.randn(3, 8, requires_grad=True)\n"
        "layer(x).sum().backward()\n"
        "assert x.grad.shape == (3, 8) and layer.lora_A.grad is not None\n"
        "print('NO_TRITON_OK')\n"
    )
    _run_in_a_fresh_interpreter(script, "NO_TRITON_OK")


def _run_in_a_fresh_interpreter(script: str, done: str) -> None:
    """Run ``script`` in a new Python (triton unimported, TRITON_INTERPRET unset) and check it printed ``done``."""
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize("training", [False, True])
def test_a_layer_without_input_features_gives_its_bias_as_torch_does(training):
    """nn.Linear(0, n) gives the bias for every row; so does the op, with zero gradients for the factors."""
    x, W, b = torch.randn(3, 0, requires_grad=True), torch.randn(4, 0), torch.randn(4)
    A, B = torch.randn(2, 0, requires_grad=True), torch.randn(4, 2, requires_grad=True)
    y = lora_linear(x, W, b, A, B, 1.0, 0.5, training=training)
    assert torch.equal(y, torch.nn.functional.linear(x, W, b))
    y.sum().backward()
    assert A.grad.shape == (2, 0) and torch.equal(B.grad, torch.zeros_like(B))


def test_the_kernels_say_which_dtypes_they_take():
    from fastlora.kernels.common import check_dtypes

    f32, f64 = torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="take x and weight in fp32, fp16 or bf16, got torch.float64"):
        check_dtypes(f64, f64, f32, f32)
    with pytest.raises(TypeError, match="lora_A and lora_B must share a dtype, got torch.float32 and torch.float16"):
        check_dtypes(f32, f32, f32, f32.half())
    check_dtypes(f32, f32, f32.half(), f32.half())

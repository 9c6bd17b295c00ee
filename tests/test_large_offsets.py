"""Operands whose furthest element lies past 2^31 elements, on both paths, without allocating 4 GiB of real
memory: x is a 3-row view with a row stride of 2^30 + 16 into an untouched fp16 storage of 2^31 + 64
elements (the pages that are never written are never backed by memory).  A kernel computing offsets in
32 bits would read the third row at a wrapped address."""

import pytest
import torch

from fastlora import lora_linear
from fastlora.functional import triton_interpreter_on
from tests.tolerances import assert_close

K, N, R = 16, 8, 4
STRIDE = 2**30 + 16


def _far_x():
    storage = torch.empty(2**31 + 64, dtype=torch.float16)  # 4 GiB of address space, 3 rows of it written
    x = storage.as_strided((3, K), (STRIDE, 1))
    x.copy_(torch.randn(3, K, generator=torch.Generator().manual_seed(0)).to(torch.float16))
    assert (x.shape[0] - 1) * x.stride(0) + x.shape[1] > 2**31
    return x


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_operands_past_2_31_elements(path):
    if path == "triton" and not (triton_interpreter_on() or torch.cuda.is_available()):
        pytest.skip("needs Triton (interpreter or CUDA)")
    x = _far_x()
    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(N, K, generator=g) / 4).to(torch.float16)
    A = (torch.randn(R, K, generator=g) / 4).requires_grad_()
    B = (torch.randn(N, R, generator=g) / 2).requires_grad_()
    y = lora_linear(x, weight, None, A, B, 2.0, 0.0, backend=path)
    y.float().sum().backward()
    x64, w64, A64, B64 = (t.detach().double() for t in (x, weight, A, B))
    A64.requires_grad_(), B64.requires_grad_()
    y64 = x64 @ w64.T + 2.0 * (x64 @ A64.T) @ B64.T
    y64.sum().backward()
    assert_close(y, y64, kind="reference", msg="y")  # fp16
    assert_close(A.grad, A64.grad, kind="reference", msg="dA")  # fp32
    assert_close(B.grad, B64.grad, kind="reference", msg="dB")

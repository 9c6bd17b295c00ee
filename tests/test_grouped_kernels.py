"""The grouped low-rank kernels (kernels/grouped.py, through fastlora.grouped_experts) under the interpreter: one
launch for every expert's rows, equal to the per-expert torch products, forward and every gradient — uneven and
empty segments, tails in every dimension, 16-bit rows beside fp32 adapters — and, in a tiny Mixtral whose experts
are adapted (target_parameters), equal to PEFT."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from fastlora.grouped_experts import grouped_low_rank  # noqa: E402
from fastlora.kernels.configs import INTERPRET  # noqa: E402
from fastlora.parameter_lora import LoRAParameter  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

pytestmark = pytest.mark.skipif(not INTERPRET, reason="interpreter tests (TRITON_INTERPRET=1)")


def _operands(counts, in_features, out_features, r, rows_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    E = len(counts)
    rows = torch.randn(sum(counts), in_features, generator=g).to(rows_dtype).requires_grad_(True)
    A = torch.randn(E * r, in_features, generator=g).requires_grad_(True)      # PEFT's layout: expert-major rows
    B = torch.randn(out_features, r * E, generator=g).requires_grad_(True)     # rank-major columns
    return rows, A, B


def _run(counts, rows, A, B, r, kernels):
    E = len(counts)
    stacks = A.reshape(E, r, -1), B.reshape(B.shape[0], r, E).permute(2, 0, 1)
    update = grouped_low_rank(rows, counts, *stacks, 1.5, kernels)
    weights = torch.linspace(-1, 1, update.numel()).reshape(update.shape)
    grads = torch.autograd.grad((update * weights).sum(), (rows, A, B))
    return update, *grads


@pytest.mark.parametrize("counts", [[5, 0, 17, 3, 0, 40], [1], [0, 0, 9], [33, 34]], ids=str)
@pytest.mark.parametrize("rows_dtype", [torch.float32, torch.bfloat16], ids=["fp32 rows", "bf16 rows"])
def test_one_launch_equals_the_per_expert_products(counts, rows_dtype):
    r = 3
    rows, A, B = _operands(counts, 40, 24, r, rows_dtype)
    got = _run(counts, rows, A, B, r, kernels=True)
    expected = _run(counts, rows, A, B, r, kernels=False)
    for name, g, e in zip(("update", "d_rows", "dA", "dB"), got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape, name
        assert_close(g, e, kind="same_math_cancelling" if g.dtype == torch.float32 else "same_math", msg=name)


def test_a_planted_segment_shift_is_caught():
    """An expert reading its neighbour's factors gives another result: the comparison above would see it."""
    counts, r = [4, 6], 2
    rows, A, B = _operands(counts, 16, 8, r, torch.float32)
    swapped = torch.cat([A[r:], A[:r]]).detach().requires_grad_(True)
    assert not torch.allclose(_run(counts, rows, swapped, B, r, kernels=True)[0],
                              _run(counts, rows, A, B, r, kernels=False)[0])


def test_mixtral_experts_on_the_grouped_kernels_agree_with_peft():
    from tests.test_target_parameters import _inputs, _pair, _peft_grads, _grads

    _, theirs, ours = _pair("mixtral")
    for module in ours.modules():
        if isinstance(module, LoRAParameter):
            module.backend = "triton"
    inputs = _inputs("mixtral")
    loss_theirs, loss_ours = theirs(**inputs).loss, ours(**inputs).loss
    assert_close(loss_ours, loss_theirs, kind="same_math")
    loss_theirs.backward()
    loss_ours.backward()
    theirs_grads = _peft_grads(theirs)
    for name, grad in _grads(ours).items():
        assert_close(grad, theirs_grads[name], kind="same_math_cancelling", msg=name)

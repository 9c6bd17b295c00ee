"""Property tests (hypothesis): lora_linear on random shapes, dtypes, layouts, dropout and requires_grad
subsets, on the torch path and the kernel path (Triton's interpreter on CPU), against a float64
computation of the same math with the same dropout mask, forward and every gradient, each output within
the tolerance of its own dtype (tests/tolerances.py, relative to the output's largest magnitude).

DoRA's op too, on both paths, against PEFT's formula in float64 (the torch path's sparse route for rare
drops included).  Also: NaN and Inf propagate as in the float64 computation; the same seed gives bit-identical outputs and
gradients; different seeds give different masks; the kept fraction matches 1-p.

Example budget: the ``ci`` profile (the default: fixed examples, seconds); ``FASTLORA_HYPOTHESIS_PROFILE=long``
runs many random examples on demand.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastlora import cpu_masks, lora_linear, reference
from fastlora.functional import SEED_HIGH, triton_interpreter_on
from fastlora.op_scalars import OpScalars
from fastlora.schedules import kernel_schedule
from tests import philox
from tests.tolerances import assert_close

settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("FASTLORA_HYPOTHESIS_PROFILE", "ci")
# The interpreter runs kernels as numpy, one program after another: a third of the torch path's budget.
KERNEL_EXAMPLES = settings.get_profile(PROFILE).max_examples // 3

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
NAMES = ("x", "weight", "bias", "lora_A", "lora_B")


@st.composite
def cases(draw):
    shape = {
        "M": draw(st.sampled_from([0, 1]) | st.integers(2, 40)),
        "K": draw(st.integers(1, 48)),
        "N": draw(st.integers(1, 48)),
        "r": draw(st.integers(1, 16)),
    }
    dtype = draw(st.sampled_from([f32, f16, bf16]))
    return {
        **shape,
        "bias": draw(st.booleans()),
        "batch": draw(st.sampled_from([None, 2, 3])),  # 3-D x: (batch, M, K)
        "layout": draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"])),
        "dtype": dtype,
        # fp32 adapters beside any base (PEFT's default for 16-bit bases), or the base's own dtype, or 16-bit
        # adapters beside an fp32 base (the LoRA branch then runs in 16 bits)
        "adapter_dtype": draw(st.sampled_from([dtype, f32] + ([f16, bf16] if dtype == f32 else []))),
        "p": draw(st.sampled_from([0.0]) | st.floats(0.0, 0.9)),
        "training": draw(st.booleans()),
        "grads": draw(st.fixed_dictionaries({n: st.booleans() for n in NAMES})),
        "scaling": draw(st.sampled_from([0.5, 2.0, 4.0])),
        "seed": draw(st.integers(0, 2**31 - 2)),
    }


def _leaves(c, generator):
    """The tensors handed to lora_linear (x possibly a view of a leaf) and the leaves gradients land on."""
    M, K, N, r, dtype = c["M"], c["K"], c["N"], c["r"], c["dtype"]
    batch = () if c["batch"] is None else (c["batch"],)

    def rand(*size, dtype=dtype, scale=1.0):
        return (torch.randn(*size, generator=generator) * scale).to(dtype)

    if c["layout"] == "transposed":
        leaf_x = rand(*batch, K, M)
        view = lambda t: t.transpose(-1, -2)  # noqa: E731
    elif c["layout"] == "sliced":
        leaf_x = rand(*batch, M, K + 3)
        view = lambda t: t[..., 1 : K + 1]  # noqa: E731
    elif c["layout"] == "expanded":
        leaf_x = rand(*batch, 1, K)
        view = lambda t: t.expand(*batch, M, K)  # noqa: E731
    else:
        leaf_x = rand(*batch, M, K)
        view = lambda t: t  # noqa: E731
    leaves = {
        "x": leaf_x, "weight": rand(N, K, scale=K**-0.5), "bias": rand(N) if c["bias"] else None,
        "lora_A": rand(r, K, dtype=c["adapter_dtype"], scale=K**-0.5),
        "lora_B": rand(N, r, dtype=c["adapter_dtype"], scale=r**-0.5),
    }
    for name, t in leaves.items():
        if t is not None:
            t.requires_grad_(c["grads"][name])
    return leaves, view


def _schedule(path: str) -> str:
    return kernel_schedule().key if path == "triton" else "torch"


def _mask(path, seed, rows, cols, p):
    if path == "torch":
        return cpu_masks.cpu_keep_mask(seed, (rows, cols), p)
    return philox.keep_mask(seed, rows, cols, p)


def _run(path, c, leaves, view, dy_seed=7):
    """lora_linear on the path: (y, {leaf: grad}); the dropout seed it drew is recovered from torch's RNG."""
    torch.manual_seed(c["seed"])
    y = lora_linear(view(leaves["x"]), leaves["weight"], leaves["bias"], leaves["lora_A"], leaves["lora_B"],
                    c["scaling"], c["p"], training=c["training"], backend=path)
    grads = {}
    if y.requires_grad:
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed)).to(y.dtype)
        wanted = [t for t in leaves.values() if t is not None and t.requires_grad]
        grads = dict(zip([n for n, t in leaves.items() if t is not None and t.requires_grad],
                         torch.autograd.grad(y, wanted, dy, allow_unused=True)))
    return y, grads


def _float64(path, c, leaves, view, dy_seed=7):
    """The same math in float64 with the path's dropout mask, applied as x ⊙ m."""
    torch.manual_seed(c["seed"])
    seed = int(torch.randint(0, SEED_HIGH, (1,)))
    ref = {n: (t.detach().double().requires_grad_(t.requires_grad) if t is not None else None) for n, t in leaves.items()}
    x = view(ref["x"])
    rows = x.reshape(-1, c["K"])
    keep = _mask(path, seed, rows.shape[0], c["K"], c["p"]) if c["training"] and c["p"] > 0 else None
    y, _ = reference.lora(rows, ref["weight"], ref["bias"], ref["lora_A"], ref["lora_B"], c["scaling"], keep, c["p"])
    y = y.reshape(*x.shape[:-1], c["N"])
    grads = {}
    if y.requires_grad:
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed)).to(c["dtype"]).double()
        wanted = [t for t in ref.values() if t is not None and t.requires_grad]
        grads = dict(zip([n for n, t in ref.items() if t is not None and t.requires_grad],
                         torch.autograd.grad(y, wanted, dy, allow_unused=True)))
    return y, grads


def _close(got, want, what, branch_dtype=None):
    """``got`` within its dtype's tolerance of ``want`` relative to the largest magnitude; for y and dx, which
    add the low-rank term computed in the adapters' dtype (``branch_dtype``), the coarser of the two."""
    assert_close(got, want, kind="reference_max_random", branch_dtype=branch_dtype, msg=what)


def _check_against_float64(path, c):
    leaves, view = _leaves(c, torch.Generator().manual_seed(c["seed"] % 1000))
    y, grads = _run(path, c, leaves, view)
    y64, grads64 = _float64(path, c, leaves, view)
    assert y.dtype == c["dtype"]
    _close(y, y64, "y", c["adapter_dtype"])
    assert grads.keys() == grads64.keys()
    for name, g in grads.items():
        leaf = leaves[name]
        assert g is not None and g.dtype == leaf.dtype, name  # each gradient in its own tensor's dtype
        _close(g, grads64[name], f"d{name}", c["adapter_dtype"] if name == "x" else None)


@settings(settings.get_profile(PROFILE))
@given(cases())
def test_torch_path_matches_float64(c):
    _check_against_float64("torch", c)


@pytest.mark.skipif(not triton_interpreter_on() and not torch.cuda.is_available(), reason="needs Triton (interpreter or CUDA)")
@settings(settings.get_profile(PROFILE), max_examples=max(KERNEL_EXAMPLES, 1))
@given(cases())
def test_kernel_path_matches_float64(c):
    _check_against_float64("triton", c)


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("where", ["x", "lora_A"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_and_inf_propagate_as_in_float64(path, where, bad):
    c = {"M": 6, "K": 8, "N": 5, "r": 2, "bias": True, "batch": None, "layout": "contiguous", "dtype": f32,
         "adapter_dtype": f32, "p": 0.0, "training": True, "grads": dict.fromkeys(NAMES, True), "scaling": 2.0,
         "seed": 3}
    leaves, view = _leaves(c, torch.Generator().manual_seed(0))
    with torch.no_grad():
        leaves[where][1, 2] = bad
    y, grads = _run(path, c, leaves, view)
    y64, grads64 = _float64(path, c, leaves, view)
    for name, got, want in [("y", y, y64), *((f"d{n}", grads[n], grads64[n]) for n in grads)]:
        assert torch.equal(torch.isnan(got), torch.isnan(want)), name
        assert torch.equal(torch.isinf(got), torch.isinf(want)), name
        finite = torch.isfinite(want)
        assert_close(got[finite], want[finite], kind="reference", msg=name)
    assert torch.isnan(y).any() or torch.isinf(y).any()


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_same_seed_is_bit_identical_and_other_seeds_differ(path):
    c = {"M": 33, "K": 40, "N": 24, "r": 4, "bias": True, "batch": None, "layout": "contiguous", "dtype": f32,
         "adapter_dtype": f32, "p": 0.3, "training": True, "grads": dict.fromkeys(NAMES, True), "scaling": 2.0,
         "seed": 11}
    leaves, view = _leaves(c, torch.Generator().manual_seed(0))
    first, again = _run(path, c, leaves, view), _run(path, c, leaves, view)
    assert torch.equal(first[0], again[0])
    assert all(torch.equal(first[1][n], again[1][n]) for n in first[1])
    other = _run(path, {**c, "seed": 12}, leaves, view)
    assert not torch.equal(first[0], other[0])
    masks = [_mask(path, s, 33, 40, 0.3) for s in (1, 2)]
    assert not torch.equal(*masks)


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_kept_fraction_is_one_minus_p(path, p):
    """Over 200,000 elements the kept fraction is within 6 standard deviations of 1 - p (a false alarm about
    once in 10^9 runs); the mask is also what lora_linear applies (recovered through an identity case)."""
    rows, cols = 400, 500
    kept = _mask(path, 1234, rows, cols, p).float().mean().item()
    sigma = math.sqrt(p * (1 - p) / (rows * cols))
    assert abs(kept - (1 - p)) <= 6 * sigma + 2**-16  # the kernels round p to a multiple of 2^-16
    x = torch.ones(rows, cols)
    eye_A = torch.eye(cols)[:8]
    torch.manual_seed(5)
    seed = int(torch.randint(0, SEED_HIGH, (1,)))
    torch.manual_seed(5)
    y = lora_linear(x, torch.zeros(8, cols), None, eye_A, torch.eye(8), 1.0, p, backend=path)
    expected = _mask(path, seed, rows, cols, p)[:, :8].float() / (1 - p)
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])  # the CPU path's three samplers: rare drops, per element, rare keeps
def test_nan_propagates_through_dropout_as_x_times_mask(path, p):
    """Dropout multiplies by the 0/1 mask (as PEFT's nn.Dropout and the float64 reference do): a NaN at a
    dropped position stays NaN in S = dropout(x) Aᵀ and in dA, as one at a kept position does."""
    from fastlora import ops

    M, K = 4, 64
    torch.manual_seed(9)
    seed = torch.randint(0, SEED_HIGH, (1,))
    keep = _mask(path, int(seed), M, K, p)
    dropped, kept = int((~keep[0]).nonzero()[0]), int(keep[1].nonzero()[0])
    x = torch.ones(M, K)
    x[0, dropped] = math.nan
    x[1, kept] = math.nan
    eye = torch.eye(K)
    _, S = ops.lora_linear_op(x, torch.zeros(K, K), None, eye, eye, seed, 1.0, p, _schedule(path))
    S_ref = (x.double() * keep / (1 - p)) @ eye.double()  # a NaN anywhere in a row spreads over it (NaN · 0)
    assert torch.isnan(S[0, dropped]) and torch.isnan(S[1, kept])
    assert torch.equal(torch.isnan(S), torch.isnan(S_ref))
    torch.testing.assert_close(S[2:], S_ref[2:].float())
    A = eye.clone().requires_grad_()
    torch.manual_seed(9)
    lora_linear(x, torch.zeros(K, K), None, A, eye, 1.0, p, backend=path).backward(torch.ones(M, K))
    assert torch.isnan(A.grad[:, dropped]).all() and torch.isnan(A.grad[:, kept]).all()


# ---- DoRA ----------------------------------------------------------------------------------------------


@st.composite
def dora_cases(draw):
    dtype = draw(st.sampled_from([f32, f32, bf16]))  # fp32 twice: on the torch path it takes the sparse route
    return {
        "M": draw(st.sampled_from([0, 1]) | st.integers(2, 40)),
        "K": draw(st.integers(1, 48)),
        "N": draw(st.integers(1, 48)),
        "r": draw(st.integers(1, 16)),
        "dtype": dtype,
        "adapter_dtype": draw(st.sampled_from([f32, dtype])),
        "bias": draw(st.booleans()),
        "transposed": draw(st.booleans()),
        # no dropout; rare drops (the CPU mask's sparse route); any other p
        "p": draw(st.sampled_from([0.0]) | st.floats(0.01, 0.15) | st.floats(0.15, 0.9)),
        "seed": draw(st.integers(0, 2**31 - 2)),
    }


def _check_dora_against_float64(path: str, c: dict) -> None:
    """DoRA's op against PEFT's formula in float64 with the same mask: y and dx to the base dtype's tolerance
    (or the adapters' where coarser), dA and dB to the adapters', dm to the base dtype's."""
    from fastlora import dora_ops
    from tests import kernel_checks as kc

    M, K, N, r, dtype, adapter_dtype, p = (c[k] for k in ("M", "K", "N", "r", "dtype", "adapter_dtype", "p"))
    x, W, b, A, B, m = kc.dora_operands(dtype, adapter_dtype, c["bias"], M, K, N, r, seed=c["seed"])
    if c["transposed"]:
        x = x.t().contiguous().t()
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(c["seed"] + 1)).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, A, B, m)]
    seed = torch.tensor([c["seed"]]) if p else None
    y = dora_ops.dora_linear(leaves[0], W, b, *leaves[1:], seed, OpScalars.from_flat(0.5, p, _schedule(path)))
    grads = torch.autograd.grad(y, leaves, dy)
    keep = None
    if p:
        keep = (philox.keep_mask(c["seed"], M, K, p) if path == "triton" else
                cpu_masks.cpu_keep_mask(c["seed"], (M, K), p)).double()
    refs = [t.double().requires_grad_() for t in (x, A, B, m)]
    y64 = reference.dora(refs[0], W, b, *refs[1:], 0.5, keep, p)
    grads64 = torch.autograd.grad(y64, refs, dy.double())
    assert y.dtype == dtype
    assert_close(y, y64, kind="reference_max", branch_dtype=adapter_dtype, msg="y")
    # dm, in the adapters' dtype, sums dy ⊙ x Wᵀ, a product in the base dtype: the coarser of the two
    for name, got, want, out_dtype, branch_dtype in zip(
            ("dx", "dA", "dB", "dm"), grads, grads64, (dtype, adapter_dtype, adapter_dtype, adapter_dtype),
            (adapter_dtype, None, None, dtype)):
        assert got.dtype == out_dtype, name
        assert_close(got, want, kind="reference_max", branch_dtype=branch_dtype, msg=name)


@settings(settings.get_profile(PROFILE))
@given(dora_cases())
def test_dora_torch_path_matches_float64(c):
    _check_dora_against_float64("torch", c)


@pytest.mark.skipif(not triton_interpreter_on(), reason="CPU tensors on the kernel path need Triton's interpreter")
@settings(settings.get_profile(PROFILE), max_examples=max(KERNEL_EXAMPLES, 1))
@given(dora_cases())
def test_dora_kernel_path_matches_float64(c):
    _check_dora_against_float64("triton", c)

"""The test suite's one table of tolerances, and the one comparison that reads it.

A tolerance is looked up by the kind of comparison and by the dtype of the value checked (``got.dtype``: an
fp32 gradient of a bf16 model is an fp32 value).  A value that sums, or is computed through, a term in another
dtype (y and dx of a 16-bit base with fp32 adapters, or of an fp32 base with 16-bit adapters) takes the coarser
of the two dtypes' tolerances: pass that dtype as ``branch_dtype``.

Literal tolerances stay in the tests only where the bound is not a dtype's: exact equality (``torch.equal``)
and statistical bounds (dropout rates), and the few each named and explained where they are used.
"""

from __future__ import annotations

import torch

f64, f32, f16, bf16 = torch.float64, torch.float32, torch.float16, torch.bfloat16

# kind -> dtype of the value checked -> (atol, rtol).  An element passes where
#     |got - ref| <= atol·scale + rtol·|ref|,
# scale = 1, or for the kinds in SCALED_BY_MAX the largest |ref| of the tensor (a bound relative to the output's
# magnitude, for sums whose terms cancel).  The kinds:
TOLERANCES = {
    # Against the same math in float64 (fastlora.reference, or the computation repeated in float64): the value's
    # own rounding and its accumulation over the small sizes the tests use.
    "reference": {f64: (1e-10, 1e-10), f32: (1e-4, 1e-4), f16: (2e-2, 2e-2), bf16: (6e-2, 6e-2)},
    # Against float64 relative to the reference's largest magnitude: the Triton kernels (tests/kernel_checks.py:
    # odd shapes, any mix of base and adapter dtypes, K up to a few thousand on the GPU) and DoRA's property tests.
    "reference_max": {f32: (2e-5, 2e-5), f16: (4e-3, 4e-3), bf16: (3e-2, 3e-2)},
    # The same for lora_linear's property tests (tests/test_properties.py): both paths over random shapes, layouts,
    # dtype mixes and dropout rates, hundreds of draws in the long profile, where the kernels' bound above leaves
    # too little room (a bf16 gradient reached 0.93 of it in a run of the long profile).
    "reference_max_random": {f32: (1e-4, 1e-4), f16: (2e-2, 2e-2), bf16: (6e-2, 6e-2)},
    # Two implementations of the same math in the same dtype, their sums free to run in another order: fastlora
    # and PEFT, a saved and a reloaded model, merged and unmerged weights, compiled and eager, a CUDA graph's
    # replay and the eager launch.
    "same_math": {f64: (1e-12, 1e-12), f32: (1e-5, 1e-5), f16: (2e-3, 2e-3), bf16: (1e-2, 1e-2)},
    # The same, where the sums cancel: gradients of y.square().sum() (magnitudes in the hundreds) through another
    # BLAS blocking, the kernels against the torch path, compiled against eager, fastlora's DoRA layer against
    # PEFT's: errors of the size of the larger terms.
    "same_math_cancelling": {f32: (1e-4, 1e-4)},
    # The same relative to the value's largest magnitude: every gradient of a whole model's step, compiled against
    # eager, where some tensors are of order 1e-5 (an absolute bound alone would pass any dropout mask there).
    "same_math_max": {f32: (1e-4, 1e-4), bf16: (1e-2, 1e-2)},
    # A value a few roundings from the other, without a model's depth of sums between them: a weight merged and
    # unmerged (or merged by PEFT), a model unloaded after a merge, a loss of equal logits, gradients with the
    # forward recomputed or from one layer of two implementations, a kernel's output asked for alone.
    "roundoff": {f32: (1e-6, 0.0)},
}
SCALED_BY_MAX = {"reference_max", "reference_max_random", "same_math_max"}
# The kinds that compare two values in one dtype (the others compare with float64).
SAME_DTYPE = {"same_math", "same_math_cancelling", "same_math_max", "roundoff"}


def tolerance(dtype: torch.dtype, branch_dtype: torch.dtype | None = None, *, kind: str) -> tuple[float, float]:
    """(atol, rtol) of ``kind`` for a value of ``dtype``; with ``branch_dtype``, the coarser of the two."""
    if kind not in TOLERANCES:
        raise KeyError(f"no tolerance kind {kind!r}; the kinds: {', '.join(TOLERANCES)}")
    table = TOLERANCES[kind]
    for d in (dtype, branch_dtype):
        if d is not None and d not in table:
            raise KeyError(f"no {kind!r} tolerance for {d} (the table has {', '.join(map(str, table))})")
    atol, rtol = table[dtype]
    if branch_dtype is not None:
        atol, rtol = max(atol, table[branch_dtype][0]), max(rtol, table[branch_dtype][1])
    return atol, rtol


def assert_close(got: torch.Tensor, ref: torch.Tensor, *, kind: str, dtype: torch.dtype | None = None,
                 branch_dtype: torch.dtype | None = None, msg: str | None = None) -> None:
    """``got`` within the ``kind`` tolerance of its dtype (``dtype`` where given, for a value already upcast) of
    ``ref``; shapes equal; no NaN (as torch.testing.assert_close), an infinity only where ``ref`` has the same.
    The comparison runs in float64; the message gives the worst element, its error and its bound, and how many
    elements are out."""
    got, ref = torch.as_tensor(got).detach(), torch.as_tensor(ref).detach()
    dtype = dtype or got.dtype
    atol, rtol = tolerance(dtype, branch_dtype, kind=kind)
    where = f"{msg}: " if msg else ""
    assert got.shape == ref.shape, f"{where}shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    if kind in SAME_DTYPE:
        assert got.dtype == ref.dtype, f"{where}{got.dtype} against {ref.dtype}; a {kind!r} comparison is in one dtype"
    else:
        assert ref.dtype == torch.float64, f"{where}the reference is {ref.dtype}; a {kind!r} comparison is with float64"
    if got.numel() == 0:
        return
    g, r = got.double(), ref.to(got.device).double()
    scale = 1.0
    if kind in SCALED_BY_MAX:
        finite = r[torch.isfinite(r)]
        scale = max(finite.abs().max().item() if finite.numel() else 0.0, 1e-30)
    err = (g - r).abs()
    bound = atol * scale + rtol * r.abs()
    bad = ~((g == r) | (err <= bound))  # equal infinities pass; a NaN error (a NaN, Inf against finite) does not
    if not bad.any():
        return
    excess = torch.where(bad, (err / bound).nan_to_num(nan=float("inf")), torch.zeros_like(err))
    i = int(excess.flatten().argmax())
    idx = tuple(int(k) for k in torch.unravel_index(torch.tensor(i), got.shape)) if got.dim() else ()
    scaled = f"·max|ref| {scale:.3g}" if kind in SCALED_BY_MAX else ""
    coarser = f" or {branch_dtype}, the coarser" if branch_dtype not in (None, dtype) else ""
    raise AssertionError(
        f"{where}{int(bad.sum())} of {got.numel()} elements out of the {kind!r} tolerance for {dtype}{coarser}: "
        f"atol {atol:g}{scaled} + rtol {rtol:g}·|ref|.  Max error {err.max().item():.3g}; worst element {idx}: "
        f"got {g.flatten()[i].item():.8g}, expected {r.flatten()[i].item():.8g}, error {err.flatten()[i].item():.3g} "
        f"> bound {bound.flatten()[i].item():.3g}")

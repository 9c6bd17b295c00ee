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


def _seeds(count, seed, device="cpu"):
    """The per-adapter seeds dropout_and_seed draws after torch.manual_seed(seed), in order."""
    from fastlora.functional import SEED_HIGH

    torch.manual_seed(seed)
    return [int(torch.randint(0, SEED_HIGH, (1,), device=device)) for _ in range(count)]


def _mixed_layer(dropouts=(0.0, 0.25, 0.1), ranks=(2, 4, 3)):
    from fastlora import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(40, 24, r=ranks[0], lora_alpha=3, lora_dropout=dropouts[0], init_lora_weights=False,
                       backend="triton", adapter_name="a")
    from fastlora.adapter_settings import AdapterSettings

    for name, r, p in zip("bc", ranks[1:], dropouts[1:]):
        layer.add_adapter(name, AdapterSettings(r, 2 * r + 1, p, False, False, False), init_lora_weights=False)
    return layer


def _reference_update(layer, x, held, seeds, segment_rows=False):
    """float64: each adapter's s · ((x ⊙ m) Aᵀ / (1-p)) Bᵀ on its rows, m the Philox mask of its seed over x's
    own (token, column), or with ``segment_rows`` over the (token, column) of the adapter's rows gathered."""
    from tests import philox

    flat = x.reshape(-1, x.shape[-1]).double().cpu()
    per_row = flat.shape[0] // x.shape[0]
    out = torch.zeros(flat.shape[0], layer.out_features, dtype=torch.float64)
    draws = iter(seeds)
    for name, rows in held.items():
        s = layer.adapter_settings[name]
        A, B = (t.double().cpu() for t in layer.lora_factors(name))
        tokens = (rows[:, None] * per_row + torch.arange(per_row)).reshape(-1)
        h = flat[tokens] if segment_rows else flat
        if s.lora_dropout > 0:
            h = h * philox.keep_mask(next(draws), h.shape[0], h.shape[1], s.lora_dropout) / (1 - s.lora_dropout)
        out = out.index_put((tokens,), ((h if segment_rows else h[tokens]) @ A.t()) @ B.t() * s.scaling)
    return out


def test_a_mixed_batch_on_the_torch_path_on_a_cuda_device_draws_the_kernels_masks(monkeypatch):
    """On a CUDA device the torch path's batched products of a mixed batch apply the kernels' Philox mask, each
    adapter's over its own rows gathered (as a call of that adapter alone on them draws it), forward and backward:
    with the device's rule in force here, the update and every gradient against float64 with those masks."""
    import fastlora.ops
    import fastlora.segments

    for module in (fastlora.ops, fastlora.segments):
        monkeypatch.setattr(module, "kernel_masks_on", lambda t: True)
    layer = _mixed_layer()
    layer.backend = "torch"
    x = torch.randn(9, 5, 40, generator=torch.Generator().manual_seed(5), requires_grad=True)
    held = {"b": torch.tensor([1, 2, 6, 7, 8]), "c": torch.tensor([4, 0])}
    assert layer._grouped_rows(x, held) == "torch"
    seeds = _seeds(2, 11)
    torch.manual_seed(11)
    got = layer.mixed_batch_forward(x, held)
    params = [x, *[p for n in "bc" for p in layer.lora_factors(n)]]
    weights = torch.linspace(-1, 1, got.numel()).reshape(got.shape)
    got_grads = torch.autograd.grad((got * weights).sum(), params)
    x_ref = x.detach().double().requires_grad_(True)
    ref = (_reference_update(layer, x_ref, held, seeds, segment_rows=True).view(got.shape)
           + torch.nn.functional.linear(x_ref, layer.weight.double(), layer.bias.double()))
    ref_params = [x_ref, *[p for n in "bc" for p in layer.lora_factors(n)]]
    ref_grads = torch.autograd.grad((ref * weights.double()).sum(), ref_params)
    assert_close(got, ref.float(), kind="same_math_cancelling", dtype=torch.float32)
    for i, (g, r) in enumerate(zip(got_grads, ref_grads)):
        assert_close(g, r.float(), kind="same_math_cancelling", msg=f"gradient {i}")


def check_mixed_batch_rows(shape, dtype=torch.float32, device="cpu"):
    """Three adapters of different ranks and dropouts, an adapter whose rows are none, base rows: the update and
    every gradient against float64 with the same Philox masks."""
    layer = _mixed_layer().to(device)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5)).to(device=device, dtype=dtype)
    x.requires_grad_(True)
    held = {"a": torch.tensor([], dtype=torch.long), "b": torch.tensor([1, 2, 6, 7, 8]), "c": torch.tensor([4, 0])}
    assert layer._grouped_rows(x, held)
    seeds = _seeds(2, 11, device)  # b and c drop: one seed each, in order
    torch.manual_seed(11)
    got = layer.grouped_rows_update(x, held)
    params = [x, *[p for n in "abc" for p in layer.lora_factors(n)]]
    weights = torch.linspace(-1, 1, got.numel(), device=device).reshape(got.shape)
    got_grads = torch.autograd.grad((got * weights).sum(), params)
    reference_layer = _mixed_layer()  # the same seed: the same factors, on the CPU
    x_ref = x.detach().cpu().double().requires_grad_(True)
    ref = _reference_update(reference_layer, x_ref, held, seeds)
    ref_params = [x_ref, *[p for n in "abc" for p in reference_layer.lora_factors(n)]]
    ref_grads = torch.autograd.grad((ref * weights.cpu().double()).sum(), ref_params)
    assert_close(got.cpu(), ref, kind="reference")
    for i, (g, r) in enumerate(zip(got_grads, ref_grads)):
        g, r = g.cpu().float(), r.float()
        assert_close(g, r, kind="same_math_cancelling" if params[i].dtype == torch.float32 else "same_math",
                     dtype=params[i].dtype, msg=f"gradient {i}")
    return layer, got_grads


@pytest.mark.parametrize("shape", [(9, 5, 40), (9, 40)], ids=["3-D: segments past one block", "2-D"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32 x", "bf16 x"])
def test_mixed_batch_rows_in_one_grouped_call_match_the_reference(shape, dtype):
    check_mixed_batch_rows(shape, dtype)


def test_a_traced_mixed_batch_takes_the_torch_path(monkeypatch):
    """Under torch.compile (which cannot run under the interpreter: is_compiling stands in) a mixed batch on the
    kernels' device takes the torch path's batched products, which trace, not the grouped kernels' eager
    autograd Function."""
    layer = _mixed_layer()
    x = torch.randn(9, 40)
    held = {"b": torch.tensor([1, 2]), "c": torch.tensor([4, 0])}
    assert layer._grouped_rows(x, held) == "kernels"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert layer._grouped_rows(x, held) == "torch"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16 base, fp32 adapters"])
@pytest.mark.parametrize("base", ["cublas", "fused"])
def test_a_mixed_batch_on_the_kernels_takes_the_updates_into_the_base_product(base, dtype, monkeypatch):
    """A frozen dense layer's mixed batch on the kernels: x Wᵀ + b with every adapter's update in the base product
    itself (the fused GEMM's accumulator, or the pass after cuBLAS), never a separate update tensor; output and
    every gradient against float64 with the same Philox masks (ranks 2 / 4 / 3, an adapter with no rows, base
    rows, dropout 0.25 and 0.1)."""
    from fastlora import schedules
    from fastlora.grouped_lora import _GroupedLoRA

    monkeypatch.setattr(_GroupedLoRA, "apply", None)  # the separate-update call must not run
    layer = _mixed_layer()
    with torch.no_grad():
        layer.weight.data, layer.bias.data = layer.weight.to(dtype), layer.bias.to(dtype)
    layer.train()
    x = torch.randn(9, 5, 40, generator=torch.Generator().manual_seed(5)).to(dtype).requires_grad_(True)
    held = {"a": torch.tensor([], dtype=torch.long), "b": torch.tensor([1, 2, 6, 7, 8]), "c": torch.tensor([4, 0])}
    seeds = _seeds(2, 11)
    torch.manual_seed(11)
    with schedules.use_kernel_variants(base=base):
        got = layer.mixed_batch_forward(x, held)
    params = [x, *[p for n in "abc" for p in layer.lora_factors(n)]]
    # values the output's dtype holds: its gradient (in that dtype) is then the reference's exactly
    weights = torch.linspace(-1, 1, got.numel()).reshape(got.shape).to(dtype).float()
    got_grads = torch.autograd.grad((got.float() * weights).sum(), params)

    reference_layer = _mixed_layer()
    x_ref = x.detach().double().requires_grad_(True)
    base_out = torch.nn.functional.linear(x_ref, layer.weight.double(), layer.bias.double())
    ref = base_out + _reference_update(reference_layer, x_ref, held, seeds).view(base_out.shape)
    ref_params = [x_ref, *[p for n in "abc" for p in reference_layer.lora_factors(n)]]
    ref_grads = torch.autograd.grad((ref * weights.double()).sum(), ref_params)
    assert_close(got, ref, kind="reference", branch_dtype=torch.float32)
    for i, (g, r) in enumerate(zip(got_grads, ref_grads)):
        g, r = g.float(), r.float()
        assert_close(g, r, kind="same_math_cancelling" if params[i].dtype == torch.float32 else "same_math",
                     dtype=params[i].dtype, msg=f"gradient {i}")


def test_a_mixed_batch_model_on_the_grouped_kernels_equals_the_torch_path():
    """A tiny Llama with three adapters: a mixed batch (with base rows) on the grouped kernels gives the torch
    path's logits and LoRA gradients (dropout off: the two paths draw their masks from different generators)."""
    import fastlora
    from tests.models import clone, tiny_llama, tokens

    base = tiny_llama()
    models = []
    for backend in ("triton", "torch"):
        model = fastlora.get_peft_model(clone(base), fastlora.LoraConfig(target_modules=["q_proj", "v_proj"], r=4,
                                                                          init_lora_weights=False))
        model.add_adapter("other", fastlora.LoraConfig(target_modules=["q_proj", "v_proj", "o_proj"], r=2,
                                                       init_lora_weights=False))
        for _, layer in model.lora_layers():
            layer.backend = backend
        models.append(model)
    with torch.no_grad():
        for (_, ours), (_, theirs) in zip(models[0].lora_layers(), models[1].lora_layers()):
            for name in ours.adapter_names:
                for a, b in zip(ours.lora_factors(name), theirs.lora_factors(name)):
                    a.copy_(b)
    ids = tokens(batch=3)
    names = ["default", "__base__", "other"]
    outs = []
    for model in models:
        model.set_requires_grad(["default", "other"])
        loss = model(input_ids=ids, labels=ids, adapter_names=names).loss
        loss.backward()
        outs.append((loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert_close(outs[0][0], outs[1][0], kind="same_math")
    for name, grad in outs[0][1].items():
        assert_close(grad, outs[1][1][name], kind="same_math_cancelling", msg=name)

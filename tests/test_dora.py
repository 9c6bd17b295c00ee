"""DoRA: the op against a float64 computation of PEFT's formula in every dtype setup, the layer and the
model against PEFT 0.21's DoRA (outputs and every gradient, dropout masks made identical), files both
ways, merges, and the norm's memory (no out × in temporary)."""

import copy

import peft
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastlora
from fastlora import LoraConfig, LoraModel, LoRALinear, cpu_masks, dora_ops, get_peft_model, reference, torch_path
from fastlora.op_scalars import OpScalars
from fastlora.schedules import kernel_schedule
from fastlora.functional import SEED_HIGH
from tests.kernel_checks import dora_operands as _operands
from tests.models import SEED_TARGETS, tiny_llama, tokens
from tests.tolerances import assert_close

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


DTYPES = [(F32, F32), (BF16, F32), (F16, F32), (BF16, BF16), (F16, F16)]


@pytest.mark.parametrize("base_dtype, adapter_dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("p", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("output_for_backward", [False, True], ids=["keeps z", "reads y"])
def test_op_against_float64(base_dtype, adapter_dtype, p, bias, output_for_backward):
    """Output and every gradient within the tolerance of its own dtype.  dm sums dy ⊙ (x Wᵀ + ...) where
    x Wᵀ is a product in the base dtype (PEFT rounds it there too), so it is held to the coarser of the two.  At
    p = 0.1 an fp32 base takes the products with the dropped input as sparse corrections (rare drops)."""
    x, W, b, A, B, m = _operands(base_dtype, adapter_dtype, bias)
    leaves = [t.clone().requires_grad_() for t in (x, A, B, m)]
    seed = torch.tensor([1234]) if p else None
    y = dora_ops.dora_linear(leaves[0], W, b, *leaves[1:], seed, OpScalars.from_flat(0.5, p, "torch"),
                             output_for_backward=output_for_backward)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    grads = torch.autograd.grad(y, leaves, dy)

    keep = cpu_masks.cpu_keep_mask(1234, tuple(x.shape), p, torch.float64) if p else None
    ref_leaves = [t.double().requires_grad_() for t in (x, A, B, m)]
    y_ref = reference.dora(ref_leaves[0], W.double(), b.double() if b is not None else None,
                              *ref_leaves[1:], 0.5, keep, p)
    ref_grads = torch.autograd.grad(y_ref, ref_leaves, dy.double())

    assert y.dtype == base_dtype
    assert_close(y, y_ref, kind="reference", msg="y")
    for name, got, want in zip(("dx", "dA", "dB", "dm"), grads, ref_grads):
        assert got.dtype == {"dx": base_dtype}.get(name, adapter_dtype), name
        assert_close(got, want, kind="reference", branch_dtype=base_dtype if name == "dm" else None, msg=name)


def test_magnitude_with_a_zero_keeps_z():
    """Backward recovers z = y / g from the output when it can; a zero in m makes it keep z instead."""
    x, W, b, A, B, m = _operands(F32, F32, bias=False)
    m[3] = 0.0
    leaves = [t.clone().double().requires_grad_() for t in (x, A, B, m)]
    y = dora_ops.dora_linear(leaves[0], W.double(), None, *leaves[1:], None, OpScalars.from_flat(0.5, 0.0, "torch"),
                             output_for_backward=True)
    ref_leaves = [t.clone().double().requires_grad_() for t in (x, A, B, m)]
    y_ref = reference.dora(ref_leaves[0], W.double(), None, *ref_leaves[1:], 0.5, None, 0.0)
    for got, want in zip(torch.autograd.grad(y.sum(), leaves), torch.autograd.grad(y_ref.sum(), ref_leaves)):
        assert_close(got, want, kind="reference")


def test_float64_gradcheck():
    """Finite differences for x and m (the norm depends on A and B, and treating it as a constant is the
    point, so A and B are checked against PEFT's formula above instead)."""
    x, W, b, A, B, m = (t.double() if t is not None else None for t in _operands(F32, F32, bias=True, M=5, K=6, N=4, r=2))
    for p, seed in ((0.0, None), (0.4, torch.tensor([7]))):
        torch.autograd.gradcheck(lambda x, m: dora_ops.dora_linear(x, W, b, A, B, m, seed, OpScalars.from_flat(0.7, p, "torch")),
                                 [x.clone().requires_grad_(), m.clone().requires_grad_()])


def test_norm_without_an_out_by_in_temporary(monkeypatch):
    """The norm reads W in row chunks: no op of a DoRA step makes a tensor of out × in elements or more."""

    class LargestTensor(TorchDispatchMode):
        """The bytes of the largest storage an op creates (views of existing storages not counted)."""
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            def dense(t):  # (a sparse tensor's parts are dense tensors, seen when they are made)
                return isinstance(t, torch.Tensor) and t.layout == torch.strided

            seen = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                    if dense(t)}
            for t in torch.utils._pytree.tree_leaves(out):
                if dense(t) and t.untyped_storage().data_ptr() not in seen:
                    self.largest = max(self.largest, t.untyped_storage().nbytes())
            return out

    monkeypatch.setattr(torch_path, "_NORM_CHUNK_ELEMENTS", 1024)
    for dtype, p in ((BF16, 0.0), (F32, 0.1)):
        layer = LoRALinear(256, 64, r=4, use_dora=True, init_lora_weights=False, dtype=dtype)
        layer.lora_A.data, layer.lora_B.data = layer.lora_A.float(), layer.lora_B.float()
        layer.lora_magnitude_vector_default.data = layer.lora_magnitude_vector_default.float()
        layer.lora_dropout = p
        x = torch.randn(4, 256, dtype=dtype, requires_grad=True)
        with LargestTensor() as mode:
            layer(x).sum().backward()
        assert 0 < mode.largest < layer.weight.nbytes, (dtype, mode.largest)
    exact = torch_path.dora_weight_norm(layer.weight.double(), layer.lora_A.double(), layer.lora_B.double(), layer.scaling)
    chunked = torch_path.dora_weight_norm(layer.weight.to(BF16), layer.lora_A, layer.lora_B, layer.scaling)
    direct = torch.linalg.vector_norm(layer.weight.to(BF16).double() + layer.scaling * (layer.lora_B @ layer.lora_A).double(), dim=1)
    assert chunked.dtype == F32
    assert_close(chunked, direct, kind="reference")
    assert_close(exact, torch.linalg.vector_norm(
        layer.weight.double() + layer.scaling * layer.lora_B.double() @ layer.lora_A.double(), dim=1), kind="reference")


# ---- against PEFT ----------------------------------------------------------------------------------


class _Holder(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


class _SeededDropout(nn.Module):
    """PEFT's dropout slot, filled with fastlora's CPU mask for ``seed``: x ⊙ mask / (1 - p)."""

    def __init__(self, p):
        super().__init__()
        self.p, self.seed = p, None

    def forward(self, x):
        return x * cpu_masks.cpu_keep_mask(self.seed, tuple(x.shape), self.p, x.dtype) / (1 - self.p)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.2])
@pytest.mark.parametrize("bias", [False, True])
def test_layer_matches_peft_dora(p, bias):
    torch.manual_seed(0)
    linear = nn.Linear(48, 40, bias=bias)
    theirs = peft.inject_adapter_in_model(
        peft.LoraConfig(target_modules=["proj"], r=4, lora_alpha=8, lora_dropout=p, use_dora=True,
                        init_lora_weights=False), _Holder(copy.deepcopy(linear))).proj
    ours = LoRALinear.from_linear(copy.deepcopy(linear), r=4, lora_alpha=8, lora_dropout=p, use_dora=True)
    with torch.no_grad():
        ours.lora_A.copy_(theirs.lora_A["default"].weight)
        ours.lora_B.copy_(theirs.lora_B["default"].weight)
    with torch.no_grad():  # m = ‖W + s·B A‖ for the copied factors, as PEFT set it at creation
        ours.lora_magnitude_vector_default.copy_(
            torch_path.dora_weight_norm(ours.weight, ours.lora_A, ours.lora_B, ours.scaling))
    assert_close(ours.lora_magnitude_vector_default, theirs.lora_magnitude_vector["default"].weight, kind="same_math")
    with torch.no_grad():  # a trained magnitude: not the norm any more
        ours.lora_magnitude_vector_default.mul_(torch.linspace(0.8, 1.2, 40))
        theirs.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude_vector_default)
    if p:
        theirs.lora_dropout["default"] = _SeededDropout(p)
    x = torch.randn(2, 6, 48)
    results = []
    for layer in (ours, theirs):
        layer.train()
        xi = x.clone().reshape(-1, 48).requires_grad_()
        torch.manual_seed(5)
        if p:
            theirs.lora_dropout["default"].seed = int(torch.randint(0, SEED_HIGH, (1,)))
            torch.manual_seed(5)
        y = layer(xi)
        params = ((ours.lora_A, ours.lora_B, ours.lora_magnitude_vector_default) if layer is ours else
                  (theirs.lora_A["default"].weight, theirs.lora_B["default"].weight,
                   theirs.lora_magnitude_vector["default"].weight))
        results.append([y, *torch.autograd.grad(y.square().sum(), (xi, *params))])
    for name, a, b in zip(("y", "dx", "dA", "dB", "dm"), *results):
        assert_close(a, b, kind="same_math_cancelling", msg=name)  # gradients of y.square().sum()


def _both(p=0.0, init=False, **config):
    base = tiny_llama()
    kwargs = dict(target_modules=SEED_TARGETS, r=4, lora_alpha=8, lora_dropout=p, use_dora=True,
                  init_lora_weights=init, **config)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="CAUSAL_LM", **kwargs))
    if not init:  # a trained magnitude, no longer the norm it started at (g = m / n ≠ 1)
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, param in theirs.named_parameters():
                if "lora_magnitude_vector" in name:
                    param.mul_(1 + 0.2 * torch.randn(param.shape, generator=g))
    return base, theirs, kwargs


def _fastlora_copy_of(base, theirs, tmp_path):
    theirs.save_pretrained(tmp_path / "peft")
    return LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft", is_trainable=True)


def _grads(model):
    return {n.replace(".default", "").replace("_default", "").replace("lora_magnitude_vector.weight",
                                                                      "lora_magnitude_vector"): p.grad
            for n, p in model.named_parameters() if p.requires_grad}


def _fastlora_names(grads):
    return {n.replace("lora_A", "lora_A.weight").replace("lora_B", "lora_B.weight"): g for n, g in grads.items()}


def test_model_matches_peft_dora_and_files_go_both_ways(tmp_path):
    base, theirs, _ = _both()
    ours = _fastlora_copy_of(base, theirs, tmp_path)
    ids = tokens()
    for model in (theirs, ours):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    theirs_grads, our_grads = _grads(theirs), _fastlora_names(_grads(ours))
    assert our_grads.keys() == theirs_grads.keys() and len(our_grads) == 3 * 7 * 2
    for name, g in our_grads.items():
        assert_close(g, theirs_grads[name], kind="same_math", msg=name)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    for model in (theirs, ours):
        model.eval()
    assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, kind="same_math")
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert_close(back(input_ids=ids).logits, ours(input_ids=ids).logits, kind="same_math")
    assert fastlora.get_peft_model_state_dict(ours).keys() == peft.get_peft_model_state_dict(theirs).keys()


def test_fresh_dora_adapter_starts_at_the_base_model():
    base, theirs, kwargs = _both(init=True)
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="CAUSAL_LM", **kwargs))
    ids = tokens()
    want = base(input_ids=ids).logits
    assert_close(ours(input_ids=ids).logits, want, kind="same_math")
    assert_close(theirs(input_ids=ids).logits, want, kind="same_math")
    for name, layer in ours.lora_layers():
        peft_layer = theirs.get_base_model().get_submodule(name)
        assert_close(layer.lora_magnitude_vector_default, peft_layer.lora_magnitude_vector["default"].weight,
                     kind="same_math")


def test_merges_and_disable_as_peft(tmp_path):
    base, theirs, _ = _both()
    ours = _fastlora_copy_of(base, theirs, tmp_path).eval()
    theirs.eval()
    ids = tokens()
    adapted = ours(input_ids=ids).logits
    with ours.disable_adapter(), theirs.disable_adapter():
        assert_close(ours(input_ids=ids).logits, base(input_ids=ids).logits, kind="same_math")
        assert_close(theirs(input_ids=ids).logits, base(input_ids=ids).logits, kind="same_math")
    weight = ours.get_base_model().model.layers[0].mlp.up_proj.weight.clone()
    ours.merge_adapter()
    theirs.merge_adapter()
    assert_close(ours(input_ids=ids).logits, adapted, kind="same_math")
    for name, layer in ours.lora_layers():  # W ← g ⊙ (W + s·B A), as PEFT's merge
        assert_close(layer.weight, theirs.get_base_model().get_submodule(name).base_layer.weight, kind="same_math")
    ours.unmerge_adapter()
    assert_close(ours.get_base_model().model.layers[0].mlp.up_proj.weight, weight, kind="roundoff")
    assert_close(ours(input_ids=ids).logits, adapted, kind="same_math")
    merged = copy.deepcopy(ours).merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert_close(merged(input_ids=ids).logits, adapted, kind="same_math")


def test_dora_beside_a_lora_adapter(tmp_path):
    """A DoRA adapter and a plain one on one model: switching, saving both and loading them into PEFT."""
    base, theirs, kwargs = _both()
    ours = _fastlora_copy_of(base, theirs, tmp_path).eval()
    plain = LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=2, init_lora_weights=False)
    ours.add_adapter("plain", plain)
    ids = tokens()
    dora_logits = ours(input_ids=ids).logits
    ours.set_adapter("plain")
    plain_logits = ours(input_ids=ids).logits
    assert not torch.allclose(plain_logits, dora_logits)
    assert ours.get_base_model().model.layers[0].self_attn.q_proj.magnitude() is None
    ours.save_pretrained(tmp_path / "two")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "two").eval()
    back.load_adapter(tmp_path / "two" / "plain", adapter_name="plain")
    assert_close(back(input_ids=ids).logits, dora_logits, kind="same_math")
    back.set_adapter("plain")
    assert_close(back(input_ids=ids).logits, plain_logits, kind="same_math")
    ours.delete_adapter("default")
    assert not any(n.startswith("lora_magnitude") for layer in ours.get_base_model().modules()
                   if isinstance(layer, LoRALinear) for n, _ in layer.named_parameters())


def test_compiled_dora_layer_matches_eager():
    layer = LoRALinear(32, 24, r=4, use_dora=True, init_lora_weights=False)
    x = torch.randn(2, 5, 32, requires_grad=True)
    params = (x, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector_default)
    results = []
    for fn in (layer, torch.compile(layer, fullgraph=True)):
        y = fn(x)
        results.append([y, *torch.autograd.grad(y.square().sum(), params)])
    for eager, compiled in zip(*results):
        assert_close(compiled, eager, kind="same_math")


@pytest.mark.parametrize("bias", [False, True])
def test_compiled_dora_op_regenerates_the_eager_mask(bias):
    """With one seed, the compiled op (which keeps z) and the eager one apply the same masks."""
    x, W, b, A, B, m = _operands(F32, F32, bias=bias)
    leaves = [t.requires_grad_() for t in (x, A, B, m)]
    for p, seed in ((0.0, None), (0.1, torch.tensor([99])), (0.5, torch.tensor([98]))):
        def f(x, A, B, m):
            return dora_ops.dora_linear(x, W, b, A, B, m, seed, OpScalars.from_flat(0.5, p, "torch"))
        results = []
        for fn in (f, torch.compile(f, fullgraph=True)):
            y = fn(*leaves)
            results.append([y, *torch.autograd.grad(y.square().sum(), leaves)])
        for eager, compiled in zip(*results):
            assert_close(compiled, eager, kind="same_math")


@pytest.mark.skipif(not fastlora.functional.triton_interpreter_on(), reason="the kernels' mask on CPU tensors")
def test_triton_backend_applies_the_kernels_mask():
    """A DoRA layer on the triton backend draws its seed as the torch backend does and applies the kernels'
    Philox mask to it (the torch backend: the CPU generator's)."""
    layer = LoRALinear(40, 24, r=4, lora_dropout=0.3, use_dora=True, init_lora_weights=False, backend="triton")
    x = torch.randn(6, 40)
    args = (x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector_default)
    torch.manual_seed(4)
    y = layer(x)
    torch.manual_seed(4)
    seed = torch.randint(0, SEED_HIGH, (1,))
    assert_close(y, dora_ops.dora_linear(*args, seed, OpScalars(layer.scaling, 0.3, kernel_schedule())), kind="same_math")
    assert not torch.allclose(y, dora_ops.dora_linear(*args, seed, OpScalars.from_flat(layer.scaling, 0.3, "torch")))


@pytest.mark.parametrize("keep_z", [True, False], ids=["z", "no-z"])
@pytest.mark.parametrize("use_kernels", [False, True], ids=["torch", "kernels"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck(p, use_kernels, keep_z):
    """The op's fake outputs (shapes, dtypes: z in the base's bf16 on the kernel path) match the real ones."""
    x, W, b, A, B, m = _operands(torch.bfloat16 if use_kernels else F32, F32, bias=True)
    seed = torch.tensor([42]) if p else None
    torch.library.opcheck(dora_ops.dora_linear_op, (x, W, b, A.requires_grad_(), B.requires_grad_(),
                                               m.requires_grad_(), seed, 0.5, p,
                                               kernel_schedule().key if use_kernels else "torch", keep_z))


def test_no_output_features():
    """A layer with no output features (an empty W): the norm's row chunks still step forward."""
    layer = LoRALinear(8, 0, r=2, use_dora=True)
    x = torch.randn(3, 8, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (3, 0) and torch.equal(x.grad, torch.zeros(3, 8))


class _AddsIntoTheOutput(nn.Module):
    """A projection whose output the model adds into in place, as Falcon's decoder adds the attention output into
    its MLP's (``mlp_output += attention_output``)."""

    def __init__(self, bias: bool, in_place: bool):
        super().__init__()
        self.proj = nn.Linear(16, 24, bias=bias)
        self.in_place = in_place

    def forward(self, x):
        y = self.proj(x)
        if self.in_place:
            y += 1.0
            return y
        return y + 1.0


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("second", [False, True], ids=["one DoRA adapter", "DoRA active after a LoRA one"])
def test_a_model_may_add_into_a_dora_layers_output_in_place(bias, dropout, second):
    """The layers do not give the output they keep for backward: a model changing it in place trains as with an
    out-of-place add (PEFT's DoRA layers allow it too)."""
    grads = {}
    for in_place in (False, True):
        torch.manual_seed(0)
        model = fastlora.get_peft_model(_AddsIntoTheOutput(bias, in_place), fastlora.LoraConfig(
            target_modules=["proj"], r=4, use_dora=True, lora_dropout=dropout, init_lora_weights=False))
        if second:
            model.add_adapter("lora", fastlora.LoraConfig(target_modules=["proj"], r=2, init_lora_weights=False))
            model.base_model.set_adapter(["lora", "default"])
        x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch.manual_seed(2)
        model.train()(x).square().sum().backward()
        grads[in_place] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad} | {"x": x.grad}
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        assert torch.equal(grads[True][name], grad), name


def test_the_functional_op_reads_its_output_in_backward_only_where_asked():
    """``output_for_backward=True`` keeps y for dm instead of z (autograd then refuses an in-place change of y);
    by default z is kept and y may change."""
    x, W, _, A, B, m = _operands(F32, F32, False)
    for output_for_backward in (False, True):
        leaves = [t.clone().requires_grad_() for t in (A, B, m)]
        y = fastlora.lora_linear(x, W, None, leaves[0], leaves[1], 0.5, magnitude=leaves[2],
                                 output_for_backward=output_for_backward)
        y += 1.0
        if output_for_backward:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                y.sum().backward()
        else:
            y.sum().backward()
            assert all(leaf.grad is not None for leaf in leaves)

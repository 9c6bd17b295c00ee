"""Several adapters at once, compared with PEFT: several active adapters (set_adapter([...]) at the base_model
level, their updates summed), the mixed-batch forward and generate (adapter_names=, one adapter per row,
"__base__" for the base model), and beyond PEFT mixed-batch training, each adapter trained by its own rows."""

import re

import peft
import pytest
import torch

import fastlora
from tests.models import SEED_TARGETS, assert_unchanged, clone, copy_lora_weights, snapshot, tiny_llama, tokens
from tests.tolerances import assert_close

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _configs(library, name):
    """Adapter "default" on every projection (r 4), "b" on q and v only (r 2, another alpha)."""
    if name == "default":
        return library.LoraConfig(target_modules=SEED_TARGETS, r=4, lora_alpha=16, init_lora_weights=False)
    return library.LoraConfig(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=3, init_lora_weights=False)


def _pair():
    base = tiny_llama()
    theirs = peft.get_peft_model(clone(base), _configs(peft, "default"))
    theirs.add_adapter("b", _configs(peft, "b"))
    ours = fastlora.get_peft_model(clone(base), _configs(fastlora, "default"))
    ours.add_adapter("b", _configs(fastlora, "b"))
    copy_lora_weights(theirs, ours)
    return theirs, ours


def _peft_key(name):
    """fastlora's parameter name under PEFT's spelling."""
    return re.sub(r"\.lora_([AB])_(\w+)$", r".lora_\1.\2.weight", name)


def _trainable(model, peft_names=False):
    return {(_peft_key(n) if peft_names else n): p for n, p in model.named_parameters() if p.requires_grad}


def test_several_active_adapters_as_peft():
    theirs, ours = _pair()
    theirs.base_model.set_adapter(["default", "b"])
    ours.base_model.set_adapter(["default", "b"])
    assert ours.active_adapters == ["default", "b"] and ours.active_adapter == "default"
    assert set(_trainable(ours, peft_names=True)) == set(_trainable(theirs))  # both adapters train
    ids = tokens()
    out_theirs, out_ours = theirs(input_ids=ids, labels=ids), ours(input_ids=ids, labels=ids)
    assert_close(out_ours.logits, out_theirs.logits, kind="same_math")
    out_theirs.loss.backward()
    out_ours.loss.backward()
    grads = {n: p.grad for n, p in _trainable(theirs).items()}
    for name, param in _trainable(ours, peft_names=True).items():
        assert_close(param.grad, grads[name], kind="same_math", msg=name)

    with ours.disable_adapter():
        assert_close(ours(input_ids=ids).logits, ours.get_base_model()(input_ids=ids).logits, kind="same_math")
    theirs.merge_adapter()
    ours.merge_adapter()  # the default: every active adapter
    assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, kind="same_math")
    ours.unmerge_adapter()
    ours.delete_adapter("b")
    assert ours.active_adapters == ["default"]


def test_set_adapter_with_a_list_on_the_model_and_the_single_adapter_again():
    _, ours = _pair()
    ids = tokens()
    alone = ours(input_ids=ids).logits
    ours.set_adapter(["default", "b"])
    assert not torch.equal(ours(input_ids=ids).logits, alone)
    ours.set_adapter("default")
    assert ours.active_adapters == ["default"]
    assert torch.equal(ours(input_ids=ids).logits, alone)
    assert not any(p.requires_grad for n, p in ours.named_parameters() if n.endswith("_b"))


def test_several_active_adapters_refusals_change_nothing():
    _, ours = _pair()
    before = snapshot(ours)
    with pytest.raises(ValueError, match="nope not found"):
        ours.base_model.set_adapter(["default", "nope"])
    assert_unchanged(ours, before)


@pytest.mark.parametrize("order", [["default", "dora"], ["dora", "default"]], ids=["LoRA then DoRA", "DoRA then LoRA"])
def test_a_dora_adapter_among_several_active_ones_as_peft(order):
    """PEFT adds each active adapter's update in turn; a DoRA adapter after others takes the output so far (without
    the base bias) as its base: outputs and every gradient as PEFT's, in either order."""
    theirs, ours = _pair()
    dora = dict(target_modules=["q_proj", "v_proj", "o_proj"], r=2, lora_alpha=5, use_dora=True, init_lora_weights=False)
    theirs.add_adapter("dora", peft.LoraConfig(**dora))
    ours.add_adapter("dora", fastlora.LoraConfig(**dora))
    copy_lora_weights(theirs, ours)
    state = theirs.state_dict()
    with torch.no_grad():
        for name, layer in ours.lora_layers("dora"):
            layer.magnitude("dora").copy_(state[f"base_model.model.{name}.lora_magnitude_vector.dora.weight"])
    theirs.base_model.set_adapter(order)
    ours.base_model.set_adapter(order)
    ids = tokens()
    out_theirs, out_ours = theirs(input_ids=ids, labels=ids), ours(input_ids=ids, labels=ids)
    assert_close(out_ours.logits, out_theirs.logits, kind="same_math")
    out_theirs.loss.backward()
    out_ours.loss.backward()
    grads = {n.replace(".weight", "") if "magnitude" in n else n: p.grad for n, p in _trainable(theirs).items()}
    for name, param in _trainable(ours, peft_names=True).items():
        key = re.sub(r"\.lora_magnitude_vector_(\w+)$", r".lora_magnitude_vector.\1", name)
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert_close(param.grad, grads[key], kind="same_math_cancelling", msg=name)


def test_mixed_batch_forward_and_generate_as_peft():
    theirs, ours = _pair()
    theirs.eval()
    ours.eval()
    ids = tokens(batch=4)
    names = ["b", "__base__", "default", "b"]
    assert_close(ours(input_ids=ids, adapter_names=names).logits,
                 theirs(input_ids=ids, adapter_names=names).logits, kind="same_math")
    mask = torch.ones_like(ids[:, :4])
    generated = [m.generate(input_ids=ids[:, :4], attention_mask=mask, adapter_names=names, max_new_tokens=3,
                            do_sample=False, pad_token_id=0) for m in (theirs, ours)]
    assert torch.equal(generated[0], generated[1])
    alone = ours(input_ids=ids).logits  # the active adapter for every row again afterwards
    ours.set_adapter("b")
    assert_close(ours(input_ids=ids, adapter_names=["b"] * 4).logits, ours(input_ids=ids).logits, kind="same_math")
    ours.set_adapter("default")
    assert torch.equal(ours(input_ids=ids).logits, alone)


@pytest.mark.parametrize("names, error, match", [
    (["default"], ValueError, "Length of `adapter_names` should be the same"),
    (["default", "nope"], ValueError, "non-existing adapter"),
    ("default", TypeError, "one per row"),
])
def test_mixed_batch_checks_as_peft(names, error, match):
    _, ours = _pair()
    with pytest.raises(error, match=match):
        ours(input_ids=tokens(batch=2), adapter_names=names)
    ours.merge_adapter()
    with pytest.raises(ValueError, match="merged adapters"):
        ours(input_ids=tokens(batch=2), adapter_names=["default", "b"])


def test_mixed_batch_training_gives_each_adapter_the_gradient_of_its_own_rows():
    """One step over a mixed batch = separate steps per adapter on its rows (dropout 0): each adapter's gradient
    comes from its rows only, with its own rank and alpha; "__base__" rows train nothing."""
    _, ours = _pair()
    ours.train()
    ours.set_requires_grad(["default", "b"])  # both train (set_adapter leaves only the active one trainable)
    ids = tokens(batch=4)
    names = ["default", "b", "__base__", "default"]

    def loss_of(logits):
        return logits.float().square().mean(dim=(1, 2)).sum()

    adapters = {n: [p for k, p in ours.named_parameters() if k.endswith(f"_{n}")] for n in ("default", "b")}
    every = adapters["default"] + adapters["b"]
    mixed = torch.autograd.grad(loss_of(ours(input_ids=ids, adapter_names=names).logits), every, allow_unused=True)
    mixed = dict(zip(map(id, every), mixed))
    for adapter, rows in (("default", [0, 3]), ("b", [1])):
        ours.set_adapter(adapter)
        ours.set_requires_grad(adapter)
        separate = torch.autograd.grad(loss_of(ours(input_ids=ids[rows]).logits), adapters[adapter])
        for param, grad in zip(adapters[adapter], separate):
            assert_close(mixed[id(param)], grad, kind="same_math_cancelling")


# Rows per adapter: scattered with a base row (gathered and scattered back), sorted by adapter over every row
# (read in place), and sorted in equal segments (read in place, no padding).
GROUPS = {"scattered": {"a": [0, 3, 4], "b": [1], "c": [5]}, "sorted": {"a": [0, 1, 2], "b": [3], "c": [4, 5]},
          "sorted equal": {"a": [0, 1], "b": [2, 3], "c": [4, 5]}}


@pytest.mark.parametrize("rows", list(GROUPS))
@pytest.mark.parametrize("dtype, adapter_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                  (torch.bfloat16, torch.bfloat16)],
                         ids=["fp32", "bf16 x, fp32 adapters", "bf16"])
def test_mixed_batch_with_dropout_equals_one_step_per_adapter_with_the_same_masks(dtype, adapter_dtype, rows,
                                                                                  monkeypatch):
    """A layer's mixed batch (adapters of unequal rows, ranks, alphas and dropout; a base row) computes, with
    dropout on, what each adapter's own step computes on its rows when it draws the same seed: outputs and the
    gradients of x and of every factor.  The masks are each adapter's own, on its own rows, as a step of its
    own draws them.  A batch sorted by adapter is read in place (no rows gathered)."""
    from fastlora import segments
    from fastlora.adapter_settings import AdapterSettings
    from fastlora.functional import dropout_and_seed

    gathered = []
    add_at_rows = segments._add_at_rows_
    monkeypatch.setattr(segments, "_add_at_rows_", lambda out, rows, values: (
        gathered.append(rows is not None), add_at_rows(out, rows, values))[1])

    torch.manual_seed(0)
    layer = fastlora.LoRALinear(16, 12, r=4, lora_alpha=8, lora_dropout=0.3, dtype=dtype, adapter_dtype=adapter_dtype,
                                adapter_name="a")
    layer.add_adapter("b", AdapterSettings(2, 3, 0.1), adapter_dtype=adapter_dtype)
    layer.add_adapter("c", AdapterSettings(8, 16, 0.0), adapter_dtype=adapter_dtype)
    groups = {name: torch.tensor(r) for name, r in GROUPS[rows].items()}
    params = [t for name in groups for t in layer.lora_factors(name)]
    with torch.no_grad():
        for t in params:
            t.normal_(0, 0.5)
    layer.train()
    x = torch.randn(6, 5, 16, dtype=dtype)
    weights = torch.randn(6, 5, 12, dtype=dtype)

    def grads(y):
        return [y.detach(), *torch.autograd.grad((y.float() * weights.float()).sum(), [x, *params], allow_unused=True)]

    x.requires_grad_(True)
    torch.manual_seed(7)
    x_before = x.detach().clone()
    mixed = grads(layer.mixed_batch_forward(x, groups))
    assert gathered == [rows == "scattered"] * 2  # forward's update and backward's dx, each added at the rows
    assert torch.equal(x.detach(), x_before)  # the masks go on copies: x itself is read, never written

    y = layer.base_forward(x)
    for i, (name, rows) in enumerate(groups.items()):
        torch.manual_seed(7)
        for before in list(groups)[:i]:  # replay the seeds the adapters before this one drew
            dropout_and_seed(layer.adapter_settings[before].lora_dropout, True, x.device)
        layer.set_adapter(name)
        y = y.index_copy(0, rows, layer(x.index_select(0, rows)))
    separate = grads(y)
    for i, (got, want) in enumerate(zip(mixed, separate)):
        if want is None:
            assert got is None or not got.any(), i
            continue
        assert_close(got, want, kind="same_math", msg=f"output / gradient {i}")


@pytest.mark.parametrize("rows", ["scattered", "sorted"])
def test_a_mixed_batch_output_takes_in_place_ops_strided_gradients_and_empty_rows(rows):
    """The layer's mixed-batch output is an ordinary tensor: an in-place op on it (as an activation's ``relu_``
    or a residual ``+=``) and a gradient that reaches it as a slice of a wider one (``torch.cat`` along the last
    dimension) give the gradients the plain expression gives; rows of no tokens pass through."""
    from fastlora.adapter_settings import AdapterSettings

    torch.manual_seed(0)
    layer = fastlora.LoRALinear(16, 12, r=4, lora_alpha=8, adapter_name="a")
    layer.add_adapter("b", AdapterSettings(2, 3, 0.0))
    with torch.no_grad():
        for name in ("a", "b"):
            layer.lora_factors(name)[1].normal_()
    groups = {name: torch.tensor(r) for name, r in GROUPS[rows].items() if name != "c"}
    count = sum(len(r) for r in groups.values()) + (rows == "scattered")  # the scattered one has a base row
    x = torch.randn(count, 5, 16, requires_grad=True)
    params = [x, *layer.lora_factors("a"), *layer.lora_factors("b")]
    dy = torch.randn(count, 5, 24)
    plain = torch.autograd.grad(layer.mixed_batch_forward(x, groups), params, dy[..., :12].contiguous())
    y = layer.mixed_batch_forward(x, groups)
    beside = torch.zeros_like(y)  # y's gradient: a strided slice of dy
    for got, want in zip(torch.autograd.grad(torch.cat([y, beside], -1), params, dy), plain):
        assert_close(got, want, kind="same_math")
    y = layer.mixed_batch_forward(x, groups)
    y.mul_(2)
    for got, want in zip(torch.autograd.grad(y, params, dy[..., :12] / 2), plain):
        assert_close(got, want, kind="same_math")
    empty = torch.randn(count, 0, 16, requires_grad=True)
    out = layer.mixed_batch_forward(empty, groups)
    assert out.shape == (count, 0, 12)
    out.sum().backward()
    assert empty.grad.shape == empty.shape


def test_a_mixed_batch_of_one_adapter_is_that_adapters_forward():
    """Every row naming one adapter: the layer's forward with that adapter active, bit for bit, its mask drawn
    from the same seed (output and gradients), whichever adapter is active."""
    from fastlora.adapter_settings import AdapterSettings

    torch.manual_seed(0)
    layer = fastlora.LoRALinear(16, 12, r=4, lora_alpha=8, lora_dropout=0.2, adapter_name="a")
    layer.add_adapter("b", AdapterSettings(2, 3, 0.1))
    with torch.no_grad():
        for name in ("a", "b"):
            layer.lora_factors(name)[1].normal_()
    layer.train()
    x = torch.randn(3, 5, 16, requires_grad=True)
    dy = torch.randn(3, 5, 12)
    params = [x, *layer.lora_factors("b")]
    torch.manual_seed(4)
    mixed = layer.mixed_batch_forward(x, {"b": torch.arange(3)})
    mixed_grads = torch.autograd.grad(mixed, params, dy)
    layer.set_adapter("b")
    torch.manual_seed(4)
    alone = layer(x)
    assert torch.equal(mixed, alone)
    for got, want in zip(mixed_grads, torch.autograd.grad(alone, params, dy)):
        assert torch.equal(got, want)


def test_a_mixed_batch_keeps_what_one_adapter_keeps():
    """Autograd keeps x once per layer (the rows are gathered again in backward, or read in place when sorted),
    each adapter's S and its rows' indices: the one-adapter step's bytes plus a few indices, with dropout on."""
    from fastlora.bench.measure import SavedTensorCounter, module_tensors

    _, ours = _pair()
    ours.train()
    ours.set_requires_grad(["default", "b"])
    for layer in (layer for _, layer in ours.lora_layers()):
        for name in layer.adapter_names:
            layer.adapter_settings[name] = layer.adapter_settings[name].__class__(
                **{**layer.adapter_settings[name].__dict__, "lora_dropout": 0.1})
    ids = tokens(batch=4)

    def saved(**kwargs):
        with SavedTensorCounter(exclude=module_tensors(ours)) as counter:
            ours(input_ids=ids, labels=ids, **kwargs).loss.backward()
        return counter.bytes

    one = saved()
    mixed = saved(adapter_names=["default", "default", "default", "default"])
    assert mixed <= one + 64 * len(list(ours.lora_layers())), (mixed, one)


def test_mixed_batch_checks_every_layer_and_refuses_checkpointed_training():
    """PEFT's row count check runs in every layer (a layer that sees flattened rows refuses); a checkpointed
    training forward, which backward would recompute without the rows' adapters, is refused."""
    holder = torch.nn.Sequential(torch.nn.Flatten(0, 1), torch.nn.Linear(4, 4))
    model = fastlora.get_peft_model(holder, fastlora.LoraConfig(target_modules=["1"]))
    with pytest.raises(ValueError, match="got 2 and 6"):
        model(torch.randn(2, 3, 4), adapter_names=["default", "default"])
    _, ours = _pair()
    ours.get_base_model().gradient_checkpointing_enable()
    ours.train()
    with pytest.raises(NotImplementedError, match="gradient checkpointing"):
        ours(input_ids=tokens(batch=2), labels=tokens(batch=2), adapter_names=["default", "b"])


def test_mixed_batch_generate_with_beams_as_peft_also_from_the_generation_config():
    """num_beams repeats each row's adapter per beam: as PEFT with num_beams=2 in the call (the ids given as
    input_ids, as inputs or positionally), and the same when it comes from the model's generation config (which
    PEFT does not read)."""
    theirs, ours = _pair()
    names = ["b", "default"]
    ids = tokens(batch=2)[:, :4]
    common = dict(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, max_new_tokens=3,
                  do_sample=False, pad_token_id=0)
    theirs.eval()
    ours.eval()
    expected = theirs.generate(**common, num_beams=2)
    assert torch.equal(ours.generate(**common, num_beams=2), expected)
    ids = common.pop("input_ids")
    assert torch.equal(ours.generate(inputs=ids, **common, num_beams=2), expected)  # generate's own name for them
    ours.get_base_model().generation_config.num_beams = 2
    assert torch.equal(ours.generate(ids, **common), expected)


def test_a_mixed_batch_naming_a_dora_adapter_is_refused_as_peft_refuses_it():
    theirs, ours = _pair()
    dora = dict(target_modules=["q_proj"], r=2, use_dora=True)
    theirs.add_adapter("dora", peft.LoraConfig(**dora))
    ours.add_adapter("dora", fastlora.LoraConfig(**dora))
    ids = tokens(batch=2)
    theirs.eval()  # PEFT refuses a mixed batch in training mode first
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
        theirs(input_ids=ids, adapter_names=["dora", "default"])
    before = snapshot(ours)
    for names in (["dora", "default"], ["dora", "dora"]):
        with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
            ours(input_ids=ids, adapter_names=names)
    assert_unchanged(ours, before)


def test_a_mixed_batch_while_the_layers_are_disabled_computes_the_base_model_as_peft():
    """Disabled, every row computes the base model, a modules_to_save module of a kind mixed batches do not take
    (a norm) included, as in PEFT, whose wrappers check the kind only when they compute a mixed batch."""
    base = tiny_llama(3)
    ids = tokens(3, 8)
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    for lib in (peft, fastlora):
        model = lib.get_peft_model(clone(base), lib.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                init_lora_weights=False, modules_to_save=["norm"]))
        model.eval().disable_adapter_layers()
        with torch.no_grad():
            logits = model(input_ids=ids, adapter_names=["default", "default", "__base__"]).logits
        assert_close(logits, expected, kind="same_math", msg=lib.__name__)
        model.enable_adapter_layers()
        with pytest.raises(TypeError, match="Mixed batching is only supported"):
            model(input_ids=ids, adapter_names=["default", "default", "__base__"])

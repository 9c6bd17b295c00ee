"""Every bad call a user can make, in one table: the exception type, a fragment of its message, and a
model (state dict and each parameter's requires_grad) unchanged afterwards."""

import json
import math

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fastlora import LoraConfig, LoraModel, LoRALinear, UnsupportedFeatureError, get_peft_model, lora_linear
from fastlora.peft_format import CONFIG_NAME, WEIGHTS_NAME
from tests.models import assert_unchanged, clone, snapshot, tiny_llama, tokens

TARGETS = ["q_proj", "v_proj"]


def _args(K=6, N=4, r=2):
    return torch.randn(3, K), torch.randn(N, K), torch.randn(N), torch.randn(r, K), torch.randn(N, r)


def _functional(**changes):
    x, W, b, A, B = _args()
    kwargs = dict(x=x, weight=W, bias=b, lora_A=A, lora_B=B, scaling=2.0, dropout_p=0.1)
    kwargs.update(changes)
    return lambda ctx: lora_linear(**kwargs)


def _adapter_dir(tmp_path, base, edit=None, **config):
    """A saved adapter for ``base`` (rank 4 unless ``config`` says otherwise), then ``edit(path)``."""
    folder = tmp_path / "adapter"
    get_peft_model(clone(base), LoraConfig(target_modules=TARGETS, r=4, **config)).save_pretrained(folder)
    if edit is not None:
        edit(folder)
    return folder


def _edit_config(**fields):
    def edit(folder):
        data = json.loads((folder / CONFIG_NAME).read_text())
        data.update(fields)
        (folder / CONFIG_NAME).write_text(json.dumps(data))
    return edit


def _truncate(folder):
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 3])


def _shorten_magnitudes(folder):
    tensors = load_file(folder / WEIGHTS_NAME)
    key = next(k for k in tensors if k.endswith("q_proj.lora_magnitude_vector"))
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, folder / WEIGHTS_NAME)


def _load(edit=None, into="base", **config):
    def call(ctx):
        folder = _adapter_dir(ctx["tmp_path"], ctx["base"], edit, **config)
        if into == "base":
            return LoraModel.from_pretrained(ctx["model"], folder)
        return ctx["lora"].load_adapter(folder, adapter_name="second")
    return call


# (id, call(ctx), exception type, message fragment).  ctx: "model" (a plain tiny Llama), "lora" (a fastlora
# model of it), "base" (a copy to save adapters from), "tmp_path".
CASES = [
    # lora_linear's numbers
    ("dropout as a string", _functional(dropout_p="0.1"), TypeError, "dropout_p must be a real number"),
    ("scaling as a string", _functional(scaling="2"), TypeError, "scaling must be a real number"),
    ("dropout as a bool", _functional(dropout_p=True), TypeError, "dropout_p must be a real number"),
    ("scaling as a tensor", _functional(scaling=torch.tensor(2.0)), TypeError, "scaling must be a real number"),
    ("NaN scaling", _functional(scaling=math.nan), ValueError, "scaling must be finite"),
    ("infinite scaling", _functional(scaling=math.inf), ValueError, "scaling must be finite"),
    ("NaN dropout", _functional(dropout_p=math.nan), ValueError, "dropout_p must be finite"),
    ("dropout 1", _functional(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    ("training as a string", lambda ctx: lora_linear(*_args(), 1.0, training="yes"), TypeError, "training must be"),
    # lora_linear's tensors
    ("x of the wrong width", _functional(x=torch.randn(3, 5)), ValueError, "in_features=6"),
    ("factors of two ranks", _functional(lora_B=torch.randn(4, 3)), ValueError, "with one r"),
    ("integer x", _functional(x=torch.ones(3, 6, dtype=torch.long)), TypeError, "x must be a floating-point tensor"),
    ("x and weight dtypes differ", _functional(x=torch.randn(3, 6, dtype=torch.float64)), TypeError, "share one dtype"),
    ("factor dtypes differ", _functional(lora_A=torch.randn(2, 6, dtype=torch.float64)), TypeError, "lora_A and lora_B"),
    ("tensors on two devices", _functional(x=torch.randn(3, 6, device="meta")), ValueError, "one device"),
    ("weight not a tensor", _functional(weight=[[1.0]]), TypeError, "weight must be a torch.Tensor"),
    ("unknown backend", lambda ctx: lora_linear(*_args(), 1.0, backend="cuda"), ValueError, "backend must be one of"),
    # LoRALinear
    ("rank 0", lambda ctx: LoRALinear(16, 16, r=0), ValueError, "r must be an integer >= 1"),
    ("alpha as a string", lambda ctx: LoRALinear(16, 16, lora_alpha="8"), ValueError, "lora_alpha must be"),
    ("NaN layer dropout", lambda ctx: LoRALinear(16, 16, lora_dropout=math.nan), ValueError, "lora_dropout"),
    ("unknown init", lambda ctx: LoRALinear(16, 16, init_lora_weights="corda"), ValueError, "init_lora_weights"),
    ("from_linear of a conv", lambda ctx: LoRALinear.from_linear(nn.Conv1d(2, 2, 1)), TypeError, "needs an nn.Linear"),
    # LoraConfig
    ("config rank as a string", lambda ctx: LoraConfig(target_modules=TARGETS, r="8"), ValueError, "r must be"),
    ("config targets as a number", lambda ctx: LoraConfig(target_modules=5), TypeError, "target_modules"),
    ("config with an empty target list", lambda ctx: LoraConfig(target_modules=[]), ValueError, "target_modules must name"),
    ("config with lora_bias and PiSSA", lambda ctx: LoraConfig(target_modules=TARGETS, lora_bias=True,
                                                               init_lora_weights="pissa"),
     ValueError, "only supported with init_lora_weights=True or False"),
    ("default targets of an unknown architecture", lambda ctx: get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig()), ValueError, "no default targets for Sequential.*named 0"),
    ("unknown bias mode", lambda ctx: LoraConfig(target_modules=TARGETS, bias="some"), ValueError, "bias must be"),
    ("config dropout as a string", lambda ctx: LoraConfig(target_modules=TARGETS, lora_dropout="0.1"), ValueError, "lora_dropout"),
    ("DoRA flag as a string", lambda ctx: LoraConfig(target_modules=TARGETS, use_dora="yes"), ValueError, "use_dora must be"),
    ("unknown task", lambda ctx: LoraConfig(target_modules=TARGETS, task_type="GAME"), ValueError, "task_type"),
    # get_peft_model and the model's methods
    ("unknown target", lambda ctx: get_peft_model(ctx["model"], LoraConfig(target_modules=["query"])), ValueError, "matched no module"),
    ("non-Linear target", lambda ctx: get_peft_model(ctx["model"], LoraConfig(target_modules=["mlp"])), TypeError, "not nn.Linear"),
    ("DoRA on an embedding target", lambda ctx: get_peft_model(ctx["model"], LoraConfig(target_modules=["embed_tokens"], use_dora=True)), ValueError, "use_dora=True on an embedding target"),
    ("PEFT's config", lambda ctx: get_peft_model(ctx["model"], peft.LoraConfig(target_modules=TARGETS)), TypeError, "fastlora.LoraConfig"),
    ("applying twice", lambda ctx: get_peft_model(ctx["lora"].get_base_model(), LoraConfig(target_modules=TARGETS)), ValueError, "already has an adapter"),
    ("adapter name with a dot", lambda ctx: get_peft_model(ctx["model"], LoraConfig(target_modules=TARGETS), adapter_name="a.b"), ValueError, "without '.'"),
    ("adapter name that is an absolute path", lambda ctx: ctx["lora"].add_adapter("/tmp/x", LoraConfig(target_modules=TARGETS)), ValueError, "path separator"),
    ("adapter name with a folder in it", lambda ctx: ctx["lora"].add_adapter("a/b", LoraConfig(target_modules=TARGETS)), ValueError, "path separator"),
    ("adapter name of white space", lambda ctx: ctx["lora"].add_adapter(" ", LoraConfig(target_modules=TARGETS)), ValueError, "white space only"),
    ("the reserved adapter name", lambda ctx: ctx["lora"].add_adapter("__base__", LoraConfig(target_modules=TARGETS)), ValueError, "reserved"),
    ("adapter name too long for a folder", lambda ctx: ctx["lora"].add_adapter("x" * 300, LoraConfig(target_modules=TARGETS)), ValueError, "300 bytes"),
    ("loading under a path-like name", lambda ctx: ctx["lora"].load_adapter(_adapter_dir(ctx["tmp_path"], ctx["base"]), adapter_name="../up"), ValueError, "without '.'"),
    ("new model with a path-like name", lambda ctx: get_peft_model(ctx["model"], LoraConfig(target_modules=TARGETS), adapter_name="x/y"), ValueError, "path separator"),
    ("mixed adapter types", lambda ctx: get_peft_model(ctx["model"], LoraConfig(target_modules=TARGETS), mixed=True), NotImplementedError, "mixed=True"),
    ("unknown adapter", lambda ctx: ctx["lora"].set_adapter("nope"), ValueError, "not found"),
    ("deleting the last adapter", lambda ctx: ctx["lora"].delete_adapter("default"), ValueError, "only adapter"),
    ("adapter names as a string", lambda ctx: ctx["lora"].merge_and_unload(adapter_names="default"), TypeError, "list of strings"),
    ("saving into a file", lambda ctx: ctx["lora"].save_pretrained(ctx["tmp_path"] / "file.txt"), ValueError, "not a file"),
    # several adapters at once
    ("adapter_names shorter than the batch", lambda ctx: ctx["lora"](input_ids=tokens(batch=2), adapter_names=["default"]), ValueError, "Length of `adapter_names`"),
    ("adapter_names naming an unknown adapter", lambda ctx: ctx["lora"](input_ids=tokens(batch=2), adapter_names=["default", "nope"]), ValueError, "non-existing adapter"),
    ("adapter_names as one string", lambda ctx: ctx["lora"](input_ids=tokens(batch=2), adapter_names="default"), TypeError, "one per row"),
    ("several active adapters, one unknown", lambda ctx: ctx["lora"].base_model.set_adapter(["default", "nope"]), ValueError, "nope not found"),
    ("weighted adapter with too few weights", lambda ctx: ctx["lora"].add_weighted_adapter(["default"], [], "mix"), ValueError, "one weight per adapter"),
    ("weighted adapter of an unknown adapter", lambda ctx: ctx["lora"].add_weighted_adapter(["nope"], [1.0], "mix"), ValueError, "nope does not exist"),
    ("weighted adapter of an unknown type", lambda ctx: ctx["lora"].add_weighted_adapter(["default"], [1.0], "mix", combination_type="mean"), ValueError, "Invalid combination_type"),
    # PEFT features not supported yet
    # target_parameters
    ("target_parameters naming a missing parameter, nothing else adapted", lambda ctx: get_peft_model(ctx["model"], LoraConfig(target_modules=[], target_parameters=["experts.gate_up_proj"])), ValueError, r"entries \['experts.gate_up_proj'\] match no parameter"),
    ("target_parameters as one string", lambda ctx: LoraConfig(target_parameters="experts.gate_up_proj"), TypeError, "target_parameters must be a list"),
    ("target_parameters with dropout", lambda ctx: get_peft_model(ctx["model"], LoraConfig(target_parameters=["mlp.down_proj.weight"], lora_dropout=0.1)), ValueError, "does not work with lora_dropout=0.1"),
    ("target_parameters with DoRA", lambda ctx: get_peft_model(ctx["model"], LoraConfig(target_parameters=["mlp.down_proj.weight"], use_dora=True)), ValueError, "does not work with use_dora=True"),
    ("target_parameters of a 1-D parameter", lambda ctx: get_peft_model(ctx["model"], LoraConfig(target_parameters=["input_layernorm.weight"])), ValueError, "adapts 2-D and 3-D parameters"),
    ("a layer and its parameter both adapted", lambda ctx: get_peft_model(ctx["model"], LoraConfig(target_modules=["down_proj"], target_parameters=["mlp.down_proj.weight"])), ValueError, "not both"),
    ("trainable token ids outside the table", lambda ctx: get_peft_model(ctx["model"], LoraConfig(target_modules=TARGETS, trainable_token_indices=[1, 500])), ValueError, r"token ids \[500\] are outside its 128 rows"),
    ("trainable tokens on a LoRA-adapted embedding", lambda ctx: get_peft_model(ctx["model"], LoraConfig(target_modules=["embed_tokens"], trainable_token_indices=[1])), TypeError, "must be an embedding table that target_modules does not adapt"),
    # adapter files
    ("adapter of another rank", _load(_edit_config(r=8)), ValueError, "wrong rank or a different base model"),
    ("adapter of another model", lambda ctx: LoraModel.from_pretrained(ctx["model"], _adapter_dir(ctx["tmp_path"], tiny_llama(hidden_size=32, intermediate_size=48))), ValueError, "shape"),
    ("truncated weights", _load(_truncate), ValueError, "not a readable safetensors file"),
    ("corrupt config", _load(lambda f: (f / CONFIG_NAME).write_text("{not json")), ValueError, "not valid JSON"),
    ("config rank as a string", _load(_edit_config(r="4")), ValueError, "invalid field"),
    ("config with an unknown set field", _load(_edit_config(future_feature={"on": True})), UnsupportedFeatureError, "future_feature"),
    ("config of another method", _load(_edit_config(peft_type="IA3")), UnsupportedFeatureError, "not a LoRA adapter"),
    ("config turning on DoRA without magnitudes", _load(_edit_config(use_dora=True)), ValueError, "missing keys: base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"),
    ("DoRA magnitude of the wrong length", _load(_shorten_magnitudes, use_dora=True), ValueError, r"lora_magnitude_vector has shape \(63,\), the model needs \(64,\)"),
    ("DoRA magnitudes in a LoRA adapter", _load(_edit_config(use_dora=False), use_dora=True), ValueError, "keys the model has no place for"),
    ("magnitude of the wrong length", _functional(magnitude=torch.ones(5)), ValueError, r"magnitude must have shape \(4,\)"),
    ("magnitude of another dtype", _functional(magnitude=torch.ones(4, dtype=torch.float64)), TypeError, "magnitude must have the adapters' dtype"),
    ("weights file missing", _load(lambda f: (f / WEIGHTS_NAME).unlink()), ValueError, "does not exist"),
    ("loading a second adapter of another rank", _load(_edit_config(r=8), into="lora"), ValueError, "wrong rank"),
    ("a path that does not exist", lambda ctx: LoraModel.from_pretrained(ctx["model"], ctx["tmp_path"] / "no" / "where"), ValueError, "neither a local directory nor a valid Hub"),
    ("a path that is a file", lambda ctx: LoraModel.from_pretrained(ctx["model"], __file__), ValueError, "is a file"),
]


@pytest.mark.parametrize("call, error, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_call_is_refused_and_changes_nothing(call, error, match, tmp_path):
    base = tiny_llama()
    ctx = {"base": base, "model": clone(base), "tmp_path": tmp_path,
           "lora": get_peft_model(clone(base), LoraConfig(target_modules=TARGETS, r=4))}
    (tmp_path / "file.txt").write_text("x")
    before = {name: snapshot(ctx[name]) for name in ("model", "lora")}
    with pytest.raises(error, match=match):
        call(ctx)
    for name in ("model", "lora"):
        assert_unchanged(ctx[name], before[name])


def test_the_table_is_long_enough():
    assert len(CASES) >= 30


def test_merging_twice_and_unmerging_unmerged_warn_as_peft():
    fm = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS))
    fm.merge_adapter()
    with pytest.warns(UserWarning, match="already merged"):
        fm.merge_adapter()
    fm.unmerge_adapter()
    with pytest.warns(UserWarning, match="Already unmerged"):
        fm.unmerge_adapter()


def test_from_linear_defaults_as_the_constructor():
    linear = nn.Linear(16, 16)
    layer, direct = LoRALinear.from_linear(linear, r=4), LoRALinear(16, 16, r=4)
    assert (layer.r, layer.lora_alpha, layer.scaling) == (direct.r, direct.lora_alpha, direct.scaling) == (4, 8, 2.0)
    assert LoRALinear.from_linear(nn.Linear(4, 4)).r == 8


class _PackedLinear(nn.Linear):
    """A quantized Linear of a kind fastlora does not adapt (an nn.Linear subclass whose weight holds packed uint8
    codes, not bitsandbytes'; those are adapted: tests/test_qlora.py)."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.weight = nn.Parameter(torch.zeros(linear.out_features * linear.in_features // 2, 1, dtype=torch.uint8),
                                   requires_grad=False)


@pytest.mark.parametrize("targets", [["q_proj"], "all-linear"], ids=["named", "all-linear"])
def test_a_quantized_linear_target_is_refused_by_name_and_changes_nothing(targets):
    model = tiny_llama()
    attention = model.model.layers[0].self_attn
    attention.q_proj = _PackedLinear(attention.q_proj)
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"model\.layers\.0\.self_attn\.q_proj \(_PackedLinear: a quantized layer of a kind fastlora does not adapt"):
        get_peft_model(model, LoraConfig(target_modules=targets))
    assert_unchanged(model, before)
    assert type(model.model.layers[0].self_attn.q_proj) is _PackedLinear


class _QuantizedWeight(torch.Tensor):
    """int8 codes and one scale per row, read as float32 through a dispatch of its own, as torchao's quantized
    weights are (only detach, clone and a view of its bytes are implemented here: nothing else may be called on
    it)."""

    @staticmethod
    def __new__(cls, codes, scale):
        return torch.Tensor._make_wrapper_subclass(cls, codes.shape, dtype=torch.float32, device=codes.device)

    def __init__(self, codes, scale):
        self.codes, self.scale = codes, scale

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.detach.default, torch.ops.aten.clone.default):
            return cls(func(args[0].codes), func(args[0].scale))
        if func is torch.ops.aten.view.dtype and args[1] is torch.uint8:  # its bytes (tests.models.same_bytes)
            return torch.cat([args[0].codes.view(torch.uint8).flatten(), args[0].scale.view(torch.uint8).flatten()])
        raise NotImplementedError(f"{cls.__name__} does not implement {func}")

    @classmethod
    def of(cls, weight):
        scale = weight.detach().abs().amax(1, keepdim=True) / 127
        return nn.Parameter(cls(torch.round(weight.detach() / scale).to(torch.int8), scale), requires_grad=False)


@pytest.mark.parametrize("targets", [["q_proj"], "all-linear"], ids=["named", "all-linear"])
def test_a_linear_whose_weight_has_a_dispatch_of_its_own_is_refused_by_name_and_changes_nothing(targets):
    model = tiny_llama()
    attention = model.model.layers[0].self_attn
    attention.q_proj.weight = _QuantizedWeight.of(attention.q_proj.weight)
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"model\.layers\.0\.self_attn\.q_proj \(Linear: its weight is a _QuantizedWeight, "
                                        r"a tensor subclass with operations of its own, whose elements"):
        get_peft_model(model, LoraConfig(target_modules=targets))
    assert_unchanged(model, before)
    assert type(attention.q_proj) is nn.Linear and type(attention.q_proj.weight) is _QuantizedWeight


def test_a_convolution_target_is_refused_with_the_reason_and_changes_nothing():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 5, 5))
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"0 \(Conv2d: a convolution: not adapted\)"):
        get_peft_model(model, LoraConfig(target_modules=["0", "2"]))
    assert_unchanged(model, before)


def test_saving_never_writes_outside_the_save_directory(tmp_path):
    """An adapter folder that is a link to somewhere else is refused before anything is written."""
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS, r=4))
    model.add_adapter("other", LoraConfig(target_modules=TARGETS, r=4))
    outside, save = tmp_path / "outside", tmp_path / "save"
    outside.mkdir()
    save.mkdir()
    (save / "other").symlink_to(outside)
    with pytest.raises(ValueError, match="outside"):
        model.save_pretrained(save)
    assert list(outside.iterdir()) == [] and sorted(p.name for p in save.iterdir()) == ["other"]


def test_saved_files_get_the_mode_open_gives(tmp_path):
    import os
    import stat

    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS, r=4))
    old = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path)
    finally:
        os.umask(old)
    for name in (WEIGHTS_NAME, CONFIG_NAME, "README.md"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


# QLoRA: bad calls on bitsandbytes 4-bit / 8-bit models (on the CPU).  Each case: (name, prepare(ctx, monkeypatch)
# run before the snapshot, the call, the exception type, a fragment of its message).
QLORA_CONFIG = dict(task_type="CAUSAL_LM", target_modules=["q_proj", "down_proj"], r=4, lora_alpha=8)


def _qlora_model(ctx, quant, **config):
    from fastlora import get_peft_model as fastlora_get_peft_model
    from tests.models import load_quantized
    from tests.test_qlora import QUANT

    return fastlora_get_peft_model(load_quantized(ctx["checkpoint"], **QUANT[quant]),
                                   LoraConfig(**{**QLORA_CONFIG, "init_lora_weights": False, **config}))


def _huge_factors(quant, value=1e3, only=""):
    """A QLoRA model whose factors (those of the modules named with ``only``) are all ``value``."""
    def prepare(ctx, monkeypatch):
        ctx["lora"] = _qlora_model(ctx, quant)
        with torch.no_grad():
            for name, param in ctx["lora"].named_parameters():
                if "lora_" in name and only in name:
                    param.fill_(value)
    return prepare


def _old_bitsandbytes(ctx, monkeypatch):
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "__version__", "0.45.5")


def _bitsandbytes_unimportable(ctx, monkeypatch):
    import fastlora.quantized

    def fail():
        raise ImportError("No module named 'bitsandbytes'")
    monkeypatch.setattr(fastlora.quantized, "_bnb", fail)


def _another_shape(ctx, monkeypatch):
    from tests.models import load_quantized
    from tests.test_qlora import QUANT

    folder = ctx["tmp_path"] / "other-shape"
    tiny_llama(hidden_size=32, intermediate_size=48).save_pretrained(folder / "base")
    get_peft_model(load_quantized(folder / "base", **QUANT["nf4-fp32"]), LoraConfig(**QLORA_CONFIG)).save_pretrained(
        folder / "adapter")
    ctx["adapter"] = folder / "adapter"


def _quantized_head(**quantization):
    def prepare(ctx, monkeypatch):
        from tests.models import load_quantized
        from tests.test_qlora import QUANT

        # a skip list without lm_head: transformers quantizes the head too
        ctx["model"] = load_quantized(ctx["checkpoint"], **QUANT["nf4-fp32"], llm_int8_skip_modules=["q_proj"],
                                      **quantization)
    return prepare


QLORA_CASES = [
    ("bitsandbytes older than the QLoRA floor", _old_bitsandbytes, lambda ctx: get_peft_model(ctx["model"], LoraConfig(**QLORA_CONFIG)), TypeError, r"q_proj \(Linear4bit: bitsandbytes 0\.45\.5 is installed; fastlora's QLoRA needs bitsandbytes>=0\.46"),
    ("bitsandbytes that cannot be imported", _bitsandbytes_unimportable, lambda ctx: get_peft_model(ctx["model"], LoraConfig(**QLORA_CONFIG)), TypeError, r"bitsandbytes cannot be imported .*needs bitsandbytes>=0\.46"),
    ("lora_dropout out of range on a 4-bit model", None, lambda ctx: get_peft_model(ctx["model"], LoraConfig(**{**QLORA_CONFIG, "lora_dropout": 1.0})), ValueError, r"lora_dropout must be a number in \[0, 1\)"),
    ("a 4-bit layer in modules_to_save", _quantized_head(), lambda ctx: get_peft_model(ctx["model"], LoraConfig(**{**QLORA_CONFIG, "modules_to_save": ["lm_head"]})), TypeError, r"modules_to_save module 'lm_head' \(Linear4bit\) holds quantized weights \(Linear4bit\), which cannot be trained: .*llm_int8_skip_modules"),
    ("a 4-bit layer stored in bf16 in modules_to_save", _quantized_head(bnb_4bit_quant_storage=torch.bfloat16), lambda ctx: get_peft_model(ctx["model"], LoraConfig(**{**QLORA_CONFIG, "modules_to_save": ["lm_head"]})), TypeError, r"modules_to_save module 'lm_head' \(Linear4bit\) holds quantized weights"),
    ("r of zero on a 4-bit model", None, lambda ctx: get_peft_model(ctx["model"], LoraConfig(**{**QLORA_CONFIG, "r": 0})), ValueError, "r must be an integer >= 1"),
    ("a QLoRA adapter of another model's shape", _another_shape, lambda ctx: LoraModel.from_pretrained(ctx["model"], ctx["adapter"]), ValueError, r"does not match the model: .*down_proj\.lora_A\.weight has shape \(4, 48\), the model needs \(4, 96\)"),
    # only the last layer merged would overflow: every layer is checked before any is merged
    ("a merge past a 4-bit layer's float16 range", _huge_factors("fp4-double-fp16", only="layers.1.mlp.down_proj"), lambda ctx: ctx["lora"].merge_and_unload(), ValueError, r"into model\.layers\.1\.mlp\.down_proj: the merged weight reaches 8e\+06, beyond torch\.float16's range \(6\.55e\+04\) in which the 4-bit layer holds it: requantizing would overflow; nothing was merged"),
    ("a merge past an 8-bit layer's float16 range", _huge_factors("int8"), lambda ctx: ctx["lora"].merge_adapter(), ValueError, "requantizing would overflow; nothing was merged"),
    ("a merge of an Inf adapter into a 4-bit layer", _huge_factors("nf4-fp32", math.inf), lambda ctx: ctx["lora"].merge_adapter(), ValueError, "the merged weight holds NaN or Inf; nothing was merged"),
    ("a layer's own merge past its float16 range", _huge_factors("fp4-double-fp16"), lambda ctx: ctx["lora"].get_base_model().model.layers[0].mlp.down_proj.merge(), ValueError, r"cannot merge adapter\(s\) \['default'\]: .*requantizing would overflow"),
]


@pytest.fixture(scope="module")
def quantized_checkpoint(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(directory)
    return directory


@pytest.mark.parametrize("prepare, call, error, match", [c[1:] for c in QLORA_CASES], ids=[c[0] for c in QLORA_CASES])
def test_bad_qlora_call_is_refused_and_changes_nothing(prepare, call, error, match, quantized_checkpoint, tmp_path,
                                                       monkeypatch):
    from tests.models import load_quantized
    from tests.test_qlora import QUANT

    ctx = {"checkpoint": quantized_checkpoint, "tmp_path": tmp_path,
           "model": load_quantized(quantized_checkpoint, **QUANT["nf4-fp32"])}
    if prepare is not None:
        prepare(ctx, monkeypatch)
    watched = [name for name in ("model", "lora") if name in ctx]
    before = {name: snapshot(ctx[name]) for name in watched}
    with pytest.raises(error, match=match):
        call(ctx)
    for name in watched:
        assert_unchanged(ctx[name], before[name])


@pytest.mark.parametrize("state, match", [
    ("on the meta device", r"q_proj \(Linear4bit: a bitsandbytes Linear4bit whose weight is on the meta device \(not "
                           r"loaded, no quantization state\)"),
    ("not quantized yet", r"q_proj \(Linear4bit: a bitsandbytes Linear4bit whose weight is not quantized yet \(no "
                          r"quantization state; .*\): call \.to\(device\) on the layer"),
])
def test_a_quantized_layer_without_its_quantization_state_is_refused_by_name_and_changes_nothing(
        quantized_checkpoint, state, match):
    """A bitsandbytes 4-bit layer with no quantization state to read: its weight not loaded (on the meta device), or
    not quantized yet (built, never moved to a device: bitsandbytes' own forward would fail with a bare assert)."""
    import bitsandbytes as bnb
    from accelerate import init_empty_weights

    from tests.models import load_quantized
    from tests.test_qlora import QUANT

    model = load_quantized(quantized_checkpoint, **QUANT["nf4-fp32"])
    if state == "on the meta device":
        with init_empty_weights():
            unloaded = bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4")
    else:
        unloaded = bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4")
    model.model.layers[0].self_attn.q_proj = unloaded
    types = [(name, type(m)) for name, m in model.named_modules()]
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with pytest.raises(TypeError, match=match):
        get_peft_model(model, LoraConfig(**QLORA_CONFIG))
    assert model.model.layers[0].self_attn.q_proj is unloaded
    assert [(name, type(m)) for name, m in model.named_modules()] == types
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags

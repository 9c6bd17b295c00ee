"""LoftQ: init_lora_weights="loftq" on a full-precision model and replace_lora_weights_loftq on a 4-bit one,
compared with PEFT's own functions run on the CPU (PEFT computes LoftQ on CUDA only: its source is run with the
device changed, nothing else), and what LoftQ is for: the adapter absorbs the quantization error."""

import inspect
import textwrap
import warnings

import peft
import pytest
import torch

import fastlora
from fastlora import LoftQConfig, replace_lora_weights_loftq
from tests.models import PEFT_BEFORE_0_22, assert_unchanged, clone, load_quantized, snapshot, tiny_llama, tiny_mixtral, tokens
from tests.tolerances import assert_close

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture
def peft_loftq_on_cpu(monkeypatch):
    """PEFT's LoftQ functions with their hard-coded CUDA device replaced by the CPU (PEFT 0.22 computes on the
    device it finds: told the CPU)."""
    from peft.tuners.lora import layer as peft_layer
    from peft.utils import loftq_utils

    for name in ("loftq_init", "_loftq_init_new"):
        source = textwrap.dedent(inspect.getsource(getattr(loftq_utils, name)))
        if not PEFT_BEFORE_0_22:
            assert '"cuda"' not in source and "infer_device()" in source
            monkeypatch.setattr(loftq_utils, "infer_device", lambda: "cpu")
            continue
        assert source.count('"cuda"') == 1
        namespace = dict(vars(loftq_utils))
        exec(compile(source.replace('"cuda"', '"cpu"'), loftq_utils.__file__, "exec"), namespace)
        monkeypatch.setattr(loftq_utils, name, namespace[name])
    monkeypatch.setattr(peft_layer, "loftq_init", loftq_utils.loftq_init)


def _config(library, bits=4, iterations=1, **changes):
    settings = {"target_modules": TARGETS, "r": 4, "lora_alpha": 4, **changes}
    loftq = {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": bits, "loftq_iter": iterations}}
    if library is fastlora:
        return fastlora.LoraConfig(**settings, **loftq)
    config = peft.LoraConfig(**settings)  # PEFT's constructor asks for scipy with "loftq", which LoftQ never uses
    for field, value in loftq.items():
        setattr(config, field, value)
    return config


@pytest.mark.parametrize("bits,iterations,dtype", [(4, 1, torch.float32), (4, 3, torch.float32),
                                                   (8, 2, torch.float32), (4, 2, torch.bfloat16)],
                         ids=["nf4", "nf4-3-iterations", "int8-2-iterations", "nf4-bf16"])
def test_loftq_initialisation_is_peft_s(peft_loftq_on_cpu, bits, iterations, dtype):
    base = tiny_llama().to(dtype)
    theirs = peft.get_peft_model(clone(base), _config(peft, bits, iterations))
    ours = fastlora.get_peft_model(clone(base), _config(fastlora, bits, iterations))
    for name, layer in ours.lora_layers():
        their_layer = theirs.base_model.model.get_submodule(name)
        A, B = layer.lora_factors("default")
        assert torch.equal(A, their_layer.lora_A["default"].weight), name
        assert torch.equal(B, their_layer.lora_B["default"].weight), name
        assert torch.equal(layer.weight, their_layer.get_base_layer().weight), name  # the quantized W
    ids = tokens()
    with torch.no_grad():
        assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, kind="same_math")


def test_an_embedding_target_takes_the_default_initialisation_under_loftq(peft_loftq_on_cpu):
    """LoftQ initialises Linear layers; an embedding among the targets keeps its table and takes the default
    initialisation (A = 0, B normal), as in PEFT since 0.22 (0.21 failed with a bare TypeError)."""
    base = tiny_llama()
    targets = ["q_proj", "embed_tokens"]
    torch.manual_seed(0)
    ours = fastlora.get_peft_model(clone(base), _config(fastlora, target_modules=targets))
    embedding = ours.base_model.model.model.embed_tokens
    A, B = embedding.lora_factors("default")
    assert not A.any() and B.any()
    assert torch.equal(embedding.weight, base.model.embed_tokens.weight)
    assert not torch.equal(ours.base_model.model.model.layers[0].self_attn.q_proj.weight,
                           base.model.layers[0].self_attn.q_proj.weight)  # the Linear's W quantized
    if PEFT_BEFORE_0_22:
        return
    torch.manual_seed(0)
    theirs = peft.get_peft_model(clone(base), _config(peft, target_modules=targets))
    their_embedding = theirs.base_model.model.model.embed_tokens
    assert torch.equal(A, their_embedding.lora_embedding_A["default"])
    assert torch.equal(B, their_embedding.lora_embedding_B["default"])


@pytest.mark.parametrize("bits", [4, 8])
def test_the_adapter_absorbs_the_quantization_error(bits):
    import bitsandbytes as bnb

    base = tiny_llama()
    ours = fastlora.get_peft_model(clone(base), _config(fastlora, bits, 2))
    for name, layer in ours.lora_layers():
        W = base.get_submodule(name).weight
        A, B = layer.lora_factors("default")
        if bits == 4:  # the base keeps W's NF4 values (first iteration: W itself quantized) ...
            packed = bnb.nn.Params4bit(W.detach().clone(), requires_grad=False, compress_statistics=False,
                                       quant_type="nf4").to("cpu")
            plain = bnb.functional.dequantize_4bit(packed.data, packed.quant_state)
        else:
            packed = bnb.nn.Int8Params(W.detach().clone(), requires_grad=False).to("cpu")
            plain = bnb.functional.int8_vectorwise_dequant(packed.data, packed.SCB)
        # ... and the adapter (scaling 1 here) takes up much of the error: closer to W than quantization alone
        assert torch.linalg.norm(W - layer.weight - B @ A) < 0.9 * torch.linalg.norm(W - plain), name


def test_replace_lora_weights_loftq_is_peft_s_and_keeps_the_quantized_weight(peft_loftq_on_cpu, tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    quantization = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(load_quantized(tmp_path, **quantization),
                                     peft.LoraConfig(target_modules=TARGETS, r=4))
        ours = fastlora.get_peft_model(load_quantized(tmp_path, **quantization),
                                       fastlora.LoraConfig(target_modules=TARGETS, r=4))
    packed = {name: layer.base_layer.weight.data.clone() for name, layer in ours.lora_layers()}
    peft.replace_lora_weights_loftq(theirs, model_path=str(tmp_path))  # PEFT finds only Hub models by itself
    replace_lora_weights_loftq(ours)  # the base's name_or_path: a local directory here
    for name, layer in ours.lora_layers():
        their_layer = theirs.base_model.model.get_submodule(name)
        A, B = layer.lora_factors("default")
        assert torch.equal(A, their_layer.lora_A["default"].weight), name
        assert torch.equal(B, their_layer.lora_B["default"].weight), name
        assert torch.equal(layer.base_layer.weight.data, packed[name])

    # a callback that refuses one layer keeps that layer's factors; the file may be named, or sharded
    again = fastlora.get_peft_model(load_quantized(tmp_path, **quantization),
                                    fastlora.LoraConfig(target_modules=TARGETS, r=4))
    first = again.base_model.model.model.layers[0].self_attn.q_proj
    kept = [t.clone() for t in first.lora_factors("default")]
    seen = []

    def refuse_the_first(model, name):
        seen.append(name)
        return name != "model.layers.0.self_attn.q_proj"

    replace_lora_weights_loftq(again, model_path=str(tmp_path / "model.safetensors"), callback=refuse_the_first)
    assert len(seen) == 6
    assert all(torch.equal(a, b) for a, b in zip(first.lora_factors("default"), kept))
    second = again.base_model.model.model.layers[1].self_attn.q_proj
    assert torch.equal(second.lora_factors("default")[0], ours.base_model.model.model.layers[1].self_attn.q_proj.lora_A)

    tiny_llama().save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    sharded = fastlora.get_peft_model(load_quantized(tmp_path, **quantization),
                                      fastlora.LoraConfig(target_modules=TARGETS, r=4))
    replace_lora_weights_loftq(sharded, model_path=str(tmp_path / "sharded"))
    for (_, layer), (_, twin) in zip(sharded.lora_layers(), ours.lora_layers()):
        assert torch.equal(layer.lora_factors("default")[0], twin.lora_factors("default")[0])


def test_replace_lora_weights_loftq_says_what_is_missing(tmp_path):
    dense = fastlora.get_peft_model(tiny_llama(), fastlora.LoraConfig(target_modules=TARGETS, r=4))
    with pytest.raises(ValueError, match="No bnb LoRA module found"):
        replace_lora_weights_loftq(dense)
    tiny_llama().save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fastlora.get_peft_model(load_quantized(tmp_path, load_in_4bit=True),
                                        fastlora.LoraConfig(target_modules=TARGETS, r=4))
    with pytest.raises(ValueError, match="no safetensors checkpoint of the model at .*nowhere"):
        replace_lora_weights_loftq(model, model_path=str(tmp_path / "nowhere"))


def test_loftq_refusals_leave_the_model_unchanged(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = load_quantized(tmp_path, load_in_4bit=True, llm_int8_skip_modules=["q_proj", "lm_head"])
    for model, config, error, match in [
        (quantized, _config(fastlora), TypeError, "replace_lora_weights_loftq"),
        (tiny_mixtral(), _config(fastlora, target_modules=["q_proj"], target_parameters=["experts.gate_up_proj"]),
         fastlora.UnsupportedFeatureError, "target_parameters"),
    ]:
        before = snapshot(model)
        with pytest.raises(error, match=match):
            fastlora.get_peft_model(model, config)
        assert_unchanged(model, before)


def test_loftq_config_is_checked_and_kept_as_peft_keeps_it():
    assert _config(fastlora).loftq_config == {"loftq_bits": 4, "loftq_iter": 1}
    config = fastlora.LoraConfig(target_modules=TARGETS, init_lora_weights="loftq", loftq_config=LoftQConfig(8, 2))
    assert config.loftq_config == {"loftq_bits": 8, "loftq_iter": 2} and config.to_dict()["loftq_config"] == {
        "loftq_bits": 8, "loftq_iter": 2}
    with pytest.raises(ValueError, match="`loftq_config` must be specified"):
        fastlora.LoraConfig(target_modules=TARGETS, init_lora_weights="loftq")
    with pytest.raises(ValueError, match="loftq_bits must be 4"):
        fastlora.LoraConfig(target_modules=TARGETS, init_lora_weights="loftq", loftq_config={"loftq_bits": 2})
    with pytest.warns(UserWarning, match="`loftq_config` specified but will be ignored"):
        ignored = fastlora.LoraConfig(target_modules=TARGETS, loftq_config={"loftq_bits": 4})
    assert ignored.loftq_config == {}

"""Small models built from configs (nothing downloaded) and PEFT-side helpers shared by the tests."""

import copy
from importlib.metadata import version

import torch
from packaging.version import Version

# The PEFT these tests compare with: 0.21 and 0.22 differ where fastlora follows 0.22 (modules_to_save entries,
# the order adapters are created in, "all-linear" on mixture-of-experts models), and files of both must load.
PEFT_BEFORE_0_22 = Version(version("peft")) < Version("0.22")

SEED_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64, **overrides,
    })
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0, **overrides):
    """A small GPT-2 (transformers' Conv1D layers), no dropout, in eval mode; ``overrides`` change its config."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(**{
        "vocab_size": 64, "n_positions": 32, "n_embd": 32, "n_layer": 2, "n_head": 2, "bos_token_id": 0,
        "eos_token_id": 0, "attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, **overrides,
    })
    return GPT2LMHeadModel(config).eval()


def tiny_mixtral(seed: int = 0):
    """A small Mixtral: transformers' experts module (4 experts, top 2) with its 3-D parameters."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    return MixtralForCausalLM(MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                            num_experts_per_tok=2))


def load_quantized(directory, dtype=None, **quantization):
    """The checkpoint in ``directory`` loaded by transformers with ``BitsAndBytesConfig(**quantization)`` (and
    ``dtype`` where given), on the CPU.  bitsandbytes 0.50 repacks a 4-bit weight for its AVX512-BF16 CPU kernel on an inference forward and keeps
    the old quantization state beside it, so the next forward fails (PEFT's models as much as fastlora's): the
    model runs the portable CPU kernel."""
    import warnings

    import bitsandbytes as bnb
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, quantization_config=transformers.BitsAndBytesConfig(**quantization),
            **({"dtype": dtype} if dtype is not None else {}))
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def tokens(batch=2, length=16, vocab=128, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def copy_lora_weights(peft_model, fastlora_model):
    """Give fastlora's layers PEFT's adapter values, every adapter of every layer: A and B (a Linear's
    ``lora_A.<name>.weight`` or an embedding's ``lora_embedding_A.<name>``) and, with lora_bias, B's bias."""
    state = peft_model.state_dict()
    with torch.no_grad():
        for name, layer in fastlora_model.lora_layers():
            embedding = getattr(type(layer), "PEFT_FACTOR_KEYS", None) is not None
            for adapter in layer.adapter_names:
                A, B = layer.lora_factors(adapter)
                prefix = f"base_model.model.{name}"
                if embedding:
                    A.copy_(state[f"{prefix}.lora_embedding_A.{adapter}"])
                    B.copy_(state[f"{prefix}.lora_embedding_B.{adapter}"])
                else:
                    A.copy_(state[f"{prefix}.lora_A.{adapter}.weight"])
                    B.copy_(state[f"{prefix}.lora_B.{adapter}.weight"])
                if layer.lora_bias(adapter) is not None:
                    layer.lora_bias(adapter).copy_(state[f"{prefix}.lora_B.{adapter}.bias"])


def _adapter_state(module):
    """The adapter bookkeeping of a fastlora module (or of a LoraModel), as plain values."""
    from fastlora import LoRALinear, LoraModel
    from fastlora.modules_to_save import ModulesToSaveWrapper

    if isinstance(module, LoRALinear):
        return (dict(module.adapter_settings), module.active_adapter, list(module.merged_adapters),
                module.adapter_enabled)
    if isinstance(module, ModulesToSaveWrapper):
        return (list(module.modules_to_save), module.active_adapter, module.adapter_enabled)
    if isinstance(module, LoraModel):
        return (dict(module.peft_config), module.active_adapter, module.adapters_enabled)
    return None


def snapshot(model):
    """Everything a failed operation must leave unchanged: module types, tensors, requires_grad, and the
    adapter state of fastlora's modules (configs, active adapter, merged adapters, enabled flags)."""
    return (
        [(n, type(m), _adapter_state(m)) for n, m in model.named_modules()],
        {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
    )


def assert_unchanged(model, before):
    modules, params = snapshot(model)
    assert modules == before[0]
    assert params.keys() == before[1].keys()
    for name, (value, flag) in params.items():
        assert same_bytes(value, before[1][name][0]) and flag == before[1][name][1], name


def same_bytes(a, b):
    """Equal dtypes, shapes and bytes: NaN is unchanged too (a 4-bit weight stored in a float dtype holds packed
    codes, some of them NaN patterns, that torch.equal calls unequal to themselves)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if hasattr(type(a), "__tensor_flatten__"):  # a tensor subclass (torchao's quantized weights): its inner tensors
        inner = a.__tensor_flatten__()[0]
        return type(a) is type(b) and inner == b.__tensor_flatten__()[0] and all(
            same_bytes(getattr(a, name), getattr(b, name)) for name in inner)
    if a.dim() == 0 or not a.is_floating_point():
        return torch.equal(a, b)
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def clone(model):
    return copy.deepcopy(model)


def peft_parameters(peft_model, fastlora_model):
    """(fastlora parameter, PEFT parameter) of every adapter of every fastlora layer: A, B and B's bias."""
    theirs = dict(peft_model.named_parameters())
    pairs = []
    for name, layer in fastlora_model.lora_layers():
        embedding = getattr(type(layer), "PEFT_FACTOR_KEYS", None) is not None
        prefix = f"base_model.model.{name}"
        for adapter in layer.adapter_names:
            A, B = layer.lora_factors(adapter)
            if embedding:
                pairs += [(A, theirs[f"{prefix}.lora_embedding_A.{adapter}"]),
                          (B, theirs[f"{prefix}.lora_embedding_B.{adapter}"])]
            else:
                pairs += [(A, theirs[f"{prefix}.lora_A.{adapter}.weight"]), (B, theirs[f"{prefix}.lora_B.{adapter}.weight"])]
            if layer.lora_bias(adapter) is not None:
                pairs.append((layer.lora_bias(adapter), theirs[f"{prefix}.lora_B.{adapter}.bias"]))
    return pairs


def assert_step_as_peft(peft_model, fastlora_model, ids, kind="same_math", grad_kind="same_math_max"):
    """One forward and backward of both models on ``ids``: logits within the ``kind`` tolerance and every adapter
    parameter's gradient within ``grad_kind``'s (tests/tolerances.py): a gradient is a sum through the model's
    depth, whose rounding follows the CPU's BLAS blocking (an Intel Xeon's put one element of a float32 gradient
    3.5e-5 off PEFT's, relative, where an AMD EPYC's stayed within 1e-5), so it is bounded relative to the
    tensor's largest magnitude."""
    from tests.tolerances import assert_close

    out_theirs = peft_model(input_ids=ids, labels=ids)
    out_ours = fastlora_model(input_ids=ids, labels=ids)
    assert_close(out_ours.logits, out_theirs.logits, kind=kind)
    out_theirs.loss.backward()
    out_ours.loss.backward()
    for ours, theirs in peft_parameters(peft_model, fastlora_model):
        if ours.requires_grad:
            assert_close(ours.grad, theirs.grad, kind=grad_kind)


def assert_converts_for_the_original_weight_as_peft(models, base, ids, directory):
    """PEFT's guide for an initialisation that changed the base weights, from its step "save the initial adapter"
    (``models``: {peft: PEFT's model, fastlora: fastlora's}, built the same way): the initial adapters saved
    saying ``init_lora_weights=True``, PEFT's factors moved as training would and fastlora given the same values,
    both saved converted for the original weight (``path_initial_model_for_weight_conversion``); the files are
    equal, and the converted adapter on the untouched ``base`` gives the trained logits in both libraries."""
    import peft
    from safetensors.torch import load_file

    import fastlora
    from tests.tolerances import assert_close

    for library, model in models.items():
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(directory / library.__name__ / "initial")
    with torch.no_grad():
        for _, param in sorted(models[peft].named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())) * 0.05)
    copy_lora_weights(models[peft], models[fastlora])
    with torch.no_grad():
        trained = models[fastlora](input_ids=ids).logits
        assert_close(trained, models[peft](input_ids=ids).logits, kind="same_math")
    for library, model in models.items():
        folder = directory / library.__name__
        model.save_pretrained(folder / "final", path_initial_model_for_weight_conversion=str(folder / "initial"))
    their_file = load_file(directory / "peft" / "final" / "adapter_model.safetensors")
    our_file = load_file(directory / "fastlora" / "final" / "adapter_model.safetensors")
    assert their_file.keys() == our_file.keys()
    for key in their_file:
        assert torch.equal(our_file[key], their_file[key]), key
    for library in (fastlora, peft):
        converted = library.PeftModel.from_pretrained(clone(base), directory / "fastlora" / "final")
        with torch.no_grad():
            assert_close(converted(input_ids=ids).logits, trained, kind="same_math_max")


def assert_refused_on_a_4bit_model(directory, call, error, match):
    """``call(model)`` on the tiny Llama saved in ``directory`` and loaded in nf4 raises ``error`` (matching
    ``match``) and leaves the model unchanged."""
    import pytest

    tiny_llama().save_pretrained(directory)
    model = load_quantized(directory, load_in_4bit=True, bnb_4bit_quant_type="nf4")
    before = snapshot(model)
    with pytest.raises(error, match=match):
        call(model)
    assert_unchanged(model, before)


def assert_factors_and_base_as_peft(theirs, ours, magnitude_kind=None):
    """Each of ``ours``' LoRA layers holds PEFT's A, B and base weight (a residual, rounded as PEFT rounds it) bit
    for bit; with ``magnitude_kind``, DoRA's magnitude within that tolerance."""
    from tests.tolerances import assert_close

    layers = dict(ours.lora_layers())
    assert len(layers) > 0
    for name, layer in layers.items():
        their_layer = theirs.base_model.model.get_submodule(name)
        A, B = layer.lora_factors("default")
        assert torch.equal(A, their_layer.lora_A["default"].weight), name
        assert torch.equal(B, their_layer.lora_B["default"].weight), name
        assert torch.equal(layer.weight, their_layer.get_base_layer().weight), name  # the residual, as PEFT rounds it
        if magnitude_kind:
            assert_close(layer.magnitude("default"), their_layer.lora_magnitude_vector["default"].weight,
                         kind=magnitude_kind)


def assert_dropout_as_peft(ours, theirs, base, p=0.3, scaling=2.0):
    """One quantized layer with dropout ``p`` (ours: fastlora's, in train mode; theirs: PEFT's of the same factors
    over a copy of ``base``): the output and the gradients of x, A and B equal PEFT's layer given fastlora's mask for
    the same seed; in eval mode, no dropout (base(x) + scaling · x Aᵀ Bᵀ)."""
    from fastlora import cpu_masks
    from fastlora.functional import SEED_HIGH
    from tests.tolerances import assert_close

    x = torch.randn(2, 5, base.in_features, requires_grad=True)
    torch.manual_seed(7)
    y_ours = ours(x)
    torch.manual_seed(7)
    seed = int(torch.randint(0, SEED_HIGH, (1,)))  # the seed the layer drew

    def masked(t):
        return t * cpu_masks.cpu_keep_mask(seed, (10, base.in_features), p, t.dtype).view(t.shape) / (1 - p)

    theirs.lora_dropout["default"] = type("SeededDropout", (torch.nn.Module,), {"forward": lambda self, t: masked(t)})()
    y_theirs = theirs(x)
    assert_close(y_ours, y_theirs, kind="same_math", dtype=torch.float32)
    dy = torch.randn_like(y_ours)
    g_ours = torch.autograd.grad(y_ours, (x, ours.lora_A, ours.lora_B), dy)
    g_theirs = torch.autograd.grad(y_theirs, (x, theirs.lora_A["default"].weight, theirs.lora_B["default"].weight), dy)
    for a, b in zip(g_ours, g_theirs):
        assert_close(a, b, kind="same_math", dtype=torch.float32)
    ours.eval()  # no dropout in eval mode
    assert_close(ours(x), base(x) + scaling * x @ ours.lora_A.t() @ ours.lora_B.t(), kind="same_math",
                 dtype=torch.float32)


def assert_biases_saved_and_loaded_as_peft(theirs, ours, load_base, directory, dtype):
    """PEFT's and fastlora's models of one config training biases: with the same trained biases, the state dicts are
    equal (keys and values) and each library's file, loaded by the other onto ``load_base()``, gives PEFT's logits
    (to ``dtype``'s tolerance).  Returns the state dict."""
    import fastlora
    import peft
    from tests.tolerances import assert_close

    with torch.no_grad():
        for model in (theirs, ours):
            for name, param in model.named_parameters():
                if name.endswith("bias") and param.requires_grad:
                    param.add_(0.5)  # a trained bias, the same in both
    saved = {lib.__name__: lib.get_peft_model_state_dict(model) for lib, model in ((peft, theirs), (fastlora, ours))}
    assert sorted(saved["fastlora"]) == sorted(saved["peft"]) and any("bias" in key for key in saved["peft"])
    for key, value in saved["peft"].items():
        assert torch.equal(saved["fastlora"][key], value), key
    ids = tokens()
    with torch.no_grad():
        expected = theirs.eval()(input_ids=ids).logits
    theirs.save_pretrained(directory / "peft")
    ours.save_pretrained(directory / "ours")
    for folder, lib in (("peft", fastlora), ("ours", peft)):
        loaded = lib.PeftModel.from_pretrained(load_base(), directory / folder).eval()
        with torch.no_grad():
            assert_close(loaded(input_ids=ids).logits, expected, kind="same_math", dtype=dtype, msg=folder)
    return saved["fastlora"]


def assert_all_linear_second_adapter_as_peft(theirs, ours, merged=False):
    """A second adapter with ``target_modules="all-linear"`` (after a merge of the first, with ``merged``): the layers
    adapted as PEFT's (counts, recorded targets), none nested inside an adapted quantized layer."""
    import fastlora
    import peft

    for model, lib in ((theirs, peft), (ours, fastlora)):
        if merged:
            model.merge_adapter()
        model.add_adapter("x1", lib.LoraConfig(target_modules="all-linear", r=2))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert not any(name.endswith("base_layer.base_layer") for name, _ in ours.named_modules())
    assert sorted(ours.peft_config["x1"].target_modules) == sorted(theirs.peft_config["x1"].target_modules)

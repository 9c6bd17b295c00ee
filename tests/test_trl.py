"""TRL's trainers with fastlora's LoraConfig (fastlora.trl_trainers): each trains fastlora's layers, and a run
matches the same run under PEFT's config from the same initial adapter (dropout 0): losses, and the saved
adapter or trained factors, to float32 rounding."""

import math
import os
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastlora
from fastlora import LoRALinear
from tests.models import SEED_TARGETS, copy_lora_weights, tiny_llama, tokens
from tests.tolerances import assert_close

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from fastlora import trl_trainers  # noqa: E402  (imports trl)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning")

CONFIG = dict(task_type="CAUSAL_LM", target_modules=SEED_TARGETS, r=8, lora_alpha=32, lora_dropout=0.0)


def _tokenizer():
    """A word-level tokenizer over tiny_llama's 128 ids (nothing downloaded): w0 … w123 and four specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(124)} | {"<pad>": 124, "<s>": 125, "</s>": 126, "<unk>": 127}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _dataset(n=16, words=12):
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(t)}" for t in torch.randint(0, 124, (words,), generator=g)) for _ in range(n)]
    return datasets.Dataset.from_dict({"text": texts})


def _args(output_dir, **changes):
    return trl.SFTConfig(**{**dict(output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=4,
                                   learning_rate=1e-2, logging_steps=1, bf16=False, report_to=[], save_strategy="no",
                                   max_length=16, seed=3), **changes})


def _trainer(trainer_class, config, output_dir, model=None, **changes):
    return trainer_class(model=model if model is not None else tiny_llama(), args=_args(output_dir, **changes),
                         train_dataset=_dataset(), processing_class=_tokenizer(), peft_config=config)


def _losses(trainer):
    return torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h])


def test_sft_trainer_trains_fastlora_layers_as_peft_would(tmp_path):
    theirs = _trainer(trl.SFTTrainer, peft.LoraConfig(**CONFIG, init_lora_weights=False), tmp_path / "peft")
    ours = _trainer(trl_trainers.SFTTrainer, fastlora.LoraConfig(**CONFIG), tmp_path / "fastlora")
    copy_lora_weights(theirs.model, ours.model)  # the same initial adapter (B ≠ 0)

    layers = [m for m in ours.model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 2 * len(SEED_TARGETS)
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in ours.model.modules())
    calls = []
    for layer in layers:
        layer.register_forward_hook(lambda *_: calls.append(1))
    for trainer in (theirs, ours):
        trainer.train()
    assert len(calls) >= 4 * len(layers)  # fastlora's layers ran every step

    assert len(_losses(ours)) == 4
    assert_close(_losses(ours), _losses(theirs), kind="same_math")
    for trainer, name in ((theirs, "peft"), (ours, "fastlora")):
        trainer.save_model(str(tmp_path / name))
    saved = {name: load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in ("peft", "fastlora")}
    assert saved["fastlora"].keys() == saved["peft"].keys()
    for key, value in saved["fastlora"].items():
        assert_close(value, saved["peft"][key], kind="same_math", msg=key)

    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "fastlora"))
    ids = tokens()
    assert_close(reloaded(input_ids=ids).logits, ours.model.eval()(input_ids=ids).logits, kind="same_math")


def test_a_model_id_is_loaded_as_trl_loads_it(tmp_path):
    """A model given by path: TRL's loader with args.model_init_kwargs (dtype), then fastlora's layers."""
    tiny_llama().save_pretrained(tmp_path / "base")
    trainer = _trainer(trl_trainers.SFTTrainer, fastlora.LoraConfig(**CONFIG), tmp_path / "out",
                       model=str(tmp_path / "base"), model_init_kwargs={"dtype": "bfloat16"})
    q_proj = trainer.model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoRALinear)
    assert q_proj.weight.dtype == torch.bfloat16 and q_proj.lora_A.dtype == torch.float32  # PEFT's autocast
    trainer.train()
    assert len(_losses(trainer)) == 4 and torch.isfinite(_losses(trainer)).all()


def test_a_peft_config_keeps_trl_behaviour(tmp_path):
    trainer = _trainer(trl_trainers.SFTTrainer, peft.LoraConfig(**CONFIG), tmp_path)
    assert any(isinstance(m, peft.tuners.lora.LoraLayer) for m in trainer.model.modules())
    assert not any(isinstance(m, LoRALinear) for m in trainer.model.modules())


def test_chat_template_path_is_refused_with_a_fastlora_config(tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    model = tiny_llama()
    with pytest.raises(ValueError, match="chat_template_path with fastlora's LoraConfig"):
        _trainer(trl_trainers.SFTTrainer, fastlora.LoraConfig(**CONFIG), tmp_path, model=model,
                 chat_template_path=str(template))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


@pytest.mark.parametrize("options", [dict(target_modules=["q_proj", "lm_head"]),
                                     dict(target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True)])
def test_an_adapter_on_the_head_is_refused_as_trl_refuses_peft_s(options, tmp_path):
    """TRL's loss reads lm_head.weight directly: an adapter there (or the embeddings' one tied to it) would never
    train, and TRL refuses PEFT's; the model given is left as it was."""
    with pytest.raises(ValueError, match="Applying a PEFT adapter to `lm_head` is not supported"):
        _trainer(trl.SFTTrainer, peft.LoraConfig(**options), tmp_path, model=tiny_llama(tie_word_embeddings=True))
    model = tiny_llama(tie_word_embeddings=True)
    with pytest.raises(ValueError, match="Applying a PEFT adapter to `lm_head` is not supported"):
        _trainer(trl_trainers.SFTTrainer, fastlora.LoraConfig(**options), tmp_path, model=model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    adapted = fastlora.get_peft_model(tiny_llama(tie_word_embeddings=True), fastlora.LoraConfig(**options))
    with pytest.raises(ValueError, match="Applying a PEFT adapter to `lm_head` is not supported"):
        _trainer(trl_trainers.DPOTrainer, None, tmp_path, model=adapted)


def test_every_trainer_is_trls_subclass_with_its_signature():
    import inspect

    for name in ("SFTTrainer", "DPOTrainer", "GRPOTrainer", "KTOTrainer", "RLOOTrainer", "RewardTrainer"):
        ours, theirs = getattr(trl_trainers, name), getattr(trl, name)
        assert issubclass(ours, theirs) and ours.__name__ == name
        assert inspect.signature(ours.__init__) == inspect.signature(theirs.__init__)


def test_the_saved_folder_is_an_adapter_folder(tmp_path):
    trainer = _trainer(trl_trainers.SFTTrainer, fastlora.LoraConfig(**CONFIG), tmp_path)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    files = set(os.listdir(tmp_path / "final"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not any(f.startswith("model") for f in files)


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_dpo_trainer_trains_fastlora_layers_as_peft_would(tmp_path, dropout):
    """DPOTrainer: given fastlora's config it trains fastlora's layers, and three steps' losses equal those of the
    run under PEFT's config from the same initial adapter (with LoRA dropout too: DPO's disable_dropout turns it
    off in both).  TRL handles the adapted model it is handed as any PEFT
    model, keeping a reference copy of the initial adapter ("ref"); with PEFT's config it disables the adapter
    for the reference instead: the same reference while B starts at zero, as it does by default."""
    g = torch.Generator().manual_seed(0)

    def words(n):
        return " ".join(f"w{int(t)}" for t in torch.randint(0, 124, (n,), generator=g))

    data = datasets.Dataset.from_dict({"prompt": [words(6) for _ in range(8)], "chosen": [words(4) for _ in range(8)],
                                       "rejected": [words(4) for _ in range(8)]})
    trainers = {}
    settings = {**CONFIG, "lora_dropout": dropout}
    for name, trainer_class, config in (("peft", trl.DPOTrainer, peft.LoraConfig(**settings)),
                                        ("fastlora", trl_trainers.DPOTrainer, fastlora.LoraConfig(**settings))):
        args = trl.DPOConfig(output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=1, bf16=False, report_to=[], save_strategy="no",
                             max_length=16, seed=3)
        trainers[name] = trainer_class(model=tiny_llama(), args=args, train_dataset=data,
                                       processing_class=_tokenizer(), peft_config=config)
    ours = trainers["fastlora"].model
    _with_peft_s_initial_adapter(trainers["peft"].model, ours)
    assert any(isinstance(m, LoRALinear) for m in ours.modules())
    for trainer in trainers.values():
        trainer.train()
    losses = {name: _losses(trainer) for name, trainer in trainers.items()}
    assert len(losses["fastlora"]) == 3
    assert_close(losses["fastlora"], losses["peft"], kind="same_math")
    _assert_trained_factors_as_peft(trainers["peft"].model, ours)


def _with_peft_s_initial_adapter(theirs, ours):
    """PEFT's initial adapter in fastlora's "default" and in its reference copy ("ref", where the trainer made one;
    PEFT's trainer disables the adapter for its reference instead: the same reference while B starts at zero)."""
    state = theirs.state_dict()
    with torch.no_grad():
        for name, layer in ours.lora_layers():
            for adapter in layer.adapter_names:
                A, B = layer.lora_factors(adapter)
                A.copy_(state[f"base_model.model.{name}.lora_A.default.weight"])
                B.copy_(state[f"base_model.model.{name}.lora_B.default.weight"])


def _assert_trained_factors_as_peft(theirs, ours):
    state = theirs.state_dict()
    for layer_name, layer in ours.lora_layers():
        for factor, value in zip("AB", layer.lora_factors("default")):
            assert_close(value, state[f"base_model.model.{layer_name}.lora_{factor}.default.weight"],
                         kind="same_math_max", msg=f"{layer_name} {factor}")


def _preference_data():
    g = torch.Generator().manual_seed(0)

    def words(n):
        return " ".join(f"w{int(t)}" for t in torch.randint(0, 124, (n,), generator=g))

    return datasets.Dataset.from_dict({"prompt": [words(6) for _ in range(8)], "chosen": [words(4) for _ in range(8)],
                                       "rejected": [words(4) for _ in range(8)]})


@pytest.mark.parametrize("use_dora", [False, True], ids=["LoRA", "DoRA"])
def test_dpo_on_an_adapted_model_takes_the_trained_adapter_as_its_reference(tmp_path, use_dora):
    """Handed a model already adapted (as after SFT: here B ≠ 0) and no reference model, TRL's DPOTrainer adds an
    adapter "ref" and copies "default" into it by PEFT's parameter names, which fastlora's layers do not have;
    fastlora's DPOTrainer copies every tensor of it, so the reference is the trained adapter, frozen, and the first
    step's loss is log 2 (policy and reference agree), as with PEFT."""
    model = fastlora.get_peft_model(tiny_llama(), fastlora.LoraConfig(**CONFIG, init_lora_weights=False,
                                                                      use_dora=use_dora, modules_to_save=["input_layernorm"]))
    with torch.no_grad():  # the trained copies of modules_to_save, away from the originals
        for key, tensor in model.adapter_tensors("default").items():
            if key.endswith("norm.weight"):
                tensor.add_(torch.linspace(-0.5, 0.5, tensor.numel()))
    args = trl.DPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, learning_rate=1e-2,
                         logging_steps=1, bf16=False, report_to=[], save_strategy="no", max_length=16, seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = trl_trainers.DPOTrainer(model=model, args=args, train_dataset=_preference_data(),
                                          processing_class=_tokenizer())
    assert not [w for w in caught if "reference adapter" in str(w.message)]
    assert set(model.peft_config) == {"default", "ref"}
    default, ref = model.adapter_tensors("default"), model.adapter_tensors("ref")
    assert default.keys() == ref.keys() and any("lora_magnitude" in k for k in ref) == use_dora
    assert any(k.endswith("input_layernorm.weight") for k in ref)
    for key, value in default.items():
        assert torch.equal(ref[key], value), key
    ref_parameters = {id(p) for p in model.adapter_tensors("ref").values()}
    assert not any(p.requires_grad for p in model.parameters() if id(p) in ref_parameters)
    trainer.train()
    assert_close(_losses(trainer)[0], torch.tensor(math.log(2)), kind="same_math")


def test_trls_own_dpo_trainer_on_an_adapted_fastlora_model_is_warned_of_its_reference(tmp_path):
    """TRL's own DPOTrainer cannot copy the trained adapter into its reference adapter (it picks tensors by PEFT's
    names): the user is told, with the class that does."""
    model = fastlora.get_peft_model(tiny_llama(), fastlora.LoraConfig(**CONFIG, init_lora_weights=False))
    args = trl.DPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, bf16=False,
                         report_to=[], save_strategy="no", max_length=16)
    with pytest.warns(UserWarning, match=r"'ref' keeps a fresh initialization .* from fastlora\.trl_trainers"):
        trl.DPOTrainer(model=model, args=args, train_dataset=_preference_data(), processing_class=_tokenizer())


@pytest.mark.parametrize("use_dora", [False, True], ids=["QLoRA", "QDoRA"])
def test_sft_trainer_on_a_4bit_model_trains_as_peft_would(tmp_path, use_dora):
    """A 4-bit model (QLoRA, and DoRA on it): TRL casts the trained factors of a quantized model to bf16 (not
    DoRA's magnitudes) whichever layers hold them; fastlora's layers take that, and four steps' losses equal the
    run under PEFT's config from the same initial adapter, at bf16's tolerance."""
    pytest.importorskip("bitsandbytes")
    from tests.models import load_quantized

    tiny_llama().save_pretrained(tmp_path / "base")
    config = dict(CONFIG, use_dora=use_dora)
    trainers = {}
    for name, trainer_class, lora_config in (("peft", trl.SFTTrainer, peft.LoraConfig(**config, init_lora_weights=False)),
                                             ("fastlora", trl_trainers.SFTTrainer, fastlora.LoraConfig(**config))):
        model = load_quantized(tmp_path / "base", load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.float32)
        trainers[name] = _trainer(trainer_class, lora_config, tmp_path / name, model=model)
    theirs, ours = trainers["peft"].model, trainers["fastlora"].model
    copy_lora_weights(theirs, ours)
    if use_dora:
        state = theirs.state_dict()
        with torch.no_grad():
            for name, layer in ours.lora_layers():
                layer.magnitude("default").copy_(state[f"base_model.model.{name}.lora_magnitude_vector.default.weight"])
    initial = {name: layer.magnitude("default").detach().clone() for name, layer in ours.lora_layers()
               if layer.magnitude("default") is not None}
    q_proj = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "LoRAQuantizedLinear" and q_proj.lora_A.dtype == torch.bfloat16
    assert (q_proj.magnitude("default") is not None) == use_dora
    if use_dora:
        assert q_proj.magnitude("default").dtype == torch.float32  # TRL leaves DoRA's magnitudes in float32
    for trainer in trainers.values():
        trainer.train()
    losses = {name: _losses(trainer) for name, trainer in trainers.items()}
    assert len(losses["fastlora"]) == 4 and torch.isfinite(losses["fastlora"]).all()
    assert_close(losses["fastlora"], losses["peft"], kind="same_math", dtype=torch.bfloat16)
    if use_dora:
        # The magnitudes moved as PEFT's did.  Not element by element: Adam turns a gradient's sign into a full
        # step, and where m's gradient is near zero its sign is bf16 rounding (PEFT rounds the norm to bf16,
        # fastlora keeps it in float32); the moves point the same way (cosine similarity 0.94-1.00 here).
        state = theirs.state_dict()
        for name, layer in ours.lora_layers():
            trained = state[f"base_model.model.{name}.lora_magnitude_vector.default.weight"]
            ours_moved, theirs_moved = layer.magnitude("default").detach() - initial[name], trained - initial[name]
            assert torch.nn.functional.cosine_similarity(ours_moved, theirs_moved, dim=0) > 0.9, name


def _words(g, n):
    return " ".join(f"w{int(t)}" for t in torch.randint(0, 124, (n,), generator=g))


def _rewarded_by_length(completions, **_):
    return [float(len(completion) % 7) for completion in completions]


def _reward_model():
    """A one-output Llama classifier, as TRL's RewardTrainer builds one from a model id."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, num_labels=1, pad_token_id=124))


def _online_run(name):
    """(TRL's trainer, its config class, the data, the model, extra arguments, task type) of each trainer."""
    g = torch.Generator().manual_seed(0)
    generating = dict(num_generations=4, max_completion_length=8)
    runs = {
        "GRPO": (trl.GRPOConfig, generating, {"prompt": [_words(g, 6) for _ in range(8)]}),
        "RLOO": (trl.RLOOConfig, generating, {"prompt": [_words(g, 6) for _ in range(8)]}),
        "KTO": (trl.KTOConfig, dict(max_length=16), {"prompt": [_words(g, 6) for _ in range(8)],
                                                   "completion": [_words(g, 4) for _ in range(8)],
                                                   "label": [True, False] * 4}),
        "Reward": (trl.RewardConfig, dict(max_length=16), {"chosen": [_words(g, 6) for _ in range(8)],
                                                         "rejected": [_words(g, 6) for _ in range(8)]}),
    }
    config_class, options, data = runs[name]
    extra = {"reward_funcs": _rewarded_by_length} if name in ("GRPO", "RLOO") else {}
    return config_class, options, datasets.Dataset.from_dict(data), extra


@pytest.mark.parametrize("name", ["GRPO", "RLOO", "KTO", "Reward"])
def test_online_kto_and_reward_trainers_train_fastlora_layers_as_peft_would(tmp_path, name):
    """GRPOTrainer and RLOOTrainer (completions sampled from the model being trained, rewarded, the policy
    updated), KTOTrainer and RewardTrainer (a classifier with its head saved whole): given fastlora's config they
    train fastlora's layers, and three steps' losses (and the sampled completions' rewards) equal those of the run
    under PEFT's config from the same initial adapter, sampling from the same seed."""
    config_class, options, data, extra = _online_run(name)
    task = "SEQ_CLS" if name == "Reward" else "CAUSAL_LM"
    trainers = {}
    for library, trainer_class, lora in (("peft", getattr(trl, f"{name}Trainer"), peft.LoraConfig),
                                         ("fastlora", getattr(trl_trainers, f"{name}Trainer"), fastlora.LoraConfig)):
        args = config_class(output_dir=str(tmp_path / library), max_steps=3, per_device_train_batch_size=4,
                            learning_rate=1e-2, logging_steps=1, bf16=False, report_to=[], save_strategy="no", seed=3,
                            **options)
        trainers[library] = trainer_class(model=_reward_model() if name == "Reward" else tiny_llama(), args=args,
                                          train_dataset=data, processing_class=_tokenizer(),
                                          peft_config=lora(**{**CONFIG, "task_type": task}), **extra)
    _with_peft_s_initial_adapter(trainers["peft"].model, trainers["fastlora"].model)
    assert any(isinstance(m, LoRALinear) for m in trainers["fastlora"].model.modules())
    logs = {}
    for library, trainer in trainers.items():
        torch.manual_seed(0)  # the completions are sampled from torch's generator
        trainer.train()
        logs[library] = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs["fastlora"]) == 3
    for key in ("loss", "reward"):
        if key in logs["peft"][0]:
            assert_close(torch.tensor([h[key] for h in logs["fastlora"]]), torch.tensor([h[key] for h in logs["peft"]]),
                         kind="same_math", msg=key)
    assert (name in ("GRPO", "RLOO")) == ("reward" in logs["fastlora"][0])
    # the trained factors (GRPO's and RLOO's losses hardly depend on the model: its sampled rewards do)
    _assert_trained_factors_as_peft(trainers["peft"].model, trainers["fastlora"].model)

"""modules_to_save as PEFT keeps it (the original frozen, a trained copy in use) and PEFT's task heads
(SEQ_CLS / TOKEN_CLS train ``classifier`` / ``score``), against PEFT on small Llamas."""

import json
import warnings

import peft
import pytest
import torch
from torch import nn

import fastlora as fastlora_module
from fastlora import LoraConfig, LoraModel, LoRALinear, get_peft_model
from fastlora.modules_to_save import ModulesToSaveWrapper
from tests.models import SEED_TARGETS, assert_unchanged, clone, copy_lora_weights, snapshot, tiny_llama, tokens
from tests.tolerances import assert_close


def tiny_llama_classifier(seed: int = 0, num_labels: int = 3):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, num_labels=num_labels,
                         pad_token_id=0)
    return LlamaForSequenceClassification(config).eval()


def _sgd_step(model, ids, labels):
    model.train()
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.sub_(0.1 * p.grad)
                p.grad = None
    model.eval()


def test_lm_head_copy_trains_and_disable_adapter_gives_the_base_model():
    base = tiny_llama()
    kwargs = dict(task_type="CAUSAL_LM", target_modules=SEED_TARGETS, r=8, lora_alpha=32, modules_to_save=["lm_head"])
    fm = get_peft_model(clone(base), LoraConfig(**kwargs))
    pm = peft.get_peft_model(clone(base), peft.LoraConfig(**kwargs))
    assert fm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    wrapper = fm.model.lm_head
    assert isinstance(wrapper, ModulesToSaveWrapper) and wrapper.weight is wrapper.modules_to_save["default"].weight
    assert not wrapper.original_module.weight.requires_grad and wrapper.weight.requires_grad

    ids = tokens()
    _sgd_step(fm, ids, ids)
    assert torch.equal(wrapper.original_module.weight, base.lm_head.weight)  # the original never trains
    assert not torch.equal(wrapper.weight, base.lm_head.weight)
    with torch.no_grad():
        adapted = fm(input_ids=ids).logits
        with fm.disable_adapter():
            torch.testing.assert_close(fm(input_ids=ids).logits, base(input_ids=ids).logits)
        torch.testing.assert_close(fm(input_ids=ids).logits, adapted)
        plain = clone(fm).merge_and_unload()
        assert type(plain.lm_head) is nn.Linear  # the trained copy, as PEFT keeps it
        assert_close(plain(input_ids=ids).logits, adapted, kind="same_math")


def test_trained_copy_saves_and_loads_both_ways_with_peft(tmp_path):
    base = tiny_llama()
    kwargs = dict(task_type="CAUSAL_LM", target_modules=["q_proj"], r=4, lora_alpha=8, modules_to_save=["lm_head"])
    fm = get_peft_model(clone(base), LoraConfig(**kwargs))
    ids = tokens()
    _sgd_step(fm, ids, ids)
    fm.save_pretrained(tmp_path / "ours")
    with torch.no_grad():
        want = fm(input_ids=ids).logits
        pm = peft.PeftModel.from_pretrained(clone(base), tmp_path / "ours").eval()
        assert_close(pm(input_ids=ids).logits, want, kind="same_math")
        pm.save_pretrained(tmp_path / "theirs")
        back = LoraModel.from_pretrained(clone(base), tmp_path / "theirs")
        assert_close(back(input_ids=ids).logits, want, kind="same_math")
        with back.disable_adapter():
            torch.testing.assert_close(back(input_ids=ids).logits, base(input_ids=ids).logits)


def test_seq_cls_trains_the_score_head_like_peft(tmp_path):
    base = tiny_llama_classifier()
    kwargs = dict(task_type="SEQ_CLS", target_modules=SEED_TARGETS, r=8, lora_alpha=16)
    fm = get_peft_model(clone(base), LoraConfig(**kwargs))
    pm = peft.get_peft_model(clone(base), peft.LoraConfig(**kwargs))
    assert isinstance(fm.model.score, ModulesToSaveWrapper)
    assert fm.peft_config["default"].modules_to_save == ["classifier", "score"]
    assert fm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    ids, labels = tokens(), torch.tensor([0, 2])
    _sgd_step(fm, ids, labels)
    fm.save_pretrained(tmp_path)
    with torch.no_grad():
        want = fm(input_ids=ids).logits
        assert not torch.allclose(want, base(input_ids=ids).logits)
        loaded_peft = peft.PeftModel.from_pretrained(clone(base), tmp_path).eval()
        assert_close(loaded_peft(input_ids=ids).logits, want, kind="same_math")
        loaded = LoraModel.from_pretrained(clone(base), tmp_path)
        assert_close(loaded(input_ids=ids).logits, want, kind="same_math")


def test_all_linear_leaves_the_task_head_to_modules_to_save():
    base = tiny_llama_classifier()
    kwargs = dict(task_type="SEQ_CLS", target_modules="all-linear", r=4, lora_alpha=8)
    fm = get_peft_model(clone(base), LoraConfig(**kwargs))
    pm = peft.get_peft_model(clone(base), peft.LoraConfig(**kwargs))
    ours = {name for name, _ in fm.lora_layers()}
    theirs = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert ours == theirs and "score" not in ours
    assert isinstance(fm.model.score, ModulesToSaveWrapper) and not isinstance(fm.model.score.active_module, LoRALinear)
    assert fm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()


def test_unknown_modules_to_save_entry_is_refused_and_changes_nothing():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="modules_to_save entry 'classifier' matches no module"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["classifier"]))
    assert_unchanged(model, before)


def test_failure_while_wrapping_rolls_back(monkeypatch):
    model = tiny_llama()
    before = snapshot(model)

    def failing_init(self, *args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(ModulesToSaveWrapper, "__init__", failing_init)
    with pytest.raises(RuntimeError, match="simulated"):
        get_peft_model(model, LoraConfig(target_modules=SEED_TARGETS, modules_to_save=["lm_head"]))
    assert_unchanged(model, before)


@pytest.mark.parametrize("entry", ["norm", "layernorm", "head"])
def test_an_entry_matches_every_name_ending_with_it_as_in_peft(entry, tmp_path):
    """PEFT wraps every module whose qualified name ends with an entry (``"norm"``: model.norm and each layer's
    input_layernorm); so does fastlora, and each loads the other's file with equal logits."""
    base = tiny_llama()
    kwargs = dict(task_type="CAUSAL_LM", target_modules=["q_proj"], r=4, lora_alpha=8, modules_to_save=[entry])
    fm = get_peft_model(clone(base), LoraConfig(**kwargs))
    pm = peft.get_peft_model(clone(base), peft.LoraConfig(**kwargs))
    ours = {n for n, m in fm.model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    theirs = {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
              if isinstance(m, peft.utils.other.ModulesToSaveWrapper)}
    assert ours == theirs and len(ours) == {"norm": 5, "layernorm": 4, "head": 1}[entry]
    assert fm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    ids = tokens()
    _sgd_step(pm, ids, ids)
    pm.save_pretrained(tmp_path)
    with torch.no_grad():
        loaded = LoraModel.from_pretrained(clone(base), tmp_path)
        assert_close(loaded(input_ids=ids).logits, pm(input_ids=ids).logits, kind="same_math")


def test_a_target_inside_a_module_matched_by_suffix_is_saved_instead_and_said_so(tmp_path):
    """A LoRA target inside a modules_to_save module (``"attn"`` ends ``layers.0.self_attn``) is left to the saved
    copy: no adapter inside a module trained whole.  PEFT's guard matches whole dotted names, so it would adapt
    q_proj there: a warning says where fastlora differs."""
    with pytest.warns(UserWarning, match=r"matched \['model\.layers\.0\.self_attn\.q_proj', .* save whole: "
                                         r"fastlora trains them whole, without an adapter"):
        model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "up_proj"], modules_to_save=["attn"]))
    assert {n.rsplit(".", 1)[-1] for n, _ in model.lora_layers()} == {"up_proj"}
    assert isinstance(model.model.model.layers[0].self_attn, ModulesToSaveWrapper)
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="fastlora trains them whole, without an adapter"):  # said again on load
        loaded = LoraModel.from_pretrained(tiny_llama(), tmp_path)
    assert {n.rsplit(".", 1)[-1] for n, _ in loaded.lora_layers()} == {"up_proj"}


def test_a_file_fastlora_wrote_when_entries_matched_dotted_names_loads_as_it_was_saved(tmp_path):
    """fastlora once matched an entry as the name or its dotted suffix (``"norm"``: model.norm only); such a file
    holds nothing of the modules only PEFT's rule adds (each input_layernorm), and loads as it was saved."""
    base = tiny_llama()
    model = get_peft_model(clone(base), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], r=4,
                                                   init_lora_weights=False, modules_to_save=["model.norm"]))
    with torch.no_grad():
        model.model.model.norm.weight.mul_(1.5)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["norm"]}))
    loaded = LoraModel.from_pretrained(clone(base), tmp_path)
    assert {n for n, m in loaded.model.named_modules() if isinstance(m, ModulesToSaveWrapper)} == {"model.norm"}
    ids = tokens()
    with torch.no_grad():
        assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, kind="same_math")
    second = get_peft_model(clone(base), LoraConfig(target_modules=["v_proj"], r=4))
    second.load_adapter(tmp_path, adapter_name="old")
    assert {n for n, m in second.model.named_modules() if isinstance(m, ModulesToSaveWrapper)} == {"model.norm"}


def test_a_file_fastlora_wrote_with_an_adapter_on_a_module_only_peft_would_save_loads_as_saved(tmp_path):
    """Before fastlora matched entries as PEFT does, ``"classifier"`` left ``pre_classifier`` (DistilBERT's) to
    target_modules: such a file holds pre_classifier's adapter, not a copy of it, and loads as it was saved."""
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(8, 8)
            self.pre_classifier = nn.Linear(8, 8)
            self.head = nn.ModuleDict({"classifier": nn.Linear(8, 3)})

        def forward(self, x):
            return self.head["classifier"](torch.relu(self.pre_classifier(self.encoder(x))))

    torch.manual_seed(0)
    base = Classifier()
    model = get_peft_model(clone(base), LoraConfig(target_modules=["encoder", "pre_classifier"], r=2,
                                                   init_lora_weights=False, modules_to_save=["head.classifier"]))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["classifier"]}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the trial of PEFT's rule, which the file does not follow, says nothing
        loaded = LoraModel.from_pretrained(clone(base), tmp_path)
    assert [n for n, _ in loaded.lora_layers()] == ["encoder", "pre_classifier"]
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert_close(loaded(x), model.eval()(x), kind="same_math")


def test_a_module_holding_another_adapters_layers_is_not_saved_whole():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], r=4))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"modules_to_save module 'model\.layers\.0\.self_attn' holds another "
                                         r"adapter's layers"):
        model.add_adapter("b", LoraConfig(target_modules=["up_proj"], r=4, modules_to_save=["attn"]))
    assert_unchanged(model, before)


def test_failure_after_the_layers_are_swapped_rolls_back(monkeypatch):
    """An error once every layer is adapted (freezing the rest of the model, here) leaves the model as it was."""
    model = tiny_llama()
    before = snapshot(model)

    def failing(self, adapter_name):
        raise RuntimeError("interrupted (simulated)")

    monkeypatch.setattr(LoraModel, "_mark_trainable", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        get_peft_model(model, LoraConfig(target_modules=SEED_TARGETS, modules_to_save=["lm_head"]))
    assert_unchanged(model, before)


def test_targets_only_in_modules_to_save_are_refused_with_the_reason():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"outside modules_to_save \(which PEFT never adapts; matched there: lm_head\)"):
        get_peft_model(model, LoraConfig(target_modules=["lm_head"], modules_to_save=["lm_head"]))
    assert_unchanged(model, before)


def test_peft_bias_all_adapter_with_a_biased_head_loads(tmp_path):
    """PEFT's bias="all" files repeat a modules_to_save head's bias under .modules_to_save and
    .original_module: both are understood (the first must agree with the head's own key)."""
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertForSequenceClassification

    from fastlora.peft_format import WEIGHTS_NAME

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                        vocab_size=100, max_position_embeddings=32, num_labels=3)
    base = BertForSequenceClassification(config).eval()
    pm = peft.get_peft_model(clone(base), peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"],
                                                          r=4, bias="all", init_lora_weights=False))
    with torch.no_grad():
        pm.base_model.model.classifier.modules_to_save.default.bias.add_(1.0)
        pm.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.bias.add_(0.5)
    pm_dir = str(tmp_path)
    pm.eval().save_pretrained(pm_dir)
    keys = load_file(f"{pm_dir}/{WEIGHTS_NAME}").keys()
    assert "base_model.model.classifier.original_module.bias" in keys
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    loaded = LoraModel.from_pretrained(clone(base), pm_dir)
    with torch.no_grad():
        assert_close(loaded(input_ids=ids).logits, pm(input_ids=ids).logits, kind="same_math")
    # an alias that disagrees with the head's own key is refused, and the model is left as it was
    tensors = load_file(f"{pm_dir}/{WEIGHTS_NAME}")
    tensors["base_model.model.classifier.modules_to_save.bias"] += 1.0
    save_file(tensors, f"{pm_dir}/{WEIGHTS_NAME}")
    model = clone(base)
    before = snapshot(model)
    with pytest.raises(ValueError, match="hold different values"):
        LoraModel.from_pretrained(model, pm_dir)
    assert_unchanged(model, before)


def test_a_mixed_batch_runs_each_row_through_its_adapters_copy_as_peft():
    """adapter_names over adapters with modules_to_save copies: each row through its adapter's copy, "__base__"
    through the original, as PEFT computes it (forward and generate); each copy's gradient comes from its own
    rows only."""
    base = tiny_llama()
    kwargs = dict(target_modules=["q_proj"], r=4, init_lora_weights=False, modules_to_save=["lm_head"])
    models = {}
    for library in (peft, fastlora_module):
        model = library.get_peft_model(clone(base), library.LoraConfig(**kwargs), adapter_name="a")
        model.add_adapter("b", library.LoraConfig(**{**kwargs, "r": 2}))
        models[library.__name__] = model.eval()
    theirs, ours = models["peft"], models["fastlora"]
    copy_lora_weights(theirs, ours)
    with torch.no_grad():
        for name in ("a", "b"):
            weight = theirs.base_model.model.lm_head.modules_to_save[name].weight
            weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
            ours.get_base_model().lm_head.modules_to_save[name].weight.copy_(weight)
    ids, names = tokens(batch=3), ["a", "b", "__base__"]
    with torch.no_grad():
        assert_close(ours(input_ids=ids, adapter_names=names).logits,
                     theirs(input_ids=ids, adapter_names=names).logits, kind="same_math")
        generated = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, adapter_names=names)
        assert torch.equal(ours.generate(input_ids=ids[:, :6], **generated),
                           theirs.generate(input_ids=ids[:, :6], **generated))
    head = ours.get_base_model().lm_head
    for name in ("a", "b"):
        head.modules_to_save[name].weight.requires_grad_(True)
    ours(input_ids=ids, adapter_names=names).logits.square().sum().backward()
    mixed = {name: head.modules_to_save[name].weight.grad.clone() for name in ("a", "b")}
    assert head.original_module.weight.grad is None
    for row, name in enumerate(("a", "b")):
        head.modules_to_save[name].weight.grad = None
        ours.set_adapter(name)
        ours(input_ids=ids[row:row + 1]).logits.square().sum().backward()
        assert_close(mixed[name], head.modules_to_save[name].weight.grad, kind="same_math_max", msg=name)


def test_a_mixed_batch_row_of_an_adapter_without_a_copy_goes_through_the_original():
    """Where PEFT fails (its wrapper looks the adapter's copy up), a row whose adapter saves no copy of the module
    takes the original, as a LoRA layer gives the base output to a row whose adapter it does not hold."""
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], r=4, init_lora_weights=False,
                                                    modules_to_save=["lm_head"]), adapter_name="a")
    model.add_adapter("c", LoraConfig(target_modules=["q_proj"], r=2, init_lora_weights=False))
    model.eval()
    with torch.no_grad():
        model.get_base_model().lm_head.modules_to_save["a"].weight.mul_(1.5)
        ids = tokens(batch=2)
        mixed = model(input_ids=ids, adapter_names=["a", "c"]).logits
        model.set_adapter("c")
        alone = model(input_ids=ids[1:]).logits
    assert_close(mixed[1:], alone, kind="same_math")


def test_a_mixed_batch_over_a_saved_module_of_another_kind_is_refused_as_peft():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], r=4, modules_to_save=["model.norm"]))
    with pytest.raises(TypeError, match=r"Mixed batching is only supported for the following modules: Linear, "
                                        r"Embedding, Conv1d, Conv2d, Conv3d\.  \(modules_to_save holds \['LlamaRMSNorm'\]\)"):
        model(input_ids=tokens(batch=2), adapter_names=["default", "__base__"])

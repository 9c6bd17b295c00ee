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
from tests.models import (PEFT_BEFORE_0_22, SEED_TARGETS, assert_unchanged, clone, copy_lora_weights, snapshot, tiny_llama,
                          tokens)
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


@pytest.mark.parametrize("call", ["unload", "merge_and_unload", "merge_and_unload-b", "merge_and_unload-both",
                                  "merge_and_unload-disabled"])
def test_unloading_keeps_the_copy_of_the_adapter_merged_as_peft(call):
    """unload() gives the original module back; merge_and_unload() the trained copy of the adapter it merges (the
    active one, or the one of ``adapter_names`` holding a copy); two of them holding copies are refused before
    anything merges.  As PEFT since 0.22."""
    base = tiny_llama()
    models = {}
    for library in (fastlora_module, peft):
        model = library.get_peft_model(clone(base), library.LoraConfig(target_modules=["q_proj"],
                                                                       modules_to_save=["lm_head"]))
        model.add_adapter("b", library.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "modules_to_save" in name:
                    parameter.add_(1.0 if ".default." in name else 2.0)
        models[library] = model
    ours = models[fastlora_module]
    if call == "merge_and_unload-both":
        before = snapshot(ours)
        with pytest.raises(ValueError, match=r"adapters \['default', 'b'\] each hold a copy of one modules_to_save"):
            ours.merge_and_unload(adapter_names=["default", "b"])
        assert_unchanged(ours, before)
        if not PEFT_BEFORE_0_22:
            with pytest.raises(ValueError, match="Only one adapter can be set at a time"):
                models[peft].merge_and_unload(adapter_names=["default", "b"])
        return
    shift = {"unload": 0.0, "merge_and_unload": 1.0, "merge_and_unload-b": 2.0, "merge_and_unload-disabled": 1.0}[call]
    results = {}
    for library, model in models.items():
        if call.endswith("-disabled"):  # the active adapter is merged, its copy kept, as PEFT merges them
            model.disable_adapter_layers()
        unloaded = model.unload() if call == "unload" else model.merge_and_unload(
            adapter_names=["b"] if call.endswith("-b") else None)
        results[library] = unloaded.lm_head
    assert type(results[fastlora_module]) is nn.Linear
    torch.testing.assert_close(results[fastlora_module].weight, base.lm_head.weight + shift, rtol=0, atol=0)
    if not PEFT_BEFORE_0_22:  # 0.21 kept the active adapter's copy in each case
        assert torch.equal(results[peft].weight, results[fastlora_module].weight)


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
    assert fm.peft_config["default"].modules_to_save == ["classifier", "score", "pre_classifier"]
    if not PEFT_BEFORE_0_22:  # 0.21 adds classifier and score only
        assert fm.peft_config["default"].modules_to_save == pm.peft_config["default"].modules_to_save
    assert fm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    ids, labels = tokens(), torch.tensor([0, 2])
    _sgd_step(fm, ids, labels)
    fm.save_pretrained(tmp_path)
    with torch.no_grad():
        want = fm(input_ids=ids).logits
        assert not torch.allclose(want, base(input_ids=ids).logits)
        loaded_peft = peft.PeftModel.from_pretrained(clone(base), tmp_path).eval()
        assert_close(loaded_peft(input_ids=ids).logits, want, kind="same_math")
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # the task heads the model lacks: nothing to say
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


@pytest.mark.parametrize("entry", ["norm", "model.norm", "layers.0.mlp"])
def test_an_entry_matches_the_name_or_a_dotted_suffix_as_in_peft(entry, tmp_path):
    """An entry matches a module's qualified name or a dotted suffix of it (``"norm"``: model.norm, not each layer's
    input_layernorm), as PEFT since 0.22; each loads the other's file with equal logits."""
    base = tiny_llama()
    kwargs = dict(task_type="CAUSAL_LM", target_modules=["q_proj"], r=4, lora_alpha=8, modules_to_save=[entry])
    fm = get_peft_model(clone(base), LoraConfig(**kwargs))
    ours = {n for n, m in fm.model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    assert ours == {"model.norm" if "norm" in entry else "model.layers.0.mlp"}
    if PEFT_BEFORE_0_22:
        return  # PEFT 0.21 matches by ending: compared in the test below
    pm = peft.get_peft_model(clone(base), peft.LoraConfig(**kwargs))
    theirs = {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
              if isinstance(m, peft.utils.other.ModulesToSaveWrapper)}
    assert ours == theirs
    assert fm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    ids = tokens()
    _sgd_step(pm, ids, ids)
    pm.save_pretrained(tmp_path)
    with torch.no_grad():
        loaded = LoraModel.from_pretrained(clone(base), tmp_path)
        assert_close(loaded(input_ids=ids).logits, pm(input_ids=ids).logits, kind="same_math")


@pytest.mark.parametrize("entry", ["layernorm", "head", "attn"])
def test_an_entry_matching_only_the_ending_of_names_is_refused(entry):
    """``"layernorm"`` ends ``input_layernorm`` but is no dotted suffix of it: matching no module, it is refused
    with the model unchanged (PEFT since 0.22 saves nothing for it, silently)."""
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"modules_to_save entry '{entry}' matches no module of the model"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"], r=4, modules_to_save=[entry]))
    assert_unchanged(model, before)


@pytest.mark.parametrize("entry", ["norm", "layernorm", "head"])
def test_a_file_written_when_entries_matched_every_ending_loads_as_written(entry, tmp_path):
    """PEFT 0.21 wrapped every module whose name ends with an entry (``"norm"``: model.norm and each layer's
    input_layernorm): its files (and fastlora's of then) hold those copies and load as they were written, with
    equal logits.  With PEFT 0.21 installed its own file is loaded; otherwise one of that form is made."""
    base = tiny_llama()
    ending = {"norm": 5, "layernorm": 4, "head": 1}[entry]
    ids = tokens()
    if PEFT_BEFORE_0_22:
        written = peft.get_peft_model(clone(base), peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"],
                                                                   r=4, modules_to_save=[entry]))
        _sgd_step(written, ids, ids)
    else:
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in base.named_modules() if n.endswith(entry)})
        written = get_peft_model(clone(base), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], r=4,
                                                         modules_to_save=names))
        _sgd_step(written, ids, ids)
    wrapped = {n for n, m in written.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"}
    assert len(wrapped) == ending
    written.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": [entry]}))
    with torch.no_grad():
        loaded = LoraModel.from_pretrained(clone(base), tmp_path)
        assert len({n for n, m in loaded.named_modules() if isinstance(m, ModulesToSaveWrapper)}) == ending
        assert_close(loaded(input_ids=ids).logits, written(input_ids=ids).logits, kind="same_math")
    second = get_peft_model(clone(base), LoraConfig(target_modules=["v_proj"], r=4))
    second.load_adapter(tmp_path, adapter_name="old")
    assert len({n for n, m in second.model.named_modules() if isinstance(m, ModulesToSaveWrapper)}) == ending


def test_a_saved_module_inside_one_only_the_ending_rule_matches_reloads_as_saved(tmp_path):
    """``"norm"`` saves ``prenorm.norm`` (a dotted suffix), not ``prenorm`` (which ends with it): the file's copy of
    ``prenorm.norm`` lies under ``prenorm``, and is not taken for a copy of ``prenorm`` written by PEFT 0.21's rule."""
    class Prenorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.proj = nn.LayerNorm(8), nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(self.norm(x))

    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("prenorm", Prenorm())
    base.add_module("body", nn.Linear(8, 8))
    model = get_peft_model(clone(base), LoraConfig(target_modules=["body"], modules_to_save=["norm"]))
    with torch.no_grad():
        model.base_model.model.prenorm.norm.weight.add_(0.5)
    model.save_pretrained(tmp_path)
    loaded = LoraModel.from_pretrained(clone(base), tmp_path)
    assert [n for n, m in loaded.model.named_modules() if isinstance(m, ModulesToSaveWrapper)] == ["prenorm.norm"]
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


def test_an_entry_matching_nothing_in_a_file_is_left_out_with_a_warning(tmp_path):
    """PEFT 0.22 saves nothing for an entry matching no module (``"layernorm"``: no dotted suffix) and writes it in
    the file: such a file loads, the entry left out with a warning."""
    base = tiny_llama()
    model = get_peft_model(clone(base), LoraConfig(target_modules=["q_proj"], r=4, init_lora_weights=False))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["layernorm", "lm_head"]}))
    with pytest.raises(ValueError, match="missing keys: base_model.model.lm_head"):  # an entry that matches: needed
        LoraModel.from_pretrained(clone(base), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["layernorm"]}))
    with pytest.warns(UserWarning, match=r"modules_to_save entries \['layernorm'\] of the adapter in .* match no module "
                                         r"of the model: left out"):
        loaded = LoraModel.from_pretrained(clone(base), tmp_path)
    assert not loaded.peft_config["default"].modules_to_save
    assert not [m for m in loaded.modules() if isinstance(m, ModulesToSaveWrapper)]
    if not PEFT_BEFORE_0_22:
        theirs = peft.get_peft_model(clone(base), peft.LoraConfig(target_modules=["q_proj"], r=4,
                                                                  modules_to_save=["layernorm"]))
        theirs.save_pretrained(tmp_path / "theirs")
        with pytest.warns(UserWarning, match="left out"):
            LoraModel.from_pretrained(clone(base), tmp_path / "theirs")


def test_a_file_saving_a_module_matched_by_ending_keeps_the_targets_inside_it_unadapted(tmp_path):
    """A file written under PEFT 0.21's rule with ``"attn"`` saves each ``self_attn`` whole; a LoRA target inside
    it (q_proj) is left to the saved copy: no adapter inside a module trained whole.  PEFT's guard matches dotted
    names, so under that rule it would adapt q_proj there: a warning says where fastlora differs."""
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["up_proj"], modules_to_save=["self_attn"]))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj", "up_proj"],
                                                               "modules_to_save": ["attn"]}))
    with pytest.warns(UserWarning, match=r"matched \['model\.layers\.0\.self_attn\.q_proj', .* save whole: "
                                         r"fastlora trains them whole, without an adapter"):
        loaded = LoraModel.from_pretrained(tiny_llama(), tmp_path)
    assert {n.rsplit(".", 1)[-1] for n, _ in loaded.lora_layers()} == {"up_proj"}
    assert isinstance(loaded.model.model.layers[0].self_attn, ModulesToSaveWrapper)


def test_distilbert_seq_cls_trains_its_pre_classifier_whole_as_peft(tmp_path):
    """DistilBERT's classification head is ``pre_classifier`` then ``classifier``, both freshly initialised: PEFT's
    SEQ_CLS model trains both whole, and so does fastlora; a step and a save / load agree with PEFT's."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    base = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=100, dim=32, hidden_dim=64, n_layers=1, n_heads=4, max_position_embeddings=32, num_labels=3)).eval()
    kwargs = dict(task_type="SEQ_CLS", target_modules=["q_lin", "v_lin"], r=4, lora_alpha=8)
    fm = get_peft_model(clone(base), LoraConfig(**kwargs))
    pm = peft.get_peft_model(clone(base), peft.LoraConfig(**kwargs))
    ours = {n for n, m in fm.model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    theirs = {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
              if isinstance(m, peft.utils.other.ModulesToSaveWrapper)}
    assert ours == theirs == {"pre_classifier", "classifier"}
    assert fm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    ids, labels = tokens(vocab=100), torch.tensor([0, 2])
    _sgd_step(pm, ids, labels)
    pm.save_pretrained(tmp_path)
    with torch.no_grad():
        loaded = LoraModel.from_pretrained(clone(base), tmp_path)
        assert_close(loaded(input_ids=ids).logits, pm(input_ids=ids).logits, kind="same_math")


def test_a_file_fastlora_wrote_when_entries_matched_dotted_names_loads_as_it_was_saved(tmp_path):
    """A file whose ``"norm"`` entry saved model.norm alone (PEFT's rule since 0.22, fastlora's before and now)
    holds nothing of the modules PEFT 0.21's rule adds (each input_layernorm), and loads as it was saved."""
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
    """Matched by dotted suffix, ``"classifier"`` leaves a ``pre_classifier`` to target_modules: such a file holds
    pre_classifier's adapter, not a copy of it, and loads as it was saved (PEFT 0.21's rule would save it whole)."""
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
        model.add_adapter("b", LoraConfig(target_modules=["up_proj"], r=4, modules_to_save=["self_attn"]))
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


def test_bias_all_leaves_the_saved_modules_originals_frozen_as_peft():
    """bias="all" trains every bias, but the frozen original beside a modules_to_save copy stays frozen."""
    from tests.models import tiny_gpt2  # GPT-2: its final norm has a bias

    def trainable(library):
        """(the trainable count, the trainable biases' names, a LoRA layer's base bias under its plain name)"""
        model = library.get_peft_model(tiny_gpt2(), library.LoraConfig(target_modules=["c_fc"], bias="all",
                                                                        modules_to_save=["ln_f"]))
        return model.get_nb_trainable_parameters()[0], sorted(
            name.replace(".base_layer", "") for name, param in model.named_parameters()
            if param.requires_grad and name.endswith("bias"))

    ours = trainable(fastlora_module)
    assert "base_model.model.transformer.ln_f.modules_to_save.default.bias" in ours[1]
    assert not any("original_module" in name for name in ours[1])
    assert ours == trainable(peft)


def test_a_bias_all_adapter_beside_another_adapters_saved_module_loads_its_biases(tmp_path):
    """bias="all" beside another adapter that saves a biased module whole: the adapter's own bias of that module is
    the original's, written under ``<path>.original_module.bias`` (PEFT writes the other adapter's copy's bias too).
    Both libraries' files load onto a fresh model with that bias, computing what the saved model computes with the
    adapter active (PEFT's own loading leaves the trained bias out there)."""
    base = tiny_llama(attention_bias=True)
    with torch.no_grad():
        for name, param in base.named_parameters():
            if name.endswith("bias"):
                param.normal_(generator=torch.Generator().manual_seed(len(name)))
    ids = tokens()
    want = {}
    for library in (fastlora_module, peft):
        model = library.get_peft_model(clone(base), library.LoraConfig(target_modules=["q_proj"], bias="all"))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.requires_grad and name.endswith("bias"):
                    param.add_(0.25)  # trained biases
        model.add_adapter("b", library.LoraConfig(target_modules=["v_proj"], modules_to_save=["o_proj"]))
        model.save_pretrained(tmp_path / library.__name__)
        with torch.no_grad():
            want[library.__name__] = model.eval()(input_ids=ids).logits
    from safetensors.torch import load_file

    assert_close(want["fastlora"], want["peft"], kind="same_math")
    ours = load_file(tmp_path / "fastlora" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.o_proj.original_module.bias" in ours
    for folder in ("fastlora", "peft"):
        loaded = LoraModel.from_pretrained(clone(base), tmp_path / folder)
        with torch.no_grad():
            assert_close(loaded(input_ids=ids).logits, want[folder], kind="same_math", msg=folder)
        o_proj = loaded.base_model.model.model.layers[0].self_attn.o_proj
        assert torch.equal(o_proj.bias, base.model.layers[0].self_attn.o_proj.bias + 0.25), folder


def test_a_bias_all_adapter_beside_another_adapters_saved_container_loads(tmp_path):
    """The biases inside a container another adapter saves whole are written under PEFT's
    ``<path>.original_module.<inner>.bias``, and both libraries' files of it load onto a fresh model."""
    for library in (fastlora_module, peft):
        model = library.get_peft_model(tiny_llama(mlp_bias=True), library.LoraConfig(target_modules=["q_proj"], bias="all"))
        with torch.no_grad():
            model.base_model.model.model.layers[0].mlp.up_proj.bias.add_(0.5)
        model.add_adapter("b", library.LoraConfig(target_modules=["v_proj"], modules_to_save=["layers.0.mlp"]))
        model.save_pretrained(tmp_path / library.__name__)
        loaded = LoraModel.from_pretrained(tiny_llama(mlp_bias=True), tmp_path / library.__name__)
        assert torch.equal(loaded.base_model.model.model.layers[0].mlp.up_proj.bias,
                           tiny_llama(mlp_bias=True).model.layers[0].mlp.up_proj.bias + 0.5), library.__name__


def test_a_target_another_adapter_saves_whole_is_left_out_with_a_warning():
    """PEFT raises on such a target; fastlora adapts the other matches and says which it left out."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=1, target_modules=["q_proj"]))
    model.add_adapter("saved", LoraConfig(r=1, target_modules=["v_proj"],
                                                   modules_to_save=["layers.0.self_attn.k_proj"]))
    with pytest.warns(UserWarning, match=r"matched \['model.layers.0.self_attn.k_proj'\], which another adapter saves "
                                         r"whole \(modules_to_save\): not adapted"):
        model.add_adapter("later", LoraConfig(r=1, target_modules=["k_proj"]))
    assert sorted(name for name, _ in model.lora_layers("later")) == ["model.layers.1.self_attn.k_proj"]

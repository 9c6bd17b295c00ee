"""AutoPeftModelFor*: an adapter folder in, its base model loaded by transformers and the adapter on it, compared
with PEFT's AutoPeftModelFor* on the same folder."""

import json

import peft
import pytest
import torch

import fastlora
from fastlora import AutoPeftModel, AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, LoraConfig
from fastlora.quantized import LoRAQuantizedLinear
from tests.models import SEED_TARGETS, tiny_llama, tokens
from tests.tolerances import assert_close

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(base folder, adapter folder): a tiny Llama and a trained-looking adapter (B ≠ 0) recording it as its base."""
    root = tmp_path_factory.mktemp("auto")
    tiny_llama().save_pretrained(root / "base")
    model = fastlora.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(root / "base"), LoraConfig(
        task_type="CAUSAL_LM", target_modules=SEED_TARGETS, r=4, lora_alpha=8, init_lora_weights=False))
    model.save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def test_loads_the_base_named_by_the_adapter_and_the_adapter_onto_it_as_peft(saved):
    base, adapter = saved
    ours = AutoPeftModelForCausalLM.from_pretrained(adapter)
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(adapter)
    assert isinstance(ours, fastlora.PeftModel) and not ours.training
    assert isinstance(ours.get_base_model(), transformers.LlamaForCausalLM)
    assert not any(p.requires_grad for p in ours.parameters())
    ids = tokens()
    with torch.no_grad():
        logits = ours(input_ids=ids).logits
        assert_close(logits, theirs(input_ids=ids).logits, kind="same_math")
        plain = transformers.AutoModelForCausalLM.from_pretrained(base)(input_ids=ids).logits
    assert not torch.allclose(logits, plain)  # the adapter is on
    trainable = AutoPeftModelForCausalLM.from_pretrained(adapter, is_trainable=True, adapter_name="sft")
    assert trainable.active_adapter == "sft"
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == \
           {n for n, _ in trainable.named_parameters() if "lora_" in n}


def test_other_keywords_go_to_the_base_models_from_pretrained(saved):
    _, adapter = saved
    model = AutoPeftModelForCausalLM.from_pretrained(adapter, dtype=torch.bfloat16)
    assert model.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}  # autocast, as PEFT


def test_a_4bit_base_gets_fastloras_quantized_layers(saved):
    pytest.importorskip("bitsandbytes")
    _, adapter = saved
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    model = AutoPeftModelForCausalLM.from_pretrained(adapter, quantization_config=quantization)
    assert isinstance(model.get_base_model().model.layers[0].self_attn.q_proj, LoRAQuantizedLinear)


def test_a_longer_tokenizer_saved_beside_the_adapter_grows_the_embeddings_as_in_peft(tmp_path):
    from tests.test_trl import _tokenizer

    tiny_llama().save_pretrained(tmp_path / "base")
    model = fastlora.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), LoraConfig(
        task_type="CAUSAL_LM", target_modules=["q_proj"], r=4))
    model.save_pretrained(tmp_path / "adapter")
    tokenizer = _tokenizer()
    tokenizer.add_tokens(["<tool>", "</tool>"])
    tokenizer.save_pretrained(tmp_path / "adapter")
    ours = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert ours.get_input_embeddings().weight.shape[0] == theirs.get_input_embeddings().weight.shape[0] == 130


def test_a_task_less_adapter_loads_through_its_auto_mapping_and_an_unlisted_library_is_refused(saved, tmp_path):
    _, adapter = saved
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(task_type=None, auto_mapping={"base_model_class": "LlamaForCausalLM", "parent_library": "transformers"})
    folder = tmp_path / "task-less"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    for auto_class in (AutoPeftModel, AutoPeftModelForCausalLM):  # PEFT's classes take auto_mapping alike
        assert isinstance(auto_class.from_pretrained(folder).get_base_model(), transformers.LlamaForCausalLM)
    (folder / "adapter_config.json").write_text(json.dumps({**config, "auto_mapping": None}))
    with pytest.raises(ValueError, match="neither a task_type nor an auto_mapping"):
        AutoPeftModelForCausalLM.from_pretrained(folder)
    config["auto_mapping"]["parent_library"] = "os"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"imports 'os', which is not in the import allowlist"):
        AutoPeftModel.from_pretrained(folder)


def test_an_adapter_of_another_task_or_without_a_base_is_refused(saved, tmp_path):
    _, adapter = saved
    with pytest.raises(ValueError, match=r"task_type is 'CAUSAL_LM', not 'SEQ_CLS': load it with "
                                         r"AutoPeftModelForCausalLM"):
        AutoPeftModelForSequenceClassification.from_pretrained(adapter)
    with pytest.raises(ValueError, match="AutoPeftModel loads adapters without a task type"):
        AutoPeftModel.from_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"names no base model \(base_model_name_or_path\)"):
        AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(OSError, match="from_pretrained"):
        AutoPeftModelForCausalLM()


def test_peft_config_and_lora_layer_answer_as_in_peft(saved):
    """``PeftConfig.from_pretrained(folder).base_model_name_or_path`` and ``isinstance(module, LoraLayer)``, as
    scripts use PEFT's."""
    base, adapter = saved
    assert fastlora.PeftConfig.from_pretrained(adapter).base_model_name_or_path == \
        peft.PeftConfig.from_pretrained(adapter).base_model_name_or_path == str(base)
    model = AutoPeftModelForCausalLM.from_pretrained(adapter)
    ours = {n for n, m in model.named_modules() if isinstance(m, fastlora.LoraLayer)}
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(adapter)
    assert ours == {n for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert len(ours) == 2 * len(SEED_TARGETS)


def test_an_adapter_saved_without_a_task_type_records_its_base_class_for_auto_peft_model(tmp_path):
    """As PEFT's save_pretrained, fastlora's records ``auto_mapping`` (the base model's class and library) for an
    adapter without a task type, so that either library's AutoPeftModel loads it."""
    tiny_llama().save_pretrained(tmp_path / "base")
    model = fastlora.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                    LoraConfig(target_modules=["q_proj"], r=4))
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["auto_mapping"] == {"base_model_class": "LlamaForCausalLM",
                                     "parent_library": "transformers.models.llama.modeling_llama"}
    for auto_class in (AutoPeftModel, peft.AutoPeftModel):
        assert isinstance(auto_class.from_pretrained(tmp_path / "adapter").get_base_model(),
                          transformers.LlamaForCausalLM)

"""The README.md model card written by save_pretrained: the metadata PEFT writes (compared with PEFT's own
card), an existing card's content kept, repeated saves stable."""

import peft
import pytest
import torch
from huggingface_hub import ModelCard

from fastlora import LoraConfig, get_peft_model, get_peft_model_state_dict
from tests.models import clone, tiny_llama


def _named_base():
    base = tiny_llama()
    base.config._name_or_path = "some-org/some-model"
    base.name_or_path = "some-org/some-model"
    return base


def test_card_metadata_as_peft_writes_it(tmp_path):
    base = _named_base()
    kwargs = dict(task_type="CAUSAL_LM", target_modules=["q_proj"])
    get_peft_model(clone(base), LoraConfig(**kwargs)).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(clone(base), peft.LoraConfig(**kwargs)).save_pretrained(tmp_path / "peft")
    ours, theirs = (ModelCard.load(tmp_path / d / "README.md").data for d in ("ours", "peft"))
    for key in ("library_name", "base_model", "pipeline_tag"):
        assert ours.get(key) == theirs.get(key), key
    assert ours.library_name == "peft" and ours.base_model == "some-org/some-model"
    assert set(theirs.tags) <= set(ours.tags) and "fastlora" in ours.tags


def test_card_of_a_model_built_from_a_config_has_no_empty_base_model(tmp_path):
    get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    data = ModelCard.load(tmp_path / "README.md").data
    assert data.get("base_model") is None and data.get("pipeline_tag") is None
    assert all(not t.startswith("base_model:adapter:") for t in data.tags) and "lora" in data.tags


def test_existing_card_is_kept_and_updated_once(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "README.md").write_text(
        "---\nlicense: mit\ntags:\n- custom\npipeline_tag: text-classification\n---\n\n# My card\n\nHello body.\n")
    fm = get_peft_model(_named_base(), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    fm.save_pretrained(tmp_path)
    first = (tmp_path / "README.md").read_text()
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.license == "mit" and card.data.pipeline_tag == "text-classification"
    assert {"custom", "lora", "base_model:adapter:some-org/some-model"} <= set(card.data.tags)
    assert "# My card\n\nHello body." in card.text and card.text.count("- fastlora ") == 1
    fm.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == first


def test_a_card_that_cannot_be_updated_never_stops_a_save(tmp_path):
    """A README.md whose front matter is not YAML metadata (or not UTF-8, or a folder): the adapters are saved and
    the card is left as it was, with a warning; a card's numeric tag is kept beside fastlora's."""
    from safetensors.torch import load_file

    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], r=4, init_lora_weights=False))
    expected = get_peft_model_state_dict(model)
    for text in (b"---\nfoo: [unclosed\n---\nhello\n", b"---\n- a list\n---\nhello\n", b"---\ntags: 5\n---\n",
                 b"\xff\xfe not utf-8"):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        (folder / "README.md").write_bytes(text)
        with pytest.warns(UserWarning, match="not a model card fastlora can update"):
            model.save_pretrained(folder)
        assert (folder / "README.md").read_bytes() == text
        saved = load_file(folder / "adapter_model.safetensors")
        assert saved.keys() == expected.keys() and all(torch.equal(saved[k], v) for k, v in expected.items())
        assert (folder / "adapter_config.json").is_file()
    folder = tmp_path / "card-is-a-folder"
    (folder / "README.md").mkdir(parents=True)
    with pytest.warns(UserWarning, match="not a model card fastlora can update") as caught:
        model.save_pretrained(folder)
    assert caught[0].filename == __file__  # the warning points at the caller's save
    assert (folder / "README.md").is_dir() and (folder / "adapter_model.safetensors").is_file()
    (tmp_path / "README.md").write_text("---\ntags:\n- 2024\n- custom\n---\n\nBody.\n")
    model.save_pretrained(tmp_path)
    assert {2024, "custom", "fastlora"} <= set(ModelCard.load(tmp_path / "README.md").data.tags)

"""The ``README.md`` model card written beside a saved adapter, with the metadata the Hub and PEFT read.

Metadata as PEFT writes it: ``library_name: peft`` (the Hub lists the folder as a PEFT adapter),
``base_model`` (the base model's Hub id, when it has one), ``tags`` (``lora``, ``transformers`` for a
transformers model, ``base_model:adapter:<id>``, the model's own ``model_tags``, and ``fastlora``) and
``pipeline_tag: text-generation`` for a causal LM.  An existing card keeps its text and metadata; the
tags are added to its own, and a framework line is added once.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from torch import nn

from fastlora._version import __version__
from fastlora.files import atomic_write_text

__all__ = ["model_card_text", "write_model_card"]

_CARD_NAME = "README.md"
_FRAMEWORK_HEADING = "### Framework versions"


def _new_card_text(base_model_id: str) -> str:
    base = f" for [{base_model_id}](https://huggingface.co/{base_model_id})" if base_model_id else ""
    return (
        f"# LoRA adapter{base}\n\n"
        "A LoRA adapter in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`).\n\n"
        "## How to load it\n\n"
        "```python\n"
        "from peft import PeftModel            # or: from fastlora import PeftModel\n"
        "model = PeftModel.from_pretrained(base_model, \"<this folder or repository>\")\n"
        "```\n\n"
        f"{_FRAMEWORK_HEADING}\n"
    )


def model_card_text(directory: Path, base_model: nn.Module, task_type: str | None) -> str | None:
    """The content of ``directory/README.md`` once created or updated; None, with a warning, where an existing
    README.md cannot be read as a model card (its front matter not YAML metadata, say, or a folder of that name),
    which is then left as it is: a card never stops a save."""
    import yaml
    from huggingface_hub import ModelCard

    path = directory / _CARD_NAME
    config = getattr(base_model, "config", None)
    base_model_id = getattr(config, "_name_or_path", "") or ""
    try:
        if path.exists() and not path.is_file():
            raise IsADirectoryError("not a file")
        card = ModelCard.load(path) if path.is_file() else ModelCard(
            f"---\nlibrary_name: peft\n---\n\n{_new_card_text(base_model_id)}")
        tags = set(card.data.get("tags") or []) | set(getattr(base_model, "model_tags", None) or [])
    except (ValueError, TypeError, UnicodeDecodeError, IsADirectoryError, yaml.YAMLError) as err:
        warnings.warn(f"{path} is not a model card fastlora can update ({type(err).__name__}: {err}); it is left as "
                      f"it is", UserWarning, stacklevel=5)
        return None
    card.data["library_name"] = "peft"
    tags |= {"lora", "fastlora"}
    if is_transformers_model(base_model):
        tags.add("transformers")
    if base_model_id:
        tags.add(f"base_model:adapter:{base_model_id}")
        card.data["base_model"] = base_model_id
    card.data["tags"] = sorted(tags, key=str)  # a card's own tags may be numbers (YAML reads `- 2024` as one)
    if task_type == "CAUSAL_LM" and not card.data.get("pipeline_tag"):
        card.data["pipeline_tag"] = "text-generation"
    lines = card.text.splitlines()
    version_line = f"- fastlora {__version__}"
    if version_line not in lines:
        if _FRAMEWORK_HEADING in lines:
            lines.insert(lines.index(_FRAMEWORK_HEADING) + 1, version_line)
        else:
            lines += ["", _FRAMEWORK_HEADING, version_line]
    card.text = "\n".join(lines) + "\n"
    return str(card)


def write_model_card(directory: Path, base_model: nn.Module, task_type: str | None) -> None:
    """Create or update ``directory/README.md``, atomically (see :func:`model_card_text`)."""
    content = model_card_text(directory, base_model, task_type)
    if content is not None:
        atomic_write_text(directory / _CARD_NAME, content)


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (False where transformers is not installed)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)

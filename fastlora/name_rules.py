"""PEFT's rules for matching a module's qualified name against a config's entries (pure functions of the names)."""

from __future__ import annotations

import re

__all__ = ["name_matches", "saved_whole"]


def name_matches(name: str, patterns: list[str] | str) -> bool:
    """PEFT's rule: a string is a regex matched in full; a list entry matches exactly or as a dotted suffix."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def saved_whole(name: str, entries: list[str] | None, peft_rule: bool = True) -> bool:
    """Whether a modules_to_save entry matches the module ``name``: PEFT's rule, every name that ends with the entry
    (``"norm"`` matches ``input_layernorm``); with ``peft_rule=False`` the name or a dotted suffix of it, as fastlora
    matched entries before (files it wrote then are read that way)."""
    return any(name.endswith(m) if peft_rule else (name == m or name.endswith("." + m)) for m in entries or [])

"""Every public name of ``fastlora`` documents its arguments, its PEFT equivalent and an example.

For each name in ``fastlora.__all__`` (but ``__version__``) the docstring must hold:

* an ``Args:`` section with one entry per parameter: the callable's parameters, a class's ``__init__``
  parameters (not ``self``, ``*args``, ``**kwargs``), ``TaskType``'s members, and for ``LoraConfig`` the
  fields users set (the ones fastlora implements; PEFT's bookkeeping fields and the feature switches it
  refuses may be described together);
* a line starting ``PEFT equivalent:``;
* an ``Example:`` section with at least one ``>>> `` line, whose examples are valid Python.

Each failure names the public name and what its docstring lacks.  Every example of the package's docstrings
runs (those that need a model or data are marked ``# doctest: +SKIP``; a module of an optional extra that is not
installed is left out).
"""

from __future__ import annotations

import dataclasses
import doctest
import inspect
import re

import pytest

import fastlora
from fastlora.config import UNSUPPORTED_FEATURES

PUBLIC_NAMES = [name for name in fastlora.__all__ if name != "__version__"]

# LoraConfig fields that must be documented whatever else changes: the ones nearly every user sets.
COMMON_CONFIG_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "task_type", "bias", "use_dora",
                        "modules_to_save")
# PEFT's bookkeeping fields: kept as given and written back, not something users set.
BOOKKEEPING_CONFIG_FIELDS = {"auto_mapping", "peft_version", "megatron_core", "qalora_group_size", "runtime_config"}

def _docstring(name: str) -> str:
    obj = getattr(fastlora, name)
    doc = obj.__doc__  # not inspect.getdoc: a class must not pass on its base class's docstring
    if inspect.isclass(obj) and doc is not None and doc == getattr(obj.__mro__[1], "__doc__", None):
        doc = None
    assert doc and doc.strip(), f"fastlora.{name} has no docstring"
    return inspect.cleandoc(doc)


def _section(doc: str, header: str) -> list[str] | None:
    """The lines of the section ``header`` (e.g. "Args:"): the lines after it up to the next line indented no
    deeper than the header (a blank line does not end it); None when there is no such section."""
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == header:
            indent = len(line) - len(line.lstrip())
            body = []
            for following in lines[i + 1:]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                body.append(following)
            return body
    return None


def _expected_args(name: str) -> list[str]:
    obj = getattr(fastlora, name)
    if obj in (fastlora.TaskType, fastlora.PeftType):
        return list(obj.__members__)
    if obj is fastlora.LoraConfig:
        fields = [f.name for f in dataclasses.fields(obj) if f.init]
        missing = [f for f in COMMON_CONFIG_FIELDS if f not in fields]
        assert not missing, f"fastlora.LoraConfig has no fields {missing}: update COMMON_CONFIG_FIELDS"
        user_fields = [f for f in fields if f not in UNSUPPORTED_FEATURES and f not in BOOKKEEPING_CONFIG_FIELDS]
        return list(dict.fromkeys([*COMMON_CONFIG_FIELDS, *user_fields]))
    signature = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    params = [p for p in signature.parameters.values() if p.kind not in skip]
    if inspect.isclass(obj) and params and params[0].name == "self":
        params = params[1:]
    return [p.name for p in params]


def test_every_public_name_is_checked():
    assert PUBLIC_NAMES, "fastlora.__all__ names nothing"
    assert "__version__" in fastlora.__all__ and isinstance(fastlora.__version__, str)
    for name in PUBLIC_NAMES:
        assert hasattr(fastlora, name), f"fastlora.__all__ lists {name!r}, which fastlora does not define"


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_args_section_names_every_parameter(name):
    doc = _docstring(name)
    section = _section(doc, "Args:")
    assert section is not None, f"fastlora.{name}: the docstring has no 'Args:' section"
    # An entry is a line of the section that starts with the parameter's name (``name`` quoting allowed),
    # followed by its type in parentheses, a colon, or the end of the line.
    entry = re.compile(r"^\s*`{0,2}(\w+)`{0,2}\s*(\(|:|$)")
    documented = {m.group(1) for m in map(entry.match, section) if m}
    missing = [arg for arg in _expected_args(name) if arg not in documented]
    assert not missing, (f"fastlora.{name}: the 'Args:' section has no entry for {missing} "
                         f"(entries found: {sorted(documented)})")


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_peft_equivalent_is_stated(name):
    doc = _docstring(name)
    lines = [line.strip() for line in doc.splitlines()]
    found = [line for line in lines if line.startswith("PEFT equivalent:")]
    assert found, f"fastlora.{name}: the docstring has no line starting 'PEFT equivalent:'"
    assert all(len(line) > len("PEFT equivalent:") for line in found), (
        f"fastlora.{name}: 'PEFT equivalent:' names nothing (give the PEFT name, or 'none' and why)")


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_example_section_has_valid_doctest_lines(name):
    doc = _docstring(name)
    section = _section(doc, "Example:")
    assert section is not None, f"fastlora.{name}: the docstring has no 'Example:' section"
    assert any(line.lstrip().startswith(">>> ") for line in section), (
        f"fastlora.{name}: the 'Example:' section has no '>>> ' line")
    examples = doctest.DocTestParser().get_examples(inspect.cleandoc("\n".join(section)))
    assert examples, f"fastlora.{name}: the 'Example:' section has no example doctest can read"
    for example in examples:
        try:
            compile(example.source, f"<fastlora.{name} example>", "single")
        except SyntaxError as err:
            pytest.fail(f"fastlora.{name}: an example line is not valid Python: {example.source!r} ({err.msg})")


def test_peft_model_is_documented_as_lora_model():
    assert fastlora.PeftModel is fastlora.LoraModel


def test_every_docstring_example_of_the_package_runs():
    import importlib
    import pkgutil

    finder, failed = doctest.DocTestFinder(), []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for info in pkgutil.walk_packages(fastlora.__path__, "fastlora."):
        if info.name.startswith("fastlora.kernels") or info.name.endswith("__main__"):
            continue  # the kernels' own package; the command line's entry point
        try:
            module = importlib.import_module(info.name)
        except ImportError as missing:  # a module of an optional extra (TRL's trainers) where it is not installed
            if missing.name is None or missing.name.startswith("fastlora"):
                raise
            continue
        for test in finder.find(module, module.__name__):
            if test.examples and runner.run(test, out=lambda text: None).failed:
                failed.append(test.name)
    assert runner.tries > 0 and not failed, f"docstring examples that do not run: {failed}"


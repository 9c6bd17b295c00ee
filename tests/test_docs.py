"""The documentation (README.md and docs/*.md) points only at things that exist.

- every relative link resolves to a file or folder of the repository, and every ``#anchor`` (in the page
  itself or in another Markdown file) to a heading there, with GitHub's heading slugs;
- every repository path the pages name in backticks or in code blocks (``bench/gpu_check.sh``,
  ``tests/tolerances.py``, ``fastlora/layer.py``, ...) exists;
- every ``fastlora SUBCOMMAND`` is a subcommand of ``fastlora/cli.py`` and every ``python -m MODULE`` a
  module that ``python -m`` can run;
- README.md stays a front page (at most 260 lines), and the pages speak to users (no work-tracking words).

The checks are plain functions of a repository root, so the tests below also run them on a planted copy
and see them fail.
"""

from __future__ import annotations

import glob
import importlib.util
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 260

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
# A code span: a run of backticks to the next run of the same length, within one paragraph.
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)((?:(?!\n[ \t]*\n)[\s\S])+?)(?<!`)\1(?!`)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# A shell command's start: line start, a code span's start, or after &&, ||, |, ;, $ or a backtick.
FASTLORA_CMD = re.compile(r"(?:^|&&|\|\||[|;$`(])\s*fastlora\s+([A-Za-z][\w-]*)")
PYTHON_M = re.compile(r"\bpython3?\s+-m\s+([A-Za-z_][\w.]*)")
# Words that belong to work tracking, not to a user's page; "#123" is an issue number.
TRACKING = re.compile(r"\b(TODO|FIXME|XXX|issues?|tickets?|sessions?)\b|(?<![\w&])#\d+\b", re.IGNORECASE)
FILE_SUFFIXES = (".py", ".sh", ".md", ".toml", ".json", ".csv", ".png", ".txt", ".cfg", ".yml", ".yaml")


def pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def split_page(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(prose lines, code-block lines), each as (line number, text)."""
    prose, code, fence = [], [], None
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m and (fence is None or m.group(1) == fence):
            fence = m.group(1) if fence is None else None
            continue
        (code if fence else prose).append((n, line))
    return prose, code


class Page:
    """A Markdown page split for the checks: its prose (code spans blanked out, for links), its code spans and
    its code-block lines, each with the line number where it starts."""

    def __init__(self, path: Path):
        self.path = path
        prose, self.code = split_page(path.read_text(encoding="utf-8"))
        self.numbers = [n for n, _ in prose] or [1]
        self.prose = "\n".join(line for _, line in prose)
        self.spans = [(self.line_of(m.start()), m.group(2).replace("\n", " ")) for m in CODE_SPAN.finditer(self.prose)]
        # Code spans blanked (newlines kept), so that a link written inside one is not taken for a link.
        self.blanked = CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), self.prose)

    def line_of(self, pos: int) -> int:
        return self.numbers[self.prose.count("\n", 0, pos)]

    def code_texts(self) -> list[tuple[int, str]]:
        return self.spans + self.code


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (inline markup dropped) lowercased, punctuation other than '-'
    and '_' removed, spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a Markdown file; a repeated heading's second anchor gets '-1', its third '-2', ..."""
    seen: dict[str, int] = {}
    out = set()
    prose, _ = split_page(path.read_text(encoding="utf-8"))
    for _, line in prose:
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def link_errors(page: Path, root: Path = ROOT) -> list[str]:
    """Relative links that lead nowhere, and anchors that match no heading."""
    errors = []
    doc = Page(page)
    for m in LINK.finditer(doc.blanked):
        target = m.group(1)
        where = f"{page.relative_to(root)}:{doc.line_of(m.start())}: ({target})"
        if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:, ...
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part) if path_part else page
        if not dest.exists() or not _inside(root, dest):
            errors.append(f"{where}: no such file or folder in the repository")
            continue
        if anchor:
            if dest.is_dir() or dest.suffix != ".md":
                errors.append(f"{where}: an anchor into something that is not a Markdown file")
            elif anchor not in anchors(dest):
                errors.append(f"{where}: no heading with the anchor #{anchor} in {dest.relative_to(root)}")
    return errors


NOT_THE_REPOSITORY = {".git", ".venv", ".venv-ci", ".hypothesis", ".benchmarks", ".pytest_cache", "build", "dist"}


def _top_level(root: Path) -> set[str]:
    """The repository's top-level files and folders (not caches, environments or build outputs)."""
    return {p.name for p in root.iterdir() if p.name not in NOT_THE_REPOSITORY and not p.name.endswith(".egg-info")}


def named_paths(page: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """The repository paths a page names in code spans and code blocks: words with a '/' whose first part is a
    top-level entry of the repository (``bench/gpu_check.sh``, ``.ci/run``, ``kernels/``), and bare script
    names (``compile_check.py``)."""
    tops = _top_level(root)
    out = []
    for n, text in Page(page).code_texts():
        for word in re.split(r"[\s=,;()\[\]{}'\"]+", text):
            word = word.strip(".:")
            if not word or not re.fullmatch(r"[\w.*/-]+", word) or "://" in word:
                continue
            if "/" in word:
                if word.split("/", 1)[0] in tops:
                    out.append((n, word))
            elif word.endswith((".py", ".sh")) and not word.startswith("."):
                out.append((n, word))
    return out


def path_errors(page: Path, root: Path = ROOT) -> list[str]:
    """Repository paths named in backticks or code blocks that do not exist."""
    errors = []
    files = None
    for n, word in named_paths(page, root):
        where = f"{page.relative_to(root)}:{n}: `{word}`"
        if "/" in word:
            if "*" in word:
                if not glob.glob(str(root / word)):
                    errors.append(f"{where}: matches no file in the repository")
            elif not (root / word).exists() or (word.endswith("/") and not (root / word).is_dir()):
                errors.append(f"{where}: no such file or folder in the repository")
        else:
            if files is None:
                files = {p.name for top in _top_level(root) for p in [root / top, *(root / top).rglob("*")]}
            if word not in files:
                errors.append(f"{where}: no file of that name in the repository")
    return errors


def _cli_commands(root: Path) -> set[str]:
    """The subcommands ``fastlora/cli.py`` dispatches (its COMMANDS table), read from the source of ``root``."""
    source = (root / "fastlora" / "cli.py").read_text(encoding="utf-8")
    table = re.search(r"^COMMANDS\s*=\s*\{(.*?)^\}", source, re.S | re.M)
    assert table, "fastlora/cli.py has no COMMANDS table"
    return set(re.findall(r"^\s*\"([\w-]+)\"\s*:", table.group(1), re.M))


def _runnable(module: str) -> bool:
    """Whether ``python -m module`` finds something to run: a module, or a package with a ``__main__``."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if spec.submodule_search_locations is not None:  # a package: python -m runs its __main__
        try:
            return importlib.util.find_spec(f"{module}.__main__") is not None
        except (ImportError, ValueError):
            return False
    return True


def command_errors(page: Path, root: Path = ROOT) -> list[str]:
    """``fastlora X`` with X not a subcommand, ``python -m M`` with M not runnable."""
    commands = _cli_commands(root)
    errors = []
    for n, text in Page(page).code_texts():
        where = f"{page.relative_to(root)}:{n}"
        for sub in FASTLORA_CMD.findall(text):
            if sub not in commands:
                errors.append(f"{where}: `fastlora {sub}`: not a subcommand of fastlora/cli.py {sorted(commands)}")
        for module in PYTHON_M.findall(text):
            module = module.rstrip(".")
            if not _runnable(module):
                errors.append(f"{where}: `python -m {module}`: no such runnable module")
    return errors


def wording_errors(page: Path, root: Path = ROOT) -> list[str]:
    errors = []
    for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        m = TRACKING.search(line)
        if m:
            errors.append(f"{page.relative_to(root)}:{n}: {m.group(0)!r} (a work-tracking word) in {line.strip()[:80]!r}")
    return errors


# ---- the repository's pages ----------------------------------------------------------------------------


def _ids(paths):
    return [str(p.relative_to(ROOT)) for p in paths]


PAGES = pages()


def test_the_pages_exist():
    assert (ROOT / "docs").is_dir()
    for name in ("usage", "peft-compatibility", "training", "dora", "kernels", "guarantees", "performance"):
        assert (ROOT / "docs" / f"{name}.md").is_file(), name


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_links_and_anchors_resolve(page):
    assert link_errors(page) == []


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_named_repository_paths_exist(page):
    assert path_errors(page) == []


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_named_commands_exist(page):
    assert command_errors(page) == []


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_no_work_tracking_words(page):
    assert wording_errors(page) == []


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    text = "\n".join(lines)
    # The set-up commands, verbatim (CI runs the second one), and a link to every docs page.
    assert 'python -m pip install torch==2.13.0 -e ".[test]" && fastlora demo' in text
    assert 'python -m pip install torch==2.13.0 -e ".[test]" && python -m pytest' in text
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in text, f"README.md does not link docs/{page.name}"


def test_the_performance_page_holds_the_generated_section():
    from fastlora.bench.report import PERFORMANCE_PAGE, README_END, README_START

    assert PERFORMANCE_PAGE == "docs/performance.md"
    text = (ROOT / PERFORMANCE_PAGE).read_text(encoding="utf-8")
    assert text.count(README_START) == 1 and text.count(README_END) == 1
    assert README_START not in (ROOT / "README.md").read_text(encoding="utf-8")


# ---- the checks themselves, on a planted copy ------------------------------------------------------------


@pytest.fixture
def planted(tmp_path):
    """A copy of the repository's files (no caches, environments or history), to plant mistakes in."""
    for entry in _top_level(ROOT):
        src = ROOT / entry
        if src.is_dir():
            shutil.copytree(src, tmp_path / entry, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, tmp_path / entry)
    return tmp_path


def _all(check, root):
    return [e for page in pages(root) for e in check(page, root)]


def test_the_checks_pass_on_an_unchanged_copy(planted):
    assert _all(link_errors, planted) == []
    assert _all(path_errors, planted) == []


def test_a_broken_link_and_a_wrong_anchor_fail(planted):
    readme = planted / "README.md"
    readme.write_text(readme.read_text() + "\nSee [the guide](docs/no-such-page.md) and [DoRA](docs/dora.md#no-such-heading).\n")
    errors = _all(link_errors, planted)
    assert len(errors) == 2
    assert "docs/no-such-page.md" in errors[0] and "no such file" in errors[0]
    assert "#no-such-heading" in errors[1]


def test_a_link_out_of_docs_needs_its_parent(planted):
    page = planted / "docs" / "usage.md"
    page.write_text(page.read_text() + "\n[the examples](examples/trainer_finetune.py)\n")  # ../ forgotten
    assert any("examples/trainer_finetune.py" in e for e in _all(link_errors, planted))


def test_a_wrong_file_name_fails(planted):
    page = planted / "docs" / "guarantees.md"
    page.write_text(page.read_text() + "\nThe table is `tests/tolerance.py`; run `bash bench/gpu_checks.sh`.\n")
    errors = _all(path_errors, planted)
    assert [e.split(": `")[1].split("`")[0] for e in errors] == ["tests/tolerance.py", "bench/gpu_checks.sh"]


def test_a_wrong_command_fails(planted):
    page = planted / "docs" / "usage.md"
    page.write_text(page.read_text() + "\nRun `fastlora benchmark --quick` or `python -m fastlora.bench.reports`.\n")
    errors = _all(command_errors, planted)
    assert len(errors) == 2 and "fastlora benchmark" in errors[0] and "fastlora.bench.reports" in errors[1]


def test_slugs_follow_github():
    assert slug("What fastlora refuses, and how") == "what-fastlora-refuses-and-how"
    assert slug("`LoraConfig`, `get_peft_model`, `LoraModel`: PEFT's API") == "loraconfig-get_peft_model-loramodel-pefts-api"
    assert slug("Several processes: torchrun, accelerate, FSDP2") == "several-processes-torchrun-accelerate-fsdp2"
    assert slug("Single layers — AMD EPYC (cpu, 2 threads)") == "single-layers--amd-epyc-cpu-2-threads"

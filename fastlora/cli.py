"""The ``fastlora`` command: ``fastlora demo`` and ``fastlora bench`` (thin dispatch), and the argument checks
both share (argparse ``type=`` functions and the output-path check), so a mistake is a usage error before any
work starts."""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

COMMANDS = {
    "demo": ("fastlora.demo", "fine-tune a small Llama with LoRA on CPU, save, reload, check"),
    "bench": ("fastlora.bench", "benchmark fastlora against PEFT and the frozen base layer"),
}


def _usage() -> str:
    lines = ["usage: fastlora {demo,bench} [options]   |   fastlora --version", ""]
    lines += [f"  {name:<6} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "fastlora COMMAND --help shows the options of COMMAND"]
    return "\n".join(lines)


# ---- argument checks shared by the subcommands ----------------------------------------------------------


def checked(kind: type, allowed: Callable[[float], bool], wanted: str) -> Callable[[str], float]:
    """An argparse ``type=``: ``kind(text)`` (a float must be finite) for which ``allowed`` holds, else a usage
    error saying it must be ``wanted``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not allowed(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, not {text!r}")
        return value

    parse.__name__ = wanted
    return parse


positive_int = checked(int, lambda v: v >= 1, "an integer ≥ 1")
non_negative_int = checked(int, lambda v: v >= 0, "an integer ≥ 0")
positive_float = checked(float, lambda v: v > 0, "a number > 0")
non_negative_float = checked(float, lambda v: v >= 0, "a number ≥ 0")
share = checked(float, lambda v: 0 <= v <= 1, "a number from 0 to 1")
probability = checked(float, lambda v: 0 <= v < 1, "a number from 0 to below 1")


def one_of(choices) -> Callable[[str], str]:
    """An argparse ``type=``: one of ``choices``."""

    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"unknown {text!r}; choose from {', '.join(choices)}")
        return text

    return parse


def comma_list(item: Callable[[str], object]) -> Callable[[str], list]:
    """An argparse ``type=``: a non-empty comma-separated list, each item parsed by ``item``."""

    def parse(text: str) -> list:
        items = [item(t.strip()) for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("must be a comma-separated list, not empty")
        return items

    return parse


def check_output(parser: argparse.ArgumentParser, option: str, path: str, folder: bool = False) -> None:
    """A usage error unless ``path`` can be written as a file (``folder``: as a folder) before any work starts:
    not an existing folder (file), no file among its parents, and its nearest existing folder one a file can be
    made in (tried with a temporary file, removed at once).  Nothing is left behind: the writers make the missing
    folders when they write."""
    target = Path(path)
    try:
        if str(path).endswith(("/", os.sep)) and not folder:
            parser.error(f"{option} {path}: names a folder; give a file")
        if target.exists() and target.is_dir() != folder:
            parser.error(f"{option} {path}: is a {'file' if folder else 'folder'}; give a "
                         f"{'folder' if folder else 'file'}")
        existing = target.parent
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            parser.error(f"{option} {path}: {existing} is a file, not a folder")
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        parser.error(f"{option} {path}: cannot be written ({e.strerror or e})")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(_usage())
        return 0
    if not argv:
        print(f"{_usage()}\n\nfastlora: error: a command is required ({', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    if argv[0] in ("-V", "--version"):
        from fastlora._version import __version__

        print(f"fastlora {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        kind = "option" if argv[0].startswith("-") else "command"
        print(f"{_usage()}\n\nfastlora: error: unknown {kind} {argv[0]!r}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())

"""fastlora's benchmarks: ``fastlora bench`` / ``python -m fastlora.bench``.

Layers (default) or one training step of a small Llama-architecture model (``--model``), for the frozen
base, PEFT, fastlora's torch path and, on CUDA, its triton path, side by side.  See ``--help`` and
bench/README.md.  ``python -m fastlora.bench.report RESULTS.json`` renders the README's performance
section from results files.
"""

from __future__ import annotations

__all__ = ["main", "build_parser"]


def main(argv: list[str] | None = None) -> int:
    """Run ``fastlora bench`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    from .cli import main as _main

    return _main(argv)


def build_parser():
    from .cli import build_parser as _build

    return _build()

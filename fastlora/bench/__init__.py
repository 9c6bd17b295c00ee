"""fastlora's benchmarks: ``fastlora bench`` / ``python -m fastlora.bench``.

Layers (default) or one training step of a small Llama-architecture model (``--model``), for the frozen
base, PEFT, fastlora's torch path and, on CUDA, its triton path, side by side.  See ``--help``.
``python -m fastlora.bench.report RESULTS.json`` renders the README's performance section.
"""

from __future__ import annotations

from .cli import build_parser, main

__all__ = ["main", "build_parser"]

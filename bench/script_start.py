"""The start of the GPU check's measuring scripts (bench/kernel_variants.py, bench/qlora_crossover.py), before they
import torch and triton: the checkout on ``sys.path`` (fastlora need not be installed), and, for a script run as
such, Triton's interpreter on with ``--dry-run`` (the CPU: the code paths only) and off otherwise (compiled
kernels: an inherited TRITON_INTERPRET=1 would time the interpreter)."""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prepare(run_as_script: bool) -> None:
    """Set up as above; an imported script (``run_as_script`` false: a test reading its functions) leaves the
    environment as it is."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    if run_as_script:
        if "--dry-run" in sys.argv:
            os.environ["TRITON_INTERPRET"] = "1"
        else:
            os.environ.pop("TRITON_INTERPRET", None)

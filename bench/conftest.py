"""pytest-benchmark suite over the cases of ``fastlora bench`` (not part of the default test run).

    pytest bench/ --benchmark-only                       # run
    pytest bench/ --benchmark-only --benchmark-save=NAME # keep in .benchmarks/ for later comparison
    pytest bench/ --benchmark-only --benchmark-compare   # against the last saved run
    pytest-benchmark compare 0001 0002 --group-by=param:case

CPU: tiny shapes (the ``tiny`` preset, 1024 tokens; the tiny model); CUDA: llama-3-8b shapes at 8192
tokens.  FASTLORA_BENCH_DEVICE=cpu|cuda overrides the device.
"""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()) if not torch.cuda.is_available() else torch.get_num_threads())


def bench_device() -> torch.device:
    name = os.environ.get("FASTLORA_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

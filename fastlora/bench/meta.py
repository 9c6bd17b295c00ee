"""What machine and software a result came from: stamped into every JSON/CSV row."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

from fastlora._version import installed_version

__all__ = ["environment", "cpu_name", "gpu_name", "git_commit", "hardware_slug"]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def gpu_name(device: str | torch.device | None = None) -> str | None:
    if not torch.cuda.is_available():
        return None
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda":
        dev = torch.device("cuda")
    return torch.cuda.get_device_name(dev)


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """HEAD of the checkout fastlora is imported from (with ``-dirty`` when it has uncommitted changes)."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            # Source changes only: results files being (re)written do not make a run "dirty".
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def hardware_slug(device: str | torch.device) -> str:
    """``cpu-amd-epyc`` / ``gpu-nvidia-h200``: the hardware part of a results file name."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return "gpu-" + _slug(gpu_name(dev) or "cuda")
    return "cpu-" + _slug(cpu_name())


def environment(device: str | torch.device) -> dict:
    """Machine, CPU/GPU name, versions and git commit, one flat dict (copied into every row)."""
    dev = torch.device(device)
    try:
        import fastlora

        fastlora_version = getattr(fastlora, "__version__", None) or installed_version("fastlora-kernels")
    except Exception:  # noqa: BLE001 - the bench must still run when fastlora's import is broken
        fastlora_version = None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(dev),
        "gpu": gpu_name(dev) if dev.type == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": installed_version("triton"),
        "peft": installed_version("peft"),
        "transformers": installed_version("transformers"),
        "fastlora": fastlora_version,
        "git_commit": git_commit(),
        "loadavg_1m": _loadavg(),
        # the Triton kernels' schedule choices, when not the defaults (fastlora.schedules.VARIANTS)
        "kernel_variants": os.environ.get("FASTLORA_KERNEL_VARIANTS") or None,
    }


def _loadavg() -> float | None:
    """The 1-minute load average when the run started: other jobs on the machine skew CPU timings."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None

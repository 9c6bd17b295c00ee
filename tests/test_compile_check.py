"""bench/compile_check.py as part of the test suite: every kernel, every config, compiled ahead of time for
sm_80 and sm_90 (no GPU needed), with no spills, shared memory within the chip, wgmma on sm_90.

It runs in a subprocess without TRITON_INTERPRET (the interpreter must not be on while compiling for real
GPUs, and tests/conftest.py turns it on for this process when CUDA is absent).  A few minutes on two cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


@pytest.mark.slow
def test_every_kernel_config_compiles_for_sm80_and_sm90():
    # This is the only check that sees what the interpreter cannot (a dot's precision, spills, wgmma), so its
    # absence is said loudly, and in CI (CI=true) it is a failure rather than a skip.
    if not CUOBJDUMP.exists():
        missing = f"the compile check cannot run: triton {triton.__version__} ships no cuobjdump (looked for {CUOBJDUMP})"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(missing)
        pytest.skip(missing)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compile_check.py"), "--jobs", str(os.cpu_count() or 1)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500,
    )
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, f"compile_check failed:\n{report}"

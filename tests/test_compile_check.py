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


_TMA_PROBE = """
import sys
sys.argv = ["compile_check"]
sys.path.insert(0, "bench")
import compile_check as cc
tma = [j for j in cc.gemm_jobs(90) if j.args["TMA"] and j.variant.startswith("fwd bf16/bf16")]
assert tma and all(j.needs_bulk_tensor and j.needs_wgmma for j in tma)
assert not any(j.args["TMA"] for j in cc.gemm_jobs(80)), "TMA candidates on sm_80"
job = next(j for j in tma if j.args["PERSISTENT"])
print("with TMA:", cc.run_job(job).problems)
job.args = dict(job.args, TMA=False)  # the same config reading through pointers: no bulk tensor copies
print("without:", cc.run_job(job).problems)
"""


def test_the_check_proves_bulk_tensor_copies_in_the_tma_configs():
    """Each Hopper TMA candidate is compiled with the requirement that its PTX has cp.async.bulk.tensor: met by
    the TMA config, failed by the same config with its descriptors turned off."""
    if not CUOBJDUMP.exists():
        pytest.skip(f"triton {triton.__version__} ships no cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _TMA_PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "with TMA: []" in proc.stdout
    assert "without: ['no bulk tensor copy (cp.async.bulk.tensor) in a TMA config']" in proc.stdout

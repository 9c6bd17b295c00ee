"""bench/gpu_check.sh without a GPU: its results must come home from a device machine that returns only a few
files, so every file its steps write is packed into one archive as each step ends, and again on exit or on a
signal.  The runner is exercised with stand-in steps; the script itself up to its CUDA check, and its whole flow
(the steps of each mode, in order, with their arguments; QLoRA's left out without bitsandbytes) with a stand-in
Python that reports a GPU and runs nothing; the wheels it carries to a machine without network."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUNNER = REPO / "bench" / "step_runner.sh"
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="bash and coreutils' timeout")

# Stand-in steps: one writes its results and succeeds, one writes a partial file and outlives its limit (its
# log and partial file must still be packed), one fails at once.
STAND_IN = """
source "{runner}"
runner_init check "$STAGE" "$DEST"
echo "header line" >>"$SUMMARY"
step writes 20 bash -c 'echo rows >"$STAGE/run-layers.csv"; echo "{{}}" >"$STAGE/run-layers.json"; echo ok'
step hangs 1 bash -c 'echo partial >"$STAGE/run-variants.json"; exec sleep 30'
step fails 20 bash -c 'echo "no luck"; exit 3'
{tail}
echo "done: $RUNNER_STATUS" >>"$SUMMARY"
exit "$RUNNER_STATUS"
"""


def _members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {Path(m.name).name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _start(tmp_path: Path, tail: str = "") -> tuple[subprocess.Popen, Path, Path]:
    stage, dest = tmp_path / "stage", tmp_path / "out"
    script = tmp_path / "check.sh"
    script.write_text(STAND_IN.format(runner=RUNNER, tail=tail))
    env = {**os.environ, "STAGE": str(stage), "DEST": str(dest)}
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    return proc, stage, dest


def test_every_file_of_every_step_is_packed_with_the_summary_beside_it(tmp_path):
    proc, stage, dest = _start(tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out  # a step failed (and one timed out)
    assert sorted(os.listdir(dest)) == ["check.tar.gz", "check.txt"]
    files = _members(dest / "check.tar.gz")
    assert set(files) == set(os.listdir(stage)) == {
        "check.txt", "run-layers.csv", "run-layers.json", "run-variants.json", "writes.log", "hangs.log", "fails.log"}
    assert files["run-variants.json"] == b"partial\n"  # the killed step's partial result
    summary = (dest / "check.txt").read_text()
    assert files["check.txt"].decode() == summary
    assert "step writes: exit 0" in summary and "step fails: exit 3" in summary and "done: 1" in summary
    assert "step hangs: timed out (exit 124)" in summary
    assert b"no luck" in files["fails.log"]


# A last step that is still running when the test signals the script (its sleep outlives the test's wait).
WAITS = "step waits 60 bash -c 'echo half >\"$STAGE/late.json\"; exec sleep 20'"


def _when_waiting(proc: subprocess.Popen, stage: Path) -> None:
    deadline = time.monotonic() + 60
    while not (stage / "late.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def test_a_signal_mid_step_still_packs_what_was_written(tmp_path):
    proc, stage, dest = _start(tmp_path, tail=WAITS)
    _when_waiting(proc, stage)
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 10  # the trap stopped the step instead of waiting for it
    files = _members(dest / "check.tar.gz")
    assert {"run-layers.json", "run-variants.json", "fails.log", "late.json"} <= set(files)
    assert "interrupted" in files["check.txt"].decode()
    assert proc.returncode == 128 + signal.SIGTERM


def test_a_kill_that_no_trap_sees_keeps_every_step_that_had_ended(tmp_path):
    proc, stage, dest = _start(tmp_path, tail=WAITS)
    _when_waiting(proc, stage)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    files = _members(dest / "check.tar.gz")
    assert {"run-layers.csv", "run-layers.json", "run-variants.json", "writes.log", "hangs.log", "fails.log"} <= set(files)
    assert "step fails: exit 3" in (dest / "check.txt").read_text()


def test_the_check_falls_back_to_python3_and_stops_without_cuda(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "OUT")}
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    for args in ([], ["--preflight"]):
        done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), *args], env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and "no CUDA device" in done.stderr, done.stdout + done.stderr


def _wheel(folder: Path, name: str, version: str, module_version: str | None = None) -> Path:
    """A minimal wheel of one module ``name`` whose ``VERSION`` is ``module_version`` (``version`` unless given),
    with what pip needs to install it."""
    import zipfile

    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {f"{name}.py": f"VERSION = {module_version or version!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def test_carried_wheels_are_installed_and_importable(tmp_path):
    """A package the device machine lacks travels as a wheel in .whl/: gpu_check.sh installs it (no index) and
    puts it on PYTHONPATH behind what was there; without .whl/ nothing happens."""
    repo = tmp_path / "repo"
    (repo / ".whl").mkdir(parents=True)
    _wheel(repo / ".whl", "carried_probe", "1.2.3")
    script = (f'source "{REPO / "bench" / "carried_wheels.sh"}"\nexport PYTHONPATH=/first\n'
              f'use_carried_wheels "$1" "{sys.executable}"\necho "note: $CARRIED_WHEELS"\necho "path: $PYTHONPATH"\n'
              f'"{sys.executable}" -c "import carried_probe; print(\'version:\', carried_probe.VERSION)"\n')
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run(["bash", "-c", script, "-", str(repo)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "version: 1.2.3" in done.stdout
    assert "note: carried wheels installed: carried_probe-1.2.3-py3-none-any.whl" in done.stdout
    assert f"path: /first:{tmp_path}/" in done.stdout  # appended: the checkout keeps its place in front
    # the next call on the same machine finds them installed
    again = subprocess.run(["bash", "-c", script, "-", str(repo)], capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 0 and "version: 1.2.3" in again.stdout, again.stdout + again.stderr
    assert "note: carried wheels already installed: carried_probe-1.2.3-py3-none-any.whl" in again.stdout
    # a wheel rebuilt under the same file name is a different package: installed, not taken for the old one
    _wheel(repo / ".whl", "carried_probe", "1.2.3", module_version="1.2.3-rebuilt")
    rebuilt = subprocess.run(["bash", "-c", script, "-", str(repo)], capture_output=True, text=True, timeout=120,
                             env=env)
    assert rebuilt.returncode == 0 and "version: 1.2.3-rebuilt" in rebuilt.stdout, rebuilt.stdout + rebuilt.stderr
    assert "note: carried wheels installed: carried_probe-1.2.3-py3-none-any.whl" in rebuilt.stdout
    done = subprocess.run(["bash", "-c", script, "-", str(tmp_path / "no-wheels")], capture_output=True, text=True,
                          timeout=120, env=env)
    assert "note: \n" in done.stdout and "path: /first\n" in done.stdout
    assert done.returncode != 0 and "No module named 'carried_probe'" in done.stderr  # nothing installed


# A Python that reports a CUDA device and runs nothing: the check's own control flow (its steps, their order and
# arguments, what it says when bitsandbytes is missing) runs here as it would on the device machine.
FAKE_PYTHON = """#!/bin/bash
case "$*" in
    *"torch.cuda.is_available"*) exit 0 ;;
    *"import bitsandbytes"*) exit "${FAKE_BNB_RC:-0}" ;;
    *"hardware_slug"*) echo gpu-fake; exit 0 ;;
esac
echo "fake python: $* ${FASTLORA_KERNEL_VARIANTS:+[variants $FASTLORA_KERNEL_VARIANTS]}"
"""


@pytest.mark.parametrize("bnb", [True, False], ids=["bitsandbytes", "no-bitsandbytes"])
@pytest.mark.parametrize("mode", ["--preflight", "", "--steps"], ids=["preflight", "full", "steps"])
def test_the_check_runs_its_steps_in_order_and_leaves_out_qlora_without_bitsandbytes(tmp_path, mode, bnb):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(out), "TMPDIR": str(tmp_path),
           "FAKE_BNB_RC": "0" if bnb else "1"}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), *([mode] if mode else [])], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    (summary,) = out.glob("*-gpu-fake-gpu-*.txt")
    text = summary.read_text()
    (archive,) = out.glob("*-gpu-fake-gpu-*.tar.gz")
    logs = {name: data.decode() for name, data in _members(archive).items() if name.endswith(".log")}
    ran = [line.split()[1].rstrip(":") for line in text.splitlines() if line.startswith("step ")]
    if mode == "--preflight":
        assert ran == ["preflight"] and "-m preflight" in logs["preflight.log"]
    elif mode == "":
        assert ran == ["qlora-tests", "kernel-tests", "kernel-variants", "layers", "model", "dora-layers",
                       "dora-composed"]
        assert "tests/test_kernels_gpu.py -k not (dequant4 or 4bit or qlora or qdora)" in logs["kernel-tests.log"]
        line = next(li for li in text.splitlines() if li.startswith("step qlora-tests:"))
        assert ("exit 0" in line) == bnb and ("left out (bitsandbytes cannot be imported)" in line) != bnb
        if bnb:
            assert "tests/test_kernels_gpu.py -k dequant4 or 4bit or qlora or qdora" in logs["qlora-tests.log"]
        assert "--package-table" in logs["kernel-variants.log"]
        assert "[variants dora=composed]" in logs["dora-composed.log"]
    else:
        assert ran == ["kinds-steps", "kinds-qlora-crossover", "kinds-qlora-fused", "kinds-moe-gpt2",
                       "kinds-mixed-batch", "kinds-compile"]
        qlora = ("kinds-steps", "kinds-qlora-crossover", "kinds-qlora-fused")
        for name in qlora:
            line = next(li for li in text.splitlines() if li.startswith(f"step {name}:"))
            assert ("exit 0" in line) == bnb and ("left out (bitsandbytes cannot be imported)" in line) != bnb
            assert (f"{name}.log" in logs) == bnb
        if bnb:
            assert "bench/qlora_crossover.py --tokens" in logs["kinds-qlora-crossover.log"]
            assert "kernel-schedules-4bit.json" in logs["kinds-qlora-crossover.log"]
            assert "[variants base_4bit=fused]" in logs["kinds-qlora-fused.log"]  # every 4-bit layer fused
    assert ("bitsandbytes cannot be imported: QLoRA's GPU tests and steps are left out" in text) != bnb

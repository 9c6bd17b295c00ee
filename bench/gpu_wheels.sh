#!/usr/bin/env bash
# Download, on a machine with a network, the wheels bench/gpu_check.sh needs on a device machine that has none:
# bitsandbytes (QLoRA's GPU tests and steps), the version installed here when there is one, else the newest.
# They go to .whl/ at the checkout's root (ignored by git); carry that folder with the checkout, and gpu_check.sh
# installs them there (bench/carried_wheels.sh).
#
#     bash bench/gpu_wheels.sh            # bitsandbytes==<the version here>
#     bash bench/gpu_wheels.sh 0.50.2     # a given version
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
version="${1:-$("$PY" -c "import importlib.metadata as m; print(m.version('bitsandbytes'))" 2>/dev/null || true)}"
mkdir -p "$REPO/.whl"
rm -f "$REPO"/.whl/bitsandbytes-*.whl  # one version: two would clash when installed together
# bitsandbytes' Linux wheel is pure Python plus its own shared libraries for every CUDA version (py3-none), so
# any CPython takes it; the platform tags are the manylinux ones it is published under.
"$PY" -m pip download -q --no-deps --only-binary=:all: --dest "$REPO/.whl" \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 "bitsandbytes${version:+==$version}"
ls -l "$REPO/.whl"
echo "carry .whl with the checkout: bench/gpu_check.sh installs these wheels where the check runs"

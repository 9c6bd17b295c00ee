#!/usr/bin/env bash
# The wheel as a user who installs from the package index gets it: built from this checkout, installed into a
# fresh environment, used from a folder outside the repository.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m pip wheel -q --no-deps -w "$work/dist" "$repo"
python3 -m venv "$work/venv"
# torch first and pinned: the CPU build on this machine's disk (a bare "torch" would pull a CUDA build)
"$work/venv/bin/python" -m pip install -q torch==2.13.0
wheel=("$work"/dist/*.whl)
"$work/venv/bin/python" -m pip install -q "${wheel[0]}[hf,trl]"
cd "$work"
"$work/venv/bin/fastlora" --version
"$work/venv/bin/fastlora" demo --help >/dev/null
"$work/venv/bin/fastlora" bench --help >/dev/null
"$work/venv/bin/python" - <<'PY'
import importlib, pathlib, fastlora
root = pathlib.Path(fastlora.__file__).parent
assert "site-packages" in str(root), root
modules = sorted(".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
                 for p in root.rglob("*.py") if p.stem != "__main__")
for name in modules:
    importlib.import_module(name)
print(f"wheel check: {len(modules)} modules import from {root}")
PY

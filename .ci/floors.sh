#!/usr/bin/env bash
# The oldest versions pyproject.toml admits, tested: a fresh environment with each product dependency pinned to
# its floor (torch, triton, safetensors, huggingface_hub, tqdm, and the hf extra: peft, transformers,
# accelerate), then the tests of the PEFT / Trainer integration and of the kernels (Triton's interpreter, and
# the ahead-of-time compile check for sm_80 / sm_90).
set -euo pipefail
cd "$(dirname "$0")/.."
floors=$(python3 - <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
wanted = {"torch", "triton", "safetensors", "huggingface_hub", "tqdm", "peft", "transformers", "accelerate"}
pins = {}
for requirement in project["dependencies"] + project["optional-dependencies"]["hf"]:
    m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)", requirement)
    if m and m.group(1) in wanted:
        pins[m.group(1)] = m.group(2)
missing = wanted - pins.keys()
assert not missing, f"no floor declared for {sorted(missing)}"
print(" ".join(f"{name}=={version}" for name, version in sorted(pins.items())))
PY
)
echo "floors: $floors"
python3 -m venv .venv-floors
. .venv-floors/bin/activate
# triton 3.6's interpreter converts 1-element arrays to scalars, which NumPy 2.4 refuses; NumPy is not ours to pin
# otherwise, so only this environment holds it below 2.4.
python -m pip install -q torch==2.13.0 -e ".[test-core]" $floors "numpy<2.4"
python -m pip check
python -m pytest -q -p no:cacheprovider \
    tests/test_peft_api.py tests/test_trainer.py tests/test_model.py tests/test_peft_format.py \
    tests/test_named_adapters.py tests/test_modules_to_save.py tests/test_hub.py tests/test_patch.py \
    tests/test_bad_inputs.py tests/test_model_card.py tests/test_torch_wrappers.py tests/test_kernels.py \
    tests/test_compile_check.py
deactivate

#!/usr/bin/env bash
# Device check for a machine with one CUDA GPU and no network (meant for an H200 with torch 2.11, triton 3.6,
# peft and transformers installed; runs on newer versions too).  Run from anywhere:
#
#     bash bench/gpu_check.sh              # under 9 min on an H100/H200; every step has its own time limit
#     SKIP_MODEL=1 bash bench/gpu_check.sh # without the model training step (SKIP_DORA=1: without step 5)
#
# Steps (all run; the exit status is non-zero when one failed):
#   1. compiled-kernel tests: pytest tests/test_kernels_gpu.py (all dtypes, Llama shapes, a case past 2^31
#      elements, CUDA-graph replay), with a JUnit XML;
#   2. kernel benchmark: Llama-3-8B projections, 8192 tokens, r=16, bf16, dropout 0.1 and 0 (frozen base,
#      PEFT, fastlora torch and triton paths) as JSON / CSV / PNG;
#   3. bench/kernel_variants.py: the design decisions — each launch against its floor, the Triton GEMM against
#      cuBLAS, the schedule (dB, low-rank term) and precision (3×tf32, tf32) variants side by side, the rank-r
#      kernels' error against float64 beside PEFT's, and which variant wins (JSON: "decision");
#   4. one training step of a 2-layer llama-3-8b-width model;
#   5. DoRA layers (fastlora's, PEFT's, and fastlora's LoRA beside them), 4096 tokens, dropout 0.1 and 0, then
#      fastlora's DoRA again on the "composed" schedule (the LoRA kernels and torch passes) against the DoRA
#      kernels: which of the two should be the default;
#   6. the README section regenerated from every results file.
# bench/compile_check.py (registers, spills, wgmma) needs no GPU: it runs on the development machine with
# triton 3.6 (this machine's) and the newest, so its device time goes to the kernel tests here.
# Results: $OUT when set, else bench/results/, named <UTC date>-<hardware slug>-<step>.<ext> (commit them).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
unset TRITON_INTERPRET
# Autotuning results kept on disk (triton's TRITON_CACHE_AUTOTUNING; a version without it ignores it), so the
# breakdown and model steps reuse what the layers step tuned instead of benchmarking every config again.
export TRITON_CACHE_AUTOTUNING=1
RESULTS="${OUT:-$REPO/bench/results}"
mkdir -p "$RESULTS"
PY="${PYTHON:-python}"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA device')" || exit 2

# fastlora.kernels is the top-level kernels/ folder, mapped into the package by pyproject.toml: it imports only
# from an installed (or editable-installed) fastlora.  Offline: an editable install without dependencies, else a
# shim directory whose fastlora/ links the package's files and kernels/.
if ! "$PY" -c "import fastlora.kernels" >/dev/null 2>&1; then
    "$PY" -m pip install --no-deps --no-index --no-build-isolation -e "$REPO" >/dev/null 2>&1 || true
fi
if ! "$PY" -c "import fastlora.kernels" >/dev/null 2>&1; then
    SHIM="$(mktemp -d)"
    mkdir -p "$SHIM/fastlora"
    for f in "$REPO"/fastlora/*; do ln -s "$f" "$SHIM/fastlora/"; done
    ln -s "$REPO/kernels" "$SHIM/fastlora/kernels"
    for f in tests bench pyproject.toml; do ln -s "$REPO/$f" "$SHIM/$f"; done
    cd "$SHIM"
    echo "gpu_check: fastlora is not installed; running from the import shim $SHIM"
fi

slug="$("$PY" -c "from fastlora.bench.meta import hardware_slug; print(hardware_slug('cuda'))" 2>/dev/null ||
    "$PY" -c "import re, torch; print('gpu-' + re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-'))")"
stem="$RESULTS/$(date -u +%F)-$slug"
SUMMARY="$stem-gpu-check.txt"
{
    echo "gpu_check $(date -u +%FT%TZ), commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(0))"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true
} | tee "$SUMMARY"

# Plots only where matplotlib is installed (the JSON / CSV carry the numbers).
has_mpl=0
"$PY" -c "import matplotlib" >/dev/null 2>&1 && has_mpl=1
plot() { [[ "$has_mpl" == 1 ]] && printf '%s\n' --plot "$1"; }

status=0
step() {  # step NAME SECONDS CMD...: run under a time limit, log to <stem>-NAME.log, record the outcome
    local name="$1" limit="$2"
    shift 2
    local t0=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$stem-$name.log"
    local rc=${PIPESTATUS[0]}
    echo "step $name: exit $rc in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$SUMMARY"
    [ "$rc" -eq 0 ] || status=1
}

# 1. compiled kernels against the float64 reference
step kernel-tests 240 "$PY" -m pytest tests/test_kernels_gpu.py -q -rfEs -p no:cacheprovider \
    --junitxml="$stem-kernel-tests.xml"

# 2. layers: bf16, 8192 tokens, r = 16, p = 0.1 and 0
step layers 100 "$PY" -m fastlora.bench --device cuda --preset llama-3-8b --tokens 8192 --rank 16 --alpha 32 \
    --dtype bf16 --dropout 0.1,0 --warmup 5 --repeats 30 --no-progress \
    --json "$stem-layers.json" --csv "$stem-layers.csv" $(plot "$stem-layers.png")

# 3. the design decisions (it stops measuring at its own budget and lists what it skipped)
step kernel-variants 90 "$PY" bench/kernel_variants.py --tokens 8192 --rank 16 --dropout 0.1,0 --budget 75 \
    --json "$stem-kernel-variants.json"

# 4. one training step of a 2-layer llama-3-8b-width model (bf16)
if [[ "${SKIP_MODEL:-0}" != "1" ]]; then
    step model 25 "$PY" -m fastlora.bench --device cuda --model llama-3-8b --warmup 2 --repeats 5 --no-progress \
        --json "$stem-model.json" --csv "$stem-model.csv" $(plot "$stem-model.png")
fi

# 5. DoRA layers beside PEFT's DoRA and fastlora's LoRA (bf16, 4096 tokens, p = 0.1 and 0)
if [[ "${SKIP_DORA:-0}" != "1" ]]; then
    step dora-layers 45 "$PY" -m fastlora.bench --device cuda --preset llama-3-8b --tokens 4096 --rank 16 --alpha 32 \
        --dtype bf16 --dropout 0.1,0 --warmup 2 --repeats 8 --no-progress \
        --providers frozen,fastlora-triton,peft-dora,fastlora-triton-dora \
        --json "$stem-dora-layers.json" --csv "$stem-dora-layers.csv"
    step dora-composed 25 env FASTLORA_KERNEL_VARIANTS=dora=composed "$PY" -m fastlora.bench --device cuda \
        --preset llama-3-8b --tokens 4096 --rank 16 --alpha 32 --dtype bf16 --dropout 0.1,0 --warmup 2 --repeats 8 \
        --no-progress --providers fastlora-triton-dora \
        --json "$stem-dora-layers-composed.json" --csv "$stem-dora-layers-composed.csv"
fi

# 6. the README section from every layer / model results file (the kernel variants have their own format)
bench_jsons=()
for f in "$RESULTS"/*.json; do
    [[ -e "$f" && "$f" != *kernel-variants* && "$f" != *-composed* ]] && bench_jsons+=("$f")
done
if ((${#bench_jsons[@]})); then
    "$PY" -m fastlora.bench.report "${bench_jsons[@]}" >"$RESULTS/README-section.md" 2>>"$SUMMARY" ||
        echo "README section: failed" | tee -a "$SUMMARY"
fi

echo "gpu_check: results under $RESULTS ($(basename "$stem")-*), exit $status" | tee -a "$SUMMARY"
exit "$status"

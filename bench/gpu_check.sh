#!/usr/bin/env bash
# Device check for a machine with one CUDA GPU and no network (an H100/H200 with torch 2.11, triton 3.6, peft
# and transformers installed; newer versions too).  Run from anywhere; fastlora need not be installed:
#
#     bash bench/gpu_check.sh --preflight   # at most 60 s: versions, CUDA, one small kernel forward+backward
#     bash bench/gpu_check.sh               # the full check, at most 420 s of steps (limits below)
#     bash bench/gpu_check.sh --steps       # QLoRA, the other base kinds, torch.compile peers: 155 s
#     SKIP_MODEL=1 / SKIP_DORA=1            # leave out the model step / the two DoRA steps
#
# The steps, most valuable first (bench/README.md says what each one decides):
#   0. qlora-tests       55 s  the 4-bit kernels and layers compiled, against bitsandbytes, the dense kernels and
#                              PEFT (JUnit XML); left out without bitsandbytes
#   1. kernel-tests     125 s  the other compiled kernels against the float64 reference (JUnit XML)
#   2. kernel-variants   90 s  the Triton GEMM against cuBLAS, schedule and precision variants, the winners
#                              per shape and token count (*-kernel-schedules.json: the package's schedule table)
#   3. layers            70 s  Llama-3-8B projections, 8192 tokens, r=16, bf16, p=0.1 and 0, beside PEFT
#   4. model             25 s  one training step of a 2-layer llama-3-8b-width model
#   5. dora-layers       35 s  DoRA layers beside PEFT's DoRA (4096 tokens)
#   6. dora-composed     20 s  DoRA on the composed schedule, to hold against step 5
# and, as a call of its own (bash bench/gpu_check.sh --steps, at most 155 s of steps):
#   kinds-steps         30 s  a 4-bit QLoRA step at Llama-3-8B's projection shapes, fastlora / PEFT / frozen
#   kinds-qlora-crossover 35 s  QLoRA layers per token count: the fused 4-bit GEMM against dequantize-then-cuBLAS,
#                             PEFT and the frozen layer; the winners as the schedule table's base_4bit classes
#   kinds-qlora-fused   35 s  the kinds-steps step with every 4-bit layer fused (base_4bit=fused): time and peak
#   kinds-moe-gpt2      15 s  whole-model steps: MoE experts as parameters, GPT-2's Conv1D
#   kinds-mixed-batch   10 s  k = 1, 2, 4, 8 adapters over one batch
#   kinds-compile       30 s  frozen, PEFT and fastlora under torch.compile beside their eager selves
# then the README section from the run's results files.
#
# Where files go: with $OUT set (the device tool), every file is written to a staging folder and packed, after
# each step and on exit or interruption, into $OUT/<date>-<gpu>-gpu-check.tar.gz, beside the plain-text
# summary $OUT/<date>-<gpu>-gpu-check.txt: two files, whatever the number of steps.  Without $OUT the files go
# to bench/results/ directly.  Unpack the archive into bench/results/ and commit it.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
# fastlora imports from the checkout itself (fastlora/kernels links to kernels/), installed or not.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
# Autotuning results kept on disk (triton's TRITON_CACHE_AUTOTUNING; a version without it ignores it), so the
# later steps reuse what the earlier ones tuned instead of benchmarking every config again.
export TRITON_CACHE_AUTOTUNING=1
PY="${PYTHON:-$(command -v python3 || command -v python)}"
[[ -n "$PY" ]] || { echo "gpu_check.sh: neither python nor python3 on PATH" >&2; exit 2; }
MODE=full
[[ "${1:-}" == "--preflight" ]] && MODE=preflight
[[ "${1:-}" == "--steps" ]] && MODE=steps
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA device')" || exit 2
# Packages the machine lacks, carried as wheels in .whl/ (bench/gpu_wheels.sh fetches them): bitsandbytes.
# shellcheck source=bench/carried_wheels.sh
source "$REPO/bench/carried_wheels.sh"
use_carried_wheels "$REPO" "$PY"
# QLoRA's GPU tests and steps are left out where bitsandbytes cannot be imported.
has_bnb=0
"$PY" -c "import bitsandbytes" >/dev/null 2>&1 && has_bnb=1

# shellcheck source=bench/step_runner.sh
source "$REPO/bench/step_runner.sh"
slug="$("$PY" -c "from fastlora.bench.meta import hardware_slug; print(hardware_slug('cuda'))" 2>/dev/null ||
    "$PY" -c "import re, torch; print('gpu-' + re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-'))")"
name="$(date -u +%F)-$slug-gpu-$([[ $MODE == full ]] && echo check || echo "$MODE")"
if [[ -n "${OUT:-}" ]]; then
    runner_init "$name" "$(mktemp -d)" "$OUT"
else
    runner_init "$name" "$REPO/bench/results" "$REPO/bench/results"
fi
stem="$RUNNER_STAGE/$(date -u +%F)-$slug"
{
    echo "gpu_check $MODE $(date -u +%FT%TZ), commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(0))"
    "$PY" -c "import importlib.metadata as m; print(' | '.join(f'{d} {m.version(d)}' for d in ('peft', 'transformers', 'accelerate', 'bitsandbytes') if __import__('importlib.util').util.find_spec(d)))" 2>/dev/null
    [[ -n "$CARRIED_WHEELS" ]] && echo "$CARRIED_WHEELS"
    [[ "$has_bnb" == 1 ]] || echo "bitsandbytes cannot be imported: QLoRA's GPU tests and steps are left out (bash bench/gpu_wheels.sh, then carry .whl)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true
} | tee -a "$SUMMARY"
pack

qlora_step() {  # qlora_step NAME SECONDS CMD...: a step that needs bitsandbytes, left out (and said so) without it
    if [[ "$has_bnb" == 1 ]]; then step "$@"; else echo "step $1: left out (bitsandbytes cannot be imported)" | tee -a "$SUMMARY"; fi
}
pytest_args=(-q -rfEs -p no:cacheprovider)
# The 4-bit tests of tests/test_kernels_gpu.py, run first in a step of their own (they would come last in the
# file's order, after the longest tests), and left out of the kernel-tests step.
qlora_tests="dequant4 or 4bit or qlora or qdora"
if [[ "$MODE" == preflight ]]; then
    step preflight 50 "$PY" -m pytest tests/test_kernels_gpu.py -m preflight "${pytest_args[@]}"
    echo "gpu_check preflight: exit $RUNNER_STATUS" | tee -a "$SUMMARY"
    exit "$RUNNER_STATUS"
fi

if [[ "$MODE" == steps ]]; then
    # QLoRA first: a whole training step at Llama-3-8B's projection shapes (one decoder layer, 4 × 512 tokens),
    # bitsandbytes' dequantize-then-matmul (the default) against PEFT's QLoRA and the frozen 4-bit base; then per
    # layer and token count the fused 4-bit GEMM against it, PEFT and the frozen layer: the crossover, as the
    # schedule table's base_4bit classes (*-kernel-schedules-4bit.json; bench/README.md says how to merge them).
    qlora_step kinds-steps 30 "$PY" -m fastlora.bench --device cuda --step qlora-nf4 --preset llama-3-8b --layers 1 \
        --batch 4 --seq 512 --warmup 2 --repeats 5 --no-progress --json "$stem-steps-qlora.json"
    qlora_step kinds-qlora-crossover 35 "$PY" bench/qlora_crossover.py --tokens 512,8192,64,2048 --budget 32 \
        --json "$stem-qlora-crossover.json" --package-table "$stem-kernel-schedules-4bit.json"
    # the whole step again with every 4-bit layer fused: its time and its peak beside the frozen 4-bit model's
    qlora_step kinds-qlora-fused 35 env FASTLORA_KERNEL_VARIANTS=base_4bit=fused "$PY" -m fastlora.bench --device cuda \
        --step qlora-nf4 --preset llama-3-8b --layers 1 --batch 4 --seq 512 --warmup 1 --repeats 4 --no-progress \
        --json "$stem-steps-qlora-fused.json"
    step kinds-moe-gpt2 15 "$PY" -m fastlora.bench --device cuda --step moe --step gpt2 --hidden 2048 --layers 2 \
        --batch 4 --seq 512 --warmup 2 --repeats 5 --no-progress --json "$stem-steps.json"
    step kinds-mixed-batch 10 "$PY" -m fastlora.bench --device cuda --step mixed-batch --hidden 1024 --seq 256 \
        --warmup 2 --repeats 5 --no-progress --json "$stem-mixed-batch.json"
    # torch.compile as a peer: Llama-3-8B's down_proj (its largest K), 8192 tokens, p=0.1, each provider eager
    # and compiled; compile time is timed apart (compile_s) and not in the step time.
    step kinds-compile 30 "$PY" -m fastlora.bench --device cuda --preset llama-3-8b --proj down_proj \
        --tokens 8192 --rank 16 --alpha 32 --dtype bf16 --dropout 0.1 --providers frozen,peft,fastlora-triton \
        --compile --warmup 3 --repeats 10 --no-progress --json "$stem-compile-layers.json"
    echo "gpu_check steps: exit $RUNNER_STATUS" | tee -a "$SUMMARY"
    exit "$RUNNER_STATUS"
fi

# Plots only where matplotlib is installed (the JSON / CSV carry the numbers).
has_mpl=0
"$PY" -c "import matplotlib" >/dev/null 2>&1 && has_mpl=1
plot_args() {  # plot_args NAME FILE: the array NAME holds --plot FILE where matplotlib is installed, else nothing
    local -n into="$1"
    into=()
    [[ "$has_mpl" == 1 ]] && into=(--plot "$2")
    return 0
}

qlora_step qlora-tests 55 "$PY" -m pytest tests/test_kernels_gpu.py -k "$qlora_tests" "${pytest_args[@]}" \
    --junitxml="$stem-qlora-tests.xml"
step kernel-tests 125 "$PY" -m pytest tests/test_kernels_gpu.py -k "not ($qlora_tests)" "${pytest_args[@]}" \
    --junitxml="$stem-kernel-tests.xml"

step kernel-variants 90 "$PY" bench/kernel_variants.py --tokens 8192,2048,512 --rank 16 --dropout 0.1,0 --budget 75 \
    --json "$stem-kernel-variants.json" --package-table "$stem-kernel-schedules.json"

plot_args layer_plot "$stem-layers.png"
step layers 70 "$PY" -m fastlora.bench --device cuda --preset llama-3-8b --tokens 8192 --rank 16 --alpha 32 \
    --dtype bf16 --dropout 0.1,0 --warmup 5 --repeats 20 --no-progress \
    --json "$stem-layers.json" --csv "$stem-layers.csv" "${layer_plot[@]}"

if [[ "${SKIP_MODEL:-0}" != "1" ]]; then
    plot_args model_plot "$stem-model.png"
    step model 25 "$PY" -m fastlora.bench --device cuda --model llama-3-8b --warmup 2 --repeats 5 --no-progress \
        --json "$stem-model.json" --csv "$stem-model.csv" "${model_plot[@]}"
fi

if [[ "${SKIP_DORA:-0}" != "1" ]]; then
    step dora-layers 35 "$PY" -m fastlora.bench --device cuda --preset llama-3-8b --tokens 4096 --rank 16 --alpha 32 \
        --dtype bf16 --dropout 0.1,0 --warmup 2 --repeats 6 --no-progress \
        --providers frozen,fastlora-triton,peft-dora,fastlora-triton-dora \
        --json "$stem-dora-layers.json" --csv "$stem-dora-layers.csv"
    step dora-composed 20 env FASTLORA_KERNEL_VARIANTS=dora=composed "$PY" -m fastlora.bench --device cuda \
        --preset llama-3-8b --tokens 4096 --rank 16 --alpha 32 --dtype bf16 --dropout 0.1,0 --warmup 2 --repeats 6 \
        --no-progress --providers fastlora-triton-dora \
        --json "$stem-dora-layers-composed.json" --csv "$stem-dora-layers-composed.csv"
fi

# The README section from this run's layer / model results (the kernel variants have their own format).
bench_jsons=()
for f in "$stem"-*.json; do
    [[ -e "$f" && "$f" != *kernel-variants* && "$f" != *kernel-schedules* && "$f" != *-composed* &&
        "$f" != *-steps* && "$f" != *-mixed-batch* ]] &&
        bench_jsons+=("$f")
done
if ((${#bench_jsons[@]})); then
    "$PY" -m fastlora.bench.report "${bench_jsons[@]}" >"$stem-README-section.md" 2>>"$SUMMARY" ||
        echo "README section: failed" | tee -a "$SUMMARY"
fi
echo "gpu_check: exit $RUNNER_STATUS" | tee -a "$SUMMARY"
exit "$RUNNER_STATUS"

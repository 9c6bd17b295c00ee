#!/usr/bin/env bash
# GPU results for bench/results/: run from the repository root on a machine with CUDA, then commit
# the files it writes (named with the date and the GPU) and regenerate the README section:
#
#     bash bench/gpu_check.sh            # all presets + the model steps (~5-10 min on an H100/H200)
#     QUICK=1 bash bench/gpu_check.sh    # llama-3-8b q/gate/down only, fewer repeats (~1-2 min)
#
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA device')"
out=bench/results
mkdir -p "$out"
stem="$out/$(date -u +%F)-$(python -c "from fastlora.bench.meta import hardware_slug; print(hardware_slug('cuda'))")"
common=(--device cuda --rank 16 --alpha 32)
if [[ "${QUICK:-0}" == "1" ]]; then
    layer_args=(--preset llama-3-8b --proj q_proj,gate_proj,down_proj --warmup 5 --repeats 20)
    model_args=(--warmup 2 --repeats 5)
else
    layer_args=(--preset llama-3-8b --preset qwen2.5-7b --warmup 10 --repeats 50)
    model_args=(--warmup 3 --repeats 10)
fi

# 1. layers: bf16, 8192 tokens, p = 0.1 and 0 (kernel-level: frozen base, PEFT, fastlora torch and triton)
python -m fastlora.bench "${common[@]}" "${layer_args[@]}" --tokens 8192 --dtype bfloat16 --dropout 0.1,0 \
    --json "$stem-layers.json" --csv "$stem-layers.csv" --plot "$stem-layers.png" --no-progress
# 2. one training step of a 2-layer llama-3-8b-width model (bf16, 4×2048 tokens), seed config r=8
python -m fastlora.bench --device cuda --model llama-3-8b "${model_args[@]}" \
    --json "$stem-model.json" --csv "$stem-model.csv" --plot "$stem-model.png" --no-progress
# 3. the tiny model of the CPU targets, on the GPU (fp32)
python -m fastlora.bench --device cuda --model tiny "${model_args[@]}" \
    --json "$stem-tiny-model.json" --no-progress
# 4. the README section from every results file
python -m fastlora.bench.report "$out"/*.json > "$out/README-section.md"
echo "wrote $stem-*.json/.csv/.png and $out/README-section.md"

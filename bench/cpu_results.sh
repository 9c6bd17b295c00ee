#!/usr/bin/env bash
# CPU results for bench/results/ (what is committed from the development machine: 2 threads):
#
#     bash bench/cpu_results.sh          # tiny model step (LoRA; DoRA) + tiny layers (~9 min on 2 cores)
#     LLAMA=1 bash bench/cpu_results.sh  # also the llama-3-8b layer shapes at 256 tokens (~8 min more)
#
# CPU timings move with whatever else runs on the machine: every row records the share of the CPUs other
# processes used while it was timed (other_load); cases above MAX_OTHER are re-timed up to RETRIES times.
# The exact command of each committed file is in its JSON ("command").
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/results
mkdir -p "$out"
stem="$out/$(date -u +%F)-$(python -c "from fastlora.bench.meta import hardware_slug; print(hardware_slug('cpu'))")"
threads=${THREADS:-2}
quiet=(--max-other-load ${MAX_OTHER:-0.05} --retries ${RETRIES:-4} --wait-idle ${WAIT_IDLE:-120})

python -m fastlora.bench --device cpu --threads "$threads" "${quiet[@]}" --model tiny --warmup 3 --repeats 30 \
    --providers frozen,peft,peft+patch,fastlora-torch,fastlora-torch+inactive \
    --json "$stem-model.json" --csv "$stem-model.csv" --plot "$stem-model.png" --no-progress
# DoRA beside both LoRAs, in a run of its own (PEFT's DoRA changes the allocator's state for the rest of a run)
python -m fastlora.bench --device cpu --threads "$threads" "${quiet[@]}" --model tiny --warmup 3 --repeats 30 \
    --providers frozen,peft,fastlora-torch,peft-dora,fastlora-torch-dora \
    --json "$stem-model-dora.json" --csv "$stem-model-dora.csv" --no-progress
# torch.compile as a peer: the frozen model, PEFT and fastlora, each eager and compiled, in a run of its own
python -m fastlora.bench --device cpu --threads "$threads" "${quiet[@]}" --model tiny --warmup 3 --repeats 20 \
    --providers frozen,peft,fastlora-torch --compile --json "$stem-model-compile.json" --csv "$stem-model-compile.csv" \
    --no-progress
layer_providers=frozen,peft,peft+patch,fastlora-torch,peft-dora,fastlora-torch-dora
python -m fastlora.bench --device cpu --threads "$threads" "${quiet[@]}" --preset tiny --tokens 1024 --dropout 0.1,0 \
    --providers "$layer_providers" --warmup 2 --repeats 15 --json "$stem-layers.json" --csv "$stem-layers.csv" --plot "$stem-layers.png" --no-progress
if [[ "${LLAMA:-0}" == "1" ]]; then
    python -m fastlora.bench --device cpu --threads "$threads" "${quiet[@]}" --preset llama-3-8b --tokens 256 --dropout 0.1,0 \
        --providers "$layer_providers" --warmup 1 --repeats 5 --json "$stem-llama-3-8b-layers.json" --csv "$stem-llama-3-8b-layers.csv" \
        --plot "$stem-llama-3-8b-layers.png" --no-progress
fi
# whole-model steps of the other base kinds (GPT-2, MoE, QLoRA nf4 / int8) and mixed batches
python -m fastlora.bench --device cpu --threads "$threads" --step gpt2 --step moe --step qlora-nf4 --step qlora-int8 \
    --json "$stem-steps.json" --no-progress
python -m fastlora.bench --device cpu --threads "$threads" --step mixed-batch --warmup 3 --repeats 12 \
    --json "$stem-mixed-batch.json" --no-progress
python -m fastlora.bench.report "$out"/*.json --plot-link "$stem-model.png" --page docs/performance.md > "$out/README-section.md"
echo "wrote $stem-* and $out/README-section.md"

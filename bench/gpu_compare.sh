#!/usr/bin/env bash
# Issue 17's GPU table: bench/compare_trl.py on both workloads in bfloat16 on one CUDA GPU, TRL and
# dpo-lora's variants each in its own process. Needs TRL (`.[bench]`) and a CUDA build of torch in
# `PYTHON` (default python3). MODEL is the model folder (default the demo's SmolLM2; about 6
# minutes on an H200). GEOMETRY=llama2-7b or llama3-8b instead writes a random-weight model of that
# geometry (bench/random_model.py, ~14-16 GB under runs/) and compares TRL, dpo-lora, its fused, mask
# and flex variants and its checkpoint_layers=auto variant on it. WORKLOADS (default "short long") picks the workloads; each writes
# bench/results/WORKLOAD-bfloat16-TIMESTAMP.json. The memory column is the CUDA allocator's peak
# (torch.cuda.max_memory_allocated).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
if [[ -n "${GEOMETRY:-}" ]]; then
    model="runs/gpu-compare/$GEOMETRY"
    [[ -f "$model/model.safetensors.index.json" ]] || "$python" bench/random_model.py "$model" --geometry "$GEOMETRY"
    # A 7B step is arithmetic-bound and steady, so few steps settle; each process loads 13+ GB.
    short_steps=6 long_steps=4 systems="trl,dpo-lora,dpo-lora-fused,dpo-lora-mask,dpo-lora-flex,dpo-lora-auto,dpo-lora-f32res" extra=""
else
    model="${MODEL:-models/SmolLM2-135M-Instruct}"
    # More steps than the CPU defaults (8 and 4): a small model's GPU step takes well under a
    # second and is launch-bound, so its times scatter and the median needs more of them.
    # The plain and online variants ran on an H200 (20261129, docs/performance.md); in their
    # place the two that have not run on a GPU: FlexAttention and compiled layers (the launch-bound
    # small model is where compiling should pay most).
    short_steps=24 long_steps=12 systems="trl,dpo-lora,dpo-lora-fused,dpo-lora-flex,dpo-lora-compile,dpo-lora-mask"
    extra=",dpo-lora-f32res"  # the float32 residual stream and head (on a GPU, auto is all bf16)
fi
for workload in ${WORKLOADS:-short long}; do
    steps="${workload}_steps"
    [[ $workload == short ]] || extra=""
    "$python" bench/compare_trl.py --workload "$workload" --steps "${!steps}" --dtype bfloat16 --model "$model" \
        --systems "$systems$extra"
done

#!/usr/bin/env bash
# Issue 17's GPU table: bench/compare_trl.py on both workloads in bfloat16 on one CUDA GPU, TRL and
# dpo-lora's variants each in its own process; about 6 minutes on an H200. Needs TRL (`.[bench]`)
# and a CUDA build of torch in `PYTHON` (default python3); MODEL is the model folder (default the
# demo's SmolLM2). Each workload writes bench/results/WORKLOAD-bfloat16-TIMESTAMP.json; the peak
# memory column is the CUDA allocator's peak (torch.cuda.max_memory_allocated) on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
model="${MODEL:-models/SmolLM2-135M-Instruct}"
# More steps than the CPU defaults (8 and 4): a GPU step takes well under a second, so the
# steady-state median needs more of them to settle.
systems="trl,dpo-lora,dpo-lora-plain,dpo-lora-online,dpo-lora-mask"
"$python" bench/compare_trl.py --workload short --steps 24 --dtype bfloat16 --model "$model" --systems "$systems,dpo-lora-allbf16"
"$python" bench/compare_trl.py --workload long --steps 12 --dtype bfloat16 --model "$model" --systems "$systems"

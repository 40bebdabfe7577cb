#!/usr/bin/env bash
# The prepared GPU check: one CUDA GPU, under 8 minutes on an H100. Run it whenever a GPU is at
# hand (the project stays fully tested without one). Needs a CUDA build of torch already in the
# python it runs with (`PYTHON`, default python3); installs dpo-lora into it, then runs
# bench/gpu_check.py: the CUDA-capable tests, SmolLM2 NF4 bf16 training (default layout, then
# packed with flash-attention where flash_attn imports), an fp16 run killed and resumed, ZeRO-3 on
# one rank, the device's peak memory of each; one JSON file in bench/results/; the shared-prompt
# attention kernels side by side (bench/shared_attention.py). Then, where TRL
# imports, bench/compare_trl.py on both workloads in bfloat16 (a JSON file each).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
"$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "bench/gpu_check.sh: torch sees no CUDA GPU in $python" >&2
    exit 2
}
"$python" -m pip install --quiet -e ".[test]"
"$python" -m dpo_lora fetch-default-model models/SmolLM2-135M-Instruct >/dev/null
"$python" bench/gpu_check.py "$@"
# The shared-prompt attention kernels, one layer: mask, split and FlexAttention (about a minute).
"$python" bench/shared_attention.py --dtype bfloat16 | tee "bench/results/shared-attention-$(date +%Y%m%d-%H%M%S).txt"
# Against TRL in bfloat16 on this GPU (issue 17's GPU table), where TRL is installed (`.[bench]`).
if "$python" -c "import trl" 2>/dev/null; then
    PYTHON="$python" bench/gpu_compare.sh
fi

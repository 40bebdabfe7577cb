#!/usr/bin/env bash
# Train on one machine with NPROC ranks through DeepSpeed's own launcher.
#   launch/single_node.sh NPROC CONFIG [dotted.key=value ...]
# NPROC ranks = NPROC GPUs on a CUDA machine, NPROC CPU processes (gloo) elsewhere.
# MASTER_PORT (default 29500) picks the rendezvous port; NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME
# pass through from the environment when set.
set -euo pipefail
usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in -h | --help) usage; exit 0 ;; esac
[[ $# -ge 2 ]] || { usage >&2; exit 2; }
nproc="$1"; shift
exec deepspeed --num_gpus "$nproc" --master_port "${MASTER_PORT:-29500}" --module dpo_lora train "$@"

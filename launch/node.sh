#!/usr/bin/env bash
# Start this node's ranks of a multi-node job, for clusters without ssh between nodes.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/node.sh CONFIG [dotted.key=value ...]
# Run it once on every node with the same NNODES, MASTER_ADDR, MASTER_PORT and its own NODE_RANK
# (0 on the MASTER_ADDR node). NPROC_PER_NODE ranks per node (default: the GPUs seen, else 1).
# MASTER_PORT defaults to 29500. NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME name the network
# interface the ranks talk over; set them when a node has several (gloo otherwise may bind to
# the address its hostname resolves to, 127.0.0.1 on many machines, and never connect).
set -euo pipefail
usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in -h | --help) usage; exit 0 ;; esac
[[ $# -ge 1 ]] || { usage >&2; exit 2; }
for var in NNODES NODE_RANK MASTER_ADDR; do
    [[ -n "${!var:-}" ]] || { echo "launch/node.sh: set $var (see --help)" >&2; exit 2; }
done
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE="$(python -c 'import torch; print(torch.cuda.device_count() or 1)')"
fi
exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
    -m dpo_lora train "$@"

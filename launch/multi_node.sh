#!/usr/bin/env bash
# Train across the hosts of a hostfile through DeepSpeed's launcher (ssh/pdsh from this host).
#   launch/multi_node.sh HOSTFILE CONFIG [dotted.key=value ...]
# HOSTFILE lines are "hostname slots=N" (N ranks on that host); every host needs passwordless ssh,
# this repository at the same path and the same environment. Rank 0 runs on the first host.
# MASTER_ADDR (default: first host), MASTER_PORT (default 29500). NCCL_SOCKET_IFNAME,
# GLOO_SOCKET_IFNAME and every DPO_LORA_* variable, when set, are forwarded to every rank.
set -euo pipefail
usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in -h | --help) usage; exit 0 ;; esac
[[ $# -ge 2 ]] || { usage >&2; exit 2; }
hostfile="$1"; shift
[[ -f "$hostfile" ]] || { echo "launch/multi_node.sh: hostfile not found: $hostfile" >&2; exit 2; }
first_host="$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")"

# DeepSpeed forwards only a few variable prefixes to remote ranks; the rest go through an env file.
env_file="$(mktemp)"
trap 'rm -f "$env_file"' EXIT
for existing in "$HOME/.deepspeed_env" ".deepspeed_env"; do
    [[ -f "$existing" ]] && cat "$existing" >>"$env_file"
done
for var in NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME $(compgen -e | grep '^DPO_LORA_' || true); do
    [[ -n "${!var:-}" ]] && echo "$var=${!var}" >>"$env_file"
done
DS_ENV_FILE="$env_file" deepspeed --hostfile "$hostfile" \
    --master_addr "${MASTER_ADDR:-$first_host}" --master_port "${MASTER_PORT:-29500}" \
    --module dpo_lora train "$@"

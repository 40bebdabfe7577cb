"""`dpo-lora plan [CONFIG]`: the per-rank device memory of a run, what fits, and advice; with
`--time`, the quote's steps, tokens and time (dpo_lora.model.quote, which the service shares)."""

from __future__ import annotations

import json

from dpo_lora.core.config import load_config
from dpo_lora.core.sizes import parse_size
from dpo_lora.model.cluster import by_gpus, cluster_table
from dpo_lora.model.fitting import largest_fitting
from dpo_lora.model.memory_plan import data_lengths, plan
from dpo_lora.model.quote import memory_quote, time_quote


def run(args) -> int:
    config = load_config(args.config, args.overrides)
    budget = parse_size(args.gpu_memory, flag="--gpu-memory")
    auto = config.model.gradient_checkpointing and config.model.checkpoint_layers == "auto"
    table = by_gpus(config, budget)  # as configured: `auto` counts every layer there
    config, planned, quoted = memory_quote(config, budget, world_size=args.gpus)  # `auto` resolved
    if args.time:
        quoted |= time_quote(config, args.gpus, _device())
    at_data = plan(config, world_size=args.gpus, lengths=data_lengths(config)) if args.data else None
    largest = {key: largest_fitting(config, planned, budget, key) for key in ("micro_batch_size", "max_length")}
    if args.json:
        print(
            json.dumps(
                {
                    "total_bytes": planned.total_bytes,
                    "gpu_memory_bytes": budget,
                    **quoted,
                    "largest_micro_batch_size": largest["micro_batch_size"],
                    "largest_max_length": largest["max_length"],
                    "data_total_bytes": at_data and at_data.total_bytes,
                    "by_gpus": [fit.as_dict() for fit in table],
                },
                indent=2,
            )
        )
        return 0
    print(
        f"per-rank device memory of {args.config or 'the defaults'} on {args.gpus} rank(s), "
        f"micro-batch of {planned.rows} row(s) x {planned.tokens_per_row} tokens:"
    )
    for name, size in planned.components.items():
        print(f"  {name:<52}{size / 2**30:>9.2f} GiB")
    verdict = "fits" if quoted["fits"] else "does NOT fit"
    print(f"  {'total':<52}{planned.total_bytes / 2**30:>9.2f} GiB  ({verdict} {budget / 2**30:.1f} GiB)")
    if planned.host:
        print(f"host memory per rank (ZeRO and activation offload), {args.gpus} rank(s) on a node need {args.gpus}x:")
        for name, size in planned.host.items():
            print(f"  {name:<52}{size / 2**30:>9.2f} GiB")
    print(
        f"largest train.micro_batch_size that fits: {largest['micro_batch_size']} (at data.max_length="
        f"{config.data.max_length}); largest data.max_length: {largest['max_length']} (at micro-batch "
        f"{config.train.micro_batch_size})"
    )
    if auto:
        print(f"model.checkpoint_layers=auto: {quoted['checkpoint_layers']} layers checkpointed (the fewest that fit)")
    if at_data:
        print(
            f"at {config.data.train}'s longest pair ({at_data.rows} row(s) x {at_data.tokens_per_row} tokens): "
            f"{at_data.total_bytes / 2**30:.2f} GiB (activations "
            f"{(at_data.total_bytes - planned.total_bytes) / 2**30:+.2f} GiB against the worst case)"
        )
    if quoted["recommendation"]:
        print(f"recommendation: {quoted['recommendation']}")
    print("\n".join(cluster_table(table, budget)))
    if args.time:
        print(
            f"time on {quoted['device']}: {quoted['total_steps']} steps, "
            f"{quoted['trained_tokens']:,} tokens, about {_duration(quoted['estimated_seconds'])} "
            f"({quoted['device_hours']:.3f} device-hours; {quoted['step_flops'] / 1e12:.2f} TFLOP a step at "
            f"{quoted['efficiency']:.0%} of {quoted['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s)"
        )
    return 0


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"

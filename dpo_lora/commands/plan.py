"""`dpo-lora plan [CONFIG]`: the per-rank device memory of a run, what fits, and advice."""

from __future__ import annotations

import json
from dataclasses import replace

from dpo_lora.core.config import load_config
from dpo_lora.core.sizes import parse_size
from dpo_lora.model.fitting import checkpointing_hint, fewest_fitting, largest_fitting, recommendation
from dpo_lora.model.memory_plan import data_lengths, plan


def run(args) -> int:
    config = load_config(args.config, args.overrides)
    budget = parse_size(args.gpu_memory, flag="--gpu-memory")
    auto = None
    if config.model.gradient_checkpointing and config.model.checkpoint_layers == "auto":  # what a run would pick
        auto = fewest_fitting(config, budget, args.gpus)
        config = replace(config, model=replace(config.model, checkpoint_layers=auto[0]))
    planned = plan(config, world_size=args.gpus)
    at_data = plan(config, world_size=args.gpus, lengths=data_lengths(config)) if args.data else None
    fits = planned.total_bytes <= budget
    largest = {key: largest_fitting(config, planned, budget, key) for key in ("micro_batch_size", "max_length")}
    if not fits:
        advice = recommendation(config, planned, budget)
    else:  # auto's count is already the fewest that fit
        advice = None if auto else checkpointing_hint(config, planned, budget, args.gpus)
    if args.json:
        print(
            json.dumps(
                {
                    "total_bytes": planned.total_bytes,
                    "fits": fits,
                    "gpu_memory_bytes": budget,
                    "components": planned.components,
                    "largest_micro_batch_size": largest["micro_batch_size"],
                    "largest_max_length": largest["max_length"],
                    "recommendation": advice,
                    "data_total_bytes": at_data and at_data.total_bytes,
                    "checkpoint_layers": config.model.checkpoint_layers,
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
    verdict = "fits" if fits else "does NOT fit"
    print(f"  {'total':<52}{planned.total_bytes / 2**30:>9.2f} GiB  ({verdict} {budget / 2**30:.1f} GiB)")
    print(
        f"largest train.micro_batch_size that fits: {largest['micro_batch_size']} (at data.max_length="
        f"{config.data.max_length}); largest data.max_length: {largest['max_length']} (at micro-batch "
        f"{config.train.micro_batch_size})"
    )
    if auto:
        print(f"model.checkpoint_layers=auto: {auto[0]} of {auto[2]} layers checkpointed (the fewest that fit)")
    if at_data:
        print(
            f"at {config.data.train}'s longest pair ({at_data.rows} row(s) x {at_data.tokens_per_row} tokens): "
            f"{at_data.total_bytes / 2**30:.2f} GiB (activations "
            f"{(at_data.total_bytes - planned.total_bytes) / 2**30:+.2f} GiB against the worst case)"
        )
    if advice:
        print(f"recommendation: {advice}")
    return 0

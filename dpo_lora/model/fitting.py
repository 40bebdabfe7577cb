"""What fits a memory budget, by the plan (`memory_plan.plan`): the fewest checkpointed layers
(`model.checkpoint_layers: auto`, resolved here before the model loads), the largest micro-batch or
length, and one line when a run fits with less recompute (dpo_lora.model.cluster says what to change
when it does not fit)."""

from __future__ import annotations

import sys
from dataclasses import replace

import torch

from dpo_lora.core.distributed import gather_lists
from dpo_lora.model.grad_checkpointing import checkpointed_count
from dpo_lora.model.memory_plan import Plan, activations_of, plan, text_config_of, zero_settings

AUTO_MEMORY_FRACTION = 0.9  # of a GPU's free memory that `auto` plans into


def fewest_fitting(config, budget: int, world_size: int = 1) -> tuple[int, int, int]:
    """(K, its planned bytes, the model's layer count): the fewest checkpointed layers whose
    `dpo-lora plan` at `data.max_length`'s worst case fits `budget` bytes per rank; every layer
    when none does. Up to all but the last, the plan shrinks as K grows, so a bisection finds it.
    Checkpointing the last layer as well never lowers the peak: its recompute runs right after
    the forward, while every checkpointed input is still held."""
    text_config = text_config_of(config)
    layers = text_config.num_hidden_layers
    every = replace(config, model=replace(config.model, checkpoint_layers="all"))
    every_bytes = plan(every, world_size).total_bytes
    fixed = every_bytes - sum(activations_of(every, text_config)[0].values())  # weights, optimizer, overhead

    def planned(count: int) -> int:
        variant = replace(config, model=replace(config.model, checkpoint_layers=count))
        return fixed + sum(activations_of(variant, text_config)[0].values())

    low, high = 0, max(layers - 1, 0)  # planned(high) is the answer when nothing smaller fits
    high_bytes = planned(high)
    if high_bytes > budget:
        return layers, every_bytes, layers
    while low < high:
        middle = (low + high) // 2
        middle_bytes = planned(middle)
        if middle_bytes <= budget:
            high, high_bytes = middle, middle_bytes
        else:
            low = middle + 1
    return high, high_bytes, layers


def device_budget(device: torch.device) -> int | None:
    """Bytes `auto` may plan into on `device`: a share of the GPU's free memory; None on a CPU,
    where resident memory runs well past live tensors (heap fragmentation) and no plan bounds it."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(AUTO_MEMORY_FRACTION * (free + torch.cuda.memory_reserved(device)))


def resolve_auto(config, device: torch.device, world_size: int, announce: bool):
    """`config` with `model.checkpoint_layers: auto` replaced by a layer count, saying which and why.
    Every rank takes the same count, sized to the rank with the least free memory. Under ZeRO-3
    every layer: one not checkpointed keeps the gathered weights its quantized matmuls read on the
    autograd graph until the backward (dpo_lora.model.grad_checkpointing), which the plan does not
    count."""
    if not config.model.gradient_checkpointing or config.model.checkpoint_layers != "auto":
        return config
    budgets = gather_lists([device_budget(device)])
    budget = None if None in budgets else min(budgets)
    if zero_settings(config).stage == 3:
        count, why = "all", "under ZeRO-3 a layer not checkpointed keeps its gathered weights until the backward"
    elif config.model.offload_activations:
        count, why = "all", "model.offload_activations keeps every layer's input on the host"
    elif budget is None:
        count, why = "all", "auto sizes to GPU memory; on a CPU it checkpoints every layer"
    else:
        count, planned, layers = fewest_fitting(config, budget, world_size)
        why = (
            f"{count} of {layers} layers; plan {planned / 2**30:.2f} GiB of {budget / 2**30:.2f} GiB usable on {device}"
        )
    if announce:
        print(f"dpo-lora: model.checkpoint_layers=auto -> {count} ({why})", file=sys.stderr)
    return replace(config, model=replace(config.model, checkpoint_layers=count))


def largest_fitting(config, planned: Plan, budget: int, key: str) -> int:
    """The largest `train.micro_batch_size` or `data.max_length` (`key`) whose plan fits `budget`
    bytes, the rest of the config as given; 0 when even 1 does not fit."""
    text_config = text_config_of(config)
    activation_names = set(activations_of(config, text_config)[0])
    fixed = sum(v for k, v in planned.components.items() if k not in activation_names)
    ceiling = 4096 if key == "micro_batch_size" else getattr(text_config, "max_position_embeddings", 131072)

    def fits(value: int) -> bool:
        if key == "micro_batch_size":
            variant = replace(config, train=replace(config.train, micro_batch_size=value))
        else:
            prompt = min(config.data.max_prompt_length, value - 1)
            variant = replace(config, data=replace(config.data, max_length=value, max_prompt_length=prompt))
        return fixed + sum(activations_of(variant, text_config)[0].values()) <= budget

    low = 1 if key == "micro_batch_size" else 2
    if not fits(low):
        return 0
    high = low
    while high < ceiling and fits(min(2 * high, ceiling)):
        high = min(2 * high, ceiling)
    if high == ceiling:
        return high
    bad = min(2 * high, ceiling)
    while bad - high > 1:
        middle = (high + bad) // 2
        high, bad = (middle, bad) if fits(middle) else (high, middle)
    return high


def checkpointing_hint(config, planned: Plan, budget: int, world_size: int = 1) -> str | None:
    """One line when the run fits `budget` with gradient checkpointing and would fit with fewer
    checkpointed layers too: the memory spent on recomputing them buys nothing. None otherwise, and
    under ZeRO-3 (where a layer not checkpointed keeps its gathered weights: resolve_auto)."""
    if not config.model.gradient_checkpointing or planned.total_bytes > budget or zero_settings(config).stage == 3:
        return None
    fewest, fewest_bytes, layers = fewest_fitting(config, budget, world_size)
    if fewest >= checkpointed_count(config.model.checkpoint_layers, layers) - 1:  # the last layer's recompute is free
        return None
    if fewest == 0:
        return (
            f"model.gradient_checkpointing=false also fits ({fewest_bytes / 2**30:.2f} GiB): it skips the "
            "recompute in backward, one of the step's three passes through the layers"
        )
    return (
        f"model.checkpoint_layers={fewest} also fits ({fewest_bytes / 2**30:.2f} GiB): the other {layers - fewest} "
        "layers keep their activations and skip the recompute (model.checkpoint_layers=auto picks this on the GPU)"
    )

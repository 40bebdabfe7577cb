"""Gradient checkpointing: which decoder layers recompute in backward, and what they keep.

Checkpointing every layer holds one `[tokens, hidden]` input per layer and reruns each layer's
forward in backward: the policy's step passes through the layers three times (forward, recompute,
backward to the adapter) instead of twice. `model.checkpoint_layers` checkpoints only the first K
layers; the others keep their saved tensors, so each layer left out costs one layer's activations
(`dpo-lora plan` counts them) and saves its recompute. Gradients are the same bit for bit at any K.
`auto` picks the fewest checkpointed layers whose plan fits the GPU (`fewest_fitting`).
"""

from __future__ import annotations

import sys
from dataclasses import replace

import torch

from dpo_lora.errors import UserError

# Fused attention kernels (aten ops), whose outputs gradient checkpointing keeps from the forward.
ATTENTION_KERNELS = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)
# Share of the GPU's free memory `auto` plans into: the plan leaves out allocator caching and
# fragmentation (torch reserves more than it allocates).
AUTO_MEMORY_FRACTION = 0.9


def checkpointed_count(value: int | str, layers: int) -> int:
    """How many of `layers` decoder layers recompute, for a `model.checkpoint_layers` value
    (an unresolved `auto` counts as all: the memory-safe choice)."""
    return layers if value in ("all", "auto") else min(value, layers)


def enable(model, model_config, zero_stage: int) -> None:
    """Checkpoint the first `model.checkpoint_layers` decoder layers of `model` (a transformers model)."""
    options = checkpoint_options(model_config, zero_stage)
    if hasattr(model, "activation_checkpointing_enable"):  # the newer name; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    if model_config.checkpoint_layers in ("all", "auto"):
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise UserError(
            f"config key 'model.checkpoint_layers': {type(model).__name__}'s layers cannot be checkpointed one by "
            "one (its code predates transformers' GradientCheckpointingLayer); use all"
        )
    count = checkpointed_count(model_config.checkpoint_layers, len(layers))
    for index, layer in enumerate(layers):  # the same flag transformers' own every_n_layers sets
        layer.gradient_checkpointing = index < count


def keeps_attention_outputs(model_config, zero_stage: int) -> bool:
    """Whether gradient checkpointing keeps the attention kernels' outputs (checkpoint_options)."""
    return model_config.gradient_checkpointing and not model_config.recompute_attention and zero_stage != 3


def checkpoint_options(model_config, zero_stage: int = 0) -> dict:
    """torch.utils.checkpoint's options. Non-reentrant: it needs no input grads and works with PEFT
    under every ZeRO stage. Selective where keeps_attention_outputs: the fused attention kernels'
    outputs ([rows, heads, tokens, head_dim] and a float32 [rows, heads, tokens] log-normalizer per
    call, what their backward reads) are kept from the forward, so the recompute reruns the layer's
    matmuls but not attention, the only part whose cost grows with the square of the length. The
    eager (matmul + softmax) path has no such kernel and is recomputed whole. Not under ZeRO-3:
    selective checkpointing replays the forward's ops in order, and ZeRO-3's parameter gathering
    runs different ops in the recompute than in the forward."""
    options = {"use_reentrant": False}
    if keeps_attention_outputs(model_config, zero_stage):
        options["context_fn"] = _keep_attention_outputs
    return options


def _keep_attention_outputs():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    kernels = [getattr(torch.ops.aten, name).default for name in ATTENTION_KERNELS if hasattr(torch.ops.aten, name)]
    return create_selective_checkpoint_contexts(kernels)


def fewest_fitting(config, budget: int, world_size: int = 1) -> tuple[int, int, int]:
    """(K, its planned bytes, the model's layer count): the fewest checkpointed layers whose
    `dpo-lora plan` at `data.max_length`'s worst case fits `budget` bytes per rank; every layer
    when none does. Up to all but the last, the plan shrinks as K grows, so a bisection finds it.
    Checkpointing the last layer as well never lowers the peak: its recompute runs right after
    the forward, while every checkpointed input is still held."""
    from dpo_lora.plan import _activations, _text_config, plan

    text_config = _text_config(config)
    layers = text_config.num_hidden_layers
    every = replace(config, model=replace(config.model, checkpoint_layers="all"))
    every_bytes = plan(every, world_size).total_bytes
    fixed = every_bytes - sum(_activations(every, text_config)[0].values())  # weights, optimizer, overhead

    def planned(count: int) -> int:
        variant = replace(config, model=replace(config.model, checkpoint_layers=count))
        return fixed + sum(_activations(variant, text_config)[0].values())

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
    Every rank takes the same count, sized to the rank with the least free memory: under ZeRO-3
    the recompute gathers parameters, so the ranks' layers must checkpoint alike."""
    from dpo_lora.distributed import gather_lists

    if not config.model.gradient_checkpointing or config.model.checkpoint_layers != "auto":
        return config
    budgets = gather_lists([device_budget(device)])
    budget = None if None in budgets else min(budgets)
    if budget is None:
        count, why = "all", "auto sizes to GPU memory; on a CPU it checkpoints every layer"
    else:
        count, planned, layers = fewest_fitting(config, budget, world_size)
        why = (
            f"{count} of {layers} layers; plan {planned / 2**30:.2f} GiB of {budget / 2**30:.2f} GiB usable on {device}"
        )
    if announce:
        print(f"dpo-lora: model.checkpoint_layers=auto -> {count} ({why})", file=sys.stderr)
    return replace(config, model=replace(config.model, checkpoint_layers=count))

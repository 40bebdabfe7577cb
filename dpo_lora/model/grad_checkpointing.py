"""Gradient checkpointing: which decoder layers recompute in backward, and what they keep.

Checkpointing every layer holds one `[tokens, hidden]` input per layer and reruns each layer's
forward in backward: the policy's step passes through the layers three times (forward, recompute,
backward to the adapter) instead of twice. `model.checkpoint_layers` checkpoints only the first K
layers; the others keep their saved tensors, so each layer left out costs one layer's activations
(`dpo-lora plan` counts them) and saves its recompute. Gradients are the same bit for bit at any K.
`auto` picks the fewest checkpointed layers whose plan fits the GPU (`fitting.fewest_fitting`).
"""

from __future__ import annotations

import torch

from dpo_lora.core.errors import UserError

# Fused attention kernels (aten ops), whose outputs gradient checkpointing keeps from the forward.
ATTENTION_KERNELS = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)
# Share of the GPU's free memory `auto` plans into: the plan leaves out allocator caching and
# fragmentation (torch reserves more than it allocates).


def checkpointed_count(value: int | str, layers: int) -> int:
    """How many of `layers` decoder layers recompute, for a `model.checkpoint_layers` value
    (an unresolved `auto` counts as all: the memory-safe choice)."""
    return layers if value in ("all", "auto") else min(value, layers)


def enable(model, model_config, zero_stage: int) -> None:
    """Checkpoint the first `model.checkpoint_layers` decoder layers of `model` (a transformers model)."""
    options = checkpoint_options(model_config, zero_stage)
    if options["use_reentrant"]:  # the checkpointed layers' inputs must require grad for the adapter's to flow
        model.enable_input_require_grads()
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
    """torch.utils.checkpoint's options. Non-reentrant, but for ZeRO-3: it needs no input grads.
    Under ZeRO-3, reentrant: the checkpointed forward then runs without autograd. A non-reentrant
    forward records every quantized matmul's node, and bitsandbytes keeps the weight it read on the
    node itself (`ctx.tensors`, not a saved tensor that checkpointing drops): under ZeRO-3 that is
    the gathered weight, which DeepSpeed's release then cannot free, so every layer's gathered
    weights stayed until the backward (each rank held the whole base).

    Selective where keeps_attention_outputs: the fused attention kernels' outputs ([rows, heads,
    tokens, head_dim] and a float32 [rows, heads, tokens] log-normalizer per call, what their
    backward reads) are kept from the forward, so the recompute reruns the layer's matmuls but not
    attention, the only part whose cost grows with the square of the length. The eager (matmul +
    softmax) path has no such kernel and is recomputed whole. Not under ZeRO-3:
    selective checkpointing replays the forward's ops in order, and ZeRO-3's parameter gathering
    runs different ops in the recompute than in the forward."""
    options = {"use_reentrant": zero_stage == 3}
    if keeps_attention_outputs(model_config, zero_stage):
        options["context_fn"] = _keep_attention_outputs
    return options


def _keep_attention_outputs():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    kernels = [getattr(torch.ops.aten, name).default for name in ATTENTION_KERNELS if hasattr(torch.ops.aten, name)]
    return create_selective_checkpoint_contexts(kernels)

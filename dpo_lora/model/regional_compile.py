"""`model.compile: layers`: each decoder layer compiled with torch.compile (regional compilation).

A 7B step launches about 14,000 kernels, most of them small elementwise ones around the matmuls:
norms, rotary embeddings, the LoRA scale and add, the MLP's activation and product, casts.
Compiling the decoder layer fuses them into a few generated kernels per layer. Compiling each layer
rather than the whole model keeps compile time at one layer's (all layers share the graph: torch
treats their weights as inputs), and leaves what does not trace outside the graphs:
- the shared-prompt attention runs eagerly between the layer's two graphs (its per-batch plan holds
  Python lists of row lengths, on which a graph would have to recompile every batch);
- gradient checkpointing wraps the compiled layer, so the recompute runs the compiled forward.
Shapes are dynamic from the first batch, so a new sequence length does not recompile. The
adapter-off reference pass and evaluation each compile once more on first use.

Not under ZeRO-3, whose parameter gathering runs as module hooks inside the layer: one line says so
and the layers run eagerly. Exactness: tests/model/test_regional_compile.py (values and gradients
against the eager layers).
"""

from __future__ import annotations

import sys

import torch

COMPILED = "_dpo_lora_compiled"


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers of a transformers model (or a PeftModel around one)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_layers(model, zero_stage: int = 0) -> int:
    """Compile each decoder layer of `model` in place; the count, or 0 with one line saying why not."""
    reason = None
    layers = decoder_layers(model)
    if zero_stage == 3:
        reason = "ZeRO-3 gathers parameters in module hooks inside the layer"
    elif not layers:
        reason = f"{type(model).__name__}'s layers predate transformers' GradientCheckpointingLayer"
    if reason is not None:
        print(f"dpo-lora: model.compile: the layers run eagerly: {reason}", file=sys.stderr)
        return 0
    for layer in layers:
        if not getattr(layer, COMPILED, False):
            layer.compile(dynamic=True)
            setattr(layer, COMPILED, True)
    return len(layers)

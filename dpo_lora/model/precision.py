"""The dtype and quantization rules every part that builds or plans the base shares (a leaf):
model loading, the memory planner, requantization and ZeRO-3 loading."""

from __future__ import annotations

import dataclasses

import torch

# What `model.float32_residual: auto` picks, by the device type that trains; any other type: True.
# Measured in docs/performance.md ("The precision policy"): on the bundled task an all-bf16 policy
# scores within the gate of the float32-residual one, so a GPU keeps the residual stream, embeddings
# and head in bf16 (less memory, fewer casts); on a CPU the float32 residual is kept.
AUTO_FLOAT32_RESIDUAL = {"cuda": False}


def torch_dtype(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def resolved(model_config, device_type: str):
    """`model_config` with `float32_residual: auto` replaced by what it picks on `device_type`."""
    if model_config.float32_residual != "auto":
        return model_config
    return dataclasses.replace(model_config, float32_residual=AUTO_FLOAT32_RESIDUAL.get(device_type, True))


def float32_residual(model_config) -> bool:
    """Whether the base keeps float32 outside its 4-bit/int8 matmuls (see `model.float32_residual`).
    A config not yet `resolved` for a device reads as on a GPU: what plans and quotes are for.

    In an all-bf16 forward, the residual stream rounds to 8 bits of mantissa after every layer, so
    a fresh LoRA delta much smaller than the hidden state rounds away: measured on SmolLM2 NF4, the
    rewards after one update were half of float32's. With the unquantized weights (embeddings,
    norms, head) in float32 and the forward under bf16 autocast, every matmul still runs in bf16,
    but sums (residual adds, base + LoRA) and the head's logits stay float32."""
    chosen = resolved(model_config, "cuda").float32_residual
    return chosen and model_config.dtype == "bfloat16" and model_config.quantization != "none"


def weights_dtype(model_config) -> torch.dtype:
    """dtype of the base's unquantized weights (and what checkpoint tensors are cast to first)."""
    return torch.float32 if float32_residual(model_config) else torch_dtype(model_config.dtype)


def quantization_config(model_config):
    from transformers import BitsAndBytesConfig

    compute_dtype = torch_dtype(model_config.dtype)
    if model_config.quantization in ("nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=model_config.quantization,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=compute_dtype,
        )
    if model_config.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None

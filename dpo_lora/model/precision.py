"""The dtype and quantization rules every part that builds or plans the base shares (a leaf):
model loading, the memory planner, requantization and ZeRO-3 loading."""

from __future__ import annotations

import dataclasses

import torch


def torch_dtype(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def bf16_is_native(device_type: str) -> bool:
    """Whether bfloat16 arithmetic is native where `device_type` trains: a CUDA GPU, or a CPU with
    AVX512-BF16 or AMX (elsewhere a CPU emulates it)."""
    return device_type == "cuda" or (device_type == "cpu" and cpu_has_native_bf16())


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolved(model_config, bf16_native: bool):
    """`model_config` with `float32_residual: auto` replaced by its choice: all bf16 where bf16 is
    native (`bf16_native`: `bf16_is_native` of the device, or of every rank of a run, so that the
    ranks agree), the float32 residual where it is emulated.

    Measured (docs/performance.md, "The precision policy"): on the bundled task the all-bf16 policy
    held the quality gate against the float32-residual one (held-out reward within 0.02, KL within
    10%), and on a CPU with AMX it trained the long benchmark workload 1.22-1.26x as fast. Where bf16
    is emulated nothing was measured, and the float32 residual stays."""
    if model_config.float32_residual != "auto":
        return model_config
    return dataclasses.replace(model_config, float32_residual=not bf16_native)


def float32_residual(model_config) -> bool:
    """Whether the base keeps float32 outside its 4-bit/int8 matmuls (see `model.float32_residual`).
    A config not yet `resolved` for a device reads as on a GPU: what plans and quotes are for.

    In an all-bf16 forward, the residual stream rounds to 8 bits of mantissa after every layer, so
    a fresh LoRA delta much smaller than the hidden state rounds away: measured on SmolLM2 NF4, the
    rewards after one update were half of float32's. With the unquantized weights (embeddings,
    norms, head) in float32 and the forward under bf16 autocast, every matmul still runs in bf16,
    but sums (residual adds, base + LoRA) and the head's logits stay float32."""
    chosen = resolved(model_config, bf16_native=True).float32_residual
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

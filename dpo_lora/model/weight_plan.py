"""The base weights, the adapter and its optimizer per rank, as each ZeRO stage places them.

A part of `dpo-lora plan` (dpo_lora.model.memory_plan adds the activations). The base's tensors
come from an empty (meta) model, with the quantized layers decided by transformers' own rules
(dpo_lora.model.requantize); nothing is allocated.

ZeRO-3 is counted as dpo_lora.model.zero3_loading partitions the base:
- every tensor above `stage3_param_persistence_threshold` elements (counted as stored: the packed
  4-bit bytes, the int8 values) is split evenly over the ranks, padded to a multiple of them;
  smaller ones are kept whole on every rank once first gathered (DeepSpeed's persistent parameters);
- a 4-bit weight's absmax is a parameter of its own there, partitioned likewise; the other
  quantization statistics (the nested absmax, codebooks, int8 row scales) are attributes, not
  parameters: every rank keeps them whole, on the device, even with `offload_param`;
- a forward or backward gathers one module's parameters at a time: the working set is the largest
  gathered tensor plus those kept for reuse within `stage3_max_reuse_distance`; with a prefetch
  bucket (`stage3_prefetch_bucket_size` > 0), every partitioned tensor (see gathered_working_set);
- with `offload_param` the partitions live in host memory (reported apart from the device's).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from dpo_lora.core.dsconfig import DEEPSPEED_REDUCE_BUCKET, contiguous_gradients
from dpo_lora.model.precision import quantization_config, weights_dtype
from dpo_lora.model.requantize import quantized_layers

ADAM_STATES = 2  # exp_avg and exp_avg_sq, float32
QUANTIZED_LABEL = {"int8": "int8 weights + row scales", "4bit": "4-bit weights + absmax"}
UNQUANTIZED_LABEL = "unquantized weights (embeddings, head, norms)"
GATHERED_LABEL = "ZeRO-3 gathered (largest tensor + reuse; all with prefetch)"
OPTIMIZER_LABEL = "optimizer states (AdamW) + ZeRO float32 partition"


@dataclass(frozen=True)
class ZeroSettings:
    """What a DeepSpeed config's `zero_optimization` decides about memory."""

    stage: int = 0
    offload_param: bool = False
    offload_optimizer: bool = False
    persistence_threshold: int = 100_000  # DeepSpeed's defaults
    prefetch_bucket: int = 50_000_000
    reuse_distance: int = 1_000_000_000
    reduce_bucket: int = DEEPSPEED_REDUCE_BUCKET
    contiguous_gradients: bool | str = True  # or "auto" (dpo_lora.core.dsconfig.contiguous_gradients)

    @classmethod
    def of(cls, zero: dict) -> ZeroSettings:
        def offloaded(key: str) -> bool:
            return (zero.get(key) or {}).get("device", "none") in ("cpu", "nvme")

        stage = int(zero.get("stage", 0))
        return cls(
            stage=stage,
            offload_param=stage == 3 and offloaded("offload_param"),
            offload_optimizer=stage >= 1 and offloaded("offload_optimizer"),
            persistence_threshold=int(zero.get("stage3_param_persistence_threshold", 100_000)),
            prefetch_bucket=int(zero.get("stage3_prefetch_bucket_size", 50_000_000)),
            reuse_distance=int(zero.get("stage3_max_reuse_distance", 1_000_000_000)),
            reduce_bucket=int(zero.get("reduce_bucket_size", DEEPSPEED_REDUCE_BUCKET)),
            contiguous_gradients=zero.get("contiguous_gradients", True),
        )


@dataclass(frozen=True)
class BaseTensor:
    """One base parameter as a rank stores it."""

    stored: int  # elements as stored (packed 4-bit: numel / 2 bytes; int8: numel)
    element: int  # bytes per stored element
    absmax: int  # a 4-bit weight's blockwise absmax (uint8, double-quantized): a parameter under ZeRO-3
    stats: int  # the other quantization statistics' bytes, whole on every rank (0 when unquantized)
    quantized: bool


def quantized_sizes(numel: int, out_features: int, quantization: str) -> tuple[int, int, int]:
    """(stored bytes, absmax bytes, other statistics' bytes) of one quantized weight: 4-bit codes
    with a blockwise absmax (double-quantized to uint8, with a float32 absmax per 256 blocks, a
    256-entry code and the nested state's 16 floats) or int8 values with float32 row scales."""
    if quantization == "int8":
        return numel, 0, 4 * out_features
    blocks = math.ceil(numel / 64)
    return math.ceil(numel / 2), blocks, 4 * math.ceil(blocks / 256) + 4 * 256 + 4 * 16


def skeleton(config, layers: int | None = None, dtype=None):
    """The model (PEFT-wrapped as configured) on the meta device, LoRA in float32 as in training;
    unquantized weights in `dtype` (default: what training holds them in)."""
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(config.model.path, trust_remote_code=config.model.trust_remote_code)
    if layers is not None:
        model_config.num_hidden_layers = layers
        if getattr(model_config, "layer_types", None):
            model_config.layer_types = model_config.layer_types[:layers]
    model_config._attn_implementation = "sdpa"
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype or weights_dtype(config.model))
        lora = LoraConfig(
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            use_rslora=config.lora.rslora,
            use_dora=config.lora.dora,
            target_modules=config.lora.target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    return model


_BASES: dict[str, tuple[list[BaseTensor], int]] = {}  # a plan's searches re-plan one model many times


def base_tensors(config) -> tuple[list[BaseTensor], int]:
    """(the base's parameters, tied ones once; the LoRA parameter count), from an empty model."""
    key = json.dumps([dataclasses.asdict(config.model), dataclasses.asdict(config.lora)], sort_keys=True, default=str)
    if key not in _BASES:
        _BASES.clear()
        _BASES[key] = _base_tensors(config)
    return _BASES[key]


def _base_tensors(config) -> tuple[list[BaseTensor], int]:
    from pathlib import Path

    model = skeleton(config)
    quantized = set()
    if config.model.quantization != "none":
        quantized = set(quantized_layers(Path(config.model.path), quantization_config(config.model)))
    tied = set(getattr(model.get_base_model(), "all_tied_weights_keys", None) or {})  # stored once
    tensors, lora = [], 0
    for name, param in model.named_parameters():
        base_name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if base_name in tied:
            continue
        if "lora_" in name:
            lora += param.numel()
        elif base_name in quantized:
            stored, absmax, stats = quantized_sizes(param.numel(), param.shape[0], config.model.quantization)
            tensors.append(BaseTensor(stored=stored, element=1, absmax=absmax, stats=stats, quantized=True))
        else:
            tensors.append(BaseTensor(param.numel(), param.element_size(), absmax=0, stats=0, quantized=False))
    return tensors, lora


def weight_components(config, zero: ZeroSettings, world_size: int) -> tuple[dict, dict, int]:
    """(device bytes per rank, host bytes per rank, LoRA parameter count) of the base weights."""
    tensors, lora = base_tensors(config)
    device = {"quantized": 0, "plain": 0}
    host = {"quantized": 0, "plain": 0}
    for tensor in tensors:
        kind = "quantized" if tensor.quantized else "plain"
        device[kind] += tensor.stats  # whole on every rank, on the device, at every stage
        for stored, element in ((tensor.stored, tensor.element), (tensor.absmax, 1)):  # the absmax: uint8
            if zero.stage < 3 or stored <= zero.persistence_threshold:
                device[kind] += stored * element
            else:
                (host if zero.offload_param else device)[kind] += math.ceil(stored / world_size) * element
    quantized_label = QUANTIZED_LABEL["int8" if config.model.quantization == "int8" else "4bit"]
    names = {"quantized": quantized_label, "plain": UNQUANTIZED_LABEL}
    device_components = {names[kind]: size for kind, size in device.items()}
    if zero.stage == 3:
        device_components[GATHERED_LABEL] = gathered_working_set(tensors, zero)
    host_components = {f"{names[kind]}, ZeRO-3 partition": size for kind, size in host.items() if size}
    return device_components, host_components, lora


def gathered_working_set(tensors: list[BaseTensor], zero: ZeroSettings) -> int:
    """Bytes ZeRO-3 holds gathered at once beyond the partitions: the largest tensor being used and
    those kept because their next use comes within `stage3_max_reuse_distance` elements (a DPO
    step reuses every layer: reference forward, policy forward, recompute and backward; DeepSpeed's
    default distance keeps up to 1e9 elements), counted at the decoder layers' bytes per stored
    element.

    With a prefetch bucket, all of them. DeepSpeed's prefetcher, once it has traced a step, keeps
    a gathered parameter until the later use its look-ahead passed over, and with gradient
    checkpointing every layer's next use is its recompute: from the second step on, every
    layer's weights stayed gathered from the policy forward to the backward (measured on two CPU
    ranks, 4 layers of Llama-2-13B: each rank held all of them, 1.2 GiB, against 0.6 GiB, the
    head alone, with the prefetch off)."""
    partitioned = [t for t in tensors if t.stored > zero.persistence_threshold]
    if not partitioned:
        return 0
    largest = max(t.stored * t.element for t in partitioned)
    layer_element = max(partitioned, key=lambda t: (t.quantized, t.stored)).element
    total = sum(t.stored for t in partitioned)
    kept = total if zero.prefetch_bucket > 0 else min(zero.reuse_distance, total)
    return largest + kept * layer_element


def optimizer_components(lora_numel: int, zero: ZeroSettings, world_size: int) -> tuple[dict, dict]:
    """(device, host) bytes per rank of the LoRA parameters, gradients and AdamW state (all float32)
    as the ZeRO stage splits them."""
    full, shard = 4 * lora_numel, 4 * math.ceil(lora_numel / world_size)
    device = {"LoRA parameters": shard if zero.stage == 3 else full}
    # Stage 2+ keeps only its gradient partition (plus the bucket being reduced, which training
    # sizes to the adapter: dpo_lora.core.dsconfig.size_buckets, and which contiguous_gradients
    # "auto" leaves out on one rank); 0-1 keep them all.
    contiguous = contiguous_gradients(zero.contiguous_gradients, zero.offload_optimizer, world_size)
    bucket = 4 * min(zero.reduce_bucket, lora_numel) if contiguous or zero.stage == 3 else 0
    device["LoRA gradients"] = shard + bucket if zero.stage >= 2 else full
    optimizer = ADAM_STATES * (shard if zero.stage >= 1 else full)
    master = shard if zero.stage >= 1 else 0  # ZeRO 1-3 step a float32 copy of their partition
    device[OPTIMIZER_LABEL] = 0 if zero.offload_optimizer else optimizer + master
    host = {"optimizer states (AdamW) + float32 partition and gradients": optimizer + 2 * master}
    return device, host if zero.offload_optimizer else {}

"""Filling a DeepSpeed JSON from the YAML config.

The YAML owns batch sizes, clipping and precision; the JSON writes them as "auto" (the Hugging
Face convention). A JSON value that contradicts the YAML is an error, never silently one or the
other. The optimizer and schedule are built by the trainer, so the JSON must not define them.
"""

from __future__ import annotations

import json
from pathlib import Path

from dpo_lora.core.errors import UserError


def owned_values(config, world_size: int) -> dict[str, object]:
    """Dotted DeepSpeed keys -> the value the YAML config gives them."""
    train = config.train
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.max_grad_norm,
        # DeepSpeed's bf16 mode would cast the adapter to bf16 and accumulate and reduce its
        # gradients in bf16 (at ZeRO-0 even without float32 masters): each stage then loses
        # precision differently. Off, the base still computes in bf16 (its 4-bit compute dtype and
        # unquantized layers), while the adapter, its gradients, their reduction and AdamW stay in
        # float32 at every stage, for a few bytes per LoRA parameter.
        "bf16.enabled": False,
        "fp16.enabled": config.model.dtype == "float16",
    }


ZERO_STAGES = (0, 1, 2, 3)
DEEPSPEED_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)
_BUCKETS = {"overlap_comm": False, "reduce_bucket_size": 50_000_000}
_CPU = {"device": "cpu", "pin_memory": True}


def zero_config(stage: int, offload: bool = False) -> dict:
    """The shipped ZeRO configuration `deepspeed_configs/zero{stage}[_offload].json`, as a dict (the
    service picks one by name for a client, who never names a file). Offload: stages 2 and 3."""
    if stage not in ZERO_STAGES:
        raise UserError(f"zero_stage {stage!r}: must be one of 0, 1, 2, 3")
    if offload and stage < 2:
        raise UserError(f"offload needs ZeRO stage 2 or 3, not {stage}")
    zero: dict = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = dict(_CPU)
        if stage == 3:
            zero["offload_param"] = dict(_CPU)
    if stage in (1, 2):
        zero |= {**_BUCKETS, "contiguous_gradients": "auto", "allgather_bucket_size": 50_000_000}
    elif stage == 3:
        zero |= {
            **_BUCKETS,
            "contiguous_gradients": True,
            # Off: once DeepSpeed has traced a step its prefetcher keeps every layer gathered from
            # the policy forward to the backward (gradient checkpointing reuses each layer in its
            # recompute), so a rank would hold the whole base (dpo_lora.model.weight_plan).
            "stage3_prefetch_bucket_size": 0,
            "stage3_param_persistence_threshold": 100_000,
            # DeepSpeed keeps a gathered parameter whose next use comes within this many elements;
            # its default, 1e9, spans most of a 13B's layers, and a DPO step reuses every layer
            # (reference forward, policy forward, recompute, backward). 50M keeps a layer's weights
            # from its recompute to its backward, and releases them between the passes.
            "stage3_max_reuse_distance": 50_000_000,
            "stage3_gather_16bit_weights_on_model_save": False,
        }
    return {
        **{
            key: "auto" for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
        },
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
    }


def read_json(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config key 'deepspeed': file not found: {path}")
    try:
        loaded = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"config key 'deepspeed': {path} is not valid JSON: {err}") from None
    if not isinstance(loaded, dict):
        raise UserError(f"config key 'deepspeed': {path} must hold a JSON object")
    return loaded


def fill_deepspeed_config(config, world_size: int) -> dict:
    """The DeepSpeed config dict for `deepspeed.initialize`, with every "auto" resolved."""
    path = config.deepspeed
    ds = read_json(path)
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise UserError(
                f"{path}: remove the '{section}' section; the optimizer and schedule come from the "
                "YAML keys train.lr, train.weight_decay, train.scheduler and train.warmup_ratio"
            )
    for dotted, wanted in owned_values(config, world_size).items():
        *parents, leaf = dotted.split(".")
        node = ds
        for parent in parents:
            node = node.setdefault(parent, {})
        current = node.get(leaf, "auto")
        if current == "auto":
            node[leaf] = wanted
        elif current != wanted:
            raise UserError(
                f"{path}: '{dotted}' is {current!r} but the config gives {wanted!r}; "
                'set it to "auto" or change the YAML'
            )
    zero = ds.get("zero_optimization", {})
    if zero.get("contiguous_gradients") == "auto":
        offloaded = (zero.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme")
        zero["contiguous_gradients"] = contiguous_gradients("auto", offloaded, world_size)
    for dotted in _remaining_autos(ds):
        raise UserError(f"{path}: '{dotted}' is \"auto\" but dpo-lora does not fill it; give a value")
    ds.setdefault("steps_per_print", 10**9)  # dpo-lora logs itself
    ds.setdefault("zero_optimization", {}).setdefault("stage", 0)
    return ds


def contiguous_gradients(setting: bool | str, offloaded: bool, world_size: int) -> bool:
    """Whether ZeRO-1/2 copies gradients into its reduce bucket as they are made, for the JSON's
    `contiguous_gradients` (true, false or "auto"). "auto": on for several ranks (the reduction
    needs no flattening and memory does not fragment), off for one, which reduces nothing: there
    the bucket would be a second float32 copy of the adapter's gradients, filled by one copy a
    gradient. Optimizer offload turns it on whatever the JSON says (DeepSpeed's rule)."""
    if setting == "auto":
        return world_size > 1 or offloaded
    return bool(setting) or offloaded


def size_buckets(ds: dict, trainable_numel: int) -> dict:
    """`ds` with its gradient reduce bucket no larger than the adapter. DeepSpeed allocates the
    bucket at full size whatever it holds (ZeRO-1/2 with contiguous gradients, ZeRO-3): the shipped
    50M elements are 200 MB of float32 (its default, 500M, 2 GB), while a LoRA adapter is often a
    few million. One bucket still holds the whole adapter, so what is reduced together is unchanged.
    `trainable_numel`: the adapter's elements on this rank (whole parameters, not ZeRO-3 shards)."""
    zero = dict(ds.get("zero_optimization", {}))
    if zero.get("stage", 0) == 0:
        return ds
    zero["reduce_bucket_size"] = max(
        1, min(int(zero.get("reduce_bucket_size", DEEPSPEED_REDUCE_BUCKET)), trainable_numel)
    )
    return {**ds, "zero_optimization": zero}


def _remaining_autos(node: dict, prefix: str = "") -> list[str]:
    found = []
    for key, value in node.items():
        if isinstance(value, dict):
            found += _remaining_autos(value, f"{prefix}{key}.")
        elif value == "auto":
            found.append(prefix + key)
    return found

"""A run's quote before it starts: whether it fits the device's memory (the memory plan), what to
change when it does not, the tokens it trains on, and how long it takes. `dpo-lora plan` prints
it; the service answers `POST /v1/fine_tuning/quotes` with it and refuses jobs that do not fit.

The time is matmul work over a matmul rate: each pair's matmul FLOPs (`step_flops_per_pair`)
over this device's dense matmul rate (measured once, cached) times the share of that rate a
training step achieves (`EFFICIENCY`, measured here; the service replaces it with the share
earlier jobs on the same base achieved).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from dpo_lora.model.cluster import smallest_change
from dpo_lora.model.fitting import checkpointing_hint, fewest_fitting
from dpo_lora.model.memory_plan import Plan, data_token_counts, plan, text_config_of

# The share of the measured matmul rate a dpo-lora step achieves, by device type. CPU: the demo run
# (SmolLM2-135M NF4, LoRA r16 all-linear, float32, 10 steps of 8 pairs) reached 0.386 of 158 GFLOP/s
# on a 2-core AVX2 EPYC. CUDA: bench/results' H200 runs of the same model reached 0.04-0.06; larger
# models reach more of the rate, which the service learns from earlier jobs on the same base.
EFFICIENCY = {"cpu": 0.38, "cuda": 0.05}
# What a run spends besides its steps (imports, load and quantize, engine, the adapter's save): the
# demo's 144.6 s wall time less its 116.8 s of steps, on CPU; not measured on a GPU.
STARTUP_SECONDS = {"cpu": 28.0, "cuda": 30.0}
# A no-grad eval forward reaches more of the rate than a training step (nothing saved for
# backward): its share is EFFICIENCY times this. CPU: `dpo-lora eval` of the demo run over the 61
# held-out pairs, less the same command over 1 pair (its start-up).
EVAL_SPEEDUP = {"cpu": 2.2}  # 59 pairs in 22.1 s: 0.83 of 158 GFLOP/s, against the steps' 0.38
RATE_CACHE_VARIABLE = "DPO_LORA_CACHE"


def _flops_per_token(config) -> tuple[float, float]:
    """(decoder layers, LM head): one token's forward matmul FLOPs, 2 per weight it passes."""
    text = text_config_of(config)
    hidden, kv_share = text.hidden_size, text.num_key_value_heads / text.num_attention_heads
    per_layer = 2 * hidden * hidden * (1 + kv_share) + 3 * hidden * text.intermediate_size
    return 2 * text.num_hidden_layers * per_layer, 2 * hidden * text.vocab_size


def step_flops_per_pair(config, tokens_per_pair: float, completion_tokens: float) -> float:
    """One pair's matmul FLOPs in a step: the decoder layers once for the reference forward (none
    when only policy-only terms read it), once for the policy's forward, once for its backward to
    the adapter and once more for a checkpointed recompute; the LM head at the completion
    positions, without the recompute. Attention's score matmuls are left out."""
    layers, head = _flops_per_token(config)
    reference = 1 if config.dpo.uses_reference else 0
    passes = reference + 2 + (1 if config.model.gradient_checkpointing else 0)
    return tokens_per_pair * passes * layers + completion_tokens * (reference + 2) * head


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU with its thread count (what a matmul rate is measured on)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def cached_matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """This device's dense matmul rate (FLOP/s) in `dtype`: measured once (about a second), then
    read from the cache file, keyed by the device's name, the dtype and the thread count."""
    key = f"{device_name(device)}/{dtype}"
    cache = Path(os.environ.get(RATE_CACHE_VARIABLE, Path.home() / ".cache" / "dpo-lora")) / "matmul_rates.json"
    try:
        rates = json.loads(cache.read_text())
    except (OSError, ValueError):
        rates = {}
    if key not in rates:
        rates[key] = measure_matmul_rate(device, dtype)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(rates, indent=1))
        except OSError:
            pass  # a read-only home: measure again next time
    return rates[key]


def measure_matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """A dense square matmul's FLOP/s on `device` in `dtype`, the faster of the two operand layouts
    (on a CPU without native bf16 they differ ~8x in bf16: bench/matmul_layouts.py)."""
    size = 4096 if device.type == "cuda" else 1024
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = 0.0
    for right in (b, b.t()):  # the faster operand layout (they differ ~8x in bf16 on CPUs without native bf16)
        a @ right
        sync()
        start, runs = time.perf_counter(), 5
        for _ in range(runs):
            a @ right
        sync()
        best = max(best, runs * 2 * size**3 / (time.perf_counter() - start))
    return best


def total_pairs(config, pairs_in_data: int, world_size: int) -> tuple[int, int]:
    """(optimizer steps, pairs trained) as the trainer counts them."""
    train = config.train
    global_batch = train.micro_batch_size * train.grad_accum * world_size
    steps = train.max_steps or max(1, math.ceil(train.epochs * pairs_in_data / global_batch))
    return steps, steps * global_batch


def run_counts(config, world_size: int) -> dict:
    """Steps, pairs and tokens of a run of `config` and of its evals, from the tokenized data."""
    counts = data_token_counts(config)
    train_pairs = counts.pairs
    eval_pairs, eval_tokens = 0, counts.mean_tokens
    if config.data.eval:
        held_out = data_token_counts(replace(config, data=replace(config.data, train=config.data.eval)))
        eval_pairs, eval_tokens = held_out.pairs, held_out.mean_tokens
    elif config.data.eval_fraction > 0:
        eval_pairs = math.ceil(config.data.eval_fraction * counts.pairs)
        train_pairs -= eval_pairs
    steps, pairs = total_pairs(config, train_pairs, world_size)
    every = config.train.eval_every
    # One eval before training (the policy is the reference: one forward), then at every
    # train.eval_every-th step and at the last.
    after = (steps // every + (1 if steps % every else 0)) if every else 1
    return {
        "steps": steps,
        "pairs": pairs,
        "counts": counts,
        "eval_pairs": eval_pairs,
        "evals": (1, after) if eval_pairs else (0, 0),  # (before training, after steps)
        "eval_tokens": eval_tokens,
    }


def quote(
    config,
    device_bytes: int,
    world_size: int = 1,
    device: torch.device | None = None,
    efficiency: float | None = None,
    with_data: bool = True,
    matmul_rate: float | None = None,
) -> dict:
    """The quote: memory (fits, per-rank bytes by component, recommendation) and, `with_data`, the
    steps, tokens and time of a run of `config` on `world_size` ranks of `device_bytes` each.
    `efficiency`: the share of the matmul rate a step achieves (EFFICIENCY for the device type
    when None); `matmul_rate`: one device's (measured here when None)."""
    config, _, result = memory_quote(config, device_bytes, world_size)
    if not with_data:
        return result
    return result | time_quote(config, world_size, device or torch.device("cpu"), efficiency, matmul_rate)


def memory_quote(config, device_bytes: int, world_size: int = 1) -> tuple[object, Plan, dict]:
    """(`config` with `model.checkpoint_layers: auto` resolved as a run would, its plan, the quote's
    memory part)."""
    if config.model.gradient_checkpointing and config.model.checkpoint_layers == "auto":
        fewest = fewest_fitting(config, device_bytes, world_size)[0]
        config = replace(config, model=replace(config.model, checkpoint_layers=fewest))
    planned = plan(config, world_size=world_size)
    fits = planned.total_bytes <= device_bytes
    advice = (
        smallest_change(config, planned, device_bytes, world_size)
        if not fits
        else checkpointing_hint(config, planned, device_bytes, world_size)
    )
    result = {
        "object": "fine_tuning.quote",
        "fits": fits,
        "per_rank_bytes": planned.total_bytes,
        "device_bytes": device_bytes,
        "world_size": world_size,
        "components": planned.components,
        "host_bytes_per_rank": planned.host_bytes,  # what ZeRO offloads to host memory
        "host_components": planned.host,
        "recommendation": advice,
        "checkpoint_layers": config.model.checkpoint_layers,
    }
    return config, planned, result


def time_quote(
    config, world_size: int, device: torch.device, efficiency: float | None = None, matmul_rate: float | None = None
) -> dict:
    """The quote's steps, tokens and time (the training data tokenized)."""
    run = run_counts(config, world_size)
    counts = run["counts"]
    flops = run["pairs"] * step_flops_per_pair(config, counts.mean_tokens, counts.mean_completion)
    eval_flops = run["eval_pairs"] * eval_flops_per_pair(config, run["eval_tokens"], *run["evals"])
    rate = (matmul_rate or cached_matmul_rate(device, getattr(torch, config.model.dtype))) * world_size
    share = efficiency or EFFICIENCY.get(device.type, EFFICIENCY["cuda"])
    eval_share = share * EVAL_SPEEDUP.get(device.type, 1.0)
    seconds = STARTUP_SECONDS.get(device.type, STARTUP_SECONDS["cuda"]) + flops / (rate * share)
    seconds += eval_flops / (rate * eval_share)
    flops += eval_flops
    return {
        "device": device_name(device),
        "total_steps": run["steps"],
        "trained_tokens": round(run["pairs"] * counts.mean_tokens),
        "step_flops": flops / run["steps"],
        "matmul_flops_per_s": rate,
        "efficiency": share,
        "estimated_seconds": round(seconds, 1),
        "device_hours": round(seconds * world_size / 3600, 4),
    }


def eval_flops_per_pair(config, tokens_per_pair: float, before: int = 0, after: int = 1) -> float:
    """One held-out pair's matmul FLOPs over `before` evals before training (one forward: the policy
    is the reference) and `after` evals after steps (the reference's and the policy's forwards)."""
    layers, _ = _flops_per_token(config)
    passes = before + after * (2 if config.dpo.uses_reference else 1)
    return tokens_per_pair * passes * layers


def achieved_efficiency(config, rows: list[dict], rate: float) -> float | None:
    """The median share of `rate` (one device's matmul rate) that a finished run's training rows
    reached: pairs/s times each pair's FLOPs over the rate of its ranks. The first row (warm-up)
    is left out; None without another."""
    shares = []
    for row in rows[1:]:
        if not row.get("pairs") or not row.get("pairs_per_s"):
            continue
        tokens = row["tokens"] / row["pairs"]
        completion = row.get("lengths/chosen", tokens / 4) + row.get("lengths/rejected", tokens / 4)
        flops = step_flops_per_pair(config, tokens, completion)
        shares.append(row["pairs_per_s"] * flops / (rate * row.get("world_size", 1)))
    return statistics.median(shares) if shares else None


if __name__ == "__main__":  # `python -m dpo_lora.model.quote cuda bfloat16`: the rate, for the service
    kind, dtype_name = sys.argv[1], sys.argv[2]
    print(cached_matmul_rate(torch.device(kind), getattr(torch, dtype_name)))

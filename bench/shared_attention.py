"""Split against masked attention for the shared-prompt layout, one layer, forward + backward.

    python bench/shared_attention.py [--dtype float32|bfloat16]

The shapes of bench/compare_trl.py's workloads on SmolLM2-135M (9 query heads, 3 KV heads, head
dim 64): short 4 rows of 64 + 60 + 60 tokens, long 2 rows of 300 + 480 + 480, rows a few tokens
apart so padding is exercised. Prints milliseconds per call of each, twice in turn (this machine's
speed drifts).
"""

from __future__ import annotations

import argparse
import time
import types

import torch

from dpo_lora.data.layout import HOST, attention_bias, collate_shared
from dpo_lora.model import shared_attention

SHAPES = {"short": (64, 60, 60, 4), "long": (300, 480, 480, 2)}  # prompt, chosen, rejected, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    dtype = getattr(torch, parser.parse_args().dtype)
    torch.manual_seed(0)
    for name, shape in SHAPES.items():
        time_shape(name, *shape, dtype)


def time_shape(name: str, prompt: int, chosen: int, rejected: int, rows: int, dtype: torch.dtype) -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    features = [
        {"prompt_ids": [5] * (prompt - i), "chosen_ids": [6] * (chosen - 2 * i), "rejected_ids": [7] * (rejected - i)}
        for i in range(rows)
    ]
    batch = collate_shared(features, pad_token_id=0)
    length = batch["input_ids"].shape[1]
    query = torch.randn(rows, 9, length, 64, dtype=dtype, requires_grad=True)
    key, value = (torch.randn(rows, 3, length, 64, dtype=dtype, requires_grad=True) for _ in range(2))
    module = types.SimpleNamespace(num_key_value_groups=3, is_causal=True, training=True)
    plan = shared_attention.layout_plan(batch[HOST].branch_lengths, length, query.device)
    lengths = {shared_attention.PLAN_KEY: plan}

    def split():
        return shared_attention.shared_prompt_attention(module, query, key, value, None, scaling=0.125, **lengths)

    def mask():
        bias = attention_bias(batch["branch"], dtype)
        return sdpa_attention_forward(module, query, key, value, bias, scaling=0.125)

    for run in (mask, split, mask, split):
        for _ in range(2):
            run()[0].sum().backward()
        started, calls = time.perf_counter(), 10
        for _ in range(calls):
            run()[0].sum().backward()
        print(f"{name:<6}{run.__name__:<6}{(time.perf_counter() - started) / calls * 1000:8.1f} ms", flush=True)


if __name__ == "__main__":
    main()

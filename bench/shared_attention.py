"""The shared-prompt layout's attention kernels, one layer, forward + backward: the dense 4D mask,
split attention with the rejected rows padded into one call and with one call per row, and (on CUDA)
FlexAttention with a block mask.

    python bench/shared_attention.py [--dtype float32|bfloat16] [--device cpu|cuda]

Shapes: bench/compare_trl.py's workloads on SmolLM2-135M (9 query heads, 3 KV heads, head dim 64):
short 4 rows of 64 + 60 + 60 tokens, long 2 rows of 300 + 480 + 480; on CUDA also Llama-2-7B's
attention (32 heads, head dim 128) on bench/gpu_regimes.py's long-prompt rows (4 x 1500 + 250 +
250). Rows are a few tokens apart so padding is exercised. Prints milliseconds per call of each,
twice in turn (a CPU's speed drifts), and each kernel's largest difference from the mask's output.
"""

from __future__ import annotations

import argparse
import time
import types

import torch

from dpo_lora.data.layout import HOST, attention_bias, collate_shared
from dpo_lora.model import shared_attention

# prompt, chosen, rejected, rows, query heads, KV heads, head dim
SHAPES = {"short": (64, 60, 60, 4, 9, 3, 64), "long": (300, 480, 480, 2, 9, 3, 64)}
GPU_SHAPES = {"7b-long-prompt": (1500, 250, 250, 4, 32, 32, 128)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    for name, shape in {**SHAPES, **(GPU_SHAPES if device.type == "cuda" else {})}.items():
        time_shape(name, shape, dtype, device)


def time_shape(name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    prompt, chosen, rejected, rows, heads, kv_heads, dim = shape
    features = [
        {"prompt_ids": [5] * (prompt - i), "chosen_ids": [6] * (chosen - 2 * i), "rejected_ids": [7] * (rejected - i)}
        for i in range(rows)
    ]
    batch = collate_shared(features, pad_token_id=0)
    length = batch["input_ids"].shape[1]
    query = torch.randn(rows, heads, length, dim, dtype=dtype, device=device, requires_grad=True)
    key, value = (
        torch.randn(rows, kv_heads, length, dim, dtype=dtype, device=device, requires_grad=True) for _ in "kv"
    )
    module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True, training=True)
    lengths = batch[HOST].branch_lengths
    plans = {padded: shared_attention.layout_plan(lengths, length, device, padded) for padded in (True, False)}
    bias = attention_bias(batch["branch"].to(device), dtype)
    scale = dim**-0.5

    def mask():
        return sdpa_attention_forward(module, query, key, value, bias, scaling=scale)

    def split_padded():  # the rejected rows padded into one call
        plan = {shared_attention.PLAN_KEY: plans[True]}
        return shared_attention.shared_prompt_attention(module, query, key, value, None, scaling=scale, **plan)

    def split_rows():  # one call per rejected row
        plan = {shared_attention.PLAN_KEY: plans[False]}
        return shared_attention.shared_prompt_attention(module, query, key, value, None, scaling=scale, **plan)

    kernels = [mask, split_padded, split_rows]
    if shared_attention.flex_unavailable(device, 0.0) is None:
        flex_plan = {shared_attention.PLAN_KEY: shared_attention.flex_plan(lengths, length, device)}

        def flex():
            return shared_attention.flex_shared_prompt_attention(
                module, query, key, value, None, scaling=scale, **flex_plan
            )

        kernels.append(flex)
    real = batch["attention_mask"].bool().to(device)
    with torch.no_grad():
        want = mask()[0][real].float()
        gaps = {run.__name__: (run()[0][real].float() - want).abs().max().item() for run in kernels[1:]}
    print(f"{name}: {rows} rows of {length} tokens, largest difference from mask: {gaps}", flush=True)
    for run in kernels * 2:
        for _ in range(2):  # warm-up (flex compiles here)
            run()[0].sum().backward()
        synchronize(device)
        started, calls = time.perf_counter(), 10
        for _ in range(calls):
            run()[0].sum().backward()
        synchronize(device)
        print(f"{name:<16}{run.__name__:<14}{(time.perf_counter() - started) / calls * 1000:8.1f} ms", flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()

"""The CPU matmul rate by operand layout and dtype, at a SmolLM2 MLP's shape.

    python bench/matmul_layouts.py [--tokens 800] [--hidden 576] [--features 1536]

A 4-bit layer's forward multiplies by the dequantized weight transposed (`x @ W.t()`), its input
gradient by the weight as stored (`grad @ W`, bitsandbytes' MatMul4Bit backward). On a CPU
without native bf16 the two layouts run at very different bf16 rates, which is where a bf16
step's backward goes there; float32 is shown beside them.
"""

from __future__ import annotations

import argparse
import time

import torch


def rate(matmul, flops: float, repeats: int = 3) -> float:
    """GFLOP/s of `matmul()`, after one warm-up call."""
    matmul()
    started = time.perf_counter()
    for _ in range(repeats):
        matmul()
    return flops * repeats / (time.perf_counter() - started) / 1e9


def layouts(x, weight, grad) -> dict:
    """The three products, by name: the forward's, the backward's as bitsandbytes computes it, and
    the backward's with the weight copied transposed first."""
    return {
        "forward   x @ W.t()": lambda: x @ weight.t(),
        "backward  grad @ W": lambda: grad @ weight,
        "backward  grad @ W.t().contiguous().t()": lambda: grad @ weight.t().contiguous().t(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=800)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--features", type=int, default=1536)
    args = parser.parse_args()
    flops = 2.0 * args.tokens * args.hidden * args.features
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {native}")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(args.tokens, args.hidden, dtype=dtype)
        weight = torch.randn(args.features, args.hidden, dtype=dtype)  # [out, in], as stored
        grad = torch.randn(args.tokens, args.features, dtype=dtype)
        for name, matmul in layouts(x, weight, grad).items():
            print(f"{str(dtype).removeprefix('torch.'):<9} {name:<42} {rate(matmul, flops):8.1f} GFLOP/s")


if __name__ == "__main__":
    main()

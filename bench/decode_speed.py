"""Milliseconds per decoded token of the service's decode loop, NF4 against unquantized, base
alone and with an adapter (what `/v1/chat/completions` costs per token on this machine).

    python bench/decode_speed.py RUN_OR_ADAPTER [--model models/SmolLM2-135M-Instruct] [--tokens 48]

RUN_OR_ADAPTER: a trained run folder (its adapter/) or a PEFT adapter folder, e.g. runs/demo after
`make demo`. float32 compute, one row, a 40-token prompt, greedy; prints the CPU's bf16 capability.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import torch

from dpo_lora.core.config import load_config
from dpo_lora.model.decode import BASE, Row, Sampling, decode
from dpo_lora.model.load import attach_trained, load_base


def per_token_ms(model, adapter: str, tokens: int) -> float:
    rows = [Row(list(range(100, 140)), Sampling(temperature=0, max_tokens=tokens), adapter)]
    start = time.perf_counter()
    decode(model, rows, eos_ids=set(), pad_id=0, on_token=lambda i, t: True)
    return (time.perf_counter() - start) / tokens * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    adapter = args.adapter / "adapter" if (args.adapter / "adapter").is_dir() else args.adapter
    flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    print(f"CPU bf16: {'native' if 'avx512_bf16' in flags or 'amx_bf16' in flags else 'emulated (avx2 only)'}; float32")  # fmt: skip
    for quantization in ("nf4", "none"):
        settings = {"model.path": args.model, "model.quantization": quantization, "model.dtype": "float32"}
        config = load_config(None, settings).model
        model = load_base(config, torch.device("cpu")).eval()
        per_token_ms(model, BASE, 4)  # warm-up
        base = per_token_ms(model, BASE, args.tokens)
        model = attach_trained(model, adapter, "tuned", config).eval()
        tuned = per_token_ms(model, "tuned", args.tokens)
        print(f"{quantization:>5}: base {base:6.1f} ms/token, with the adapter {tuned:6.1f} ms/token")


if __name__ == "__main__":
    main()

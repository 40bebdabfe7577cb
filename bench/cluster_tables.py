"""The cluster tables of the README: `dpo-lora plan`'s `by_gpus` for Llama-3-8B, Llama-2-13B and
Llama-3-70B (config.json only, no weights) at GPUs of 24 and 80 GiB.

    python bench/cluster_tables.py [--max-length 1024]

The run: NF4, LoRA r16 on every linear layer, one pair per rank of `--max-length` tokens, bfloat16,
gradient checkpointing. Prints a markdown table: for each model and GPU count, the cheapest shipped
ZeRO configuration that fits and its per-rank device memory (and host memory when it offloads).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import GEOMETRIES  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODELS = {
    "Llama-3-8B": GEOMETRIES["llama3-8b"],
    "Llama-2-13B": GEOMETRIES["llama2-13b"],
    "Llama-3-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}  # fmt: skip


def by_gpus(folder: Path, max_length: int, gpu_memory: str) -> list[dict]:
    overrides = [f"model.path={folder}", "model.quantization=nf4", "model.dtype=bfloat16",
                 "model.gradient_checkpointing=true", "lora.r=16", "lora.target_modules=all-linear",
                 f"data.max_length={max_length}", f"data.max_prompt_length={max_length // 2}",
                 "train.micro_batch_size=1"]  # fmt: skip
    command = [sys.executable, "-m", "dpo_lora", "plan", *overrides, "--gpu-memory", gpu_memory, "--json"]
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=True).stdout
    return json.loads(out[out.index("{") :])["by_gpus"]


def cell(row: dict) -> str:
    if not row["fits"]:
        return f"no ({row['per_rank_bytes'] / 2**30:.1f} GiB at best)"
    name = row["deepspeed"].removeprefix("deepspeed_configs/").removesuffix(".json")
    host = f", host {row['host_bytes_per_rank'] / 2**30:.0f}" if row["host_bytes_per_rank"] else ""
    return f"`{name}` {row['per_rank_bytes'] / 2**30:.1f}{host}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-length", type=int, default=1024)
    args = parser.parse_args()
    from transformers import LlamaConfig

    lines = ["| model | GPU | 1 GPU | 2 GPUs | 4 GPUs | 8 GPUs |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as work:
        for name, shape in MODELS.items():
            folder = Path(work) / name
            LlamaConfig(**shape, max_position_embeddings=8192, tie_word_embeddings=False).save_pretrained(folder)
            for memory in ("24GiB", "80GiB"):
                rows = by_gpus(folder, args.max_length, memory)
                lines.append(f"| {name} | {memory[:-3]} GiB | " + " | ".join(cell(row) for row in rows) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

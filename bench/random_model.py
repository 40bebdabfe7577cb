"""A model folder with a real model's geometry and tokenizer but random weights, for measuring speed
and memory where the real weights cannot travel (a GPU machine that reaches no hub).

    python bench/random_model.py SOURCE_FOLDER TARGET_FOLDER [--dtype bfloat16]

SOURCE_FOLDER needs only config.json and the tokenizer files; the weights are the architecture's
own initialisation (seed 0), saved as safetensors in the dtype given.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(args.source)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    args.target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.target)
    for name in COPIED:
        if (args.source / name).is_file():
            shutil.copy(args.source / name, args.target / name)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{args.target}: {config.model_type}, {parameters / 1e6:.0f}M random parameters in {args.dtype}")


if __name__ == "__main__":
    main()

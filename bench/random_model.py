"""A model folder with a real model's geometry but random weights, for measuring speed and memory
where the real weights cannot travel (a GPU machine that reaches no hub).

    python bench/random_model.py TARGET --like FOLDER [--dtype bfloat16]
    python bench/random_model.py TARGET --geometry llama2-7b|llama3-8b [--layers N]

`--like`: FOLDER's config.json and tokenizer files, the architecture's own initialisation (seed 0),
saved as safetensors in the dtype given. `--geometry`: bench/scale.py's 7B/8B Llama geometries,
written a layer at a time (never the whole model in memory; drawn on the GPU where there is one)
with a tokenizer trained on the bundled data; `--layers` cuts the depth for a quick check.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import GEOMETRIES  # noqa: E402  (stdlib-only at import: --help stays instant)

COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def like(source: Path, target: Path, dtype_name: str) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(source)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype_name))
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    for name in COPIED:
        if (source / name).is_file():
            shutil.copy(source / name, target / name)
    return f"{config.model_type}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters in {dtype_name}"


def geometry(name: str, target: Path, layers: int) -> str:
    import torch
    from scale import write_model, write_tokenizer

    shape = dict(GEOMETRIES[name], **({"num_hidden_layers": layers} if layers else {}))
    target.mkdir(parents=True, exist_ok=True)
    write_tokenizer(target)
    billions = write_model(target, shape, "cuda" if torch.cuda.is_available() else "cpu")
    return f"{name} geometry, {shape['num_hidden_layers']} layers, {billions:.2f}B parameters in bfloat16"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("target", type=Path)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--like", type=Path, help="a model folder whose config and tokenizer to copy")
    source.add_argument("--geometry", choices=sorted(GEOMETRIES))
    parser.add_argument("--dtype", default="bfloat16", help="weights' dtype with --like")
    parser.add_argument("--layers", type=int, default=0, help="with --geometry: cut the depth to N layers")
    args = parser.parse_args()
    if args.like:
        made = like(args.like, args.target, args.dtype)
    else:
        made = geometry(args.geometry, args.target, args.layers)
    print(f"{args.target}: {made}, random weights")


if __name__ == "__main__":
    main()

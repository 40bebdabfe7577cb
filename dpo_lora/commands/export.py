"""Export: merge a LoRA adapter into its base and write a standalone Hugging Face model folder.

The base is streamed tensor by tensor from its memory-mapped safetensors shards, merged in float32
(for `dequantized`, first quantized and dequantized exactly as training loaded it) and written out
in shards as they fill; verification streams the models one module at a time. Peak anonymous
memory is about one output shard plus a few float32 copies of the largest tensor (README, Export).

Merge targets:
  original     W + s * B @ A on the unquantized base (the usual choice for serving at 16 bits);
               departs from the trained function by the base's quantization error.
  dequantized  dequant(quant(W)) + s * B @ A: exactly the function that was trained.
A DoRA adapter also rescales each output row of the sum to its trained magnitude (LoraDelta.merged).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from dpo_lora.core.errors import UserError
from dpo_lora.core.sizes import parse_size
from dpo_lora.model.gguf_export import check_supported, gguf_name, modelfile, verify_gguf, write_gguf
from dpo_lora.model.gguf_mixes import GGUF_TYPES
from dpo_lora.model.requantize import Requantizer
from dpo_lora.model.verify import verify_export
from dpo_lora.model.weight_files import ShardWriter, WeightFolder
from dpo_lora.train.trained import checkpoint_of, lora_settings, resolve_adapter

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class LoraDelta:
    """One adapted layer: A [r, in], B [out, r], the scale, and DoRA's magnitude [out] if it has one."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        """The float32 weight that computes what the adapted layer computes on `weight`.

        LoRA: W + s * B @ A. DoRA: m / ||W + s * B @ A||_row * (W + s * B @ A), each output row
        rescaled to its trained magnitude, with the norm of the weight as given (for `dequantized`,
        the weight training saw: PEFT's DoRA takes the norm of the dequantized base)."""
        merged = torch.addmm(weight.float(), self.b.float(), self.a.float(), alpha=self.scale)  # `weight` kept
        if self.magnitude is None:
            return merged
        return merged.mul_((self.magnitude.float() / torch.linalg.vector_norm(merged, dim=1)).unsqueeze(1))


def lora_deltas(adapter_dir: Path, settings: dict) -> dict[str, LoraDelta]:
    """Base weight name -> its LoraDelta, for every adapted layer."""
    from safetensors.torch import load_file

    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    deltas = {}
    for name, lora_a in state.items():
        if ".lora_A." not in name:
            continue
        module = name.split(".lora_A.")[0]
        lora_b = state[name.replace(".lora_A.", ".lora_B.")]
        rank = lora_a.shape[0]
        alpha = settings["lora_alpha"]
        scale = alpha / rank**0.5 if settings.get("use_rslora") else alpha / rank
        magnitude = state.get(module + ".lora_magnitude_vector") if settings.get("use_dora") else None
        if settings.get("use_dora") and magnitude is None:
            raise UserError(f"{adapter_dir}: a DoRA adapter without the magnitude of {module}")
        deltas[module.removeprefix("base_model.model.") + ".weight"] = LoraDelta(lora_a, lora_b, scale, magnitude)
    return deltas


def merge(base: Path, adapter_dir: Path, out: Path, *, dtype: str, max_shard_bytes: int, requantize=None) -> dict:
    """Write merged weights into `out`; returns {"tensors", "merged", "bytes", "files"}.
    `requantize` (a Requantizer) turns each quantized layer's weight into what training used."""
    from tqdm.auto import tqdm

    deltas = lora_deltas(adapter_dir, lora_settings(adapter_dir))
    target_dtype = DTYPES[dtype]
    writer = ShardWriter(out, max_shard_bytes)
    base_files = WeightFolder(base)
    merged = set()
    for name in tqdm(base_files.names(), desc="merge", unit="tensor", dynamic_ncols=True):
        tensor = base_files[name]
        if requantize is not None and name in requantize:
            tensor = requantize(name, tensor)
        if name in deltas:
            tensor = deltas[name].merged(tensor)
            merged.add(name)
        writer.add(name, tensor.to(target_dtype) if tensor.is_floating_point() else tensor)
        del tensor
    missing = sorted(set(deltas) - merged)
    if missing:
        raise UserError(f"the adapter adapts weights the base does not have, e.g. {missing[0]} (wrong --base?)")
    files = writer.close()
    count = len(base_files.names())
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


def _model_card(adapter_dir: Path, base: str, run_config) -> str:
    lines = ["# LoRA adapter trained with dpo-lora (DPO)\n", f"- base model: `{base}`"]
    if run_config is not None:
        lines += [
            f"- quantization during training: {run_config.model.quantization}",
            f"- loss: {run_config.dpo.loss}, beta {run_config.dpo.beta}",
            f"- LoRA r={run_config.lora.r}, alpha={run_config.lora.alpha}"
            + (", rsLoRA" if run_config.lora.rslora else "")
            + (", DoRA" if run_config.lora.dora else ""),
        ]
    lines += [
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "PATH_TO_THIS_FOLDER")',
        "```",
        "",
    ]
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
    source: str,
    *,
    out: str,
    base: str | None = None,
    dtype: str = "bfloat16",
    max_shard_size: str = "5GB",
    merge_into: str = "original",
    adapter_only: bool = False,
    overwrite: bool = False,
    push: str | None = None,
    checkpoint: str | None = None,
    format: str = "safetensors",
    gguf_type: str = "f16",
) -> dict:
    """Export a run/adapter/checkpoint (or the run's `checkpoint`: best, latest, a step) to `out`;
    returns the export report (also in out/export_report.json). `format: gguf` writes one GGUF file
    (`gguf_type`: one of dpo_lora.model.gguf_mixes.GGUF_TYPES) from a float32 merge, with an Ollama Modelfile, instead of safetensors."""
    import shutil
    import tempfile

    source = checkpoint_of(source, checkpoint) if checkpoint else source

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
                if merge_into == "dequantized" and run_config.model.quantization == "none":
                    raise UserError("--merge-into dequantized: the run's base was not quantized (use original)")
                requantize = Requantizer(base_path, run_config.model) if merge_into == "dequantized" else None
                gguf = format == "gguf"
                if gguf:  # checked before the merge: a one-line refusal, not one after minutes of work
                    check_supported(json.loads((base_path / "config.json").read_text()))
                merged = Path(scratch) / "merged" if gguf else staging
                merged.mkdir(exist_ok=True)
                dtype = "float32" if gguf else dtype  # the GGUF converts from float32, rounding once
                summary = merge(
                    base_path, adapter_dir, merged, dtype=dtype, max_shard_bytes=parse_size(max_shard_size),
                    requantize=requantize,
                )  # fmt: skip
                write_model_files(base_path, adapter_dir, merged, dtype)
                report = {**summary, **verify_export(merged, base_path, adapter_dir, run_config, merge_into, dtype)}
                if report["max_logp_diff_vs_claimed"] > report["tolerance"]:
                    raise UserError(
                        f"export failed verification: merged model differs from the {report['claimed']} by "
                        f"{report['max_logp_diff_vs_claimed']:.4g} in log-prob (tolerance {report['tolerance']}); nothing written"
                    )
                if gguf:
                    report |= _write_gguf(merged, staging, gguf_type, out_path.name)
            (staging / "export_report.json").write_text(json.dumps(report, indent=2))
        shutil.rmtree(out_path, ignore_errors=True)
        staging.rename(out_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if push:
        push_to_hub(out_path, push)
    return report


def _write_gguf(merged: Path, staging: Path, gguf_type: str, name: str) -> dict:
    """The verified float32 merge as one GGUF file in `staging`, checked, with its Ollama Modelfile."""
    from transformers import AutoTokenizer

    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf-type {gguf_type!r}: must be one of {', '.join(GGUF_TYPES)}")
    gguf_file = staging / gguf_name(name, gguf_type)
    report = {"format": "gguf", "gguf_file": gguf_file.name, **write_gguf(merged, gguf_file, gguf_type, name)}
    report |= verify_gguf(gguf_file, merged, gguf_type)
    if not report["gguf_tokenizer_matches"] or report["max_logp_diff_gguf_vs_stored"] > report["gguf_tolerance"]:
        raise UserError(
            f"GGUF export failed verification: log-probs differ from the merged model with its weights as stored by "
            f"{report['max_logp_diff_gguf_vs_stored']:.4g} (tolerance {report['gguf_tolerance']}), tokenizer "
            f"{'matches' if report['gguf_tokenizer_matches'] else 'differs'}; nothing written"
        )
    (staging / "Modelfile").write_text(modelfile(gguf_file.name, AutoTokenizer.from_pretrained(str(merged)).eos_token))
    return report


SPEC_KEYS = (
    "source",
    "checkpoint",
    "out",
    "base",
    "dtype",
    "max_shard_size",
    "merge_into",
    "adapter_only",
    "overwrite",
    "push",
    "format",
    "gguf_type",
)


def read_spec(path: str) -> dict:
    """An export's options from a JSON spec file (what `dpo-lora serve` writes for each export)."""
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"--spec {path}: cannot read it as JSON ({err})") from None
    unknown = sorted(set(spec) - set(SPEC_KEYS)) if isinstance(spec, dict) else ["<not an object>"]
    if unknown or "source" not in spec or "out" not in spec:
        raise UserError(f"--spec {path}: needs source and out, and only {', '.join(SPEC_KEYS)} (got {unknown or spec})")
    return spec


def run(args) -> int:
    if args.spec:
        options = read_spec(args.spec)
    elif args.source is None or args.out is None:
        raise UserError("export needs SOURCE and --out (or --spec FILE)")
    else:
        options = {key: getattr(args, key) for key in SPEC_KEYS}
    report = export_model(options.pop("source"), **options)
    print(json.dumps(report, indent=2))
    if report.get("format") == "gguf":
        print(
            f"serve it with Ollama: cd {options['out']} && ollama create NAME -f Modelfile (Modelfile: "
            f"{(Path(options['out']) / 'Modelfile').read_text().strip()!r}); or llama.cpp: "
            f"llama-cli -m {Path(options['out']) / report['gguf_file']}",
            file=sys.stderr,
        )
    return 0

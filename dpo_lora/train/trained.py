"""Finding what a training run produced: its config, and its adapter (final, or from a checkpoint
of any ZeRO stage 0-2), as a PEFT adapter folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dpo_lora.core import rundir
from dpo_lora.core.config import load_config
from dpo_lora.core.errors import UserError
from dpo_lora.core.schema import Config
from dpo_lora.model import precision
from dpo_lora.model.load import (
    POLICY_ADAPTER,
    REFERENCE_ADAPTER,
    attach_trained,
    load_base,
    load_tokenizer,
    peft_saved_name,
)
from dpo_lora.train.checkpoints import DEEPSPEED_TAG, _deepspeed_checkpoint_types, latest_checkpoint

LORA_KEY_PARTS = (".lora_A.", ".lora_B.", ".lora_magnitude_vector.")


def run_config(path: Path) -> Config | None:
    """The resolved config of the run that `path` (run dir, adapter or checkpoint) belongs to."""
    for folder in (path, path.parent, path.parent.parent):
        if (folder / "config.yaml").is_file():
            return load_config(folder / "config.yaml")
    return None


def adapter_state_from_checkpoint(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The adapter tensors of a DeepSpeed checkpoint of any ZeRO stage, named as PEFT saves them."""

    states = checkpoint / DEEPSPEED_TAG / "mp_rank_00_model_states.pt"
    with torch.serialization.safe_globals(_deepspeed_checkpoint_types()):
        if states.is_file():
            module = torch.load(states, map_location="cpu", weights_only=True)["module"]
        elif (checkpoint / DEEPSPEED_TAG / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file():
            module = _zero3_trainable_state(checkpoint, DEEPSPEED_TAG)
        else:
            raise UserError(f"{checkpoint}: no DeepSpeed model states ({states.name}) in it")
    adapter = {peft_saved_name(name): t for name, t in module.items() if any(p in name for p in LORA_KEY_PARTS)}
    if not adapter or any(t.numel() == 0 for t in adapter.values()):
        raise UserError(f"{checkpoint}: no complete adapter weights in it")
    return adapter


def _zero3_trainable_state(checkpoint: Path, tag: str) -> dict[str, torch.Tensor]:
    """ZeRO-3 keeps each rank's shard of the float32 masters: DeepSpeed's zero_to_fp32 joins them.

    It reads with weights_only=False; torch's own switch forces weights_only=True instead.
    """
    import os

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=tag, exclude_frozen_parameters=True)
    finally:
        if before is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before
    return {name: tensor.detach() for name, tensor in state.items()}


def write_adapter(adapter: dict[str, torch.Tensor], config: Config, folder: Path) -> Path:
    """Save checkpoint tensors as a PEFT adapter folder (adapter_config.json + safetensors)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    targets = sorted({name.split(".lora_")[0].rsplit(".", 1)[-1] for name in adapter})
    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        use_rslora=config.lora.rslora,
        use_dora=config.lora.dora,
        target_modules=targets,
        task_type="CAUSAL_LM",
        base_model_name_or_path=config.model.path,
    )
    folder.mkdir(parents=True, exist_ok=True)
    lora.save_pretrained(str(folder))
    save_file(
        {k: v.contiguous() for k, v in adapter.items()}, str(folder / "adapter_model.safetensors"), {"format": "pt"}
    )
    return folder


def checkpoint_of(run_dir: str, which: str) -> str:
    """The folder of a run's checkpoint `which`: best (by train.best_metric), latest, or a step number."""
    found = dict(rundir.checkpoints(Path(run_dir)))
    if not found and not (Path(run_dir) / rundir.CONFIG).is_file():
        raise UserError(f"--checkpoint: {run_dir} is not a run folder")
    if which == "best":
        best = rundir.best_checkpoint(Path(run_dir))
        if best is None:
            raise UserError(f"--checkpoint best: {run_dir} recorded no best checkpoint (it needs held-out evals)")
        return str(best[1])
    if which == "latest" and found:
        return str(found[max(found)])
    if which.isdigit() and int(which) in found:
        return str(found[int(which)])
    steps = ", ".join(map(str, sorted(found))) or "none"
    raise UserError(f"--checkpoint {which}: not best, latest or a complete checkpoint's step of {run_dir} ({steps})")


def resolve_adapter(source: str, scratch: Path) -> tuple[Path, Config | None]:
    """(PEFT adapter folder, run config or None) for a run dir, an adapter folder or a checkpoint.

    A run dir gives its final adapter, or its newest complete checkpoint when it has none yet.
    """

    path = Path(source)
    config = run_config(path)
    if (path / "adapter_config.json").is_file():
        return path, config
    if (path / "adapter" / "adapter_config.json").is_file():
        return path / "adapter", config
    checkpoint = path if (path / "deepspeed").is_dir() else latest_checkpoint(path)
    if checkpoint is None:
        raise UserError(f"{source}: not a run folder, an adapter folder or a checkpoint")
    if config is None:
        raise UserError(f"{checkpoint}: its run's config.yaml is missing, needed to rebuild the adapter config")
    return write_adapter(adapter_state_from_checkpoint(checkpoint), config, scratch / "adapter"), config


def lora_settings(adapter_dir: Path) -> dict:
    """r, alpha, scaling rule and DoRA of a PEFT LoRA adapter; refuses variants the merge would get wrong."""
    settings = json.loads((adapter_dir / "adapter_config.json").read_text())
    if settings.get("peft_type") != "LORA":
        raise UserError(f"{adapter_dir}: not a LoRA adapter ({settings.get('peft_type')})")
    if settings.get("fan_in_fan_out"):
        raise UserError(f"{adapter_dir}: fan_in_fan_out (Conv1D) adapters are not supported by export")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if settings.get(key):
            raise UserError(f"{adapter_dir}: adapters with {key} are not supported by export")
    return settings


def load_policy(adapter_dir: Path, model_config, device: torch.device, reference_adapter: str | None = None):
    """The trained policy as it ran in training: the quantized base plus the adapter, with the
    adapter's parameters in the compute dtype. Like DeepSpeed's mixed precision this casts
    parameters only: buffers such as rotary frequencies stay in float32. A run that continued
    from `reference_adapter` (its lora.init_adapter) gets it back as its reference, as in training."""
    model_config = precision.resolved(model_config, precision.bf16_is_native(device.type))
    model = attach_trained(load_base(model_config, device), adapter_dir, POLICY_ADAPTER, model_config)
    if reference_adapter:
        if not (Path(reference_adapter) / "adapter_config.json").is_file():
            raise UserError(f"config key 'lora.init_adapter': the run's reference adapter {reference_adapter} is gone")
        attach_trained(model, Path(reference_adapter), REFERENCE_ADAPTER, model_config)
        model.set_adapter(POLICY_ADAPTER)
    return model.eval()


def inference_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    return torch.device(get_accelerator().current_device_name() if name != "cpu" else "cpu")


def load_trained(source: str, scratch: Path):
    """(policy model, tokenizer, run config) for a run folder, adapter folder or checkpoint."""
    adapter_dir, config = resolve_adapter(source, scratch)
    if config is None:
        raise UserError(f"{source}: its run's config.yaml is missing (needed for the base and its quantization)")
    tokenizer = load_tokenizer(config.model)
    policy = load_policy(adapter_dir, config.model, inference_device(), reference_adapter=config.lora.init_adapter)
    return policy, tokenizer, config

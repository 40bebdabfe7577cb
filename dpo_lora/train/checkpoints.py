"""Atomic, resumable checkpoints on top of DeepSpeed's own `save_checkpoint`.

Layout: OUTPUT_DIR/checkpoints/step-00000010/
    deepspeed/          DeepSpeed's checkpoint (adapter + optimizer + scheduler, every ZeRO stage;
                        the frozen quantized base is not written)
    adapter/            the PEFT adapter at this step (load it like the final one)
    rank-00000.pt       per-rank state: RNG streams and the unlogged part of the metric window
    trainer_state.json  step, data position, config, metrics so far
    COMPLETE            written last; the folder is renamed from `.tmp-step-...` only after it
A crash mid-write leaves a `.tmp-` folder (or one without COMPLETE): never taken for a checkpoint.
"""

from __future__ import annotations

import functools
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from dpo_lora.core import rundir
from dpo_lora.core.config import resume_differences
from dpo_lora.core.distributed import barrier
from dpo_lora.core.errors import UserError
from dpo_lora.core.rundir import ADAPTER, BEST, CHECKPOINTS, COMPLETE, METRICS, TENSORBOARD, WANDB_RUN_ID, step_name

DEEPSPEED_TAG = "deepspeed"
STATE_FILE = "trainer_state.json"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return [folder for _, folder in rundir.checkpoints(output_dir)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def _rng_state() -> dict:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    state = {
        "python": random.getstate(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": np.random.get_state()[2],
        "torch": torch.get_rng_state(),
    }
    if accelerator.device_name() != "cpu":
        state["accelerator"] = accelerator.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "accelerator" in state:
        get_accelerator().set_rng_state(state["accelerator"])


def _trainable_state_dict(module, **_ignored) -> dict:
    """Only the adapter. DeepSpeed's exclude_frozen_parameters still writes a tied lm_head (its
    second name is no parameter name) and bitsandbytes' quantization statistics: the frozen base
    is reloaded from the model folder anyway."""
    names = {name for name, p in module.named_parameters() if p.requires_grad}
    return {name: t for name, t in module.state_dict().items() if name in names}


def save_checkpoint(
    engine,
    output_dir: Path,
    step: int,
    trainer_state: dict,
    rank_state: dict,
    dist,
    keep: int,
    save_adapter=None,
    keep_step: int | None = None,
) -> Path:
    """Write a checkpoint for `step` on every rank; returns its final path (same on all ranks).
    `save_adapter(folder)`, called on every rank, adds the step's PEFT adapter. Only the newest
    `keep` checkpoints stay (all for 0), and the one at `keep_step` (the best) besides."""
    root = Path(output_dir) / CHECKPOINTS
    final = root / step_name(step)
    tmp = root / f".tmp-{step_name(step)}"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    engine.module_state_dict = functools.partial(_trainable_state_dict, engine.module)
    engine.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
    torch.save({**rank_state, "rng": _rng_state()}, tmp / f"rank-{dist.rank:05d}.pt")
    if save_adapter is not None:
        save_adapter(tmp / ADAPTER)
    barrier()
    if dist.is_main:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state))
        (tmp / COMPLETE).write_text(f"{step}\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old_step, old in rundir.checkpoints(output_dir)[:-keep] if keep > 0 else []:
            if old_step != keep_step:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _deepspeed_checkpoint_types() -> list:
    """The only non-tensor types DeepSpeed (0.19) pickles into its checkpoint files (an fp16 run
    keeps its dynamic loss scaler there)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _weights_only_load(file, map_location=None):
    return torch.load(file, map_location=map_location, weights_only=True)


def load_checkpoint(engine, path: Path, rank: int) -> tuple[dict, dict]:
    """Restore engine, RNG and per-rank state from `path`; returns (trainer_state, rank_state).

    DeepSpeed unpickles its files with weights_only=False, which runs any code a tampered file
    holds; here they are read with weights_only=True, allowing only DeepSpeed's own state types.
    """
    import pickle

    engine.checkpoint_engine.load = _weights_only_load
    try:
        with torch.serialization.safe_globals(_deepspeed_checkpoint_types()):
            engine.load_checkpoint(
                str(path),
                tag=DEEPSPEED_TAG,
                load_module_strict=False,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0]
        raise UserError(f"refusing to load checkpoint {path}: it holds more than tensors ({first_line})") from None
    rank_state = torch.load(path / f"rank-{rank:05d}.pt", weights_only=True)
    _set_rng_state(rank_state.pop("rng"))
    return json.loads((path / STATE_FILE).read_text()), rank_state


RUN_FILES = (METRICS, ADAPTER, CHECKPOINTS, TENSORBOARD, BEST, WANDB_RUN_ID)  # W&B's own folder stays: unsynced runs


def resume_point(config, output_dir: Path, world_size: int) -> Path | None:
    """The checkpoint to continue from, or None for a fresh run; refuses to clobber an old run
    (unless `overwrite`) and to resume under a config that would train differently (unless forced)."""

    mode = config.train.resume
    checkpoint = latest_checkpoint(output_dir) if mode != "never" else None
    if checkpoint is None:
        existing = [name for name in RUN_FILES if (Path(output_dir) / name).exists()]
        if existing and not config.overwrite:
            hint = "it has no complete checkpoint to resume from; " if mode != "never" else ""
            raise UserError(
                f"output_dir {output_dir} already holds a run ({', '.join(existing)}); {hint}"
                "resume it with --resume or replace it with --overwrite"
            )
        return None
    saved = json.loads((checkpoint / STATE_FILE).read_text())
    if saved["world_size"] != world_size:
        # Not even with --force-resume: the saved data position counts each rank's micro-batches
        # (pairs would be replayed or skipped), and ZeRO's optimizer partitions are per rank.
        raise UserError(
            f"cannot resume {checkpoint} on {world_size} rank(s): it was saved by {saved['world_size']}; "
            f"resume it on {saved['world_size']} rank(s), or start a new run"
        )
    differences = resume_differences(saved["config"], config)
    if differences and mode != "force":
        raise UserError(
            f"cannot resume {checkpoint}: the config changed ({'; '.join(differences)}); "
            "restore it, or resume anyway with --force-resume"
        )
    return checkpoint


def clear_run(output_dir: Path) -> None:
    """Remove a previous run's outputs (only with `overwrite`)."""
    for name in RUN_FILES:
        path = Path(output_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

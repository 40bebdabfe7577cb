"""The run folder's contract (a torch-free leaf): the trainer writes through it; the commands and
the service read through it.

    OUTPUT_DIR/
        config.yaml          the resolved config (what `--resume` compares against)
        metrics.jsonl        one JSON row per line, each with a `kind` (RowKind)
        adapter/             the final PEFT adapter (adapter_config.json, adapter_model.safetensors)
        checkpoints/step-00000010/
            COMPLETE         written last: a folder without it is never taken for a checkpoint
            adapter/         the adapter at that step
        best.json            which complete checkpoint is the best by train.best_metric
        tensorboard/, plots/, data_report.json
        wandb_run_id, wandb/ where wandb.project is set: the W&B run's id (a resume continues it), W&B's files

A failed command's last line on stderr is `error_line(message)`; a rank that dies or times out
says `dpo-lora: rank R of N ...`.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
ADAPTER = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
TENSORBOARD = "tensorboard"
WANDB = "wandb"  # W&B's own folder (offline runs, logs)
WANDB_RUN_ID = "wandb_run_id"  # the W&B run this folder logs to: a resumed run continues it
BEST = "best.json"  # {"step", "metric", "score"}: the best checkpoint by train.best_metric
ERROR_PREFIX = "dpo-lora: error: "
RANK_PREFIX = "dpo-lora: rank"


class RowKind(str, enum.Enum):
    """What a metrics.jsonl row records."""

    TRAIN = "train"  # a logging window of training steps: loss, rewards/*, logps/*, lr, throughput
    EVAL = "eval"  # held-out metrics (eval/*), before, during and after training
    CHECKPOINT = "checkpoint"  # a complete checkpoint was written at `step`
    SKIPPED = "skipped"  # a non-finite step that was not applied
    HEALTH = "health"  # a warning about the run's state

    def __str__(self) -> str:
        return self.value


def row_kind(row: dict) -> RowKind | None:
    """A row's kind: its `kind` field, or for rows written before it, the key that told them apart."""
    if "kind" in row:
        return RowKind(row["kind"])
    for key, kind in (
        ("checkpoint", RowKind.CHECKPOINT),
        ("skipped", RowKind.SKIPPED),
        ("loss", RowKind.TRAIN),
        ("eval/loss", RowKind.EVAL),
    ):
        if key in row:
            return kind
    return None


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def step_folder(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / step_name(step)


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    found = []
    for marker in (Path(run_dir) / CHECKPOINTS).glob(f"step-*/{COMPLETE}"):
        found.append((int(marker.parent.name.split("-")[1]), marker.parent))
    return sorted(found)


def has_adapter(folder: Path) -> bool:
    """Whether `folder` (a run or a checkpoint) holds a PEFT adapter."""
    return (Path(folder) / ADAPTER / ADAPTER_CONFIG).is_file()


def error_line(message: str) -> str:
    return f"{ERROR_PREFIX}{message}"


def write_best(run_dir: Path, step: int, metric: str, score: list[float]) -> None:
    """Record checkpoint `step` as the best (written whole or not at all)."""
    partial = Path(run_dir) / f".{BEST}.partial"
    partial.write_text(json.dumps({"step": step, "metric": metric, "score": score}) + "\n")
    partial.rename(Path(run_dir) / BEST)


def best_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    """(step, folder) of the best complete checkpoint, or None where none was recorded."""
    recorded = Path(run_dir) / BEST
    if not recorded.is_file():
        return None
    step = json.loads(recorded.read_text())["step"]
    folder = step_folder(run_dir, step)
    return (step, folder) if (folder / COMPLETE).is_file() else None

"""Metric windows averaged over steps and ranks, and the writers (metrics.jsonl, TensorBoard)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from dpo_lora.core.distributed import all_reduce_sum
from dpo_lora.core.rundir import METRICS, RowKind
from dpo_lora.train.wandb_log import WandbLog

PAIR_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def pair_metrics(dpo_config) -> tuple[str, ...]:
    """The per-pair statistics a run logs: PAIR_METRICS, each term's loss where dpo.loss mixes terms, and
    WPO's pair weight where dpo.wpo is on."""
    names = [name for name, _ in dpo_config.terms]
    terms = tuple(f"loss/{name}" for name in names) if len(names) > 1 else ()
    return PAIR_METRICS + terms + (("wpo/weight",) if dpo_config.wpo else ())


# Per-pair statistics the health monitors read (dpo_lora.train.monitors), in train rows only: the
# completion lengths, and the moments from which a window's margin-length correlation follows.
HEALTH_STATS = (
    "lengths/chosen",
    "lengths/rejected",
    "moments/margin_x_length",
    "moments/margin_sq",
    "moments/length_sq",
)
REFERENCE_STATS = ("logratios/chosen_per_token",)  # where a reference model is read


def train_metrics(dpo_config) -> tuple[str, ...]:
    """What a train row averages: the pair metrics and the health monitors' statistics."""
    return pair_metrics(dpo_config) + HEALTH_STATS + (REFERENCE_STATS if dpo_config.uses_reference else ())


def margin_length_correlation(means: dict) -> dict:
    """`means` with the moments replaced by the Pearson correlation of the margin and the chosen-minus-
    rejected length over the window's pairs (`rewards/margin_length_corr`; None when either is constant)."""
    means = dict(means)
    moments = [means.pop(f"moments/{name}") for name in ("margin_x_length", "margin_sq", "length_sq")]
    margin, length = means["rewards/margins"], means["lengths/chosen"] - means["lengths/rejected"]
    covariance = moments[0] - margin * length
    variances = moments[1] - margin**2, moments[2] - length**2
    scale = math.sqrt(max(variances[0], 0.0) * max(variances[1], 0.0))
    means["rewards/margin_length_corr"] = covariance / scale if scale > 1e-12 else None
    return means


class MetricWindow:
    """Sums per-pair statistics (weighted) until `reduce` averages them over all ranks. The sums
    stay on the statistics' device until then, so adding a step's does not wait for the device."""

    def __init__(self, names: tuple[str, ...] = PAIR_METRICS) -> None:
        self.names = names
        self.sums = torch.zeros(len(names) + 1, dtype=torch.float64)  # the metrics', then the pairs' weight
        self.tokens = 0.0
        self.slots = 0.0  # positions computed, padding included

    def add(
        self, stats: dict[str, torch.Tensor], tokens: int, weight: torch.Tensor | None = None, slots: int = 0
    ) -> None:
        """stats: per-pair tensors [B] keyed by `names`; weight [B] (0 drops a pair); `tokens` real
        and `slots` computed positions of the batch (HostFacts)."""
        first = stats[self.names[0]]
        weight = torch.ones_like(first, dtype=torch.float64) if weight is None else weight.double().to(first.device)
        values = torch.stack([*(stats[name].double() * weight for name in self.names), weight])  # [M + 1, B]
        self.sums = self.sums.to(first.device) + values.sum(-1)
        self.tokens += tokens
        self.slots += slots

    def state(self) -> dict:
        """The unlogged part of the window (saved in checkpoints so resumed rows are identical)."""
        sums = self.sums.cpu()
        return {"sums": sums[:-1].clone(), "pairs": sums[-1].item(), "tokens": self.tokens, "slots": self.slots}

    def load_state(self, state: dict) -> None:
        if state["sums"].shape != (len(self.names),):  # a checkpoint of a version that logged other metrics
            return
        self.sums = torch.cat([state["sums"], torch.tensor([state["pairs"]], dtype=torch.float64)])
        self.tokens = state["tokens"]
        self.slots = state.get("slots", 0.0)  # a checkpoint from before slots were counted

    def reduce(self) -> dict[str, float]:
        """Means over every pair seen on every rank since the last reset, plus global counts."""
        counts = torch.tensor([self.tokens, self.slots], dtype=torch.float64)
        packed = all_reduce_sum(torch.cat([self.sums.cpu(), counts]))
        pairs, tokens, slots = packed[-3].item(), packed[-2].item(), packed[-1].item()
        means = {name: (packed[i].item() / pairs if pairs else math.nan) for i, name in enumerate(self.names)}
        self.__init__(self.names)
        return {**means, "pairs": pairs, "tokens": tokens, "slots": slots}


class MetricsWriter:
    """Appends rows to OUTPUT_DIR/metrics.jsonl and, when tensorboard is installed, event files; to
    W&B too where `wandb` names a project (`config`: the resolved tree it records)."""

    def __init__(self, output_dir: Path, wandb=None, config: dict | None = None) -> None:
        self.path = output_dir / METRICS
        self.wandb = WandbLog(output_dir, wandb, config or {}) if wandb is not None and wandb.project else None
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop rows past `step` (written after the checkpoint a run resumes from)."""
        if self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {
            key: value
            for key, value in row.items()
            if key not in ("step", "total_steps") and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, row["step"])
        if self.wandb is not None and scalars:
            self.wandb.log(scalars, row["step"])
        if self.wandb is not None and row.get("kind") == RowKind.HEALTH:
            self.wandb.alert(row["monitor"], row["message"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.close()

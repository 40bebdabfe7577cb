"""The best checkpoint by a held-out metric (`train.best_metric`), and early stopping on it
(`train.early_stopping_patience`). Torch-free: it reads eval rows and keeps a small state that
checkpoints carry, so a resumed run judges as the uninterrupted one would."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Higher is better for the rewards, lower for the loss.
DIRECTION = {"eval/rewards/accuracies": 1.0, "eval/rewards/margins": 1.0, "eval/loss": -1.0}
AUTO = ("eval/rewards/accuracies", "eval/rewards/margins")  # accuracy, ties broken by the margin


def describe(best_metric: str) -> str:
    return "eval/rewards/accuracies (then margins)" if best_metric == "auto" else best_metric


def score(metrics: dict, best_metric: str) -> list[float]:
    """What `best_metric` makes of one eval's metrics: compared as a list, larger is better."""
    names = AUTO if best_metric == "auto" else (best_metric,)
    return [DIRECTION[name] * metrics[name] for name in names]


@dataclass
class BestTracker:
    """The best eval so far (its step and score) and the evals since it improved."""

    metric: str
    step: int | None = None
    score: list[float] | None = None
    evals_since: int = 0

    def observe(self, step: int, metrics: dict) -> bool:
        """Count an eval at `step`; whether it is the best so far (strictly better, so a tie keeps
        the earlier checkpoint)."""
        current = score(metrics, self.metric)
        if self.score is None or current > self.score:
            self.step, self.score, self.evals_since = step, current, 0
            return True
        self.evals_since += 1
        return False

    def out_of_patience(self, patience: int) -> bool:
        return patience > 0 and self.evals_since >= patience

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> BestTracker:
        return cls(**state)

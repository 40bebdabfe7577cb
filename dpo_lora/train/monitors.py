"""DPO health monitors: the failures a falling loss does not show, read from the rows the trainer logs.

- displacement: the chosen completions' log-probs fall below the reference's while the margin
  grows (the policy pushes both completions down, the rejected one faster);
- kl: the policy's log-ratio to the reference on the chosen completions grows past a bound;
- saturation: train reward accuracy at the ceiling while held-out accuracy stops improving;
- length: the margin follows the chosen-minus-rejected length difference;
- grad_norm: a non-finite gradient norm, or one far above the run's usual.

Torch-free. `observe_train` and `observe_eval` return the warnings that start at that row: a
monitor warns when its condition starts to hold and again only after it has cleared. The state is
small and rides in checkpoints, so a resumed run warns as the uninterrupted one would.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field

MONITORS = ("displacement", "kl", "saturation", "length", "grad_norm")
GRAD_NORM_HISTORY = 50  # earlier windows whose median a gradient norm is compared with
MIN_GRAD_NORM_HISTORY = 3


@dataclass(frozen=True)
class HealthWarning:
    monitor: str  # one of MONITORS
    step: int
    message: str  # one line: the numbers, the key that sets the bound, what helps
    values: dict  # the numbers behind it, for the health row


@dataclass
class MonitorState:
    first_margin: float | None = None  # the first logged window's mean margin
    train_accuracies: list = field(default_factory=list)  # [pairs, value] of the rows in the window
    correlations: list = field(default_factory=list)  # [pairs, value] of the rows in the window
    grad_norms: list = field(default_factory=list)  # the last GRAD_NORM_HISTORY finite ones
    best_eval_accuracy: float | None = None
    evals_since_better: int = 0
    active: list = field(default_factory=list)  # monitors whose condition held at their last check


class HealthMonitors:
    """`config`: the run's MonitorConfig. `has_reference`: the run reads a reference model (the
    displacement and kl monitors measure against it; policy-only losses have none)."""

    def __init__(self, config, has_reference: bool) -> None:
        self.config, self.has_reference = config, has_reference
        self.state = MonitorState()

    def observe_train(self, row: dict) -> list[HealthWarning]:
        """A train row (one logging window): the warnings that start at it."""
        if not self.config.enabled:
            return []
        s, step = self.state, row["step"]
        if s.first_margin is None:
            s.first_margin = row["rewards/margins"]
        window = self.config.window_pairs
        _push_window(s.train_accuracies, row["pairs"], row["rewards/accuracies"], window)
        if row.get("rewards/margin_length_corr") is not None:
            _push_window(s.correlations, row["pairs"], row["rewards/margin_length_corr"], window)
        found = [
            self._check("displacement", step, self._displacement(row)),
            self._check("kl", step, self._kl(row)),
            self._check("length", step, self._length()),
            self._check("grad_norm", step, self._grad_norm(row.get("grad_norm"))),
            self._check("saturation", step, self._saturation()),
        ]
        return [warning for warning in found if warning is not None]

    def observe_eval(self, step: int, metrics: dict) -> list[HealthWarning]:
        """Eval metrics (`eval/...`): held-out accuracy's progress, for the saturation monitor."""
        if not self.config.enabled:
            return []
        s, accuracy = self.state, metrics["eval/rewards/accuracies"]
        if s.best_eval_accuracy is None or accuracy > s.best_eval_accuracy:
            s.best_eval_accuracy, s.evals_since_better = accuracy, 0
        else:
            s.evals_since_better += 1
        warning = self._check("saturation", step, self._saturation())
        return [warning] if warning is not None else []

    def _check(self, monitor: str, step: int, found: tuple[str, dict] | None) -> HealthWarning | None:
        """A warning when `found` (message, values) starts to hold; none while it goes on holding."""
        active = self.state.active
        if found is None:
            if monitor in active:
                active.remove(monitor)
            return None
        if monitor in active:
            return None
        active.append(monitor)
        return HealthWarning(monitor, step, f"{_TITLES[monitor]} at step {step}: {found[0]}", found[1])

    def _displacement(self, row: dict):
        ratio = row.get("logratios/chosen_per_token")
        bound = self.config.displacement_nats_per_token
        margin, first = row["rewards/margins"], self.state.first_margin
        if not self.has_reference or ratio is None or ratio >= -bound or margin <= max(first, 0.0):
            return None
        return (
            f"the chosen completions' log-probs fell {-ratio:.3f} nats/token below the reference's "
            f"(monitor.displacement_nats_per_token={bound:g}) while the margin grew from {first:.3f} to "
            f"{margin:.3f}: both completions are pushed down, the rejected one faster; a lower train.lr, a "
            "larger dpo.beta or an SFT term (dpo.loss: [sigmoid, sft]) keeps the chosen ones up",
            {"logratios/chosen_per_token": ratio, "rewards/margins": margin, "first_margin": first},
        )

    def _kl(self, row: dict):
        ratio = row.get("logratios/chosen_per_token")
        bound = self.config.kl_nats_per_token
        if not self.has_reference or ratio is None or abs(ratio) <= bound:
            return None
        tokens = row.get("lengths/chosen") or 0.0
        return (
            f"the policy's log-ratio to the reference on the chosen completions is {ratio:+.3f} nats/token "
            f"({ratio * tokens:+.2f} nats per {tokens:.0f}-token completion; monitor.kl_nats_per_token={bound:g}): "
            "it has moved far from the reference; a larger dpo.beta or a lower train.lr keeps it closer",
            {"logratios/chosen_per_token": ratio, "lengths/chosen": tokens},
        )

    def _saturation(self):
        s, config = self.state, self.config
        train_accuracy = _window_mean(s.train_accuracies, config.window_pairs)
        if train_accuracy is None or s.best_eval_accuracy is None:
            return None
        if train_accuracy < config.saturation_accuracy or s.evals_since_better < config.saturation_evals:
            return None
        return (
            f"train reward accuracy {train_accuracy:.3f} over the last {_pairs(s.train_accuracies):.0f} pairs "
            f"(monitor.saturation_accuracy={config.saturation_accuracy:g}) while held-out accuracy has not passed "
            f"{s.best_eval_accuracy:.3f} for {s.evals_since_better} evals (monitor.saturation_evals="
            f"{config.saturation_evals}): the adapter memorises the training pairs; more data, fewer steps, a lower "
            "train.lr or train.early_stopping_patience",
            {
                "rewards/accuracies": train_accuracy,
                "eval/rewards/accuracies": s.best_eval_accuracy,
                "evals_since_better": s.evals_since_better,
            },
        )

    def _length(self):
        s, bound = self.state, self.config.length_correlation
        correlation = _window_mean(s.correlations, self.config.window_pairs)
        if correlation is None or correlation <= bound:
            return None
        return (
            f"the margin correlates {correlation:.2f} with the chosen-minus-rejected length over the last "
            f"{_pairs(s.correlations):.0f} pairs (monitor.length_correlation={bound:g}): the policy may be "
            "learning length rather than content; balance lengths in the data or try dpo.loss: simpo",
            {"rewards/margin_length_corr": correlation},
        )

    def _grad_norm(self, norm: float | None):
        s = self.state
        if norm is None:
            return None
        if not math.isfinite(norm):
            return (
                f"the gradient norm is {norm} (the step guards skip such steps; train.max_bad_steps in a row "
                "abort the run): look for a bad row, or lower train.lr",
                {"grad_norm": norm},
            )
        usual = statistics.median(s.grad_norms) if len(s.grad_norms) >= MIN_GRAD_NORM_HISTORY else None
        _push(s.grad_norms, norm, GRAD_NORM_HISTORY)
        spike = self.config.grad_norm_spike
        if usual is None or norm <= spike * usual:
            return None
        return (
            f"the gradient norm {norm:.3g} is {norm / usual:.1f}x the median of earlier windows ({usual:.3g}; "
            f"monitor.grad_norm_spike={spike:g}); train.max_grad_norm clips the update, but a lower train.lr "
            "or a look at this window's rows may be due",
            {"grad_norm": norm, "median_grad_norm": usual},
        )

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = MonitorState(**state)


_TITLES = {
    "displacement": "likelihood displacement",
    "kl": "KL growth",
    "saturation": "saturation",
    "length": "length exploitation",
    "grad_norm": "gradient norm",
}


def _push(values: list, value: float, keep: int) -> None:
    values.append(value)
    del values[:-keep]


def _push_window(values: list, pairs: float, value: float, window_pairs: int) -> None:
    """Add a row's [pairs, value]; drop the oldest rows the newest ones no longer need to cover
    `window_pairs` pairs."""
    values.append([pairs, value])
    while len(values) > 1 and _pairs(values[1:]) >= window_pairs:
        values.pop(0)


def _pairs(values: list) -> float:
    return sum(pairs for pairs, _ in values)


def _window_mean(values: list, window_pairs: int) -> float | None:
    """The pair-weighted mean over the window; None until its rows cover `window_pairs` pairs."""
    total = _pairs(values)
    return sum(pairs * value for pairs, value in values) / total if total >= window_pairs and total else None

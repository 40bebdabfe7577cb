"""Plots are written from metrics.jsonl and are real, non-empty PNGs."""

from __future__ import annotations

import json

import pytest

from dpo_lora.core.errors import UserError
from dpo_lora.train.plots import CHARTS, plot_run


def test_plots_from_train_and_eval_rows(tmp_path):
    rows = [{"step": 0, "eval/loss": 0.69, "eval/rewards/accuracies": 0.0, "eval/rewards/margins": 0.0,
             "eval/logps/chosen": -40.0, "eval/logps/rejected": -50.0}]  # fmt: skip
    rows += [{"step": s, "loss": 0.7 - 0.05 * s, "rewards/accuracies": 0.1 * s, "rewards/margins": 0.2 * s,
              "logps/chosen": -40 + s, "logps/rejected": -50 - s} for s in range(1, 6)]  # fmt: skip
    rows += [{"step": 3, "skipped": "loss", "rows": [1]}, {"step": 5, "checkpoint": "x"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = plot_run(tmp_path)
    assert sorted(p.name for p in written) == sorted(CHARTS)
    for path in written:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_no_metrics_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no metrics.jsonl"):
        plot_run(tmp_path)

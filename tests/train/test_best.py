"""The best checkpoint by a held-out metric and early stopping: the tracker's rules, then a run
that keeps its best checkpoint past `keep_checkpoints` and one that stops early."""

from __future__ import annotations

import json

import pytest

from dpo_lora.core import rundir
from dpo_lora.core.errors import UserError
from dpo_lora.train.best import BestTracker
from dpo_lora.train.loop import train
from dpo_lora.train.trained import checkpoint_of

from .test_loop import read_metrics, tiny_config


def evals(accuracy: float, margin: float, loss: float) -> dict:
    return {"eval/rewards/accuracies": accuracy, "eval/rewards/margins": margin, "eval/loss": loss}


def test_auto_takes_accuracy_then_margin_and_a_tie_keeps_the_earlier_step():
    best = BestTracker("auto")
    assert best.observe(1, evals(0.5, 0.1, 0.7))
    assert best.observe(2, evals(0.5, 0.2, 0.9))  # same accuracy, larger margin
    assert not best.observe(3, evals(0.5, 0.2, 0.1))  # a tie is no improvement
    assert not best.observe(4, evals(0.4, 9.0, 0.1))
    assert best.step == 2 and best.evals_since == 2
    assert best.out_of_patience(2) and not best.out_of_patience(3) and not best.out_of_patience(0)
    assert BestTracker.from_state(json.loads(json.dumps(best.state()))) == best


def test_the_loss_is_better_lower():
    best = BestTracker("eval/loss")
    for step, loss in enumerate((0.7, 0.5, 0.6, 0.4), start=1):
        best.observe(step, evals(0.0, 0.0, loss))
    assert best.step == 4 and best.score == [-0.4]


def test_the_best_checkpoint_is_recorded_kept_past_keep_checkpoints_and_found_by_name(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    run = ["train.max_steps=6", "train.eval_every=1", "train.keep_checkpoints=1", "train.micro_batch_size=4"]
    train(tiny_config(tiny_model_dir, out, *run, "train.lr=2e-2"))
    eval_rows = [row for row in read_metrics(out) if row["kind"] == "eval" and row["step"] > 0]
    scored = [
        (row["eval/rewards/accuracies"], row["eval/rewards/margins"], -row["step"], row["step"]) for row in eval_rows
    ]
    expected = max(scored)[3]  # best accuracy, then margin, then the earliest
    recorded = json.loads((out / rundir.BEST).read_text())
    assert recorded["step"] == expected and recorded["metric"] == "auto"
    kept = [step for step, _ in rundir.checkpoints(out)]
    assert kept == sorted({expected, 6}), kept  # the newest, and the best besides
    assert checkpoint_of(str(out), "best") == str(rundir.step_folder(out, expected))
    assert checkpoint_of(str(out), "latest") == str(rundir.step_folder(out, 6))
    with pytest.raises(UserError, match="--checkpoint 3: not best, latest or a complete checkpoint's step"):
        checkpoint_of(str(out), "3" if expected != 3 else "4")


def test_a_run_whose_metric_stops_improving_stops_early_with_its_adapter(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Scripted evals (accuracy 0.5, 0.6, 0.7, 0.7, 0.65, ...): the best is step 2, and with
    patience 2 the run stops at step 4, saves a checkpoint there and its final adapter."""
    import dpo_lora.train.setup as setup

    script = iter([0.5, 0.6, 0.7, 0.7, 0.65, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9])
    monkeypatch.setattr(setup.Run, "evaluate", lambda self, **_: {**evals(next(script), 0.0, 0.7), "eval/pairs": 64})
    out = tmp_path / "run"
    run = ["train.max_steps=10", "train.eval_every=1", "train.micro_batch_size=4", "data.eval_fraction=0"]
    results = train(tiny_config(tiny_model_dir, out, *run, "train.early_stopping_patience=2"))
    assert results["steps"] == 10 and not results["stopped"] and results["after"]["eval/rewards/accuracies"] == 0.65
    rows = read_metrics(out)
    assert [row["step"] for row in rows if row["kind"] == "eval"] == [0, 1, 2, 3, 4]
    assert max(row["step"] for row in rows if row["kind"] == "train") == 4
    assert (
        "early stop at step 4: eval/rewards/accuracies (then margins) has not improved for 2 evals"
        in capsys.readouterr().out
    )
    assert json.loads((out / rundir.BEST).read_text())["step"] == 2
    assert [step for step, _ in rundir.checkpoints(out)] == [2, 4]  # keep_checkpoints 2: the best and the last
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_early_stopping_needs_evals_to_judge():
    from dpo_lora.core.config import load_config

    with pytest.raises(UserError, match="'train.early_stopping_patience' needs train.eval_every > 0"):
        load_config(None, ["train.early_stopping_patience=2"])

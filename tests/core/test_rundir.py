"""The run folder's contract: checkpoint naming and listing, and the kinds of metrics rows."""

from __future__ import annotations

import json

from dpo_lora.core.rundir import RowKind, checkpoints, row_kind, step_folder

from ..train.test_loop import read_metrics, tiny_config


def test_only_complete_checkpoints_count(tmp_path):
    for step, complete in ((2, True), (4, False), (10, True)):
        folder = tmp_path / "checkpoints" / f"step-{step:08d}"
        folder.mkdir(parents=True)
        if complete:
            (folder / "COMPLETE").write_text(f"{step}\n")
    assert [step for step, _ in checkpoints(tmp_path)] == [2, 10]


def test_a_row_written_before_kinds_is_told_apart_by_its_keys():
    assert row_kind({"step": 3, "loss": 0.6, "rewards/accuracies": 0.5}) == RowKind.TRAIN
    assert row_kind({"step": 3, "eval/loss": 0.6}) == RowKind.EVAL
    assert row_kind({"step": 3, "checkpoint": "/run/checkpoints/step-00000003"}) == RowKind.CHECKPOINT
    assert row_kind({"step": 3, "skipped": "non-finite loss", "rows": [1]}) == RowKind.SKIPPED
    assert row_kind({"step": 3, "kind": "health", "loss": 1.0}) == RowKind.HEALTH  # the field wins
    assert row_kind({"step": 3}) is None


def test_every_row_a_run_writes_names_its_kind_and_checkpoints_are_listed_where_the_trainer_wrote_them(
    tiny_model_dir, tmp_path
):
    from dpo_lora.train.loop import train

    out = tmp_path / "run"
    train(tiny_config(tiny_model_dir, out, "train.max_steps=2", "train.save_every=1", "train.eval_every=1"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kinds = [row["kind"] for row in rows]
    # Health warnings come when the tiny model moves fast (lr 5e-3); the rest always.
    assert {"train", "eval", "checkpoint"} <= set(kinds) <= {"train", "eval", "checkpoint", "health"}
    assert kinds[0] == "eval"  # the eval before training
    assert all(row_kind(row) == RowKind(row["kind"]) for row in rows)
    listed = checkpoints(out)
    assert [step for step, _ in listed] == [1, 2] and listed[-1][1] == step_folder(out, 2)
    assert len(read_metrics(out)) == len(rows)

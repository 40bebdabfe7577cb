"""Checkpoints and resume: kill -9 then resume equals the uninterrupted run, step for step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from dpo_lora.core.config import dump_yaml, to_dict
from dpo_lora.core.errors import UserError
from dpo_lora.core.rundir import COMPLETE, step_name
from dpo_lora.train.checkpoints import STATE_FILE, latest_checkpoint, resume_point
from dpo_lora.train.loop import train

from ..conftest import REPO
from .test_loop import read_metrics, tiny_config

# Dropout on, so a resume that failed to restore the RNG streams would show in the losses.
RUN = ["lora.dropout=0.1", "train.micro_batch_size=2", "data.eval=null", "train.log_every=1", "train.save_every=5"]


def train_rows(output_dir) -> dict[int, dict]:
    """Training rows by step, without the wall-clock and memory fields (they vary run to run)."""
    rows = {}
    for row in read_metrics(output_dir):
        if "loss" in row:
            rows[row["step"]] = {k: v for k, v in row.items() if "_per_s" not in k and k != "peak_memory_gb"}
    return rows


def start_cli(model_dir, output_dir, *overrides) -> subprocess.Popen:
    """`dpo-lora train` in its own process (so it can be killed), on the same config as tiny_config."""
    config_file = output_dir.parent / "config.yaml"
    config_file.write_text(dump_yaml(tiny_config(model_dir, output_dir, *RUN, *overrides)))
    return subprocess.Popen(
        [sys.executable, "-m", "dpo_lora", "train", str(config_file)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for(predicate, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, f"trainer ended early: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_kill_9_then_resume_equals_the_uninterrupted_run(tiny_model_dir, tmp_path):
    # Logging every 3 steps and saving every 5 puts checkpoints mid-window: the unlogged part of
    # the metric window must survive the resume too.
    steps = ["train.max_steps=150", "train.log_every=3"]
    train(tiny_config(tiny_model_dir, tmp_path / "straight", *RUN, *steps))
    expected = train_rows(tmp_path / "straight")

    out = tmp_path / "killed" / "run"
    out.parent.mkdir()
    process = start_cli(tiny_model_dir, out, *steps)
    wait_for(lambda: latest_checkpoint(out) is not None, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed_from = int(latest_checkpoint(out).name.split("-")[1])
    assert resumed_from < 150, "the kill must land mid-run"

    train(tiny_config(tiny_model_dir, out, *RUN, *steps, "train.resume=auto"))
    got = train_rows(out)
    assert sorted(got) == sorted(expected) == [*range(3, 150, 3), 150], "no row lost or repeated in metrics.jsonl"
    later = [step for step in got if step > resumed_from]
    assert later
    for step in later:
        assert got[step] == expected[step], f"step {step} differs after resuming from {resumed_from}"


def test_sigterm_saves_a_checkpoint_and_exits_0_then_resume_finishes(tiny_model_dir, tmp_path):
    out = tmp_path / "stopped" / "run"
    out.parent.mkdir()
    process = start_cli(tiny_model_dir, out, "train.max_steps=400", "train.save_every=0")
    wait_for(
        lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count('"loss"') >= 2, process
    )
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    assert "stopped at step" in stdout and "the adapter is in" not in stdout
    stopped_at = int(latest_checkpoint(out).name.split("-")[1])
    assert 2 <= stopped_at < 400
    assert not (out / "adapter").exists(), "a stopped run has no final adapter yet"

    train(tiny_config(tiny_model_dir, out, *RUN, "train.max_steps=400", "train.save_every=0", "train.resume=auto"))
    assert sorted(train_rows(out)) == list(range(1, 401))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_incomplete_checkpoints_are_ignored(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_model_dir, out, *RUN, "train.max_steps=10", "train.keep_checkpoints=0"))
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == [step_name(5), step_name(10)]
    # A crash mid-write leaves a .tmp- folder, or (on a filesystem without atomic rename) no marker.
    (out / "checkpoints" / f".tmp-{step_name(12)}").mkdir()
    half_written = out / "checkpoints" / step_name(15)
    half_written.mkdir()
    (half_written / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(out).name == step_name(10)
    (out / "checkpoints" / step_name(10) / COMPLETE).unlink()
    assert latest_checkpoint(out).name == step_name(5)


def test_keep_checkpoints_prunes_old_ones(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_model_dir, out, *RUN, "train.max_steps=20", "train.keep_checkpoints=2"))
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == [step_name(15), step_name(20)]


def test_every_checkpoint_holds_its_steps_peft_adapter(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_model_dir, out, *RUN, "train.max_steps=10"))
    final = load_file(out / "adapter" / "adapter_model.safetensors")
    at_step = {step: load_file(out / "checkpoints" / step_name(step) / "adapter" / "adapter_model.safetensors")
               for step in (5, 10)}  # fmt: skip
    assert final.keys() == at_step[10].keys() == at_step[5].keys()
    assert all(torch.equal(final[name], at_step[10][name]) for name in final)
    assert not all(torch.equal(final[name], at_step[5][name]) for name in final)
    rows = train_rows(out)
    assert all(row["tokens"] > 0 and row["tokens"] == int(row["tokens"]) for row in rows.values())


def test_resume_refuses_a_changed_config_unless_forced_and_output_dir_is_not_clobbered(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_model_dir, out, *RUN, "train.max_steps=5"))
    with pytest.raises(UserError, match=r"already holds a run .*--resume or replace it with --overwrite"):
        train(tiny_config(tiny_model_dir, out, *RUN, "train.max_steps=5"))
    with pytest.raises(UserError, match=r"config changed \(train.lr: 0.005 -> 0.001; train.max_steps: 5 -> 8\)"):
        train(tiny_config(tiny_model_dir, out, *RUN, "train.max_steps=8", "train.lr=1e-3", "train.resume=auto"))
    train(tiny_config(tiny_model_dir, out, *RUN, "train.max_steps=8", "train.resume=force"))
    assert sorted(train_rows(out)) == list(range(1, 9))
    train(tiny_config(tiny_model_dir, out, *RUN, "train.max_steps=3", "overwrite=true"))
    assert sorted(train_rows(out)) == [1, 2, 3], "overwrite starts a new run"
    assert json.loads((out / "checkpoints" / step_name(3) / "trainer_state.json").read_text())["step"] == 3
    assert os.listdir(out / "checkpoints") == [step_name(3)]


def test_an_fp16_run_resumes_with_its_loss_scaler(tiny_model_dir, tmp_path, fp16_on_cpu):
    """DeepSpeed pickles fp16's DynamicLossScaler into the checkpoint: the weights-only reader
    must accept it, and the resumed steps equal the uninterrupted run."""
    fp16 = ["model.dtype=float16", "model.quantization=nf4", "train.save_every=2", "train.scheduler=constant"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    train(tiny_config(tiny_model_dir, whole, *RUN, *fp16, "train.max_steps=4"))
    train(tiny_config(tiny_model_dir, part, *RUN, *fp16, "train.max_steps=2"))
    train(tiny_config(tiny_model_dir, part, *RUN, *fp16, "train.max_steps=4", "train.resume=force"))
    expected, resumed = train_rows(whole), train_rows(part)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == expected[step], step


def test_resume_on_another_world_size_is_refused_even_when_forced(tiny_model_dir, tmp_path):
    """The data position counts each rank's micro-batches: on another world size it would replay
    or skip pairs, so no --force-resume gets past it."""
    out = tmp_path / "run"
    config = tiny_config(tiny_model_dir, out, *RUN, "train.resume=force")
    checkpoint = out / "checkpoints" / step_name(5)
    checkpoint.mkdir(parents=True)
    (checkpoint / STATE_FILE).write_text(json.dumps({"config": to_dict(config), "world_size": 2, "step": 5}))
    (checkpoint / COMPLETE).write_text("5\n")
    assert resume_point(config, out, world_size=2) == checkpoint
    with pytest.raises(
        UserError, match=r"cannot resume .*step-00000005 on 4 rank\(s\): it was saved by 2; resume it on 2"
    ):
        resume_point(config, out, world_size=4)


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


PWNED = "/tmp/dpo-lora-test-pwned"


def test_a_tampered_checkpoint_is_refused_without_running_its_code(tiny_model_dir, tmp_path):
    import torch

    out = tmp_path / "run"
    train(tiny_config(tiny_model_dir, out, *RUN, "train.max_steps=5"))
    states = out / "checkpoints" / step_name(5) / "deepspeed" / "mp_rank_00_model_states.pt"
    saved = torch.load(states, weights_only=False)
    torch.save({**saved, "extra": Payload()}, states)
    if os.path.exists(PWNED):
        os.unlink(PWNED)
    with pytest.raises(UserError, match="refusing to load checkpoint .*step-00000005"):
        train(tiny_config(tiny_model_dir, out, *RUN, "train.max_steps=8", "train.resume=force"))
    assert not os.path.exists(PWNED)

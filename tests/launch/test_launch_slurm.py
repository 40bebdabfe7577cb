"""launch/slurm.sbatch on a real one-node SLURM cluster (tests/launch/slurm_cluster.py): it trains with two
tasks to completion; a job that reaches its time limit gets SIGTERM in every rank, checkpoints, is
requeued and ends with the adapter of an uninterrupted run; scancel leaves no rank behind."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dpo_lora.core.config import dump_yaml

from ..conftest import REPO
from ..train.test_loop import tiny_config, train_rows

SCRIPT = REPO / "launch" / "slurm.sbatch"
# Two CPU ranks on one node; sbatch's command line overrides the script's GPU-sized defaults.
TWO_TASKS = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]
STEPS = 800  # ~55 s of training: the time-limit signal lands mid-run


def write_config(tiny_model_dir, folder: Path, *overrides: str) -> Path:
    run = ["data.eval=null", "train.micro_batch_size=2", "train.log_every=1", "train.save_every=0"]
    config = folder / "config.yaml"
    config.write_text(dump_yaml(tiny_config(tiny_model_dir, folder / "run", *run, *overrides)))
    return config


def sbatch(env, log: Path, *args) -> str:
    command = ["sbatch", "--parsable", f"--output={log}", *TWO_TASKS, *args]
    return subprocess.run(command, env=env, cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def job_field(env, job: str, name: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    found = re.search(rf"\b{name}=(\S+)", shown)
    return found.group(1) if found else ""


def node_state(env) -> str:
    return subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip()


def wait_until(condition, seconds: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; job log:\n{log.read_text()[-3000:] if log.exists() else ''}")
        time.sleep(0.5)


def adapter(run: Path) -> dict:
    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(slurm, tiny_model_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slurm-straight")
    config = write_config(tiny_model_dir, folder, f"train.max_steps={STEPS}")
    log = folder / "job.out"
    subprocess.run(
        ["sbatch", "--wait", f"--output={log}", *TWO_TASKS, str(SCRIPT), str(config)],
        env=slurm, cwd=REPO, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return folder / "run"


def test_sbatch_trains_two_tasks_to_completion(uninterrupted):
    rows = train_rows(uninterrupted)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert {row["world_size"] for row in rows} == {2}
    assert (uninterrupted / "adapter" / "adapter_model.safetensors").is_file()
    # Its rendezvous port comes from its job ID, so two jobs sharing a node meet on two ports.
    said = re.search(r"dpo-lora: job (\d+) meets at \S+:(\d+)", (uninterrupted.parent / "job.out").read_text())
    assert said is not None and int(said[2]) == 20000 + int(said[1]) % 10000


def test_a_job_at_its_time_limit_checkpoints_requeues_and_ends_like_an_uninterrupted_run(
    slurm, uninterrupted, tiny_model_dir, tmp_path
):
    config = write_config(tiny_model_dir, tmp_path, f"train.max_steps={STEPS}")
    log, run = tmp_path / "job.out", tmp_path / "run"
    job = sbatch(slurm, log, "--time=10", str(SCRIPT), str(config))
    wait_until(lambda: (run / "metrics.jsonl").is_file() and len(train_rows(run)) >= 2, 300, "training", log)
    # Bring the time limit within the script's --signal lead (120 s): SLURM signals the ranks at
    # its next time-limit check (every 30 s), with the hard limit over a minute away.
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=2"], env=slurm, check=True)
    wait_until(lambda: job_field(slurm, job, "Restarts") == "1", 180, "the requeue", log)
    # Started again within the second of its requeue, SLURM refuses the job ("Job credential
    # revoked": revocation is kept to the second) and fails it: let the old instance leave first.
    wait_until(lambda: node_state(slurm) == "idle", 60, "the node to be free of the old run", log)
    time.sleep(2)
    # The requeued run gets its full limit back; SLURM holds a requeued job ~2 min before it
    # may start again, which StartTime=now lifts.
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10", "StartTime=now"], env=slurm, check=True)
    wait_until(lambda: job_field(slurm, job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 400, "the end", log)
    assert job_field(slurm, job, "JobState") == "COMPLETED", log.read_text()[-3000:]

    text = log.read_text()
    stopped_at = int(re.search(r"stopped at step (\d+)", text).group(1))
    assert 2 <= stopped_at < STEPS, "the signal landed mid-run"
    assert "requeueing job" in text and f"resuming from {run / 'checkpoints'}" in text
    assert [row["step"] for row in train_rows(run)] == list(range(1, STEPS + 1))
    want, got = adapter(uninterrupted), adapter(run)
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        assert (got[name] - tensor).abs().max().item() <= 1e-6, name


def test_scancel_ends_the_job_with_no_rank_left(slurm, tiny_model_dir, tmp_path):
    config = write_config(tiny_model_dir, tmp_path, "train.max_steps=100000")
    log, run = tmp_path / "job.out", tmp_path / "run"
    job = sbatch(slurm, log, "--time=10", str(SCRIPT), str(config))
    wait_until(lambda: (run / "metrics.jsonl").is_file() and len(train_rows(run)) >= 1, 300, "training", log)

    def ranks() -> list[str]:  # this job's trainer processes, found by their config path
        found = subprocess.run(["pgrep", "-f", f"dpo_lora train {config}"], capture_output=True, text=True)
        return found.stdout.split()

    assert len(ranks()) == 2
    subprocess.run(["scancel", job], env=slurm, check=True)
    wait_until(lambda: job_field(slurm, job, "JobState") == "CANCELLED" and not ranks(), 60, "the ranks to end", log)
    assert job_field(slurm, job, "Restarts") == "0", "a cancelled job is not requeued"

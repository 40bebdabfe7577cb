"""`dpo-lora serve --backend slurm` on the real one-node SLURM cluster (tests/launch/slurm_cluster.py),
through the `openai` client: a two-rank job is submitted with sbatch, shows SLURM's states, lives
through a kill -9 of the server, pauses at a checkpoint (SIGTERM to its ranks, no requeue) and
resumes to success; a second job is cancelled with no rank left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from dpo_lora.serve.slurm import NO_REQUEUE, SlurmBackend, SlurmError, render

from ..conftest import REPO
from .conftest import all_events, wait_for_status
from .test_scheduler import create, wait_for_event

# Two CPU ranks of one CPU each fill the test node (2 CPUs).
STEPS = 600
BACKEND = ["--backend", "slurm", "--slurm-max-ranks", "2", "--slurm-gpus-per-rank", "0", "--slurm-cpus-per-rank", "1"]


def test_the_rendered_script_is_the_shipped_one_sized_for_the_job(tmp_path):
    template = (REPO / "launch" / "slurm.sbatch").read_text()
    script = render(template, "ftjob-abc", tmp_path, ranks=3, gpus_per_rank=1, cpus_per_rank=4,
                    exit_file=tmp_path / "exit-2.json")  # fmt: skip
    sbatch_lines = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert sbatch_lines == [
        "#SBATCH --job-name=dpo-lora-ftjob-abc", f"#SBATCH --output={tmp_path}/run.log", "#SBATCH --open-mode=append",
        f"#SBATCH --chdir={tmp_path}", "#SBATCH --ntasks=3", "#SBATCH --cpus-per-task=4", "#SBATCH --signal=TERM@120",
        "#SBATCH --requeue", "#SBATCH --gpus-per-task=1",
    ]  # fmt: skip
    assert f"export DPO_LORA_EXIT_FILE={tmp_path}/exit-2.json" in script
    assert f"export DPO_LORA_NO_REQUEUE_FILE={tmp_path}/{NO_REQUEUE}" in script
    template_body = [line for line in template.splitlines()[1:] if not line.startswith("#SBATCH")]
    assert script.splitlines()[-len(template_body) :] == template_body  # the rest is the shipped script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # and it parses


def test_without_slurm_commands_the_server_refuses_to_start_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dpo_lora", "serve", "--backend", "slurm", "--state-dir", str(tmp_path / "state")],
        env={**os.environ, "PATH": str(tmp_path)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.strip() == (
        "dpo-lora: error: --backend slurm: sbatch not found on PATH (install SLURM's client commands)"
    )


def squeue_states(env) -> list[str]:
    listed = subprocess.run(["squeue", "-h", "-o", "%i %T"], env=env, capture_output=True, text=True, check=True)
    return listed.stdout.split()


def test_a_slurm_job_pauses_survives_a_server_restart_resumes_and_another_is_cancelled(servers, tiny_setup, slurm):
    models, config, train, _ = tiny_setup
    server = servers(models, config, *BACKEND, env=slurm)
    client = server.client()
    file_id = client.files.create(file=train.open("rb"), purpose="fine-tune").id
    # 7-15 steps/s by machine: long enough to outlast a server restart and still be paused mid-run
    # (at 240 steps a fast machine finished before the pause landed).
    job = create(client, file_id, {"train": {"max_steps": STEPS, "save_every": 20}, "gpus": 2})
    wait_for_event(client, job.id, ": RUNNING", timeout=120)
    directory = server.state_dir / "jobs" / job.id
    assert "#SBATCH --ntasks=2" in (directory / "job.sbatch").read_text()

    # The server dies mid-job: the SLURM job trains on and the restarted server re-adopts it.
    wait_for_event(client, job.id, "Checkpoint created at step 20", timeout=300)
    server.kill9()
    server.start()
    client = server.client()
    wait_for_event(client, job.id, "re-adopted", timeout=60)

    # Pause: SIGTERM to both ranks, a checkpoint, and the script does not requeue.
    client.fine_tuning.jobs.pause(job.id)
    wait_for_status(client, job.id, ("paused",), timeout=180)
    stopped_at = client.fine_tuning.jobs.checkpoints.list(job.id).data[0].step_number
    assert 20 <= stopped_at < STEPS
    assert json.loads((directory / "exit-1.json").read_text()) == {"returncode": 0}
    assert "requeueing" not in (directory / "run.log").read_text()
    client.fine_tuning.jobs.resume(job.id)
    job = wait_for_status(client, job.id, ("succeeded",), timeout=400)
    events = all_events(client, job.id)
    rows = [e.data for e in events if e.type == "metrics" and "loss" in e.data]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))  # each step once, across the pause
    assert {row["world_size"] for row in rows} == {2}
    messages = [e.message for e in events]
    assert f"The job is paused; resume continues from step {stopped_at}" in messages
    assert sum(m.startswith("Fine-tuning job started") for m in messages) == 2
    assert job.fine_tuned_model and (directory / "run" / "adapter" / "adapter_model.safetensors").is_file()

    # Cancel: the SLURM job ends and none of its ranks is left.
    doomed = create(client, file_id, {"train": {"max_steps": 4000}, "gpus": 2})
    wait_for_event(client, doomed.id, "Step 1:", timeout=180)
    assert client.fine_tuning.jobs.cancel(doomed.id).status == "cancelled"
    wait_for_event(client, doomed.id, "The job was cancelled", timeout=120)
    deadline = time.monotonic() + 60
    while any(state in ("RUNNING", "COMPLETING") for state in squeue_states(slurm)[1::2]):
        assert time.monotonic() < deadline, squeue_states(slurm)
        time.sleep(0.5)
    ranks = subprocess.run(["pgrep", "-f", f"jobs/{doomed.id}/config.yaml"], capture_output=True, text=True)
    assert ranks.stdout == "", "a rank of the cancelled job is still running"


def test_a_silent_servers_slurm_job_is_adopted_by_another_server(servers, tiny_setup, slurm, postgres_url, tmp_path):
    """Two SLURM-backed servers on one PostgreSQL store: the one that submitted a running job dies
    for good; the other adopts the SLURM job (its folder on the shared filesystem), watches it
    through squeue and records it succeeded."""
    models, config, train, _ = tiny_setup
    first = servers(models, config, *BACKEND, "--db", postgres_url, "--adopt-after", "10", env=slurm, state_dir=tmp_path / "a")  # fmt: skip
    client = first.client()
    job = create(client, client.files.create(file=train.open("rb"), purpose="fine-tune").id, {"train.max_steps": 120})
    wait_for_event(client, job.id, ": RUNNING", timeout=120)
    first.kill9()
    second = servers(models, config, *BACKEND, "--db", postgres_url, "--adopt-after", "10", env=slurm, state_dir=tmp_path / "b")  # fmt: skip
    done = wait_for_status(second.client(), job.id, ("succeeded",), timeout=300)
    assert done.fine_tuned_model and done.trained_tokens > 0
    assert any("adopted the job" in e.message for e in all_events(second.client(), job.id))


def fake_squeue(folder, stdout: str, stderr: str = "", status: int = 0) -> dict:
    """PATH with an `squeue` that answers as SLURM's would."""
    script = folder / "squeue"
    script.write_text(f"#!/bin/sh\nprintf '%s' '{stdout}'\nprintf '%s' '{stderr}' >&2\nexit {status}\n")
    script.chmod(0o755)
    return {"PATH": f"{folder}:{os.environ['PATH']}"}


@pytest.mark.parametrize(
    "stdout, stderr, status, alive, state",
    [
        ("42|PENDING|Resources\n", "", 0, True, "PENDING (Resources)"),
        ("42|RUNNING|None\n", "", 0, True, "RUNNING"),
        ("42|COMPLETING|None\n", "", 0, True, "COMPLETING"),
        ("42|COMPLETED|None\n", "", 0, False, "COMPLETED"),
        ("42|CANCELLED|None\n", "", 0, False, "CANCELLED"),
        ("", "slurm_load_jobs error: Invalid job id specified", 1, False, None),  # forgotten (MinJobAge)
    ],
)
def test_squeue_states_map_to_alive_or_ended(tmp_path, monkeypatch, stdout, stderr, status, alive, state):
    for name, value in fake_squeue(tmp_path, stdout, stderr, status).items():
        monkeypatch.setenv(name, value)
    backend = SlurmBackend(gpus_per_rank=0, cpus_per_rank=1, sbatch_options=[])
    assert backend.is_alive(42, None) is alive
    assert backend.state(42) == state


def test_one_squeue_call_answers_every_running_job_of_a_tick(tmp_path, monkeypatch):
    """As the real squeue does (checked on the test cluster): given a list of ids it prints the jobs
    it knows and leaves out the forgotten ones, with exit status 0."""
    calls = tmp_path / "calls"
    fake_command(tmp_path, "squeue", f"echo \"$@\" >> {calls}\nprintf '7|RUNNING|None\\n8|PENDING|Priority\\n'")
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    backend = SlurmBackend(gpus_per_rank=0, cpus_per_rank=1, sbatch_options=[])
    backend.refresh([7, 8, 9])
    assert [backend.is_alive(job, None) for job in (7, 8, 9)] == [True, True, False], "9 is forgotten: ended"
    assert backend.state(8) == "PENDING (Priority)" and backend.state(9) is None
    assert calls.read_text().splitlines() == ["-h --states=all -o %i|%T|%r -j 7,8,9"]
    backend.is_alive(7, None)
    assert len(calls.read_text().splitlines()) == 2, "an answer serves one tick: a later check asks again"


def test_a_controller_that_does_not_answer_is_never_taken_for_a_finished_job(tmp_path, monkeypatch):
    error = "slurm_load_jobs error: Unable to contact slurm controller (connect failure)"
    for name, value in fake_squeue(tmp_path, "", error, 1).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SlurmError, match="Unable to contact slurm controller"):
        SlurmBackend(gpus_per_rank=0, cpus_per_rank=1, sbatch_options=[]).is_alive(42, None)


def fake_command(folder, name: str, body: str) -> None:
    script = folder / name
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)


def test_a_controller_that_is_down_at_submission_leaves_the_job_queued_until_it_is_back(tmp_path, monkeypatch):
    from dpo_lora.serve import scheduler as scheduler_module
    from dpo_lora.serve.scheduler import Scheduler
    from dpo_lora.serve.store import Event, Job, Store

    from .test_store import queued_job

    bin_dir, job_dir = tmp_path / "bin", tmp_path / "job"
    bin_dir.mkdir()
    job_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    fake_command(bin_dir, "sbatch", "echo 'sbatch: error: Batch job submission failed: Unable to contact slurm "
                                    "controller (connect failure)' >&2; exit 1")  # fmt: skip
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    queued_job(store, "ftjob-1", job_dir, queue_seq=1, devices_wanted=1)
    backend = SlurmBackend(gpus_per_rank=0, cpus_per_rank=1, sbatch_options=[])
    scheduler = Scheduler(store, ["slurm0"], backend, runner="me")
    scheduler._dispatch()
    with store.session() as s:
        job = s.get(Job, "ftjob-1")
        assert (job.status, job.devices, job.attempt, job.pid) == ("queued", None, 0, None)
        messages = [e.message for e in s.query(Event).filter(Event.job_id == "ftjob-1")]
    assert any("could not start yet" in m and "Unable to contact slurm controller" in m for m in messages)
    assert scheduler._dispatch_after > 0  # and nothing is submitted again before RETRY_S

    fake_command(bin_dir, "sbatch", "echo '4242;cluster'")  # the controller is back
    monkeypatch.setattr(scheduler_module.time, "monotonic", lambda: scheduler._dispatch_after + 1)
    scheduler._dispatch()
    with store.session() as s:
        job = s.get(Job, "ftjob-1")
        assert (job.status, job.pid, job.attempt) == ("running", 4242, 1)
    assert json.loads((job_dir / "exit-1.json.started").read_text()) == {"pid": 4242, "start_time": None}
    assert "#SBATCH --ntasks=1" in (job_dir / "job.sbatch").read_text()
    store.dispose()


def test_a_refused_submission_fails_the_job_with_sbatchs_words(tmp_path, monkeypatch):
    from dpo_lora.serve.scheduler import Scheduler
    from dpo_lora.serve.store import Job, Store

    from .test_store import queued_job

    bin_dir, job_dir = tmp_path / "bin", tmp_path / "job"
    bin_dir.mkdir()
    job_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    fake_command(bin_dir, "sbatch", "echo 'sbatch: error: invalid partition specified: gpux' >&2; exit 1")
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    queued_job(store, "ftjob-2", job_dir, queue_seq=1, devices_wanted=1)
    Scheduler(store, ["slurm0"], SlurmBackend(0, 1, ["--partition=gpux"]), runner="me")._dispatch()
    with store.session() as s:
        job = s.get(Job, "ftjob-2")
        assert job.status == "failed" and job.error["code"] == "launch_failed"
        assert job.error["message"] == "sbatch: error: invalid partition specified: gpux"
    store.dispose()

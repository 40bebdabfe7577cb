"""Job lifecycles on the tiny Llama through the real client: FIFO on one slot, cancel, pause and
resume, and a server killed with kill -9 mid-job (alone, and with its job), each finishing with the
adapter of an uninterrupted job, bit for bit."""

from __future__ import annotations

import io
import os
import signal
import tarfile
import time

import torch
from safetensors.torch import load

from .conftest import all_events, wait_for_status

LONG = {"train": {"max_steps": 40, "save_every": 2}}  # long enough to interrupt after a checkpoint


def create(client, file_id: str, extra: dict | None = None):
    return client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=file_id, method={"type": "dpo"}, extra_body={"dpo_lora": extra or LONG}
    )


def wait_for_event(client, job_id: str, text: str, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while not any(text in event.message for event in all_events(client, job_id)):
        assert time.monotonic() < deadline, f"no event '{text}' for {job_id}"
        time.sleep(0.2)


def final_adapter(client, job_id: str) -> dict[str, torch.Tensor]:
    """The newest checkpoint's adapter, downloaded as the archive the extension route serves."""
    newest = client.fine_tuning.jobs.checkpoints.list(job_id).data[0]
    archive = client.get(f"/fine_tuning/jobs/{job_id}/checkpoints/{newest.id}/adapter", cast_to=bytes)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return load(tar.extractfile("adapter/adapter_model.safetensors").read())


def assert_same_adapter(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_two_jobs_on_one_slot_run_one_after_the_other_and_cancel_frees_it(servers, tiny_setup):
    models, config, train, _ = tiny_setup
    client = servers(models, config).client()
    file_id = client.files.create(file=train.open("rb"), purpose="fine-tune").id
    first, second = create(client, file_id, {"train.max_steps": 4}), create(client, file_id, {"train.max_steps": 4})
    third = create(client, file_id, {"train.max_steps": 400})
    wait_for_status(client, first.id, ("running",))
    # Validated a scheduler tick later, the second waits for the slot (the first runs for seconds).
    assert wait_for_status(client, second.id, ("queued",), timeout=30).status == "queued"
    assert client.fine_tuning.jobs.retrieve(first.id).status == "running"
    first = wait_for_status(client, first.id, ("succeeded",))
    second = wait_for_status(client, second.id, ("succeeded",))
    started = [e for e in all_events(client, second.id) if e.message.startswith("Fine-tuning job started")]
    assert len(started) == 1 and started[0].created_at >= first.finished_at

    wait_for_event(client, third.id, "Step 1:")
    cancelled = client.fine_tuning.jobs.cancel(third.id)
    assert cancelled.status == "cancelled"
    wait_for_event(client, third.id, "The job was cancelled", timeout=90)  # its process ended
    fourth = create(client, file_id, {"train.max_steps": 1})
    assert wait_for_status(client, fourth.id, ("succeeded",)).status == "succeeded"  # the slot is free again
    assert client.fine_tuning.jobs.retrieve(third.id).status == "cancelled"


def test_pause_then_resume_finishes_with_the_uninterrupted_adapter(servers, tiny_setup):
    models, config, train, _ = tiny_setup
    client = servers(models, config).client()
    file_id = client.files.create(file=train.open("rb"), purpose="fine-tune").id
    # 120 steps: the pause must land before the end (at 40, a fast or loaded machine finished first).
    steps = {"train": {"max_steps": 120, "save_every": 2}}
    uninterrupted = create(client, file_id, steps)
    paused = create(client, file_id, steps)
    wait_for_status(client, uninterrupted.id, ("succeeded",))

    wait_for_event(client, paused.id, "Checkpoint created at step 2")
    client.fine_tuning.jobs.pause(paused.id)
    job = wait_for_status(client, paused.id, ("paused",), timeout=120)
    stopped_at = client.fine_tuning.jobs.checkpoints.list(paused.id).data[0].step_number
    assert 2 <= stopped_at < 120, stopped_at
    assert job.fine_tuned_model is None
    client.fine_tuning.jobs.resume(paused.id)
    job = wait_for_status(client, paused.id, ("succeeded",))
    messages = [e.message for e in all_events(client, paused.id)]
    assert f"The job is paused; resume continues from step {stopped_at}" in messages
    reported = [e.data["step"] for e in all_events(client, paused.id) if e.type == "metrics" and "loss" in e.data]
    assert reported == list(range(1, 121))  # each step reported once, across the pause
    assert_same_adapter(final_adapter(client, paused.id), final_adapter(client, uninterrupted.id))


def test_a_server_killed_mid_job_finds_it_again_and_it_finishes_with_the_same_adapter(servers, tiny_setup):
    models, config, train, _ = tiny_setup
    server = servers(models, config)
    client = server.client()
    file_id = client.files.create(file=train.open("rb"), purpose="fine-tune").id
    uninterrupted = create(client, file_id)
    wait_for_status(client, uninterrupted.id, ("succeeded",))
    expected = final_adapter(client, uninterrupted.id)

    # 1. Only the server dies: its job keeps training and is re-adopted.
    adopted = create(client, file_id)
    wait_for_event(client, adopted.id, "Checkpoint created at step 2")
    (job_pid,) = server.job_pids()
    os.killpg(job_pid, signal.SIGSTOP)  # held mid-run, so it cannot finish while no server watches
    server.kill9()
    os.kill(job_pid, 0)  # the job's process group outlived the server
    server.start()
    client = server.client()
    wait_for_event(client, adopted.id, "Server restarted: the job's process is alive and was re-adopted")
    os.killpg(job_pid, signal.SIGCONT)
    assert wait_for_status(client, adopted.id, ("succeeded",)).status == "succeeded"
    assert any("re-adopted" in e.message for e in all_events(client, adopted.id))
    assert_same_adapter(final_adapter(client, adopted.id), expected)

    # 2. The server and the job's whole process group die: it is queued again and resumes.
    resumed = create(client, file_id)
    wait_for_event(client, resumed.id, "Checkpoint created at step 2")
    (job_pid,) = server.job_pids()
    os.killpg(job_pid, signal.SIGSTOP)  # mid-run when it dies, whatever the machine's speed
    server.kill9()
    os.killpg(job_pid, signal.SIGKILL)
    server.start()
    client = server.client()
    job = wait_for_status(client, resumed.id, ("succeeded",))
    messages = [e.message for e in all_events(client, resumed.id)]
    assert "Server restarted: the job's process is gone" in messages
    assert any(m.startswith("The job's process was killed; re-queued to resume from step") for m in messages)
    assert sum(m.startswith("Fine-tuning job started") for m in messages) == 2
    assert job.trained_tokens == client.fine_tuning.jobs.retrieve(uninterrupted.id).trained_tokens
    assert_same_adapter(final_adapter(client, resumed.id), expected)


def test_a_failing_run_fails_the_job_with_the_trainers_one_line_error(servers, tiny_setup, tmp_path):
    models, config, train, _ = tiny_setup
    client = servers(models, config).client()
    few = tmp_path / "few.jsonl"
    few.write_text("".join(train.read_text().splitlines(keepends=True)[:3]))
    file_id = client.files.create(file=few.open("rb"), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=file_id, method={"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 8}}}
    )
    job = wait_for_status(client, job.id, ("failed",))
    assert job.error.code == "training_failed"
    assert job.error.message.endswith(
        "3 pairs are fewer than one global batch (8 = micro_batch_size x grad_accum x 1 ranks)"
    )
    errors = [e for e in all_events(client, job.id) if e.level == "error"]
    assert len(errors) == 1 and job.error.message in errors[0].message


def test_a_two_rank_job_pauses_at_a_checkpoint_through_deepspeeds_launcher_and_resumes(servers, tiny_setup):
    models, config, train, _ = tiny_setup
    client = servers(models, config, "--cpu-slots", "2").client()
    file_id = client.files.create(file=train.open("rb"), purpose="fine-tune").id
    job = create(client, file_id, {**LONG, "gpus": 2})
    wait_for_event(client, job.id, "Checkpoint created at step 2", timeout=300)
    client.fine_tuning.jobs.pause(job.id)
    wait_for_status(client, job.id, ("paused",), timeout=120)
    stopped_at = client.fine_tuning.jobs.checkpoints.list(job.id).data[0].step_number
    assert stopped_at < 40
    client.fine_tuning.jobs.resume(job.id)
    wait_for_status(client, job.id, ("succeeded",))
    rows = [e.data for e in all_events(client, job.id) if e.type == "metrics" and "loss" in e.data]
    assert [row["step"] for row in rows] == list(range(1, 41))
    assert {row["world_size"] for row in rows} == {2}
    assert f"The job is paused; resume continues from step {stopped_at}" in [
        e.message for e in all_events(client, job.id)
    ]


def test_a_silent_servers_running_job_is_adopted_by_another_and_finishes(servers, tiny_setup, postgres_url, tmp_path):
    """Two servers on one PostgreSQL store and one host, `--adopt-after 10`: the server running a
    job is killed for good (kill -9, never started again). The other adopts the job once the dead
    one's heartbeat is 10 s old, watches its process (alive, or its exit record) and records how it
    ended: succeeded, trained to its last step. Without adoption it would stay running forever."""
    from sqlalchemy import create_engine, text

    models, config, train, _ = tiny_setup
    started = {name: servers(models, config, "--db", postgres_url, "--adopt-after", "10", state_dir=tmp_path / name)
               for name in ("state-a", "state-b")}  # fmt: skip
    client = started["state-a"].client()
    job = create(client, client.files.create(file=train.open("rb"), purpose="fine-tune").id, {"train.max_steps": 30})
    wait_for_event(client, job.id, "Fine-tuning job started")
    engine = create_engine(postgres_url)
    runner_of = text("SELECT runner FROM jobs WHERE id = :id")
    try:
        with engine.connect() as db:
            runner = db.execute(runner_of, {"id": job.id}).scalar_one()
        running, survivor = sorted(started.values(), key=lambda server: str(server.state_dir) not in runner)
        running.kill9()
        done = wait_for_status(survivor.client(), job.id, ("succeeded",), timeout=240)
        with engine.connect() as db:
            assert str(survivor.state_dir) in db.execute(runner_of, {"id": job.id}).scalar_one()
    finally:
        engine.dispose()
    assert done.trained_tokens > 0 and done.fine_tuned_model is not None
    adopted = [e.message for e in all_events(survivor.client(), job.id) if "adopted the job" in e.message]
    assert len(adopted) == 1 and "fell silent" in adopted[0], adopted


def test_two_servers_on_one_postgresql_database_run_each_job_once(servers, tiny_setup, postgres_url, tmp_path):
    """Two `dpo-lora serve` processes share a real PostgreSQL job store (as two machines would): they
    split the queue, no job starts twice, and a cancel sent to one stops the job wherever it is."""
    from sqlalchemy import create_engine, text

    models, config, train, _ = tiny_setup
    first = servers(models, config, "--db", postgres_url, state_dir=tmp_path / "state-a").client()
    second = servers(models, config, "--db", postgres_url, state_dir=tmp_path / "state-b").client()
    file_id = first.files.create(file=train.open("rb"), purpose="fine-tune").id
    jobs = [create(client, file_id, {"train.max_steps": 2}) for client in (first, second, first, second)]
    doomed = create(first, file_id, {"train.max_steps": 400})
    assert second.fine_tuning.jobs.cancel(doomed.id).status == "cancelled"
    for job in jobs:
        assert wait_for_status(second, job.id, ("succeeded",)).status == "succeeded"
        starts = [e for e in all_events(first, job.id) if e.message.startswith("Fine-tuning job started")]
        assert len(starts) == 1, [e.message for e in starts]
    engine = create_engine(postgres_url)
    try:
        deadline = time.monotonic() + 90
        while True:  # the cancelled job holds no device and no process once it is stopped
            with engine.connect() as db:
                runners = {r for (r,) in db.execute(text("SELECT runner FROM jobs WHERE status = 'succeeded'"))}
                doomed_row = db.execute(text("SELECT status, pid, devices FROM jobs WHERE id = :id"), {"id": doomed.id})
                status, pid, devices = doomed_row.one()
            if pid is None and devices is None:
                break
            assert time.monotonic() < deadline, (status, pid, devices)
            time.sleep(0.5)
    finally:
        engine.dispose()
    assert status == "cancelled"
    assert len(runners) == 2, f"both servers ran jobs: {runners}"

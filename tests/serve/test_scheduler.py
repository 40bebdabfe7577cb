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
    assert client.fine_tuning.jobs.retrieve(second.id).status == "queued"
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
    uninterrupted = create(client, file_id)
    paused = create(client, file_id)
    wait_for_status(client, uninterrupted.id, ("succeeded",))

    wait_for_event(client, paused.id, "Checkpoint created at step 2")
    client.fine_tuning.jobs.pause(paused.id)
    job = wait_for_status(client, paused.id, ("paused",), timeout=120)
    stopped_at = client.fine_tuning.jobs.checkpoints.list(paused.id).data[0].step_number
    assert 2 <= stopped_at < 40, stopped_at
    assert job.fine_tuned_model is None
    client.fine_tuning.jobs.resume(paused.id)
    job = wait_for_status(client, paused.id, ("succeeded",))
    messages = [e.message for e in all_events(client, paused.id)]
    assert f"The job is paused; resume continues from step {stopped_at}" in messages
    steps = [e.data["step"] for e in all_events(client, paused.id) if e.type == "metrics" and "loss" in e.data]
    assert steps == list(range(1, 41))  # each step reported once, across the pause
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
    server.kill9()
    os.kill(job_pid, 0)  # the job's process group outlived the server
    server.start()
    client = server.client()
    assert wait_for_status(client, adopted.id, ("succeeded",)).status == "succeeded"
    assert any("re-adopted" in e.message for e in all_events(client, adopted.id))
    assert_same_adapter(final_adapter(client, adopted.id), expected)

    # 2. The server and the job's whole process group die: it is queued again and resumes.
    resumed = create(client, file_id)
    wait_for_event(client, resumed.id, "Checkpoint created at step 2")
    (job_pid,) = server.job_pids()
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


def test_a_job_claimed_but_without_a_recorded_process_is_adopted_or_queued_again(tmp_path):
    """The server died between claiming a job and storing its pid: the supervisor's own start
    record decides (adopt the process it names), and without one the job is queued again."""
    import json
    import subprocess
    import sys

    from dpo_lora.serve import processes
    from dpo_lora.serve.scheduler import Scheduler
    from dpo_lora.serve.store import Job, Store

    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with store.session() as s:
            for name in ("started", "never-started"):
                (tmp_path / name).mkdir()
                s.add(Job(id=name, created_at=1, model="m", training_file="f", hyperparameters={}, seed=1, extra={},
                          status="running", directory=str(tmp_path / name), devices=["cpu0"], attempt=1))  # fmt: skip
        record = {"pid": sleeper.pid, "start_time": processes.start_time(sleeper.pid)}
        (tmp_path / "started" / "exit-1.json.started").write_text(json.dumps(record))
        Scheduler(store, ["cpu0"], on_gpu=False)._announce_recovery()
        with store.session() as s:
            adopted, requeued = s.get(Job, "started"), s.get(Job, "never-started")
            assert (adopted.status, adopted.pid, adopted.devices) == ("running", sleeper.pid, ["cpu0"])
            assert (requeued.status, requeued.pid, requeued.devices) == ("queued", None, None)
    finally:
        sleeper.kill()

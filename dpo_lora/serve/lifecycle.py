"""The job lifecycle: each transition makes one status change and records its event, in the
caller's transaction. The routes (what a client asks) and the scheduler (what a run did) change a
job's status only through these.

    validating_files --validated--> queued --(claim: store.claim)--> running --succeeded--> succeeded
           |                          |  ^                              |  \\--failed-----------> failed
           +--validation_failed--> failed |                             |  \\--requeued--> queued (resumes)
    (before start) --pause--> paused --resume--> queued (or validating_files, if never validated)
    running --request_pause--> (checkpoint) --paused--> paused;   any unfinished --cancel--> cancelled
    running --preempt--> (checkpoint) --preempted--> queued (resumes; serve/preemption.py)
"""

from __future__ import annotations

import time
from pathlib import Path

from dpo_lora.serve.status import BEFORE_START, FINAL, JobStatus, StopRequest
from dpo_lora.serve.store import Job, Store, now
from dpo_lora.serve.wire import ApiError


def _requeue(store: Store, s, job: Job) -> None:
    job.status, job.queue_seq, job.queued_ns = JobStatus.QUEUED, store.next_queue_seq(s), time.time_ns()


def validated(store: Store, s, job: Job) -> None:
    _requeue(store, s, job)
    store.add_event(s, job.id, "Files validated; the job is queued")


def failed(store: Store, s, job: Job, code: str, message: str, param: str | None = None, event: str = "") -> None:
    job.status, job.finished_at = JobStatus.FAILED, now()
    job.error = {"code": code, "param": param, "message": message}
    store.add_event(s, job.id, event or message, level="error")


def succeeded(store: Store, s, job: Job, model_name: str, result_file: str) -> None:
    job.status, job.finished_at = JobStatus.SUCCEEDED, now()
    job.fine_tuned_model, job.result_files = model_name, [result_file]
    store.add_event(s, job.id, f"The job has successfully completed: {model_name}")


def requeued(store: Store, s, job: Job, message: str, level: str = "warn") -> None:
    """A run that ended without finishing (killed, lost, not started): it queues again and resumes."""
    _requeue(store, s, job)
    store.add_event(s, job.id, message, level=level)


def cancel(store: Store, s, job: Job) -> None:
    """A client's cancel. A running job's process is stopped by whoever runs it (StopRequest.CANCEL)."""
    if job.status in FINAL:
        raise ApiError(400, f"Job {job.id} has already {job.status}", param="fine_tuning_job_id")
    if job.devices is not None:
        job.stop_request, job.signalled_at = StopRequest.CANCEL, None
    job.status, job.finished_at = JobStatus.CANCELLED, now()
    store.add_event(s, job.id, "Cancellation requested")


def pause(store: Store, s, job: Job) -> None:
    """A client's pause: a running job checkpoints at its next step; one not started waits."""
    if job.status == JobStatus.RUNNING and job.stop_request in (None, StopRequest.PREEMPT):
        job.stop_request = StopRequest.PAUSE  # ends in `paused` once the checkpoint is written
        store.add_event(s, job.id, "Pause requested: the job checkpoints at its next step")
    elif job.status in BEFORE_START:
        job.status = JobStatus.PAUSED
        store.add_event(s, job.id, "The job is paused before it started")
    else:
        raise ApiError(
            400, f"Job {job.id} is {job.status}; only a running or queued job can be paused", param="fine_tuning_job_id"
        )


def resume(store: Store, s, job: Job) -> None:
    """A client's resume: queued again; validated first if it was paused before its files were."""
    if job.status != JobStatus.PAUSED:
        raise ApiError(
            400, f"Job {job.id} is {job.status}; only a paused job can be resumed", param="fine_tuning_job_id"
        )
    if (Path(job.directory) / "train.jsonl").is_file():
        _requeue(store, s, job)
    else:
        job.status = JobStatus.VALIDATING_FILES
    store.add_event(s, job.id, f"The job is resumed and {job.status.value.replace('_', ' ')}")


def preempt(store: Store, s, job: Job, head: Job) -> None:
    """The scheduler stops a running job for `head`, of a project below its share (serve/preemption.py)."""
    job.stop_request, job.signalled_at = StopRequest.PREEMPT, None
    store.add_event(s, job.id, f"Preempted for job {head.id} of a project below its share: the job checkpoints at its next step")  # fmt: skip
    store.add_event(s, head.id, f"Job {job.id} of a project over its share stops for this one")


def preempted(store: Store, s, job: Job, at_step: str) -> None:
    """A preempted run stopped at a checkpoint: it queues again in its old place in its project's queue."""
    job.status, job.queued_ns = JobStatus.QUEUED, time.time_ns()
    store.add_event(s, job.id, f"The job was preempted and is queued again; it resumes from {at_step}", level="warn")


def paused(store: Store, s, job: Job, at_step: str) -> None:
    """The run stopped at a checkpoint after a pause request."""
    job.status = JobStatus.PAUSED
    store.add_event(s, job.id, f"The job is paused; resume continues from {at_step}")


def not_started(store: Store, s, job: Job, message: str) -> None:
    """The backend could not take the job now: back as it was (paused if a pause came meanwhile)."""
    if job.stop_request == StopRequest.PAUSE:
        job.status = JobStatus.PAUSED
    elif job.status == JobStatus.RUNNING:  # not cancelled meanwhile
        job.status = JobStatus.QUEUED
    store.add_event(s, job.id, message, level="warn")

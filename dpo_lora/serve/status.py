"""A job's status and the stop a client asked for, as enums (a leaf: the store's columns hold them)."""

from __future__ import annotations

import enum


class JobStatus(str, enum.Enum):
    """OpenAI's job statuses, plus `paused`: validating_files -> queued -> running -> a final one."""

    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


class StopRequest(str, enum.Enum):
    """What the scheduler does to a running job's process: kill it (cancel), or SIGTERM it so the
    trainer checkpoints and exits (pause; preempt, after which it queues again: serve/preemption.py)."""

    CANCEL = "cancel"
    PAUSE = "pause"
    PREEMPT = "preempt"

    def __str__(self) -> str:
        return self.value


FINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
BEFORE_START = (JobStatus.VALIDATING_FILES, JobStatus.QUEUED)

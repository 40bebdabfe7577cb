"""Fair share by preemption (`dpo-lora serve --preempt-after S`): the head of the queue, kept waiting S
seconds by devices that projects over their share hold, takes some back.

The head of the queue belongs to the project holding the fewest devices per unit of its weight
(scheduler._head_of_queue). When it has waited S seconds and does not fit on the free devices, one
running job of this server is stopped as a pause stops it (SIGTERM: the trainer checkpoints at its next
step and exits) and queued again in its old place in its project's queue; it resumes later from that
checkpoint, as a paused job does. The job stopped:
  - belongs to another project and has run at least S seconds (a job is not stopped again at once);
  - frees, with the free devices, enough for the head;
  - leaves the head's project, after the swap, holding no more devices per unit of weight than the
    stopped job's project then holds (else that project would be the more starved, and take them back);
  - of those, belongs to the project holding the most devices per unit of weight, and started last.
One preemption at a time per server: the next waits until the stopped job has checkpointed and left.
"""

from __future__ import annotations

import time

from sqlalchemy import select

from dpo_lora.serve.status import JobStatus, StopRequest
from dpo_lora.serve.store import Job


def held_devices(s) -> dict[str, int]:
    """Devices each project's running jobs hold now, every server's counted."""
    held: dict[str, int] = {}
    for project, devices in s.execute(select(Job.project, Job.devices).where(Job.devices.is_not(None))):
        held[project] = held.get(project, 0) + len(devices)
    return held


def in_flight(s, runner: str) -> bool:
    """Whether a job of `runner` was asked to stop for a preemption and has not left its devices yet."""
    asked = select(Job.id).where(Job.runner == runner, Job.stop_request == StopRequest.PREEMPT)
    return s.scalars(asked.limit(1)).first() is not None


def victim(s, head: Job, free: int, weights: dict, runner: str, min_run_s: float) -> Job | None:
    """The running job of `runner` to stop so that `head` can start (the rules above); None: none may."""
    held = held_devices(s)

    def share(project: str, change: int = 0) -> float:
        return (held.get(project, 0) + change) / weights.get(project, 1.0)

    head_after = share(head.project, head.devices_wanted)
    started_before = time.time_ns() - int(min_run_s * 1e9)
    running = select(Job).where(
        Job.runner == runner,
        Job.status == JobStatus.RUNNING,
        Job.devices.is_not(None),
        Job.pid.is_not(None),
        Job.stop_request.is_(None),
        Job.project != head.project,
        Job.started_ns <= started_before,
    )
    best, best_key = None, None
    for job in s.scalars(running):
        if len(job.devices) + free < head.devices_wanted or head_after > share(job.project, -len(job.devices)):
            continue
        key = (share(job.project), job.started_ns)
        if best_key is None or key > best_key:
            best, best_key = job, key
    return best

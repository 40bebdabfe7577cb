"""The scheduler's dispatch side: validate files, queue FIFO, give each job its devices, start it
on the backend, watch it, stop it, decide how it ended. What a run wrote becomes events and
checkpoints in ingest.py; every status change is a named transition of lifecycle.py.

Runs start, stop and are watched through a backend (local.py: process groups on this machine;
slurm.py: SLURM jobs), which the rest of this file never looks inside.

One `tick()` does everything that touches processes, so the HTTP routes only record requests
(committed first) and a request survives a restart that happens before it is carried out. The
tick reads the same rows on a fresh server: a job whose process is alive is re-adopted, one whose
process died is queued again and resumes from its newest complete checkpoint.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from pathlib import Path

from sqlalchemy import func, select

from dpo_lora.core import rundir
from dpo_lora.serve import failover, ingest, lifecycle, preemption, processes, runfiles
from dpo_lora.serve.status import JobStatus, StopRequest
from dpo_lora.serve.store import Export, File, Job, Store, Upload, now
from dpo_lora.serve.wire import fine_tuned_name

MAX_ATTEMPTS = 3  # a job whose process dies this many times without finishing fails
RETRY_S = 30.0  # after a backend could not take a job (its controller is down), before the next try


class Scheduler:
    """`runner` names this server in the rows it claims (stable across its restarts): servers that
    share a database each watch, stop and recover only their own runs."""

    def __init__(self, store: Store, devices: list[str], backend, runner: str, grace_s: float = 120.0,
                 project_devices: int = 0, weights=dict, adopt_after_s: float = 0.0,
                 preempt_after_s: float = 0.0) -> None:  # fmt: skip
        """`project_devices`: the most devices one project's running jobs may hold (0: no cap);
        `weights()`: each project's share in the queue's turns now (absent: 1; --api-keys);
        `adopt_after_s`: adopt the runs of a server silent this long (0: never; serve/failover.py);
        `preempt_after_s`: stop a job of a project over its share for a head of the queue waiting this
        long (0: never; serve/preemption.py)."""
        self.store, self.devices, self.backend, self.runner, self.grace_s = store, devices, backend, runner, grace_s
        self.project_devices, self.weights, self.adopt_after_s = project_devices, weights, adopt_after_s
        self.preempt_after_s = preempt_after_s
        self._next_beat = 0.0  # monotonic time of this server's next heartbeat
        self._adopted_checked = False
        self._reported_state: dict[str, str] = {}  # job id -> the backend state last put in its events
        self._dispatch_after = 0.0  # monotonic time before which no job is started (backend down)
        self._lent: set[str] = set()  # devices inference holds now: no job starts on them
        self._lending = threading.Lock()  # between picking free devices and claiming them

    def run_forever(self, stopping) -> None:
        while not stopping.is_set():
            try:
                self.tick()
            except Exception as err:  # a bad tick must not end the service; the next one retries
                print(f"dpo-lora serve: scheduler: {type(err).__name__}: {err}", file=sys.stderr)
            stopping.wait(self.backend.interval_s)

    def tick(self) -> None:
        if time.monotonic() >= self._next_beat:
            failover.beat(self.store, self.runner)
            if self.adopt_after_s:
                self._adopt_silent()
            self._next_beat = time.monotonic() + failover.BEAT_S
        if not self._adopted_checked:
            self._announce_recovery()
        self._validate()
        self._watch()
        self._dispatch()
        if self.preempt_after_s:
            self._preempt()
        self._watch_exports()
        self._expire_files()

    def _expire_files(self) -> None:
        """Delete files past their `expires_after` (row and file; a job that copied one keeps its copy),
        and the parts of uploads (OpenAI's Uploads) still pending at their expiry."""
        with self.store.session() as s:
            expired = list(s.scalars(select(File).where(File.expires_at.is_not(None), File.expires_at <= now())))
            for file in expired:
                s.delete(file)
            uploads = list(s.scalars(select(Upload).where(Upload.status == "pending", Upload.expires_at <= now())))
            for upload in uploads:
                upload.status = "expired"
        for file in expired:
            Path(file.path).unlink(missing_ok=True)
        for upload in uploads:
            shutil.rmtree(upload.directory, ignore_errors=True)

    def _adopt_silent(self) -> None:
        """Take over the runs of servers silent for `adopt_after_s` that this backend reaches; from
        the next tick they are watched as this server's own."""
        with self.store.session() as s:
            for dead in failover.silent(s, self.runner, self.adopt_after_s):
                if self.backend.reaches(dead.name):
                    for job in failover.adopt(self.store, s, dead, self.runner, self.adopt_after_s):
                        if job.pid is None:
                            self._settle_unstarted(s, job)

    # -- states before running -------------------------------------------------------------------
    def _announce_recovery(self) -> None:
        with self.store.session() as s:
            mine = Job.runner == self.runner
            for job in s.scalars(
                select(Job).where(mine, Job.devices.is_not(None), Job.pid.is_(None)).with_for_update()
            ):
                self._settle_unstarted(s, job)
            for export in s.scalars(
                select(Export)
                .where(Export.runner == self.runner, Export.status == "running", Export.pid.is_(None))
                .with_for_update()
            ):
                started = processes.started_record(Path(export.directory), export.attempt)
                if started is not None:
                    export.pid, export.pid_start = started
                else:
                    export.status = "queued"
            for job in s.scalars(select(Job).where(mine, Job.pid.is_not(None))):
                alive = self.backend.is_alive(job.pid, job.pid_start)
                self.store.add_event(
                    s,
                    job.id,
                    "Server restarted: the job's process is alive and was re-adopted"
                    if alive
                    else "Server restarted: the job's process is gone",
                )
        self._adopted_checked = True

    def _settle_unstarted(self, s, job: Job) -> None:
        """A job claimed with no process recorded: its server died between the claim and storing the
        pid. The supervisor's own record tells whether the process started; if not, it is re-queued."""
        started = processes.started_record(Path(job.directory), job.attempt)
        if started is not None:
            job.pid, job.pid_start = started
            return
        job.devices = None
        message = "Server restarted before the job's process started; re-queued"
        if job.stop_request is None and job.status == JobStatus.RUNNING:
            lifecycle.requeued(self.store, s, job, message, level="info")
        else:
            self.store.add_event(s, job.id, message)

    def _validate(self) -> None:
        with self.store.session() as s:
            waiting = (
                select(Job).where(Job.status == JobStatus.VALIDATING_FILES).order_by(Job.created_at).with_for_update()
            )
            for job in s.scalars(waiting):
                problem = None
                for param, file_id, name in (
                    ("training_file", job.training_file, "train.jsonl"),
                    ("validation_file", job.validation_file, "eval.jsonl"),
                ):
                    if file_id is None:
                        continue
                    file = s.get(File, file_id)
                    if file is None or file.status != "processed":
                        details = file.status_details if file is not None else "the file was deleted"
                        problem = {"code": f"invalid_{param}", "param": param, "message": f"{file_id}: {details}"}
                        break
                    shutil.copyfile(file.path, Path(job.directory) / name)
                if problem:
                    lifecycle.failed(self.store, s, job, **problem, event=f"Validation failed: {problem['message']}")
                else:
                    lifecycle.validated(self.store, s, job)

    def _dispatch(self) -> None:
        """Start queued jobs while the head of the queue fits on the free devices. The head is the
        oldest queued job of the project that holds the fewest devices per unit of its weight now
        (every server's jobs counted), or of equals the one whose newest job started longest ago: projects take turns,
        and each project's jobs run first come, first served."""
        while time.monotonic() >= self._dispatch_after:
            with self._lending:
                with self.store.session() as s:
                    head = _head_of_queue(s, self.project_devices, self.weights())
                free = self._free()
                if head is None or head.devices_wanted > len(free):
                    return
                devices = free[: head.devices_wanted]
                if not self.store.claim(head.id, devices, head.attempt + 1, self.runner):
                    continue  # another server on this database took it
            self._launch(head.id, devices, head.attempt + 1)

    def _preempt(self) -> None:
        """Stop one job of a project over its share when the head of the queue has waited
        preempt_after_s for devices (serve/preemption.py)."""
        with self._lending:
            free = len(self._free())
            with self.store.session() as s:
                if preemption.in_flight(s, self.runner):
                    return
                weights = self.weights()
                head = _head_of_queue(s, self.project_devices, weights)
                if head is None or head.devices_wanted <= free or head.devices_wanted > len(self.devices):
                    return
                if time.time_ns() - head.queued_ns < self.preempt_after_s * 1e9:
                    return
                job = preemption.victim(s, head, free, weights, self.runner, self.preempt_after_s)
                if job is not None:
                    lifecycle.preempt(self.store, s, self.store.for_update(s, Job, job.id), head)

    def _free(self) -> list[str]:
        """Devices that no job of this server holds and inference has not borrowed."""
        with self.store.session() as s:
            mine = select(Job).where(Job.runner == self.runner, Job.devices.is_not(None))
            held = {d for job in s.scalars(mine) for d in job.devices}
        return [d for d in self.devices if d not in held and d not in self._lent]

    def lend(self) -> str | None:
        """A device no job holds, kept from jobs until given back (inference on the GPUs); None: all busy."""
        with self._lending:
            free = self._free()
            if free:
                self._lent.add(free[-1])  # from the end: jobs take devices from the start
                return free[-1]
        return None

    def give_back(self, device: str) -> None:
        with self._lending:
            self._lent.discard(device)

    def _launch(self, job_id: str, devices: list[str], attempt: int) -> None:
        with self.store.session() as s:
            directory = Path(s.get(Job, job_id).directory)
        try:
            handle, started = self.backend.start(job_id, directory, devices, attempt)
        except OSError as err:
            if getattr(err, "transient", False):
                self._start_later(job_id, attempt, err)
                return
            with self.store.session() as s:
                job = self.store.for_update(s, Job, job_id)
                job.devices = None
                lifecycle.failed(self.store, s, job, "launch_failed", str(err), event=f"The job could not start: {err}")
            return
        with self.store.session() as s:
            job = self.store.for_update(s, Job, job_id)
            job.pid, job.pid_start = handle, started

    def _start_later(self, job_id: str, attempt: int, err: OSError) -> None:
        """The backend could not take the job now (SLURM's controller is down): the job goes back to
        the head of the queue as it was, and nothing starts for RETRY_S."""
        self._dispatch_after = time.monotonic() + RETRY_S
        with self.store.session() as s:
            job = self.store.for_update(s, Job, job_id)
            lifecycle.not_started(
                self.store, s, job, f"The job could not start yet ({err}); trying again in {RETRY_S:.0f} s"
            )
            job.devices, job.attempt, job.stop_request = None, attempt - 1, None

    # -- running jobs ----------------------------------------------------------------------------
    def _watch(self) -> None:
        with self.store.session() as s:
            running = s.execute(
                select(Job.id, Job.pid).where(Job.runner == self.runner, Job.devices.is_not(None))
            ).all()
            ids, handles = [job_id for job_id, _ in running], [pid for _, pid in running if pid is not None]
        self.backend.refresh(handles)  # SLURM: one squeue for all of them
        for job_id in ids:
            with self.store.session() as s:
                job = self.store.for_update(s, Job, job_id)
                ingest.new_rows(self.store, s, job)
                if job.pid is None:
                    continue  # claimed, not started yet (or its start is being recorded)
                if self.backend.is_alive(job.pid, job.pid_start):
                    self._report_state(s, job)
                    self._carry_out_stop(s, job)
                else:
                    ingest.new_rows(self.store, s, job)  # rows written just before the end
                    self._finish(s, job)

    def _report_state(self, s, job: Job) -> None:
        """An event each time the backend's own state of the run changes (SLURM: PENDING, RUNNING)."""
        state = self.backend.state(job.pid)
        if state is not None and self._reported_state.get(job.id) != state:
            self._reported_state[job.id] = state
            self.store.add_event(s, job.id, f"{self.backend.name} job {job.pid}: {state}")

    def _carry_out_stop(self, s, job: Job) -> None:
        if job.stop_request is None:
            return
        if job.stop_request == StopRequest.CANCEL:  # nothing of a cancelled run is kept: no last step, no checkpoint
            self.backend.kill(job.pid)
        elif job.signalled_at is None:
            self.backend.request_stop(job.pid, Path(job.directory))  # the trainer checkpoints and exits
            job.signalled_at = time.time()
        elif time.time() - job.signalled_at > self.grace_s:
            self.backend.kill(job.pid)
            self.store.add_event(s, job.id, f"The job did not stop within {self.grace_s:.0f} s; killed", "warn")

    def _finish(self, s, job: Job) -> None:
        """The job's process ended: decide what that means, from its exit status and its files."""
        directory = Path(job.directory)
        returncode = processes.returncode(directory, job.attempt)
        job.pid = job.pid_start = job.devices = None
        job.signalled_at = None
        self._reported_state.pop(job.id, None)
        newest = rundir.checkpoints(directory / "run")
        at_step = f"step {newest[-1][0]}" if newest else "the start (no checkpoint yet)"
        if job.stop_request == StopRequest.CANCEL:
            self.store.add_event(s, job.id, "The job was cancelled")
        elif job.stop_request == StopRequest.PAUSE:
            lifecycle.paused(self.store, s, job, at_step)
        elif job.stop_request == StopRequest.PREEMPT and not (
            returncode == 0 and rundir.has_adapter(directory / "run")
        ):
            lifecycle.preempted(self.store, s, job, at_step)
        elif returncode == 0 and rundir.has_adapter(directory / "run"):
            lifecycle.succeeded(self.store, s, job, fine_tuned_name(job), ingest.result_file(s, directory, job.project))
        elif returncode not in (None, 0) and returncode != -9:
            message = runfiles.last_error(directory / processes.LOG_FILE, returncode)
            lifecycle.failed(self.store, s, job, "training_failed", message, event=f"The job failed: {message}")
        elif job.attempt >= MAX_ATTEMPTS:
            lifecycle.failed(
                self.store, s, job, "process_lost", f"the job's process ended without finishing {job.attempt} times"
            )
        else:  # killed or stopped from outside: continue where it stopped
            how = "was killed" if returncode in (None, -9) else "stopped before finishing"
            lifecycle.requeued(self.store, s, job, f"The job's process {how}; re-queued to resume from {at_step}")
        job.stop_request = None

    # -- exports ---------------------------------------------------------------------------------
    def _watch_exports(self) -> None:
        with self.store.session() as s:
            queued = list(s.scalars(select(Export.id).where(Export.status == "queued")))
        for export_id in queued:
            if self.store.claim_export(export_id, self.runner):
                with self.store.session() as s:
                    export = self.store.for_update(s, Export, export_id)
                    command = [sys.executable, "-m", "dpo_lora", "export", "--spec", export.options["spec"]]
                    export.pid, export.pid_start = processes.start(command, Path(export.directory), export.attempt)
        with self.store.session() as s:
            mine = select(Export).where(
                Export.runner == self.runner, Export.status == "running", Export.pid.is_not(None)
            )
            for export in s.scalars(mine.with_for_update()):
                if processes.is_alive(export.pid, export.pid_start):
                    continue
                directory = Path(export.directory)
                returncode = processes.returncode(directory, export.attempt)
                export.pid = export.pid_start = None
                if returncode == 0:
                    export.status, export.finished_at = "succeeded", now()
                elif returncode is None and export.attempt < MAX_ATTEMPTS:
                    export.status = "queued"  # killed with the server's machine: run it again
                else:
                    export.status, export.finished_at = "failed", now()
                    message = runfiles.last_error(directory / processes.LOG_FILE, returncode)
                    export.error = {"code": "export_failed", "param": None, "message": message}


def _head_of_queue(s, cap: int = 0, weights: dict | None = None) -> Job | None:
    """The queued job to start next: the oldest queued job of the project first by (devices it
    holds now per unit of its weight, when its newest job started): projects take turns, on many
    devices and on one, a project of weight 3 holding three devices to another's one. A project
    whose head would take it past `cap` devices (0: no cap) waits, and others go first."""
    weights = weights or {}
    held = preemption.held_devices(s)
    started = dict(s.execute(select(Job.project, func.max(Job.started_ns)).group_by(Job.project)).all())
    firsts = select(Job.project, func.min(Job.queue_seq)).where(Job.status == JobStatus.QUEUED).group_by(Job.project)
    share = {project: held.get(project, 0) / weights.get(project, 1.0) for project in {*held, *weights}}
    for project, position in sorted(s.execute(firsts).all(), key=lambda row: (share.get(row[0], 0), started.get(row[0]) or 0, row[1])):  # fmt: skip
        chosen = select(Job).where(Job.status == JobStatus.QUEUED, Job.project == project, Job.queue_seq == position)
        head = s.scalars(chosen.order_by(Job.created_ns)).first()
        if head is not None and (not cap or held.get(project, 0) + head.devices_wanted <= cap):
            return head
    return None

"""/v1/fine_tuning/jobs: create (the request -> the job's folder and config), list, read, cancel,
pause, resume, delete (extension), events and checkpoints. Status changes go through lifecycle."""

from __future__ import annotations

import hashlib
import json
import shutil

from fastapi import APIRouter, Header, Request
from sqlalchemy import func, select, tuple_
from sqlalchemy.exc import IntegrityError

from dpo_lora.core.config import dump_yaml
from dpo_lora.serve import admission, lifecycle, wire
from dpo_lora.serve.state import DEFAULT_PROJECT, Project, ServerState, State, job_or_404, or_404, page_limit
from dpo_lora.serve.status import FINAL, JobStatus
from dpo_lora.serve.store import Checkpoint, Event, Export, IdempotencyKey, Job, new_id, now
from dpo_lora.serve.store import File as StoredFile
from dpo_lora.serve.wire import ApiError

router = APIRouter()
MAX_IDEMPOTENCY_KEY = 128  # characters: the store keeps them with a project's name in 256


@router.post("/fine_tuning/jobs")
def create_job(state: State, project: Project, body: wire.JobCreate, idempotency_key: str | None = Header(None)) -> dict:  # fmt: skip
    request_hash = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    if idempotency_key:
        if len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise ApiError(400, f"Idempotency-Key is longer than {MAX_IDEMPOTENCY_KEY} characters", param="Idempotency-Key")  # fmt: skip
        # Each project's keys apart (the default project's as before projects existed).
        idempotency_key = idempotency_key if project == DEFAULT_PROJECT else f"{project}/{idempotency_key}"
        replay = _replayed(state, project, idempotency_key, request_hash)
        if replay is not None:
            return replay
    job = _new_job(state, project, body)
    try:
        with state.store.session() as s:
            _within_job_cap(state, s, project)
            s.add(job)
            state.store.add_event(s, job.id, f"Created fine-tuning job: {job.id}")
            if idempotency_key:
                s.add(
                    IdempotencyKey(key=idempotency_key, request_hash=request_hash, object_id=job.id, created_at=now())
                )
    except BaseException as err:  # a create that fails leaves no folder behind
        shutil.rmtree(job.directory, ignore_errors=True)
        if not (isinstance(err, IntegrityError) and idempotency_key):
            raise
        return _replayed(state, project, idempotency_key, request_hash)  # a concurrent retry with this key won
    return wire.job_object(job)


@router.get("/fine_tuning/jobs")
def list_jobs(request: Request, state: State, project: Project, after: str | None = None, limit: int = 20) -> dict:
    key = tuple_(Job.created_ns, Job.id)
    query = select(Job).where(Job.project == project, *_metadata_filter(request.query_params))
    with state.store.session() as s:
        if after:
            anchor = job_or_404(s, after, project)
            query = query.where(key < tuple_(anchor.created_ns, anchor.id))
        found = list(s.scalars(query.order_by(Job.created_ns.desc(), Job.id.desc()).limit(page_limit(limit) + 1)))
    return wire.page([wire.job_object(j) for j in found[:limit]], len(found) > limit)


@router.get("/fine_tuning/jobs/{job_id}")
def retrieve_job(state: State, project: Project, job_id: str) -> dict:
    with state.store.session() as s:
        return wire.job_object(job_or_404(s, job_id, project))


@router.post("/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(state: State, project: Project, job_id: str) -> dict:
    with state.store.session() as s:
        job = job_or_404(s, job_id, project, for_update=True)
        lifecycle.cancel(state.store, s, job)
        if job.stop_request is not None:
            _kill_if_mine(state, job)  # before `cancelled` is reported: no step or checkpoint after it
        return wire.job_object(job)


@router.post("/fine_tuning/jobs/{job_id}/pause")
def pause_job(state: State, project: Project, job_id: str) -> dict:
    with state.store.session() as s:
        job = job_or_404(s, job_id, project, for_update=True)
        lifecycle.pause(state.store, s, job)
        return wire.job_object(job)


@router.post("/fine_tuning/jobs/{job_id}/resume")
def resume_job(state: State, project: Project, job_id: str) -> dict:
    with state.store.session() as s:
        job = job_or_404(s, job_id, project, for_update=True)
        lifecycle.resume(state.store, s, job)
        return wire.job_object(job)


@router.delete("/fine_tuning/jobs/{job_id}")
def delete_job(state: State, project: Project, job_id: str) -> dict:
    """dpo-lora's extension: a finished job, its folder (run, checkpoints, exports) and its rows."""
    with state.store.session() as s:
        job = job_or_404(s, job_id, project, for_update=True)
        if job.status not in FINAL or job.devices is not None:
            raise ApiError(
                409,
                f"Job {job_id} is {job.status}; cancel it and let it stop first",
                param="fine_tuning_job_id",
                code="job_active",
            )
        if s.scalar(select(Export.id).where(Export.job_id == job_id, Export.status.in_(("queued", "running")))):
            raise ApiError(
                409, f"Job {job_id} has an export in progress", param="fine_tuning_job_id", code="export_active"
            )
        for model in (Event, Checkpoint, Export):
            for row in s.scalars(select(model).where(model.job_id == job_id)):
                s.delete(row)
        for file_id in job.result_files or []:
            if (result := s.get(StoredFile, file_id)) is not None:
                s.delete(result)
        s.delete(job)
    shutil.rmtree(job.directory, ignore_errors=True)
    return {"id": job_id, "object": "fine_tuning.job", "deleted": True}


@router.get("/fine_tuning/jobs/{job_id}/events")
def list_events(state: State, project: Project, job_id: str, after: str | None = None, limit: int = 20) -> dict:
    query = select(Event).where(Event.job_id == job_id)
    with state.store.session() as s:
        job_or_404(s, job_id, project)
        if after:
            anchor = or_404(s.scalar(select(Event).where(Event.id == after)), "event", after)
            query = query.where(Event.seq < anchor.seq)
        found = list(s.scalars(query.order_by(Event.seq.desc()).limit(page_limit(limit) + 1)))
    return wire.page([wire.event_object(e) for e in found[:limit]], len(found) > limit)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
def list_checkpoints(state: State, project: Project, job_id: str, after: str | None = None, limit: int = 10) -> dict:
    query = select(Checkpoint).where(Checkpoint.job_id == job_id)
    with state.store.session() as s:
        job = job_or_404(s, job_id, project)
        if after:
            anchor = or_404(s.get(Checkpoint, after), "checkpoint", after)
            query = query.where(Checkpoint.step_number < anchor.step_number)
        found = list(s.scalars(query.order_by(Checkpoint.step_number.desc()).limit(page_limit(limit) + 1)))
        return wire.page([wire.checkpoint_object(c, job) for c in found[:limit]], len(found) > limit)


def _kill_if_mine(state: ServerState, job: Job) -> None:
    """Stop a cancelled job's process now, where this server started it (others' schedulers stop theirs)."""
    if state.backend is None or job.runner != state.runner or job.pid is None:
        return
    if state.backend.is_alive(job.pid, job.pid_start):
        state.backend.kill(job.pid)


def _replayed(state: ServerState, project: str, key: str, request_hash: str) -> dict | None:
    with state.store.session() as s:
        seen = s.get(IdempotencyKey, key)
        if seen is None:
            return None
        if seen.request_hash != request_hash:
            raise ApiError(
                409,
                "Idempotency-Key was used with a different request",
                param="Idempotency-Key",
                code="idempotency_key_reused",
            )
        return wire.job_object(job_or_404(s, seen.object_id, project))


def _metadata_filter(params) -> list:
    """OpenAI's list filter: `metadata[k]=v` (every pair must match) or `metadata=null` (jobs with none)."""
    pairs = {name[len("metadata[") : -1]: value for name, value in params.multi_items()
             if name.startswith("metadata[") and name.endswith("]")}  # fmt: skip
    if "metadata" in params:
        if pairs or params["metadata"] != "null":
            raise ApiError(400, "metadata: give metadata[key]=value pairs, or metadata=null alone", param="metadata")
        return [Job.job_metadata.is_(None)]
    return [Job.job_metadata[name].as_string() == value for name, value in pairs.items()]


def _within_job_cap(state: ServerState, s, project: str) -> None:
    """A 429 (OpenAI's answer past its active-jobs limit) when the project already has
    --project-jobs jobs not yet final; the count and the insert after it hold the project's lock."""
    if not state.project_jobs:
        return
    state.store.lock_project(s, project)
    active = s.scalar(select(func.count()).select_from(Job).where(Job.project == project, Job.status.not_in(FINAL)))
    if active >= state.project_jobs:
        raise ApiError(429, f"project '{project}' has {active} jobs queued, running or paused, its most "
                       "(--project-jobs); wait for one to end, or cancel one", code="rate_limit_exceeded",
                       kind="rate_limit_error")  # fmt: skip


def _new_job(state: ServerState, project: str, body: wire.JobCreate) -> Job:
    job_id = new_id("ftjob")
    directory = state.state_dir / "jobs" / job_id
    spec = admission.request_spec(state, project, body, directory)
    directory.mkdir(parents=True)
    try:  # the job's folder holds everything its run reads besides the base model
        (directory / "deepspeed.json").write_text(json.dumps(spec.deepspeed, indent=2))
        (directory / "config.yaml").write_text(dump_yaml(spec.config))
        if spec.parent_adapter:
            shutil.copytree(spec.parent_adapter, directory / admission.INIT_ADAPTER)
        admission.admit(state, body.model, spec)  # its plan reads the DeepSpeed JSON
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return Job(
        id=job_id,
        created_at=now(),
        model=body.model,
        training_file=body.training_file,
        validation_file=body.validation_file,
        hyperparameters=spec.hyperparameters,
        seed=spec.config.train.seed,
        suffix=body.suffix,
        extra=body.knobs(),
        job_metadata=body.metadata,
        status=JobStatus.VALIDATING_FILES,
        directory=str(directory),
        devices_wanted=spec.devices,
        result_files=[],
        project=project,
    )

"""The HTTP routes: OpenAI's files and fine_tuning.jobs under /v1, plus dpo-lora's extensions.

Routes only read the store and record requests (committed before the response); the scheduler
acts on them. Errors have OpenAI's shape, and an error answering a POST says `x-should-retry:
false`, so the client never repeats work that a retry would duplicate.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, FastAPI, File, Form, Header, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from sqlalchemy import select, tuple_
from sqlalchemy.exc import IntegrityError
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from dpo_lora.core.config import dump_yaml
from dpo_lora.core.errors import UserError
from dpo_lora.data.rows import shape_problems
from dpo_lora.serve import wire
from dpo_lora.serve.dashboard import dashboard_routes
from dpo_lora.serve.guard import Guard, Limits
from dpo_lora.serve.jobspec import SpecError, build_spec
from dpo_lora.serve.store import FINAL, Checkpoint, Event, Export, IdempotencyKey, Job, Store, new_id, now
from dpo_lora.serve.store import File as StoredFile
from dpo_lora.serve.wire import ApiError, not_found

MAX_LISTED_ROWS = 20  # bad rows named in a file's status_details
# OpenAI's upload purposes; only `fine-tune` files are checked as pairs and may be trained on.
PURPOSES = ("fine-tune", "assistants", "batch", "vision", "user_data", "evals")
STREAM_POLL_S = 0.5


@dataclass
class ServerState:
    store: Store
    state_dir: Path
    models: dict[str, str]  # base model id -> folder
    devices: int  # devices (GPUs, or CPU slots) a job may ask for at most
    base_config: str | None = None
    api_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    max_upload: int = 1 << 30
    max_streams: int = 64  # open event streams per API key
    backend: object | None = None  # stops a cancelled job's process at once (the scheduler's backend)
    runner: str | None = None  # this server's name in the rows it claims
    started_at: int = field(default_factory=now)
    streams: dict[str, int] = field(default_factory=dict)  # API key -> open event streams


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="dpo-lora", docs_url=None, redoc_url=None)
    app.state.server = state
    app.add_middleware(Guard, limits=Limits(state.api_key, state.host, state.port, state.max_upload))
    api = APIRouter(prefix="/v1")
    _files_routes(api, state)
    _job_routes(api, state)
    _extension_routes(api, state)
    dashboard_routes(app, api, state)
    app.include_router(api)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "uptime_s": now() - state.started_at}

    @app.exception_handler(ApiError)
    def api_error(request: Request, err: ApiError) -> JSONResponse:
        return _error_response(request, err)

    @app.exception_handler(RequestValidationError)
    def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
        param = ".".join(location) or None
        return _error_response(request, ApiError(400, f"{param or 'request'}: {first.get('msg')}", param=param))

    @app.exception_handler(HTTPException)
    def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return _error_response(request, ApiError(err.status_code, str(err.detail), code=str(err.status_code)))

    @app.exception_handler(RecursionError)
    def too_deep(request: Request, err: RecursionError) -> JSONResponse:
        return _error_response(request, ApiError(400, "the request nests too deeply", code="too_deep"))

    @app.exception_handler(Exception)
    def server_error(request: Request, err: Exception) -> JSONResponse:
        message = f"internal error ({type(err).__name__}); the request was not carried out"
        return _error_response(request, ApiError(500, message, code="server_error", kind="server_error"))

    return app


def _error_response(request: Request, err: ApiError) -> JSONResponse:
    retry = request.method == "POST" or err.status >= 500
    return JSONResponse(err.body(), status_code=err.status, headers={"x-should-retry": "false"} if retry else {})


def _limit(limit: int, most: int = 100) -> int:
    if not 1 <= limit <= most:
        raise ApiError(400, f"limit must be between 1 and {most}", param="limit")
    return limit


# -- files ---------------------------------------------------------------------------------------
def _files_routes(api: APIRouter, state: ServerState) -> None:
    @api.post("/files")
    def create_file(file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]) -> dict:

        if purpose not in PURPOSES:
            raise ApiError(400, f"purpose '{purpose}' is not one of {', '.join(PURPOSES)}", param="purpose")
        file_id = new_id("file")
        folder = state.state_dir / "files"
        folder.mkdir(parents=True, exist_ok=True)
        suffix = ".json" if (file.filename or "").endswith(".json") else ".jsonl"
        path = folder / f"{file_id}{suffix}"
        try:
            with open(f"{path}.tmp", "wb") as out:
                shutil.copyfileobj(file.file, out)
            Path(f"{path}.tmp").replace(path)
            status, details, count = "processed", None, 0
            if purpose == "fine-tune":
                try:
                    count, problems = shape_problems(str(path))
                except UserError as err:
                    count, problems = 0, [(0, str(err))]
                if problems or count == 0:
                    listed = "; ".join(f"row {n}: {text}" for n, text in problems[:MAX_LISTED_ROWS])
                    more = f" (and {len(problems) - MAX_LISTED_ROWS} more)" if len(problems) > MAX_LISTED_ROWS else ""
                    status = "error"
                    details = f"{len(problems)} bad row(s): {listed}{more}" if problems else "the file holds no rows"
            row = StoredFile(id=file_id, filename=file.filename or "upload.jsonl", bytes=path.stat().st_size,
                             purpose=purpose, created_at=now(), status=status, status_details=details,
                             path=str(path), rows=count)  # fmt: skip
            with state.store.session() as s:
                s.add(row)
        except BaseException:  # nothing is left behind by an upload that did not complete
            Path(f"{path}.tmp").unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            raise
        return wire.file_object(row)

    @api.get("/files")
    def list_files(after: str | None = None, limit: int = 100, order: str = "desc", purpose: str | None = None):
        query = select(StoredFile)
        if purpose:
            query = query.where(StoredFile.purpose == purpose)
        key = tuple_(StoredFile.created_ns, StoredFile.id)
        with state.store.session() as s:
            if after:
                anchor = s.get(StoredFile, after) or _raise(not_found("file", after))
                mark = tuple_(anchor.created_ns, anchor.id)
                query = query.where(key < mark if order == "desc" else key > mark)
            query = query.order_by(*(c.desc() for c in key.clauses) if order == "desc" else key.clauses)
            found = list(s.scalars(query.limit(_limit(limit) + 1)))
        return wire.page([wire.file_object(f) for f in found[:limit]], len(found) > limit)

    @api.get("/files/{file_id}")
    def retrieve_file(file_id: str) -> dict:
        return wire.file_object(_file(state, file_id))

    @api.get("/files/{file_id}/content")
    def file_content(file_id: str):
        return FileResponse(_file(state, file_id).path, media_type="application/octet-stream")

    @api.delete("/files/{file_id}")
    def delete_file(file_id: str) -> dict:
        with state.store.session() as s:
            file = s.get(StoredFile, file_id) or _raise(not_found("file", file_id))
            s.delete(file)
        Path(file.path).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}


def _file(state: ServerState, file_id: str) -> StoredFile:
    with state.store.session() as s:
        return s.get(StoredFile, file_id) or _raise(not_found("file", file_id))


def _raise(err: Exception):
    raise err


# -- jobs ----------------------------------------------------------------------------------------
def _job_routes(api: APIRouter, state: ServerState) -> None:
    @api.post("/fine_tuning/jobs")
    def create_job(body: wire.JobCreate, idempotency_key: str | None = Header(None)) -> dict:
        request_hash = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
        if idempotency_key:
            replay = _replayed(state, idempotency_key, request_hash)
            if replay is not None:
                return replay
        job = _new_job(state, body)
        try:
            with state.store.session() as s:
                s.add(job)
                state.store.add_event(s, job.id, f"Created fine-tuning job: {job.id}")
                if idempotency_key:
                    s.add(IdempotencyKey(key=idempotency_key, request_hash=request_hash, object_id=job.id,
                                         created_at=now()))  # fmt: skip
        except BaseException as err:  # a create that fails leaves no folder behind
            shutil.rmtree(job.directory, ignore_errors=True)
            if not (isinstance(err, IntegrityError) and idempotency_key):
                raise
            return _replayed(state, idempotency_key, request_hash)  # a concurrent retry with this key won
        return wire.job_object(job)

    @api.get("/fine_tuning/jobs")
    def list_jobs(after: str | None = None, limit: int = 20) -> dict:
        key = tuple_(Job.created_ns, Job.id)
        query = select(Job)
        with state.store.session() as s:
            if after:
                anchor = s.get(Job, after) or _raise(not_found("fine-tuning job", after))
                query = query.where(key < tuple_(anchor.created_ns, anchor.id))
            found = list(s.scalars(query.order_by(Job.created_ns.desc(), Job.id.desc()).limit(_limit(limit) + 1)))
        return wire.page([wire.job_object(j) for j in found[:limit]], len(found) > limit)

    @api.get("/fine_tuning/jobs/{job_id}")
    def retrieve_job(job_id: str) -> dict:
        with state.store.session() as s:
            return wire.job_object(_job(s, job_id))

    @api.post("/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(job_id: str) -> dict:
        with state.store.session() as s:
            job = _job(s, job_id, for_update=True)
            if job.status in FINAL:
                raise ApiError(400, f"Job {job_id} has already {job.status}", param="fine_tuning_job_id")
            if job.devices is not None:
                job.stop_request, job.signalled_at = "cancel", None  # the scheduler reaps the process
                _kill_if_mine(state, job)  # before `cancelled` is reported: no step or checkpoint after it
            job.status, job.finished_at = "cancelled", now()
            state.store.add_event(s, job.id, "Cancellation requested")
            return wire.job_object(job)

    @api.post("/fine_tuning/jobs/{job_id}/pause")
    def pause_job(job_id: str) -> dict:
        with state.store.session() as s:
            job = _job(s, job_id, for_update=True)
            if job.status == "running" and job.stop_request is None:
                job.stop_request = "pause"  # ends in `paused` once the checkpoint is written
                state.store.add_event(s, job.id, "Pause requested: the job checkpoints at its next step")
            elif job.status in ("queued", "validating_files"):
                job.status = "paused"
                state.store.add_event(s, job.id, "The job is paused before it started")
            else:
                raise ApiError(400, f"Job {job_id} is {job.status}; only a running or queued job can be paused",
                               param="fine_tuning_job_id")  # fmt: skip
            return wire.job_object(job)

    @api.post("/fine_tuning/jobs/{job_id}/resume")
    def resume_job(job_id: str) -> dict:
        with state.store.session() as s:
            job = _job(s, job_id, for_update=True)
            if job.status != "paused":
                raise ApiError(400, f"Job {job_id} is {job.status}; only a paused job can be resumed",
                               param="fine_tuning_job_id")  # fmt: skip
            if not (Path(job.directory) / "train.jsonl").is_file():  # paused before its files were validated
                job.status = "validating_files"
            else:
                job.status, job.queue_seq = "queued", state.store.next_queue_seq(s)
            state.store.add_event(s, job.id, f"The job is resumed and {job.status.replace('_', ' ')}")
            return wire.job_object(job)

    @api.delete("/fine_tuning/jobs/{job_id}")
    def delete_job(job_id: str) -> dict:
        """dpo-lora's extension: a finished job, its folder (run, checkpoints, exports) and its rows."""
        with state.store.session() as s:
            job = _job(s, job_id, for_update=True)
            if job.status not in FINAL or job.devices is not None:
                raise ApiError(409, f"Job {job_id} is {job.status}; cancel it and let it stop first",
                               param="fine_tuning_job_id", code="job_active")  # fmt: skip
            if s.scalar(select(Export.id).where(Export.job_id == job_id, Export.status.in_(("queued", "running")))):
                raise ApiError(409, f"Job {job_id} has an export in progress", param="fine_tuning_job_id",
                               code="export_active")  # fmt: skip
            for model in (Event, Checkpoint, Export):
                for row in s.scalars(select(model).where(model.job_id == job_id)):
                    s.delete(row)
            for file_id in job.result_files or []:
                if (result := s.get(StoredFile, file_id)) is not None:
                    s.delete(result)
            s.delete(job)
        shutil.rmtree(job.directory, ignore_errors=True)
        return {"id": job_id, "object": "fine_tuning.job", "deleted": True}

    @api.get("/fine_tuning/jobs/{job_id}/events")
    def list_events(job_id: str, after: str | None = None, limit: int = 20) -> dict:
        query = select(Event).where(Event.job_id == job_id)
        with state.store.session() as s:
            _job(s, job_id)
            if after:
                anchor = s.scalar(select(Event).where(Event.id == after)) or _raise(not_found("event", after))
                query = query.where(Event.seq < anchor.seq)
            found = list(s.scalars(query.order_by(Event.seq.desc()).limit(_limit(limit) + 1)))
        return wire.page([wire.event_object(e) for e in found[:limit]], len(found) > limit)

    @api.get("/fine_tuning/jobs/{job_id}/checkpoints")
    def list_checkpoints(job_id: str, after: str | None = None, limit: int = 10) -> dict:
        query = select(Checkpoint).where(Checkpoint.job_id == job_id)
        with state.store.session() as s:
            job = _job(s, job_id)
            if after:
                anchor = s.get(Checkpoint, after) or _raise(not_found("checkpoint", after))
                query = query.where(Checkpoint.step_number < anchor.step_number)
            found = list(s.scalars(query.order_by(Checkpoint.step_number.desc()).limit(_limit(limit) + 1)))
            return wire.page([wire.checkpoint_object(c, job) for c in found[:limit]], len(found) > limit)


def _kill_if_mine(state: ServerState, job: Job) -> None:
    """Stop a cancelled job's process now, where this server started it (others' schedulers stop theirs)."""
    if state.backend is None or job.runner != state.runner or job.pid is None:
        return
    if state.backend.is_alive(job.pid, job.pid_start):
        state.backend.kill(job.pid)


def _job(s, job_id: str, for_update: bool = False) -> Job:
    """The job; `for_update` locks its row for a read-modify-write (cancel, pause, resume)."""
    job = Store.for_update(s, Job, job_id) if for_update else s.get(Job, job_id)
    return job or _raise(not_found("fine-tuning job", job_id))


def _replayed(state: ServerState, key: str, request_hash: str) -> dict | None:
    with state.store.session() as s:
        seen = s.get(IdempotencyKey, key)
        if seen is None:
            return None
        if seen.request_hash != request_hash:
            raise ApiError(409, "Idempotency-Key was used with a different request", param="Idempotency-Key",
                           code="idempotency_key_reused")  # fmt: skip
        return wire.job_object(_job(s, seen.object_id))


def _new_job(state: ServerState, body: wire.JobCreate) -> Job:

    if body.method is not None and body.method.type != "dpo":
        raise ApiError(400, f"method '{body.method.type}' is not supported; this server trains DPO", param="method")
    if body.integrations:
        raise ApiError(400, "integrations are not supported; metrics are in the job's events", param="integrations")
    if body.model not in state.models:
        known = ", ".join(sorted(state.models)) or "none (start the server with --models DIR)"
        raise ApiError(400, f"model '{body.model}' is not one this server trains (known: {known})", param="model")
    with state.store.session() as s:
        for param, file_id in (("training_file", body.training_file), ("validation_file", body.validation_file)):
            file = s.get(StoredFile, file_id) if file_id is not None else None
            if file_id is not None and file is None:
                raise ApiError(400, f"invalid {param}: no file '{file_id}'", param=param)
            if file is not None and file.purpose != "fine-tune":
                raise ApiError(400, f"invalid {param}: file '{file_id}' has purpose '{file.purpose}', not fine-tune",
                               param=param)  # fmt: skip
    hyperparameters = body.method.dpo.hyperparameters if body.method and body.method.dpo else body.hyperparameters
    job_id = new_id("ftjob")
    directory = state.state_dir / "jobs" / job_id
    try:
        spec = build_spec(
            state.base_config, state.models[body.model], str(directory / "train.jsonl"),
            str(directory / "eval.jsonl") if body.validation_file else None, str(directory / "run"),
            str(directory / "deepspeed.json"), hyperparameters.model_dump(exclude_none=True) if hyperparameters else {},
            body.dpo_lora, body.seed, state.devices,
        )  # fmt: skip
    except SpecError as err:
        raise ApiError(400, str(err), param=err.param, code="invalid_config") from None
    directory.mkdir(parents=True)
    try:  # the job's folder holds everything its run reads besides the base model
        (directory / "deepspeed.json").write_text(json.dumps(spec.deepspeed, indent=2))
        (directory / "config.yaml").write_text(dump_yaml(spec.config))
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return Job(
        id=job_id, created_at=now(), model=body.model, training_file=body.training_file,
        validation_file=body.validation_file, hyperparameters=spec.hyperparameters, seed=spec.config.train.seed,
        suffix=body.suffix, extra=body.dpo_lora, job_metadata=body.metadata, status="validating_files",
        directory=str(directory), devices_wanted=spec.devices, result_files=[],
    )  # fmt: skip


# -- extensions ----------------------------------------------------------------------------------
def _extension_routes(api: APIRouter, state: ServerState) -> None:
    @api.get("/fine_tuning/jobs/{job_id}/events/stream")
    async def stream_events(job_id: str, request: Request, after: str | None = None):
        """Server-sent events: every event of the job from `after` on, oldest first, until it ends.

        It waits on the event loop, holding no worker thread, and each API key has at most
        `max_streams` open at once (429 past that)."""

        def first() -> int:
            with state.store.session() as s:
                _job(s, job_id)
                return (s.scalar(select(Event.seq).where(Event.id == after)) if after else 0) or 0

        def newer(last: int) -> tuple[list[tuple[int, dict]], str]:
            with state.store.session() as s:
                found = list(
                    s.scalars(select(Event).where(Event.job_id == job_id, Event.seq > last).order_by(Event.seq))
                )
                return [(e.seq, wire.event_object(e)) for e in found], s.get(Job, job_id).status

        start = await run_in_threadpool(first)
        who = hashlib.sha256(request.headers.get("authorization", "").encode()).hexdigest()
        if state.streams.get(who, 0) >= state.max_streams:
            raise ApiError(429, f"at most {state.max_streams} event streams may be open at once per API key",
                           code="too_many_streams", kind="rate_limit_error")  # fmt: skip
        state.streams[who] = state.streams.get(who, 0) + 1

        async def events():
            last = start
            try:
                while True:
                    found, status = await run_in_threadpool(newer, last)
                    for seq, event in found:
                        last = seq
                        yield f"id: {event['id']}\ndata: {json.dumps(event)}\n\n"
                    if not found and status in (*FINAL, "paused"):
                        yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
                        return
                    await asyncio.sleep(STREAM_POLL_S)
            finally:
                state.streams[who] -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    @api.get("/fine_tuning/jobs/{job_id}/checkpoints/{checkpoint_id}/adapter")
    def checkpoint_adapter(job_id: str, checkpoint_id: str):
        """The checkpoint's PEFT adapter as a .tar.gz (adapter_config.json, adapter_model.safetensors)."""
        with state.store.session() as s:
            checkpoint = s.get(Checkpoint, checkpoint_id)
            if checkpoint is None or checkpoint.job_id != job_id:
                raise not_found("checkpoint", checkpoint_id)
        adapter = Path(checkpoint.path) / "adapter"
        if not adapter.is_dir():
            raise ApiError(410, f"checkpoint {checkpoint_id} was pruned (train.keep_checkpoints)", code="gone")
        handle, archive = tempfile.mkstemp(suffix=".tar.gz", dir=state.state_dir)
        with open(handle, "wb") as out, tarfile.open(fileobj=out, mode="w:gz") as tar:
            tar.add(adapter, arcname="adapter")
        return FileResponse(archive, media_type="application/gzip", filename=f"{checkpoint_id}-adapter.tar.gz",
                            background=BackgroundTask(Path(archive).unlink))  # fmt: skip

    @api.post("/fine_tuning/jobs/{job_id}/export")
    def create_export(job_id: str, body: wire.ExportCreate | None = None) -> dict:
        body = body or wire.ExportCreate()
        with state.store.session() as s:
            job = _job(s, job_id)
            source = Path(job.directory) / "run"
            if body.checkpoint:
                checkpoint = s.get(Checkpoint, body.checkpoint)
                if checkpoint is None or checkpoint.job_id != job_id:
                    raise not_found("checkpoint", body.checkpoint)
                source = Path(checkpoint.path)
            elif job.status != "succeeded":
                raise ApiError(400, f"Job {job_id} is {job.status}; export a checkpoint or wait for it to succeed",
                               param="fine_tuning_job_id")  # fmt: skip
            export_id = new_id("ftexport")
            directory = Path(job.directory) / "exports" / export_id
            directory.mkdir(parents=True)
            # --overwrite: an export rerun after a crash replaces the partial folder
            argv = [str(source), "--out", str(directory / "model"), "--merge-into", body.merge_into, "--overwrite"]
            argv += ["--dtype", body.dtype] if body.dtype else []
            export = Export(id=export_id, job_id=job_id, created_at=now(), status="queued", directory=str(directory),
                            options={"argv": argv, "merge_into": body.merge_into, "out": str(directory / "model")})  # fmt: skip
            s.add(export)
            state.store.add_event(s, job_id, f"Export {export_id} queued ({body.merge_into})")
            return wire.export_object(export)

    @api.get("/fine_tuning/jobs/{job_id}/exports/{export_id}")
    def retrieve_export(job_id: str, export_id: str) -> dict:
        with state.store.session() as s:
            export = s.get(Export, export_id)
            if export is None or export.job_id != job_id:
                raise not_found("export", export_id)
            return wire.export_object(export)

    @api.get("/models")
    def list_models() -> dict:
        return wire.page(_models(state), False)

    @api.get("/models/{model_id:path}")
    def retrieve_model(model_id: str) -> dict:
        for model in _models(state):
            if model["id"] == model_id:
                return model
        raise not_found("model", model_id)


def _models(state: ServerState) -> list[dict]:
    models = [{"id": name, "object": "model", "created": state.started_at, "owned_by": "dpo-lora"}
              for name in sorted(state.models)]  # fmt: skip
    with state.store.session() as s:
        for job in s.scalars(select(Job).where(Job.fine_tuned_model.is_not(None)).order_by(Job.finished_at)):
            models.append({"id": job.fine_tuned_model, "object": "model", "created": job.finished_at,
                           "owned_by": wire.ORGANIZATION})  # fmt: skip
    return models

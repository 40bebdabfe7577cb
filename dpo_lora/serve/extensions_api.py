"""dpo-lora's routes beyond OpenAI's: a job's events as server-sent events, a checkpoint's adapter
as a .tar.gz, exports of merged models (their folder streamed as a tar), and /v1/models."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import tarfile
import tempfile
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, StreamingResponse
from sqlalchemy import select
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from dpo_lora.core import rundir
from dpo_lora.serve import wire
from dpo_lora.serve.models import CHECKPOINT_MARK
from dpo_lora.serve.state import Project, ServerState, State, job_or_404
from dpo_lora.serve.status import FINAL
from dpo_lora.serve.store import Checkpoint, Event, Export, Job, new_id, now
from dpo_lora.serve.wire import ApiError, not_found

STREAM_POLL_S = 0.5
EXPORT_SPEC = "export.json"

router = APIRouter()


@router.get("/fine_tuning/jobs/{job_id}/events/stream")
async def stream_events(state: State, project: Project, job_id: str, request: Request, after: str | None = None):
    """Server-sent events: every event of the job from `after` on, oldest first, until it ends.

    It waits on the event loop, holding no worker thread, and each API key has at most
    `max_streams` open at once (429 past that)."""

    def first() -> int:
        with state.store.session() as s:
            job_or_404(s, job_id, project)
            return (s.scalar(select(Event.seq).where(Event.id == after)) if after else 0) or 0

    def newer(last: int) -> tuple[list[tuple[int, dict]], str]:
        with state.store.session() as s:
            found = list(s.scalars(select(Event).where(Event.job_id == job_id, Event.seq > last).order_by(Event.seq)))
            return [(e.seq, wire.event_object(e)) for e in found], s.get(Job, job_id).status

    start = await run_in_threadpool(first)
    who = hashlib.sha256(request.headers.get("authorization", "").encode()).hexdigest()
    if state.streams.get(who, 0) >= state.max_streams:
        raise ApiError(
            429,
            f"at most {state.max_streams} event streams may be open at once per API key",
            code="too_many_streams",
            kind="rate_limit_error",
        )
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


@router.get("/fine_tuning/jobs/{job_id}/checkpoints/{checkpoint_id}/adapter")
def checkpoint_adapter(state: State, project: Project, job_id: str, checkpoint_id: str):
    """The checkpoint's PEFT adapter as a .tar.gz (adapter_config.json, adapter_model.safetensors)."""
    with state.store.session() as s:
        job_or_404(s, job_id, project)
        checkpoint = s.get(Checkpoint, checkpoint_id)
        if checkpoint is None or checkpoint.job_id != job_id:
            raise not_found("checkpoint", checkpoint_id)
    adapter = Path(checkpoint.path) / rundir.ADAPTER
    if not adapter.is_dir():
        raise ApiError(410, f"checkpoint {checkpoint_id} was pruned (train.keep_checkpoints)", code="gone")
    handle, archive = tempfile.mkstemp(suffix=".tar.gz", dir=state.state_dir)
    with open(handle, "wb") as out, tarfile.open(fileobj=out, mode="w:gz") as tar:
        tar.add(adapter, arcname="adapter")
    return FileResponse(
        archive,
        media_type="application/gzip",
        filename=f"{checkpoint_id}-adapter.tar.gz",
        background=BackgroundTask(Path(archive).unlink),
    )


@router.post("/fine_tuning/jobs/{job_id}/export")
def create_export(state: State, project: Project, job_id: str, body: wire.ExportCreate | None = None) -> dict:
    body = body or wire.ExportCreate()
    with state.store.session() as s:
        job = job_or_404(s, job_id, project)
        source = Path(job.directory) / "run"
        if body.checkpoint:
            checkpoint = s.get(Checkpoint, body.checkpoint)
            if checkpoint is None or checkpoint.job_id != job_id:
                raise not_found("checkpoint", body.checkpoint)
            source = Path(checkpoint.path)
        elif job.model_deleted_at is not None:
            raise ApiError(400, f"Job {job_id}'s model {job.fine_tuned_model} was deleted", param="fine_tuning_job_id")
        elif job.status != "succeeded":
            raise ApiError(
                400,
                f"Job {job_id} is {job.status}; export a checkpoint or wait for it to succeed",
                param="fine_tuning_job_id",
            )
        export_id = new_id("ftexport")
        directory = Path(job.directory) / "exports" / export_id
        directory.mkdir(parents=True)
        # The export's spec file, as a job's config.yaml: `dpo-lora export --spec` reads it (overwrite:
        # an export rerun after a crash replaces the partial folder).
        spec = {
            "source": str(source),
            "out": str(directory / "model"),
            "merge_into": body.merge_into,
            "overwrite": True,
            **({"dtype": body.dtype} if body.dtype else {}),
            **({"format": "gguf", "gguf_type": body.gguf_type} if body.format == "gguf" else {}),
        }
        (directory / EXPORT_SPEC).write_text(json.dumps(spec, indent=2))
        export = Export(
            id=export_id,
            job_id=job_id,
            created_at=now(),
            status="queued",
            directory=str(directory),
            options={
                "spec": str(directory / EXPORT_SPEC),
                "merge_into": body.merge_into,
                "out": spec["out"],
                "format": body.format,
            },
        )
        s.add(export)
        state.store.add_event(s, job_id, f"Export {export_id} queued ({body.merge_into})")
        return wire.export_object(export)


@router.get("/fine_tuning/jobs/{job_id}/exports/{export_id}")
def retrieve_export(state: State, project: Project, job_id: str, export_id: str) -> dict:
    with state.store.session() as s:
        job_or_404(s, job_id, project)
        export = s.get(Export, export_id)
        if export is None or export.job_id != job_id:
            raise not_found("export", export_id)
        return wire.export_object(export)


@router.get("/fine_tuning/jobs/{job_id}/exports/{export_id}/content")
def export_content(state: State, project: Project, job_id: str, export_id: str):
    """A finished export's model folder as an uncompressed tar, streamed as it is read: a 7B merged
    model is ~14 GB, so nothing is staged on disk or held in memory (safetensors barely compress)."""
    with state.store.session() as s:
        job_or_404(s, job_id, project)
        export = s.get(Export, export_id)
        if export is None or export.job_id != job_id:
            raise not_found("export", export_id)
        status, folder = export.status, Path(export.options["out"])
    if status != "succeeded":
        raise ApiError(409, f"export {export_id} is {status}; its content exists once it has succeeded",
                       code="export_not_ready")  # fmt: skip
    if not folder.is_dir():
        raise ApiError(410, f"export {export_id}'s folder is gone from the server", code="gone")
    return StreamingResponse(
        tar_stream(folder, export_id),
        media_type="application/x-tar",
        headers={"Content-Disposition": f'attachment; filename="{export_id}.tar"'},
    )


def tar_stream(folder: Path, arcname: str, chunk: int = 1 << 20):
    """`folder`'s regular files as a POSIX tar under `arcname/`, in `chunk`-byte pieces (symlinks and
    anything else that is not a plain file are left out)."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        info = tarfile.TarInfo(f"{arcname}/{path.relative_to(folder).as_posix()}")
        stat = path.stat()
        info.size, info.mtime, info.mode = stat.st_size, int(stat.st_mtime), 0o644
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        with open(path, "rb") as source:
            left = info.size
            while left > 0 and (piece := source.read(min(chunk, left))):
                left -= len(piece)
                yield piece
        if left:
            raise OSError(f"{path} shrank while it was streamed")
        yield b"\0" * (-info.size % tarfile.BLOCKSIZE)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)  # the end-of-archive marker


@router.get("/models")
def list_models(state: State, project: Project) -> dict:
    return wire.page(_models(state, project), False)


@router.get("/models/{model_id:path}")
def retrieve_model(state: State, project: Project, model_id: str) -> dict:
    for model in _models(state, project):
        if model["id"] == model_id:
            return model
    raise not_found("model", model_id)


@router.delete("/models/{model_id:path}")
def delete_model(state: State, project: Project, model_id: str) -> dict:
    """OpenAI's model delete, for a fine-tuned model: its adapter and its checkpoints (models too)
    are removed; the job stays, its `fine_tuned_model` naming what was. A base is the server's."""
    if model_id in state.models:
        raise ApiError(403, f"model '{model_id}' is one of this server's bases (--models); only fine-tuned models can be deleted", param="model")  # fmt: skip
    if CHECKPOINT_MARK in model_id:
        raise ApiError(400, f"model '{model_id}' is a checkpoint: it goes with its fine-tuned model (delete that)", param="model")  # fmt: skip
    with state.store.session() as s:
        query = select(Job).where(Job.fine_tuned_model == model_id, Job.project == project, Job.model_deleted_at.is_(None))  # fmt: skip
        job = s.scalar(query.with_for_update())
        if job is None:
            raise not_found("model", model_id)
        job.model_deleted_at = now()
        checkpoints = list(s.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id)))
        for checkpoint in checkpoints:
            s.delete(checkpoint)
        state.store.add_event(s, job.id, f"Model {model_id} deleted, with its {len(checkpoints)} checkpoint(s)")
    shutil.rmtree(Path(job.directory) / "run" / rundir.ADAPTER, ignore_errors=True)
    for checkpoint in checkpoints:
        shutil.rmtree(checkpoint.path, ignore_errors=True)
    return {"id": model_id, "object": "model", "deleted": True}


def _models(state: ServerState, project: str) -> list[dict]:
    """The bases (every project's) and `project`'s fine-tuned models."""
    models = [
        {"id": name, "object": "model", "created": state.started_at, "owned_by": "dpo-lora"}
        for name in sorted(state.models)
    ]
    with state.store.session() as s:
        for job in s.scalars(
            select(Job)
            .where(Job.fine_tuned_model.is_not(None), Job.project == project, Job.model_deleted_at.is_(None))
            .order_by(Job.finished_at)
        ):
            models.append(
                {
                    "id": job.fine_tuned_model,
                    "object": "model",
                    "created": job.finished_at,
                    "owned_by": wire.ORGANIZATION,
                }
            )
    return models

"""/v1/files: upload (checked row by row when its purpose is fine-tune; within the project's
--project-storage), list, read, delete."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import FileResponse
from sqlalchemy import func, select, tuple_

from dpo_lora.core.errors import UserError
from dpo_lora.data.rows import shape_problems
from dpo_lora.serve import wire
from dpo_lora.serve.state import Project, State, file_or_404, page_limit
from dpo_lora.serve.store import File as StoredFile
from dpo_lora.serve.store import Upload, new_id, now
from dpo_lora.serve.wire import ApiError, not_found

MAX_LISTED_ROWS = 20  # bad rows named in a file's status_details
EXPIRY_SECONDS = (3600, 30 * 24 * 3600)  # expires_after[seconds]: OpenAI's range, an hour to 30 days
# OpenAI's upload purposes; only `fine-tune` files are checked as pairs and may be trained on.
PURPOSES = ("fine-tune", "assistants", "batch", "vision", "user_data", "evals")

router = APIRouter()


@router.post("/files")
def create_file(
    state: State,
    project: Project,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
    anchor: Annotated[str | None, Form(alias="expires_after[anchor]")] = None,
    seconds: Annotated[str | None, Form(alias="expires_after[seconds]")] = None,
) -> dict:
    check_purpose(purpose)
    lifetime = expiry_seconds(anchor, seconds)
    filename = file.filename or "upload.jsonl"
    path = new_file_path(state, filename)
    try:
        with open(f"{path}.tmp", "wb") as out:
            if not copied_within(file.file, out, room(state, project)):
                raise over_storage(state, project, None)
        Path(f"{path}.tmp").replace(path)
        row = add_file(state, project, path, filename, purpose, lifetime)
    except BaseException:  # nothing is left behind by an upload that did not complete
        Path(f"{path}.tmp").unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        raise
    return wire.file_object(row)


def check_purpose(purpose: str) -> None:
    if purpose not in PURPOSES:
        raise ApiError(400, f"purpose '{purpose}' is not one of {', '.join(PURPOSES)}", param="purpose")


def new_file_path(state, filename: str) -> Path:
    """Where a new file's bytes go (its id is the name's stem)."""
    folder = state.state_dir / "files"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{new_id('file')}{'.json' if filename.endswith('.json') else '.jsonl'}"


def add_file(state, project: str, path: Path, filename: str, purpose: str, lifetime: int | None, also=None) -> StoredFile:  # fmt: skip
    """Store the bytes at `path` as one of the project's files (a fine-tune file is checked row by
    row first), within its --project-storage: the count and the insert hold the project's lock.
    `also(session)` runs in the same transaction before the count (an upload marking itself
    completed: its announced bytes stop counting as they become the file's)."""
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
    row = StoredFile(
        id=path.stem,
        filename=filename,
        bytes=path.stat().st_size,
        purpose=purpose,
        created_at=now(),
        status=status,
        status_details=details,
        path=str(path),
        rows=count,
        project=project,
        expires_at=None if lifetime is None else now() + lifetime,
    )
    with state.store.session() as s:
        state.store.lock_project(s, project)  # a concurrent upload counts after this one, or before
        if also is not None:
            also(s)
        if row.bytes > room(state, project, s):
            raise over_storage(state, project, row.bytes)
        s.add(row)
    return row


@router.get("/files")
def list_files(
    state: State,
    project: Project,
    after: str | None = None,
    limit: int = 100,
    order: str = "desc",
    purpose: str | None = None,
):
    query = select(StoredFile).where(StoredFile.project == project)
    if purpose:
        query = query.where(StoredFile.purpose == purpose)
    key = tuple_(StoredFile.created_ns, StoredFile.id)
    with state.store.session() as s:
        if after:
            anchor = file_or_404(state, after, project)
            mark = tuple_(anchor.created_ns, anchor.id)
            query = query.where(key < mark if order == "desc" else key > mark)
        query = query.order_by(*(c.desc() for c in key.clauses) if order == "desc" else key.clauses)
        found = list(s.scalars(query.limit(page_limit(limit) + 1)))
    return wire.page([wire.file_object(f) for f in found[:limit]], len(found) > limit)


@router.get("/files/{file_id}")
def retrieve_file(state: State, project: Project, file_id: str) -> dict:
    return wire.file_object(file_or_404(state, file_id, project))


@router.get("/files/{file_id}/content")
def file_content(state: State, project: Project, file_id: str):
    return FileResponse(file_or_404(state, file_id, project).path, media_type="application/octet-stream")


@router.delete("/files/{file_id}")
def delete_file(state: State, project: Project, file_id: str) -> dict:
    with state.store.session() as s:
        file = s.get(StoredFile, file_id)
        if file is None or file.project != project:
            raise not_found("file", file_id)
        s.delete(file)
    Path(file.path).unlink(missing_ok=True)
    return {"id": file_id, "object": "file", "deleted": True}


def room(state, project: str, session=None) -> float:
    """Bytes the project may still store under --project-storage (inf without the cap): the cap
    less its files and the bytes its pending uploads (OpenAI's Uploads) have announced."""
    if not state.project_storage:
        return float("inf")
    files = select(func.coalesce(func.sum(StoredFile.bytes), 0)).where(StoredFile.project == project)
    pending = select(func.coalesce(func.sum(Upload.bytes), 0)).where(Upload.project == project, Upload.status == "pending")  # fmt: skip
    if session is not None:
        return state.project_storage - session.scalar(files) - session.scalar(pending)
    with state.store.session() as s:
        return state.project_storage - s.scalar(files) - s.scalar(pending)


def over_storage(state, project: str, size: int | None) -> ApiError:
    upload = "this upload" if size is None else f"this upload of {size} bytes"
    return ApiError(413, f"project '{project}': {upload} would pass its {state.project_storage} bytes of files "
                    "(--project-storage); delete files first", code="storage_quota_exceeded", param="file")  # fmt: skip


def copied_within(source, out, room: float, chunk: int = 1 << 20) -> bool:
    """Copy an upload; False, stopping at once, when it is larger than `room` bytes."""
    written = 0
    while block := source.read(chunk):
        written += len(block)
        if written > room:
            return False
        out.write(block)
    return True


def expiry_seconds(anchor: str | None, seconds: str | None) -> int | None:
    """`expires_after` as OpenAI takes it ({"anchor": "created_at", "seconds": N}): N, or None
    when not given; a 400 naming the field otherwise. The scheduler deletes expired files."""
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise ApiError(400, "expires_after.anchor must be created_at", param="expires_after.anchor")
    low, high = EXPIRY_SECONDS
    if seconds is None or not seconds.isdigit() or not low <= int(seconds) <= high:
        raise ApiError(400, f"expires_after.seconds must be an integer from {low} to {high}", param="expires_after.seconds")  # fmt: skip
    return int(seconds)

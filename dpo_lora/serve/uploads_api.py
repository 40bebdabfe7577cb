"""/v1/uploads: OpenAI's Uploads, one file sent in parts, what its client uses for files too large
for one request (`client.uploads.upload_file_chunked`). At most 64 MB a part and 8 GB in all, as
OpenAI's; `complete` joins the parts it names, in its order, into a File checked as /v1/files
checks one (rows, --project-storage). The parts are files in the upload's folder under
--state-dir/uploads/, named by their ids; an upload not completed within an hour expires, and the
scheduler removes its parts. A pending upload's announced bytes count against --project-storage."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, UploadFile

from dpo_lora.serve import wire
from dpo_lora.serve.files_api import (
    add_file,
    check_purpose,
    copied_within,
    expiry_seconds,
    new_file_path,
    over_storage,
    room,
)
from dpo_lora.serve.state import Project, State
from dpo_lora.serve.store import Store, Upload, new_id, now
from dpo_lora.serve.wire import ApiError, not_found

MAX_BYTES = 8 * 10**9  # one upload, all its parts (OpenAI's)
MAX_PART_BYTES = 64 * 2**20  # one part (OpenAI's)
LIFETIME_S = 3600  # a pending upload expires an hour after it was created (OpenAI's)
PART_ID = re.compile(r"part-[0-9a-f]{24}")  # new_id("part"): what a part's file may be named

router = APIRouter()


@router.post("/uploads")
def create_upload(state: State, project: Project, body: wire.UploadCreate) -> dict:
    check_purpose(body.purpose)
    if not 1 <= body.bytes <= MAX_BYTES:
        raise ApiError(400, f"bytes must be from 1 to {MAX_BYTES}", param="bytes")
    after = body.expires_after
    lifetime = None if after is None else expiry_seconds(after.anchor, str(after.seconds))
    upload_id = new_id("upload")
    directory = state.state_dir / "uploads" / upload_id
    created = now()
    upload = Upload(id=upload_id, project=project, filename=body.filename, purpose=body.purpose,
                    mime_type=body.mime_type, bytes=body.bytes, created_at=created,
                    expires_at=created + LIFETIME_S, status="pending", file_lifetime=lifetime,
                    directory=str(directory))  # fmt: skip
    directory.mkdir(parents=True)
    try:
        with state.store.session() as s:
            state.store.lock_project(s, project)
            if body.bytes > room(state, project, s):
                raise over_storage(state, project, body.bytes)
            s.add(upload)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return wire.upload_object(upload)


@router.post("/uploads/{upload_id}/parts")
def add_part(state: State, project: Project, upload_id: str, data: Annotated[UploadFile, File()]) -> dict:
    upload = _pending(state, upload_id, project)
    directory = Path(upload.directory)
    part_id = new_id("part")
    path = directory / part_id
    too_large = ApiError(400, f"a part holds at most {MAX_PART_BYTES} bytes, and the parts together at most the upload's {upload.bytes}", param="data")  # fmt: skip
    try:
        with open(f"{path}.tmp", "wb") as out:  # no folder: the upload ended meanwhile
            if not copied_within(data.file, out, min(MAX_PART_BYTES, upload.bytes - _sent(directory))):
                raise too_large
        Path(f"{path}.tmp").replace(path)
        if _sent(directory) > upload.bytes:  # parts sent at once, each within what was left alone
            raise too_large
    except FileNotFoundError:
        raise ApiError(400, f"upload {upload_id} is no longer pending", param="upload_id") from None
    except BaseException:
        Path(f"{path}.tmp").unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        raise
    return {"id": part_id, "object": "upload.part", "created_at": now(), "upload_id": upload_id}


@router.post("/uploads/{upload_id}/complete")
def complete_upload(state: State, project: Project, upload_id: str, body: wire.UploadComplete) -> dict:
    upload = _pending(state, upload_id, project)
    directory = Path(upload.directory)
    if len(set(body.part_ids)) != len(body.part_ids):
        raise ApiError(400, "part_ids names a part twice", param="part_ids")
    parts = [directory / part_id for part_id in body.part_ids]
    for part_id, part in zip(body.part_ids, parts, strict=True):
        if not PART_ID.fullmatch(part_id) or not part.is_file():
            raise ApiError(400, f"part_ids: upload {upload_id} has no part '{part_id}'", param="part_ids")
    total = sum(part.stat().st_size for part in parts)
    if total != upload.bytes:
        raise ApiError(400, f"the parts named hold {total} bytes; the upload was created for {upload.bytes}", param="part_ids")  # fmt: skip
    path = new_file_path(state, upload.filename)
    try:
        digest = _join(parts, Path(f"{path}.tmp"))
        if body.md5 is not None and body.md5.lower() != digest:
            raise ApiError(400, f"md5: the parts joined give {digest}", param="md5")
        Path(f"{path}.tmp").replace(path)

        def mark_completed(s) -> None:  # in the File's own transaction: one complete wins
            locked = Store.for_update(s, Upload, upload_id)
            if locked.status != "pending":
                raise ApiError(400, f"upload {upload_id} is {locked.status}", param="upload_id")
            locked.status, locked.file_id = "completed", path.stem

        file = add_file(
            state, project, path, upload.filename, upload.purpose, upload.file_lifetime, also=mark_completed
        )
    except BaseException:
        Path(f"{path}.tmp").unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        raise
    shutil.rmtree(directory, ignore_errors=True)
    upload.status, upload.file_id = "completed", file.id
    return wire.upload_object(upload, file)


@router.post("/uploads/{upload_id}/cancel")
def cancel_upload(state: State, project: Project, upload_id: str) -> dict:
    with state.store.session() as s:
        upload = Store.for_update(s, Upload, upload_id)
        if upload is None or upload.project != project:
            raise not_found("upload", upload_id)
        if upload.status != "pending":
            raise ApiError(400, f"upload {upload_id} is {upload.status}", param="upload_id")
        upload.status = "cancelled"
    shutil.rmtree(upload.directory, ignore_errors=True)
    return wire.upload_object(upload)


def _pending(state, upload_id: str, project: str) -> Upload:
    with state.store.session() as s:
        upload = s.get(Upload, upload_id)
    if upload is None or upload.project != project:
        raise not_found("upload", upload_id)
    status = "expired" if upload.status == "pending" and upload.expires_at <= now() else upload.status
    if status != "pending":
        raise ApiError(400, f"upload {upload_id} is {status}", param="upload_id")
    return upload


def _sent(directory: Path) -> int:
    """Bytes of the parts stored so far (a part being written is a .tmp, not counted)."""
    return sum(p.stat().st_size for p in directory.iterdir() if PART_ID.fullmatch(p.name))


def _join(parts: list[Path], out_path: Path) -> str:
    """Write `parts` one after another into `out_path`; the MD5 of what was written."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(out_path, "wb") as out:
        for part in parts:
            with open(part, "rb") as source:
                while block := source.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    return digest.hexdigest()

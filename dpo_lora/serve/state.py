"""What every route reads: the server's state (a FastAPI dependency), and the lookups they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from dpo_lora.serve.store import File, Job, Store, now
from dpo_lora.serve.wire import ApiError, not_found


@dataclass
class ServerState:
    store: Store
    state_dir: Path
    models: dict[str, str]  # base model id -> folder
    devices: int  # devices (GPUs, or CPU slots) a job may ask for at most
    device_memory: int | None = None  # bytes of one device that a job's plan must fit; None: not checked
    device_type: str = "cpu"  # what the jobs' ranks run on: cpu or cuda (the quote's matmul rate)
    matmul_rates: dict = field(default_factory=dict)  # dtype -> one device's measured FLOP/s
    base_config: str | None = None
    api_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    max_upload: int = 1 << 30
    max_streams: int = 64  # open event streams per API key
    backend: object | None = None  # stops a cancelled job's process at once (the scheduler's backend)
    runner: str | None = None  # this server's name in the rows it claims
    inference: object | None = None  # the engines behind /v1/chat/completions (inference.Inference)
    started_at: int = field(default_factory=now)
    streams: dict[str, int] = field(default_factory=dict)  # API key -> open event streams


def server_state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(server_state)]  # a route's `state: State` parameter


def page_limit(limit: int, most: int = 100) -> int:
    if not 1 <= limit <= most:
        raise ApiError(400, f"limit must be between 1 and {most}", param="limit")
    return limit


def or_404(row, kind: str, object_id: str):
    """`row`, or a 404 naming what was looked for."""
    if row is None:
        raise not_found(kind, object_id)
    return row


def job_or_404(s, job_id: str, for_update: bool = False) -> Job:
    """The job; `for_update` locks its row for a read-modify-write (cancel, pause, resume, delete)."""
    job = Store.for_update(s, Job, job_id) if for_update else s.get(Job, job_id)
    if job is None:
        raise not_found("fine-tuning job", job_id)
    return job


def file_or_404(state: ServerState, file_id: str) -> File:
    with state.store.session() as s:
        file = s.get(File, file_id)
    if file is None:
        raise not_found("file", file_id)
    return file

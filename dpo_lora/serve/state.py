"""What every route reads: the server's state and the caller's project (FastAPI dependencies), and
the lookups they share. Every job and file belongs to the project of the key that made it; a
lookup of another project's object is a 404, as if it did not exist."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from dpo_lora.serve.projects import DEFAULT_PROJECT, Projects
from dpo_lora.serve.store import File, Job, Store, now
from dpo_lora.serve.wire import ApiError, not_found


@dataclass
class ServerState:
    store: Store
    state_dir: Path
    models: dict[str, str]  # base model id -> folder
    devices: int  # devices (GPUs, or CPU slots) a job may ask for at most
    project_devices: int = 0  # devices one project's running jobs may hold at once (0: no cap)
    project_jobs: int = 0  # jobs one project may have not yet final (0: no cap)
    project_storage: int = 0  # bytes of files one project may hold (0: no cap)
    device_memory: int | None = None  # bytes of one device that a job's plan must fit; None: not checked
    device_type: str = "cpu"  # what the jobs' ranks run on: cpu or cuda (the quote's matmul rate)
    matmul_rates: dict = field(default_factory=dict)  # dtype -> one device's measured FLOP/s
    base_config: str | None = None
    api_key: str | None = None  # DPO_LORA_API_KEY: the key of the project named DEFAULT_PROJECT
    projects: Projects = field(default_factory=Projects)  # --api-keys: keys and weights (SIGHUP replaces it)
    host: str = "127.0.0.1"
    port: int = 0
    max_upload: int = 1 << 30
    max_streams: int = 64  # open event streams per API key
    rate_per_minute: int = 0  # /v1 requests per API key a minute (0: no limit)
    backend: object | None = None  # stops a cancelled job's process at once (the scheduler's backend)
    runner: str | None = None  # this server's name in the rows it claims
    inference: object | None = None  # the engines behind /v1/chat/completions (inference.Inference)
    started_at: int = field(default_factory=now)
    streams: dict[str, int] = field(default_factory=dict)  # API key -> open event streams

    def keys(self) -> dict[str, str]:
        """Every API key -> its project, now (SIGHUP replaces `projects`); empty: no keys (a
        loopback-only server, one project)."""
        return ({self.api_key: DEFAULT_PROJECT} if self.api_key else {}) | self.projects.keys


def server_state(request: Request) -> ServerState:
    return request.app.state.server


def request_project(request: Request) -> str:
    """The project of the request's API key, which the Guard put in the request's scope."""
    return request.scope.get("state", {}).get("project", DEFAULT_PROJECT)


State = Annotated[ServerState, Depends(server_state)]  # a route's `state: State` parameter
Project = Annotated[str, Depends(request_project)]  # a route's `project: Project` parameter


def page_limit(limit: int, most: int = 100) -> int:
    if not 1 <= limit <= most:
        raise ApiError(400, f"limit must be between 1 and {most}", param="limit")
    return limit


def or_404(row, kind: str, object_id: str):
    """`row`, or a 404 naming what was looked for."""
    if row is None:
        raise not_found(kind, object_id)
    return row


def job_or_404(s, job_id: str, project: str, for_update: bool = False) -> Job:
    """The project's job; `for_update` locks its row for a read-modify-write (cancel, pause, resume, delete)."""
    job = Store.for_update(s, Job, job_id) if for_update else s.get(Job, job_id)
    if job is None or job.project != project:
        raise not_found("fine-tuning job", job_id)
    return job


def file_or_404(state: ServerState, file_id: str, project: str) -> File:
    with state.store.session() as s:
        file = s.get(File, file_id)
    if file is None or file.project != project:
        raise not_found("file", file_id)
    return file

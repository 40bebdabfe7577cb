"""The dashboard at GET /: one static page (dashboard.html: no CDN, no JavaScript library) over the
JSON API, plus the routes it reads: every job with its progress, a job's charts, drawn server-side
as SVG by the project's own matplotlib code (dpo_lora/train/plots.py), and a job's log, piece by
piece (the page shows it live).

The page itself holds no data, so it needs no token; everything it shows comes from /v1 routes
under the server's auth, with the token typed into the page (kept in the browser's localStorage).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import select

from dpo_lora.core import rundir
from dpo_lora.core.rundir import RowKind, row_kind
from dpo_lora.serve import processes, runfiles, wire
from dpo_lora.serve.state import Project, State, job_or_404, page_limit
from dpo_lora.serve.store import Job
from dpo_lora.train.plots import CHARTS, chart_svg

PAGE = Path(__file__).with_name("dashboard.html")
MAX_ROWS = 1000  # jobs one dashboard request may list


def progress(job: Job) -> dict | None:
    """{step, total_steps, pairs_per_s, eta_seconds, estimated_finish} of a job's run (runfiles.progress)."""
    return runfiles.progress(Path(job.directory) / "run", running=job.status == "running")


page = APIRouter()  # GET /, outside /v1
api = APIRouter()  # mounted under /v1


@page.get("/", include_in_schema=False)
def dashboard_page() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text())


@api.get("/dashboard/jobs")
def jobs_with_progress(state: State, project: Project, limit: int = 100) -> dict:
    with state.store.session() as s:
        jobs = list(
            s.scalars(
                select(Job)
                .where(Job.project == project)
                .order_by(Job.created_at.desc(), Job.id.desc())
                .limit(page_limit(limit, MAX_ROWS))
            )
        )
    return {"object": "list", "data": [{**wire.job_object(job), "progress": progress(job)} for job in jobs]}


@api.get("/fine_tuning/jobs/{job_id}/charts/{name}.svg")
def job_chart(state: State, project: Project, job_id: str, name: str) -> Response:
    if f"{name}.png" not in CHARTS:
        raise wire.ApiError(
            404, f"No chart named {name}; charts: {', '.join(c[:-4] for c in CHARTS)}", param="name", code="not_found"
        )
    with state.store.session() as s:
        directory = Path(job_or_404(s, job_id, project).directory)
    rows, _, _ = runfiles.new_rows(directory / "run" / rundir.METRICS, 0)
    latest = {}  # a resumed run may have logged a step twice: its newest row counts
    for row in rows:
        if (kind := row_kind(row)) in (RowKind.TRAIN, RowKind.EVAL):
            latest[(row["step"], kind)] = row
    return Response(
        chart_svg(list(latest.values()), name), media_type="image/svg+xml", headers={"Cache-Control": "no-store"}
    )


@api.get("/fine_tuning/jobs/{job_id}/log")
def job_log(state: State, project: Project, job_id: str, after: int | None = None) -> dict:
    """The job's log (its trainer's output, every attempt) from byte `after`, 64 KiB at most a call;
    without `after`, its last 64 KiB. Ask again from `offset` for what follows."""
    if after is not None and after < 0:
        raise wire.ApiError(400, "after: must be >= 0", param="after")
    with state.store.session() as s:
        directory = Path(job_or_404(s, job_id, project).directory)
    return {"object": "fine_tuning.job.log", **runfiles.log_piece(directory / processes.LOG_FILE, after)}

"""The HTTP app: OpenAI's files, fine_tuning.jobs and chat/completions under /v1 plus dpo-lora's
extensions, each a module-level router (files_api, uploads_api, jobs_api, completions_api, extensions_api,
dashboard), behind the Guard.

Routes only read the store and record requests (committed before the response); the scheduler
acts on them. Errors have OpenAI's shape; an error answering a POST, and every 500, says
`x-should-retry: false`, so the client never repeats work that a retry would duplicate.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from dpo_lora.serve import admission, completions_api, dashboard, extensions_api, files_api, jobs_api, uploads_api
from dpo_lora.serve.guard import Guard, Limits
from dpo_lora.serve.state import ServerState
from dpo_lora.serve.store import now
from dpo_lora.serve.wire import ApiError


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="dpo-lora", docs_url=None, redoc_url=None)
    app.state.server = state
    app.add_middleware(
        Guard,
        limits=Limits(state.keys, state.host, state.port, state.max_upload, rate_per_minute=state.rate_per_minute),
    )
    for router in (files_api.router, uploads_api.router, jobs_api.router, admission.router, extensions_api.router, completions_api.router, dashboard.api):  # fmt: skip
        app.include_router(router, prefix="/v1")
    app.include_router(dashboard.page)

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

"""The gate every request passes before any route reads its body (a plain ASGI middleware).

- With API keys: a /v1 request without `Authorization: Bearer <key>` gets its 401 before a byte
  of its body is read. Bearer tokens only, never cookies: a browser page can't borrow them (CSRF).
  The key's project goes into the request's scope (`state.project`), for the routes to scope by.
- Without a key (a loopback-only server): a request whose `Host` is not a loopback name or the bound
  address (DNS rebinding), or that a browser sends from another site (`Origin`, `Sec-Fetch-Site`),
  gets a 403.
- Bodies are capped: uploads (multipart) at `max_upload`, every other body at `max_json`; past the
  cap a 413, whether or not the client declared its length.
- With `rate_per_minute`, each API key may send that many /v1 requests a minute (a token bucket as
  deep as one minute's): past it a 429 with `retry-after`, which the `openai` client waits out.
"""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from dpo_lora.serve.wire import ApiError

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
PUBLIC_PATHS = ("/", "/healthz")  # the dashboard's page (holds no data) and the health check


class BodyTooLarge(HTTPException):
    """Raised from `receive` past the cap; an HTTPException, so FastAPI's body parsing passes it on."""

    def __init__(self, cap: int) -> None:
        super().__init__(413, f"request body is larger than this server's limit of {cap} bytes")


@dataclass(frozen=True)
class Limits:
    api_keys: Callable[[], dict[str, str]]  # now: key -> project (SIGHUP reloads); empty: no keys (loopback only)
    bound_host: str
    port: int
    max_upload: int
    max_json: int = 1 << 20
    rate_per_minute: int = 0  # /v1 requests per API key a minute (0: no limit)


def _host_name(host_header: str) -> str:
    """`Host` without its port: "127.0.0.1:8000" -> "127.0.0.1", "[::1]:8000" -> "::1"."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


class Guard:
    def __init__(self, app, limits: Limits) -> None:
        self.app, self.limits = app, limits
        hosts = {*LOOPBACK_HOSTS, limits.bound_host}
        self.hosts = hosts
        self.origins = {f"http://{h}:{limits.port}" for h in hosts} | {f"http://[{h}]:{limits.port}" for h in hosts}
        self.buckets: dict[str, tuple[float, float]] = {}  # API key -> (requests left, when counted)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refused = self._refusal(scope, headers)
        if refused is not None:
            return await _reply(refused, scope, receive, send)
        if wait := self._rate_wait(scope, headers):
            message = f"more than {self.limits.rate_per_minute} requests a minute with this API key; retry in {wait} s"
            limited = ApiError(429, message, code="rate_limit_exceeded", kind="rate_limit_error")
            return await _reply(limited, scope, receive, send, {"retry-after": str(wait), "x-should-retry": "true"})
        multipart = headers.get("content-type", "").startswith("multipart/")
        cap = self.limits.max_upload if multipart else self.limits.max_json
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            return await _reply(_too_large(cap), scope, receive, send)
        received, started = 0, False

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > cap:
                raise BodyTooLarge(cap)
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await _reply(_too_large(cap), scope, receive, send)

    def _rate_wait(self, scope, headers: dict) -> int:
        """0 when the key's bucket holds a request (taken now), else the whole seconds until it does."""
        rate = self.limits.rate_per_minute
        if not rate or "project" not in scope.get("state", {}):  # no limit, or no key (loopback, public pages)
            return 0
        key = headers.get("authorization", "")
        now = time.monotonic()
        left, counted = self.buckets.get(key, (float(rate), now))
        left = min(float(rate), left + (now - counted) * rate / 60.0)
        if left < 1.0:
            self.buckets[key] = (left, now)
            return math.ceil((1.0 - left) * 60.0 / rate)
        self.buckets[key] = (left - 1.0, now)
        return 0

    def _refusal(self, scope, headers: dict) -> ApiError | None:
        keys = self.limits.api_keys()
        if not keys:
            if _host_name(headers.get("host", "")) not in self.hosts:
                return ApiError(403, "Host is not this server's loopback address (no-key mode)", code="forbidden_host")
            origin = headers.get("origin")
            cross_site = headers.get("sec-fetch-site") in ("cross-site", "same-site")
            if (origin is not None and origin not in self.origins) or cross_site:
                return ApiError(403, "cross-site requests are refused (no-key mode)", code="forbidden_origin")
            return None
        if scope["path"] in PUBLIC_PATHS or not scope["path"].startswith("/v1"):
            return None
        given = headers.get("authorization", "").removeprefix("Bearer ").strip().encode()
        # Every key compared, whichever matches: the time taken tells nothing of which.
        matches = [project for key, project in keys.items() if hmac.compare_digest(given, key.encode())]
        if not matches:
            return ApiError(401, "Incorrect API key provided", code="invalid_api_key", kind="authentication_error")
        scope.setdefault("state", {})["project"] = matches[0]
        return None


def _too_large(cap: int) -> ApiError:
    return ApiError(413, f"request body is larger than this server's limit of {cap} bytes", code="body_too_large")


async def _reply(err: ApiError, scope, receive, send, headers: dict | None = None) -> None:
    response = JSONResponse(err.body(), status_code=err.status, headers=headers or {"x-should-retry": "false"})
    await response(scope, receive, send)

"""Helpers for FastAPI ingresses under ``@serve.ingress``.

``install_ingress(app, ...)`` gives every pattern the same edge behaviour:
- a request id: the one Serve's proxy assigned (``x-request-id``), or a new one outside Serve,
  echoed in the ``X-Request-ID`` response header and in every error body;
- a request body limit: 413 before the handler reads an oversized body;
- JSON errors for every 4xx/5xx: ``{"error": {"status", "message", "request_id"}}`` with a
  sentence a person can act on and never a traceback;
- ``GET /healthz``: liveness plus what the pattern's ``health`` callable reports. Report
  dependencies as fields: a database outage is no reason for Serve to restart the replica.

``api_key_auth(keys)`` is a FastAPI dependency: 401 without a key, 403 with a wrong one,
compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import json
import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Annotated, Any

from fastapi import FastAPI, Header, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import Forbidden, HTTPError, Unauthorized
from core.resilience import replica_lost

logger = logging.getLogger("core.ingress")

REQUEST_ID_HEADER = "x-request-id"
# A client that sends this header on a POST promises the same key means the same request; the
# app answers a repeat with the first answer and writes nothing twice, so the edge may retry it.
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
# The header as a route parameter: ``key: IdempotencyKey = None``; a malformed key is a 422.
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias=IDEMPOTENCY_KEY_HEADER,
        min_length=1,
        max_length=128,
        pattern=r"^[\x21-\x7e]+$",
        description="Any printable ASCII id (UUID recommended); a repeat gets the first answer.",
    ),
]
# Mark a route whose repeat is harmless (a pure read or inference):
#     @api.post("/predict", openapi_extra=IDEMPOTENT)
# The cluster's edge (cluster/haproxy_edge.py) replays such a request when the replica serving
# it is lost; the flag shows in the OpenAPI document as ``x-idempotent: true``.
IDEMPOTENT: dict[str, Any] = {"x-idempotent": True}
_STATUS_SENTENCES = {
    404: "No such route; see the OpenAPI docs at /docs under this app's prefix.",
    405: "This route does not accept that HTTP method.",
}


def _in_serve_replica() -> bool:
    try:
        from ray.serve.context import _get_internal_replica_context

        return _get_internal_replica_context() is not None
    except Exception:
        return False


def request_id_of(scope_or_request: Scope | Request) -> str:
    scope = scope_or_request.scope if isinstance(scope_or_request, Request) else scope_or_request
    return str(scope.get("state", {}).get("request_id", "")) or "-"


def error_body(status: int, message: str, request_id: str) -> dict[str, Any]:
    return {"error": {"status": status, "message": message, "request_id": request_id}}


def _json_error(
    status: int, message: str, request_id: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        error_body(status, message, request_id), status_code=status, headers=headers
    )


class _EdgeMiddleware:
    """Request id, body limit and last-resort 500, as one pure ASGI middleware."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        # Outside Serve nobody else echoes the id; inside a replica Serve's proxy already
        # does. Decided on first request: the app object is often built at import time.
        self.echo_request_id: bool | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.echo_request_id is None:
            self.echo_request_id = not _in_serve_replica()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = False
        overflow = False  # body went over the limit while the app was reading it
        declared = headers.get("content-length")
        # Whether the client has sent its whole body (None: no body is coming).
        body_done = declared in (None, "0") and "transfer-encoding" not in headers

        async def send_raw(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not body_done and not overflow:
                    # An answer before the body is read (a 4xx on the declared size, a route
                    # that ignores its body): read the rest first, as Kestrel does, so the
                    # connection stays reusable. A proxy in front (HAProxy) otherwise closes it
                    # under a client about to send its next request.
                    await drain()
                if overflow or not body_done:
                    message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
                if self.echo_request_id:
                    message["headers"] = [
                        *message.get("headers", []),
                        (b"x-request-id", request_id.encode("latin-1")),
                    ]
            await send(message)

        async def send_app(message: Message) -> None:
            # FastAPI turns a failed body read into its own 400; after an overflow we drop
            # whatever the app says and answer 413 ourselves.
            if not overflow:
                await send_raw(message)

        async def reply(status: int, message: str) -> None:
            await _json_error(status, message, request_id)(scope, receive, send_raw)

        received = 0

        async def receive_limited() -> Message:
            nonlocal received, overflow, body_done
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_body_bytes:
                    overflow = True
                    raise _BodyTooLarge
            elif message["type"] == "http.disconnect":
                body_done = True
            return message

        async def drain() -> None:
            try:
                while not body_done and not overflow:
                    await receive_limited()
            except _BodyTooLarge:
                pass

        if declared is not None:
            if not declared.isdigit():
                await reply(400, "Content-Length must be a whole number of bytes.")
                return
            if int(declared) > self.max_body_bytes:
                overflow = True  # not read: the answer closes the connection
                await reply(413, self._too_large(int(declared)))
                return

        try:
            await self.app(scope, receive_limited, send_app)
        except _BodyTooLarge:
            pass
        except Exception as exc:
            if started:
                logger.exception("error after the answer started (request id %s)", request_id)
                return
            if replica_lost(exc):
                # A deployment this request called died with the call. Not retried here: the
                # flow repeats a lost call where repeating it is harmless
                # (core.resilience.call_surviving_replica), and the client decides the rest.
                logger.warning("request %s: a replica it called was lost (%s)", request_id, exc)
                await _json_error(503, REPLICA_LOST_MESSAGE, request_id, {"Retry-After": "1"})(
                    scope, receive, send_raw
                )
                return
            logger.exception("unhandled error (request id %s)", request_id)
            await reply(500, f"Internal error; quote request id {request_id} when reporting.")
            return
        if overflow and not started:
            await reply(413, self._too_large(received))

    def _too_large(self, size: int) -> str:
        return (
            f"Request body is {size} bytes; this endpoint accepts at most "
            f"{self.max_body_bytes} bytes."
        )


class _BodyTooLarge(Exception):
    pass


REPLICA_LOST_MESSAGE = (
    "A replica this request needed was lost before it answered; it is being replaced. "
    "Retry shortly (send an Idempotency-Key header with requests that write)."
)


def _validation_sentence(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:10]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        msg = str(err.get("msg", "invalid value"))
        if err.get("type") == "json_invalid":
            return "The request body is not valid JSON."
        if err.get("type") == "missing" and loc == "body":
            return "The request body is empty; send a JSON object."
        parts.append(f"{loc}: {msg}")
    return "Invalid request: " + "; ".join(parts) + "."


def install_ingress(
    app: FastAPI,
    *,
    app_name: str,
    max_body_bytes: int = 1_000_000,
    health: Callable[[], Awaitable[dict[str, Any]] | dict[str, Any]] | None = None,
) -> FastAPI:
    """Add request ids, a body limit, JSON errors and ``GET /healthz`` to ``app``."""

    @app.exception_handler(StarletteHTTPException)
    async def _http_exc(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code in _STATUS_SENTENCES and detail in ("Not Found", "Method Not Allowed"):
            detail = _STATUS_SENTENCES[exc.status_code]
        return _json_error(exc.status_code, detail, request_id_of(request), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_exc(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _json_error(422, _validation_sentence(exc), request_id_of(request))

    @app.exception_handler(HTTPError)
    async def _cookbook_exc(request: Request, exc: HTTPError) -> JSONResponse:
        headers = None
        retry_after = getattr(exc, "retry_after_s", None)
        if retry_after is not None:  # 429 and 503: tell the client when to come back
            headers = {"Retry-After": str(max(1, math.ceil(retry_after)))}
        if exc.status_code == 401:
            headers = {"WWW-Authenticate": "APIKey"}
        return _json_error(exc.status_code, exc.message, request_id_of(request), headers)

    @app.get("/healthz", tags=["ops"], summary="Liveness and model/dependency info")
    async def healthz() -> dict[str, Any]:
        body: dict[str, Any] = {"status": "ok", "app": app_name}
        if health is not None:
            extra = health()
            if inspect.isawaitable(extra):
                extra = await extra
            body.update(extra)
        return body

    app.add_middleware(_EdgeMiddleware, max_body_bytes=max_body_bytes)
    return app


def key_id(key: str) -> str:
    """A loggable name for an API key (never log the key itself)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def api_key_auth(
    keys: Callable[[], Iterable[str]] | Iterable[str],
    header: str = "X-API-Key",
    required: Callable[[], bool] | None = None,
    description: str = "API key",
) -> Callable[..., Awaitable[str]]:
    """A FastAPI dependency: 401 without a key, 403 with a wrong one. Returns the key's id, or
    ``"open"`` when ``required()`` says this environment needs no key
    (``core.settings.keys_required``; pair it with ``core.openapi.document_replica``)."""
    scheme = APIKeyHeader(name=header, auto_error=False, description=description)

    async def check(presented: str | None = Security(scheme)) -> str:
        if required is not None and not required():
            return "open"
        if not presented:
            raise Unauthorized(f"Missing API key: send it in the {header} header.")
        valid = list(keys() if callable(keys) else keys)
        # Compare against every key, always, so timing does not reveal which one was close.
        ok = False
        for candidate in valid:
            ok |= hmac.compare_digest(presented.encode(), candidate.encode())
        if not ok:
            raise Forbidden("The API key is not valid for this service.")
        return key_id(presented)

    return check

"""The edge of the cluster: a lost replica becomes a retry or a 503, never Ray's bare 500.

Ray Serve's HTTP proxy answers a plain-text 500 when the replica serving a request dies before
it answered (``RayActorError`` in ``ray/serve/_private/proxy.py``), and Serve promises no
survival for requests in flight. ``ReplicaLossRetry`` is an ASGI middleware that Serve runs
*inside its proxy*, in front of the routing, when the cluster is started with

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=core.edge:proxy_middlewares

(every cluster started through ``core.ingress_mode.apply_ingress_mode`` gets it: ``make
serve``, the test clusters, the benchmarks; the RayService sets it on the head and workers).
For each HTTP request it keeps the body, passes the request on, and watches what comes back:

- an answer (any status, including the app's own errors and Serve's 503 backpressure): passed
  through untouched, streamed as it comes;
- no answer at all (the ingress replica was lost, or the proxy failed before answering):
  - if repeating the request is harmless, it is sent again (up to ``attempts`` times, with
    a short backoff, within ``retry_window_s``); Serve's router sends it to a live replica,
    or holds it until the controller has started the replacement. Harmless means: a
    ``GET``/``HEAD``/``OPTIONS``; a request with an ``Idempotency-Key`` header (the app
    answers a repeat with the first answer); or a route the app marks
    ``openapi_extra=core.ingress.IDEMPOTENT`` (pure inference), listed for the
    proxy in ``COOKBOOK_IDEMPOTENT_ROUTES`` (``idempotent_routes`` computes it from the apps);
  - otherwise, or when the attempts are spent: a JSON 503 with ``Retry-After``, so the client
    knows it may come back and nothing was half-answered;
- a client that went away: nothing is retried and nothing is sent.

One answer of the proxy's own counts as "no answer": its plain-text 404 "Path ... not found"
for a path under a prefix that this cluster serves (``COOKBOOK_APP_PREFIXES``). The proxy
drops an app's route for a moment while the app's only ingress replica is being replaced, so
that 404 means "not here yet", not "no such thing".

What it cannot save: a response that had started streaming when its replica died (a chat
stream cut mid-way), and anything in HAProxy ingress mode, where HAProxy talks to the
replicas without this proxy (its own ``retry-on`` applies there).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("core.edge")

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "core.edge:proxy_middlewares"
ROUTES_ENV = "COOKBOOK_IDEMPOTENT_ROUTES"
PREFIXES_ENV = "COOKBOOK_APP_PREFIXES"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOST_MESSAGE = (
    "The replica serving this request was lost before it answered; it is being replaced. "
    "Retry shortly (send an Idempotency-Key header with requests that write)."
)


def _route_pattern(route: str) -> re.Pattern[str]:
    """``/multiplex/forecast/{store_id}`` -> a regex where ``{...}`` is one path segment."""
    parts = re.split(r"(\{[^/{}]+\})", route.rstrip("/") or "/")
    body = "".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(f"^{body}/?$")


class ReplicaLossRetry:
    """Retry harmless requests whose replica was lost; answer the rest with 503 + Retry-After."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Iterable[str] = (),
        prefixes: Iterable[str] = (),
        attempts: int = 3,
        backoff_s: tuple[float, ...] = (0.2, 0.5, 1.0),
        retry_window_s: float = 10.0,
        max_replay_bytes: int = 64 * 1024 * 1024,
        retry_after_s: int = 1,
    ) -> None:
        self.app = app
        self.patterns = [_route_pattern(r) for r in routes if r.strip()]
        self.prefixes = [p.rstrip("/") for p in prefixes if p.strip() and p.strip() != "/"]
        self.attempts = max(1, attempts)
        self.backoff_s = backoff_s or (0.0,)
        self.retry_window_s = retry_window_s
        self.max_replay_bytes = max_replay_bytes
        self.retry_after_s = retry_after_s

    def retryable(self, scope: Scope) -> bool:
        if scope.get("method", "GET").upper() in SAFE_METHODS:
            return True
        if any(k.lower() == b"idempotency-key" for k, _ in scope.get("headers", [])):
            return True
        path = scope.get("path", "")
        return any(p.match(path) for p in self.patterns)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = self._request_id(scope)
        # Read the body first (the proxy would read it anyway) so it can be sent again.
        chunks: list[bytes] = []
        size, complete, disconnected = 0, False, False
        while not complete and size <= self.max_replay_bytes:
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected = True
                break
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            complete = not message.get("more_body", False)
        if disconnected:
            return
        retryable = complete and self.retryable(scope)
        path = scope.get("path", "")
        served = any(path == p or path.startswith(p + "/") for p in self.prefixes)
        deadline = time.monotonic() + self.retry_window_s
        tries = lost = 0
        while True:
            tries += 1
            state = _Attempt(chunks, complete, receive, send, hold_route_miss=served and complete)
            try:
                # A fresh scope each time: the proxy rewrites the one it is given (path,
                # root_path), and a retry on a rewritten scope matches no route.
                await self.app(_fresh(scope), state.receive, state.send)
            except Exception:
                logger.exception("proxy failed on request %s", request_id)
            if state.client_gone:
                return
            delay = self.backoff_s[min(tries - 1, len(self.backoff_s) - 1)]
            in_time = time.monotonic() + delay < deadline
            if state.route_missing:
                # It never reached a replica: any request may go again, writes included.
                await state.release_if_last(not in_time)
                if not in_time:
                    return
            elif state.started:
                return
            else:
                lost += 1
                if not retryable or lost >= self.attempts or not in_time:
                    break
            logger.warning(
                "request %s (%s %s): %s; retry in %.1fs",
                request_id,
                scope.get("method"),
                path,
                "its app's route is not in the proxy yet"
                if state.route_missing
                else "replica lost",
                delay,
            )
            await asyncio.sleep(delay)
        await self._unavailable(send, request_id)

    @staticmethod
    def _request_id(scope: Scope) -> str:
        """The client's ``x-request-id`` or a new one, put in the headers so that every attempt
        (and Serve's own request-id middleware) uses the same id."""
        for key, value in scope.get("headers", []):
            if key.lower() == b"x-request-id":
                return value.decode("latin-1")
        request_id = str(uuid.uuid4())
        scope["headers"] = [*scope.get("headers", []), (b"x-request-id", request_id.encode())]
        return request_id

    async def _unavailable(self, send: Send, request_id: str) -> None:
        body = json.dumps(
            {"error": {"status": 503, "message": LOST_MESSAGE, "request_id": request_id}}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(self.retry_after_s).encode()),
                    (b"x-request-id", request_id.encode("latin-1")),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _Attempt:
    """One pass of a request through the proxy: the kept body first, then the live receive
    (which reports the client going away); every message sent is passed on at once."""

    def __init__(
        self,
        chunks: list[bytes],
        complete: bool,
        receive: Receive,
        send: Send,
        *,
        hold_route_miss: bool = False,
    ) -> None:
        self._pending = list(chunks)
        self._complete = complete
        self._receive = receive
        self._send = send
        self._hold_route_miss = hold_route_miss
        self._held: list[Message] = []
        self.started = False
        self.route_missing = False
        self.client_gone = False

    async def receive(self) -> Message:
        if self._pending:
            body = self._pending.pop(0)
            more = bool(self._pending) or not self._complete
            return {"type": "http.request", "body": body, "more_body": more}
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self.client_gone = True
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            if self._hold_route_miss and message.get("status") == 404 and _plain_text(message):
                self._held.append(message)  # the proxy's own 404? decided on the body
                return
        elif self._held:
            self._held.append(message)
            if not self.route_missing and message.get("body", b"").startswith(b"Path '"):
                self.route_missing = True  # "Path '/x' not found. Ping .../-/routes ..."
            if not self.route_missing:
                held, self._held = self._held, []
                for m in held:
                    await self._send(m)
            return
        await self._send(message)

    async def release_if_last(self, last: bool) -> None:
        """The held 404 goes out only when no attempt is left (the app is really gone)."""
        if last:
            for m in self._held:
                await self._send(m)
        self._held = []


def _fresh(scope: Scope) -> Scope:
    """A copy of ``scope`` for one attempt; what an app may change in place is copied too."""
    fresh = dict(scope)
    fresh["headers"] = list(scope.get("headers", []))
    if "state" in scope:
        fresh["state"] = dict(scope["state"])
    return fresh


def _plain_text(start: Message) -> bool:
    for key, value in start.get("headers", []):
        if key.lower() == b"content-type":
            return value.startswith(b"text/plain")
    return True


def proxy_middlewares() -> list[Any]:
    """What Serve's proxy calls (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    from starlette.middleware import Middleware

    routes = [r for r in os.environ.get(ROUTES_ENV, "").split(",") if r.strip()]
    prefixes = [p for p in os.environ.get(PREFIXES_ENV, "").split(",") if p.strip()]
    return [Middleware(ReplicaLossRetry, routes=routes, prefixes=prefixes)]


def idempotent_routes(applications: Iterable[dict[str, Any]]) -> list[str]:
    """Full paths of the routes marked ``IDEMPOTENT`` in the apps of a serve config.

    Imports each app's module (``patterns.<name>.app``) and reads the OpenAPI of every FastAPI
    object in it: the flag is declared once, on the route, and read here for the proxy.
    """
    from fastapi import FastAPI

    found: list[str] = []
    for app in applications:
        module = importlib.import_module(app["import_path"].split(":")[0])
        prefix = (app.get("route_prefix") or "/").rstrip("/")
        for value in vars(module).values():
            if not isinstance(value, FastAPI):
                continue
            for path, ops in value.openapi().get("paths", {}).items():
                if any(isinstance(op, dict) and op.get("x-idempotent") for op in ops.values()):
                    found.append(prefix + path)
    return sorted(set(found))


def proxy_environment(applications: Iterable[dict[str, Any]]) -> dict[str, str]:
    """The environment a cluster needs for the edge: set it before ``ray.init``/``ray start``
    (Ray's processes, the proxy included, inherit it)."""
    applications = list(applications)
    return {
        PROXY_CALLBACK_ENV: PROXY_CALLBACK,
        ROUTES_ENV: ",".join(idempotent_routes(applications)),
        PREFIXES_ENV: ",".join(sorted({a.get("route_prefix") or "/" for a in applications})),
    }

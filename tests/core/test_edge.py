"""Replica loss at the edge: the proxy middleware (core.edge) and the ingress middleware
(core.ingress) retry what is harmless to repeat and answer the rest with 503 + Retry-After.

Replica loss is real Ray's exception type raised by the app under test; the Serve-level check
(a SIGKILLed replica under load) is tests/reliability/test_kill.py.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from ray.exceptions import ActorDiedError, RayTaskError

from core.edge import ReplicaLossRetry, idempotent_routes, proxy_environment, proxy_middlewares
from core.ingress import IDEMPOTENT, install_ingress, replica_lost


class FlakyProxy:
    """An ASGI app standing in for Serve's proxy: the first ``lose`` calls end without an
    answer (what the proxy does when the replica dies), then it echoes the request."""

    def __init__(self, lose: int) -> None:
        self.lose = lose
        self.calls: list[tuple[str, bytes, list[str]]] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        ids = [v.decode() for k, v in scope["headers"] if k == b"x-request-id"]
        self.calls.append((scope["path"], body, ids))
        scope["path"] = scope["path"].removeprefix("/ensemble")  # what Serve's proxy does
        if len(self.calls) <= self.lose:
            return  # replica lost: no answer at all
        payload = json.dumps({"body": body.decode(), "attempt": len(self.calls)}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": payload})


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge")


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def _edge(lose: int, **kw: Any) -> tuple[FlakyProxy, ReplicaLossRetry]:
    inner = FlakyProxy(lose)
    return inner, ReplicaLossRetry(inner, backoff_s=(0.0,), **kw)


def test_get_is_retried_until_a_replica_answers() -> None:
    inner, edge = _edge(lose=2)

    async def go() -> httpx.Response:
        async with _client(edge) as c:
            return await c.get("/ensemble/model")

    r = _run(go())
    assert r.status_code == 200 and r.json()["attempt"] == 3
    # every attempt saw the request as the client sent it, with the same request id
    assert [path for path, _, _ in inner.calls] == ["/ensemble/model"] * 3
    assert len({tuple(ids) for _, _, ids in inner.calls}) == 1


def test_idempotent_post_route_is_retried_with_the_same_body() -> None:
    inner, edge = _edge(lose=1, routes=["/multiplex/forecast/{store_id}", "/ensemble/predict"])

    async def go() -> httpx.Response:
        async with _client(edge) as c:
            return await c.post("/multiplex/forecast/s-0042", json={"horizon": 7})

    r = _run(go())
    assert r.status_code == 200
    assert json.loads(r.json()["body"]) == {"horizon": 7}
    assert [body for _, body, _ in inner.calls] == [b'{"horizon":7}'] * 2


def test_post_with_idempotency_key_is_retried() -> None:
    inner, edge = _edge(lose=1)

    async def go() -> httpx.Response:
        async with _client(edge) as c:
            return await c.post(
                "/online/feedback", json={"y": 1}, headers={"Idempotency-Key": "k1"}
            )

    assert _run(go()).status_code == 200 and len(inner.calls) == 2


def test_post_that_writes_is_not_retried_and_gets_503_with_retry_after() -> None:
    inner, edge = _edge(lose=1, routes=["/ensemble/predict"])

    async def go() -> httpx.Response:
        async with _client(edge) as c:
            return await c.post("/online/feedback", json={"y": 1}, headers={"X-Request-ID": "r-7"})

    r = _run(go())
    assert len(inner.calls) == 1
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.headers["x-request-id"] == "r-7"
    error = r.json()["error"]
    assert error["status"] == 503 and error["request_id"] == "r-7"
    assert "Retry shortly" in error["message"]


def test_attempts_spent_is_503_not_500() -> None:
    inner, edge = _edge(lose=10, attempts=3)

    async def go() -> httpx.Response:
        async with _client(edge) as c:
            return await c.get("/pipeline/model")

    r = _run(go())
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and len(inner.calls) == 3


def test_an_answer_of_any_status_passes_through_untouched() -> None:
    async def app(scope: dict, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 500, "headers": [(b"x-a", b"1")]})
        await send({"type": "http.response.body", "body": b"app said 500"})

    async def go() -> httpx.Response:
        async with _client(ReplicaLossRetry(app, backoff_s=(0.0,))) as c:
            return await c.get("/x")

    r = _run(go())
    assert (r.status_code, r.text, r.headers["x-a"]) == (500, "app said 500", "1")


def test_route_templates_match_one_segment() -> None:
    edge = ReplicaLossRetry(lambda *a: None, routes=["/m/forecast/{id}"])
    post = {"type": "http", "method": "POST", "headers": []}
    assert edge.retryable({**post, "path": "/m/forecast/s-1"})
    assert edge.retryable({**post, "path": "/m/forecast/s-1/"})
    assert not edge.retryable({**post, "path": "/m/forecast/s-1/extra"})
    assert not edge.retryable({**post, "path": "/m/forecast"})


def test_proxy_callback_reads_the_routes_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("COOKBOOK_IDEMPOTENT_ROUTES", "/a/read,/b/predict")
    (middleware,) = proxy_middlewares()
    assert middleware.cls is ReplicaLossRetry
    assert middleware.kwargs["routes"] == ["/a/read", "/b/predict"]


def test_idempotent_routes_are_read_from_the_apps_openapi() -> None:
    apps = [{"import_path": "tests.core.test_edge:app", "route_prefix": "/demo"}]
    assert idempotent_routes(apps) == ["/demo/items/{item_id}", "/demo/predict"]
    env = proxy_environment(apps)
    assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "core.edge:proxy_middlewares"
    assert env["COOKBOOK_IDEMPOTENT_ROUTES"] == "/demo/items/{item_id},/demo/predict"


def test_every_cluster_started_through_ingress_mode_gets_the_edge(monkeypatch) -> None:
    """``apply_ingress_mode`` (make serve, the tests, the benchmarks, the load study) installs
    the edge for the config's apps, leaves a callback someone set alone, and leaves the edge
    out with ``COOKBOOK_EDGE=off``."""
    from core.ingress_mode import apply_ingress_mode

    names = ("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "COOKBOOK_IDEMPOTENT_ROUTES",
             "COOKBOOK_APP_PREFIXES", "COOKBOOK_EDGE", "COOKBOOK_INGRESS_MODE")  # fmt: skip
    for name in names:
        monkeypatch.delenv(name, raising=False)
    apps = [{"import_path": "tests.core.test_edge:app", "route_prefix": "/demo"}]
    assert apply_ingress_mode(applications=apps) == "default"
    assert os.environ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "core.edge:proxy_middlewares"
    assert os.environ["COOKBOOK_IDEMPOTENT_ROUTES"] == "/demo/items/{item_id},/demo/predict"
    assert os.environ["COOKBOOK_APP_PREFIXES"] == "/demo"

    monkeypatch.setenv("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "mine:middlewares")
    apply_ingress_mode(applications=apps)
    assert os.environ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "mine:middlewares"

    for name in names:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COOKBOOK_EDGE", "off")
    apply_ingress_mode(applications=apps)
    assert not any(n in os.environ for n in names[:3])
    with pytest.raises(ValueError, match="COOKBOOK_INGRESS_MODE must be one of"):
        apply_ingress_mode("nginx")


def test_haproxy_mode_gives_each_cluster_its_own_files_and_ports(monkeypatch) -> None:
    """HAProxy mode picks files and stats/metrics ports for this process's cluster, keeps them
    when called again, picks new ones in a child process that inherited them (two clusters on
    one machine must not bind the same ports: the load study's target under the tests did),
    and never replaces a value a person set."""
    import json
    import subprocess
    import sys

    from core import ingress_mode

    names = ("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "RAY_SERVE_HAPROXY_SOCKET_PATH",
             "RAY_SERVE_HAPROXY_SERVER_STATE_BASE", "RAY_SERVE_HAPROXY_SERVER_STATE_FILE",
             "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
             ingress_mode._PICKED_ENV, "RAY_SERVE_ENABLE_HA_PROXY",
             "RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_HAPROXY_NBTHREAD")  # fmt: skip
    for name in names:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COOKBOOK_EDGE", "off")
    monkeypatch.setenv("RAY_SERVE_HAPROXY_METRICS_PORT", "19101")  # a person's choice
    assert ingress_mode.apply_ingress_mode("haproxy") == "haproxy"
    parent = {n: os.environ[n] for n in names[:6]}
    assert parent["RAY_SERVE_HAPROXY_METRICS_PORT"] == "19101"
    assert os.path.isdir(parent["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"])
    ingress_mode.apply_ingress_mode("haproxy")
    assert {n: os.environ[n] for n in names[:6]} == parent  # same process: same cluster

    code = ("import json, os; from core.ingress_mode import apply_ingress_mode; "
            f"apply_ingress_mode('haproxy'); print(json.dumps({{n: os.environ[n] for n in "
            f"{list(names[:6])!r}}}))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)  # fmt: skip
    child = json.loads(out.stdout)
    assert child["RAY_SERVE_HAPROXY_METRICS_PORT"] == "19101"  # set by a person: kept
    for name in names[:5]:
        assert child[name] != parent[name], name


# ------------------------------------------------------------------ inside the ingress replica
def _lost() -> ActorDiedError:
    return ActorDiedError()


calls: dict[str, int] = {}
app = FastAPI()
install_ingress(app, app_name="edge-test")


@app.post("/predict", openapi_extra=IDEMPOTENT)
async def predict(request: Request) -> dict[str, Any]:
    calls["predict"] = calls.get("predict", 0) + 1
    body = await request.json()
    if calls["predict"] == 1:
        raise _lost()
    return {"echo": body, "calls": calls["predict"]}


@app.post("/write")
async def write(request: Request) -> dict[str, Any]:
    calls["write"] = calls.get("write", 0) + 1
    await request.json()
    raise RayTaskError("f", "traceback", _lost())


@app.get("/items/{item_id}", openapi_extra=IDEMPOTENT)
async def item(item_id: str) -> dict[str, Any]:
    calls["item"] = calls.get("item", 0) + 1
    raise _lost()


@app.get("/boom")
async def boom() -> dict[str, Any]:
    raise ValueError("a bug")


@pytest.fixture
def client():
    calls.clear()
    from fastapi.testclient import TestClient

    return TestClient(app, raise_server_exceptions=False)


def test_ingress_retries_an_idempotent_route_with_the_body_it_read(client) -> None:
    r = client.post("/predict", json={"x": [1, 2]})
    assert r.status_code == 200 and r.json() == {"echo": {"x": [1, 2]}, "calls": 2}


def test_ingress_answers_503_with_retry_after_for_a_write(client) -> None:
    r = client.post("/write", json={"x": 1})
    assert calls["write"] == 1
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "Idempotency-Key" in r.json()["error"]["message"]


def test_ingress_retries_a_write_that_carries_an_idempotency_key(client) -> None:
    r = client.post("/write", json={"x": 1}, headers={"Idempotency-Key": "k"})
    assert calls["write"] == 3 and r.status_code == 503  # 1 + 2 retries, then 503


def test_ingress_gives_up_after_its_retries_with_503(client) -> None:
    r = client.get("/items/7")
    assert calls["item"] == 3 and r.status_code == 503


def test_a_bug_is_still_a_500_without_internals(client) -> None:
    r = client.get("/boom")
    assert r.status_code == 500 and "a bug" not in r.text


def test_replica_lost_classifies_ray_errors() -> None:
    assert replica_lost(ActorDiedError())
    assert replica_lost(RayTaskError("f", "tb", ActorDiedError()))
    assert not replica_lost(RayTaskError("f", "tb", ValueError("x")))
    assert not replica_lost(ValueError("x"))


class RouteMissingProxy:
    """The proxy while an app's only ingress replica is replaced: its own plain-text 404 for
    the first ``misses`` calls, then the app's answer."""

    def __init__(self, misses: int) -> None:
        self.misses = misses
        self.calls = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await receive()
        self.calls += 1
        if self.calls <= self.misses:
            text = f"Path '{scope['path']}' not found. Ping http://.../-/routes for routes."
            start = {"type": "http.response.start", "status": 404}
            await send({**start, "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
            await send({"type": "http.response.body", "body": text.encode()})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b'{"ok": true}'})


def _post(app: Any, path: str) -> httpx.Response:
    async def go() -> httpx.Response:
        async with _client(app) as c:
            return await c.post(path, json={"y": 1})

    return _run(go())


def test_the_proxy_404_for_a_served_prefix_is_retried_even_for_a_write() -> None:
    inner = RouteMissingProxy(misses=2)
    edge = ReplicaLossRetry(inner, prefixes=["/online"], backoff_s=(0.0,))
    r = _post(edge, "/online/feedback")
    assert (r.status_code, r.json(), inner.calls) == (200, {"ok": True}, 3)


def test_a_404_outside_the_served_prefixes_passes_through_at_once() -> None:
    inner = RouteMissingProxy(misses=5)
    edge = ReplicaLossRetry(inner, prefixes=["/online"], backoff_s=(0.0,))
    r = _post(edge, "/onlinex/feedback")
    assert r.status_code == 404 and r.text.startswith("Path '") and inner.calls == 1


def test_a_route_that_stays_missing_is_a_404_when_the_window_ends() -> None:
    inner = RouteMissingProxy(misses=1000)
    edge = ReplicaLossRetry(inner, prefixes=["/online"], backoff_s=(0.01,), retry_window_s=0.2)
    r = _post(edge, "/online/feedback")
    assert r.status_code == 404 and r.text.startswith("Path '") and inner.calls > 2


def test_call_surviving_replica_repeats_a_lost_call_and_nothing_else() -> None:
    from core.resilience import call_surviving_replica

    calls: list[int] = []

    async def lost_once() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise ActorDiedError()
        return "scored"

    assert _run(call_surviving_replica(lost_once, backoff_s=0)) == "scored" and len(calls) == 2

    async def bug() -> str:
        calls.append(1)
        raise ValueError("a bug is not retried")

    calls.clear()
    with pytest.raises(ValueError):
        _run(call_surviving_replica(bug, backoff_s=0))
    assert len(calls) == 1

    async def always_lost() -> str:
        calls.append(1)
        raise ActorDiedError()

    calls.clear()
    with pytest.raises(ActorDiedError):
        _run(call_surviving_replica(always_lost, attempts=3, backoff_s=0))
    assert len(calls) == 3

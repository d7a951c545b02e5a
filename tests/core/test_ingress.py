"""Ingress helpers, run for real under Serve: auth, 413, JSON errors, request ids, health."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.core.ingress_app import api, build

GOOD = {"X-API-Key": "k-beta-456"}


@pytest.fixture(scope="module")
def url(deploy) -> str:
    return deploy(build(), name="core-ingress-test", route_prefix="/core-test")


def _error(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"}, body
    assert body["error"]["status"] == resp.status_code
    assert "Traceback" not in resp.text and 'File "' not in resp.text
    return body["error"]


def test_happy_path_and_request_id_echo(url: str) -> None:
    r = httpx.post(f"{url}/echo", json={"text": "ab", "n": 2}, headers=GOOD)
    assert r.status_code == 200
    assert r.json()["text"] == "abab" and r.json()["key"].startswith("key-")
    assert len(r.headers.get_list("x-request-id")) == 1
    r2 = httpx.post(
        f"{url}/echo", json={"text": "a", "n": 1}, headers={**GOOD, "X-Request-ID": "abc-123"}
    )
    assert r2.headers["x-request-id"] == "abc-123"


def test_missing_key_is_401_wrong_key_is_403(url: str) -> None:
    r = httpx.post(f"{url}/echo", json={"text": "a", "n": 1})
    assert r.status_code == 401 and "X-API-Key" in _error(r)["message"]
    r = httpx.post(f"{url}/echo", json={"text": "a", "n": 1}, headers={"X-API-Key": "k-beta-457"})
    assert r.status_code == 403 and "not valid" in _error(r)["message"]


def test_oversized_body_is_413(url: str) -> None:
    r = httpx.post(f"{url}/echo", json={"text": "a" * 5000, "n": 1}, headers=GOOD)
    assert r.status_code == 413
    assert "at most 1024 bytes" in _error(r)["message"]


def test_oversized_chunked_body_is_413(url: str) -> None:
    def chunks():
        for _ in range(40):
            yield b"x" * 100

    r = httpx.post(
        f"{url}/echo", content=chunks(), headers={**GOOD, "content-type": "application/json"}
    )
    assert r.status_code == 413


def test_validation_errors_are_sentences(url: str) -> None:
    r = httpx.post(f"{url}/echo", json={"text": "", "n": 99}, headers=GOOD)
    assert r.status_code == 422
    msg = _error(r)["message"]
    assert msg.startswith("Invalid request:") and "text" in msg and "n:" in msg
    r = httpx.post(
        f"{url}/echo", content=b"{not json", headers={**GOOD, "content-type": "application/json"}
    )
    assert r.status_code == 422 and "not valid JSON" in _error(r)["message"]
    r = httpx.post(f"{url}/echo", headers=GOOD)
    assert r.status_code == 422 and "empty" in _error(r)["message"]


def test_dependency_down_is_503_with_retry_after(url: str) -> None:
    r = httpx.get(f"{url}/down")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "unreachable" in _error(r)["message"]


def test_backpressure_is_429_with_retry_after_and_conflict_is_409(url: str) -> None:
    r = httpx.get(f"{url}/busy")
    assert r.status_code == 429 and r.headers["retry-after"] == "3"  # 2.5 s, rounded up
    assert "slow down" in _error(r)["message"]
    r = httpx.get(f"{url}/conflict")
    assert r.status_code == 409 and "retry-after" not in r.headers
    assert "already recorded" in _error(r)["message"]


def test_unhandled_error_is_500_without_internals(url: str) -> None:
    r = httpx.get(f"{url}/crash")
    assert r.status_code == 500
    err = _error(r)
    assert "request id" in err["message"] and "/etc/passwd" not in r.text
    # and the app keeps serving
    assert httpx.get(f"{url}/healthz").status_code == 200


def test_unknown_route_is_json_404(url: str) -> None:
    r = httpx.get(f"{url}/nope")
    assert r.status_code == 404 and "OpenAPI" in _error(r)["message"]


def test_health_route(url: str) -> None:
    r = httpx.get(f"{url}/healthz")
    assert r.json() == {"status": "ok", "app": "core-test", "models": []}


def test_outside_serve_the_middleware_echoes_the_id() -> None:
    client = TestClient(api)
    r = client.get("/healthz", headers={"X-Request-ID": "plain-1"})
    assert r.headers.get_list("x-request-id") == ["plain-1"]
    r = client.get("/healthz")
    assert len(r.headers["x-request-id"]) == 32

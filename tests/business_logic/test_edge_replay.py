"""The edge replays a request whose replica died with it only when a repeat is harmless, shown
on a real write path: ``POST /business/score`` (it calls the risk API, then writes a decision).

The risk API answers after 4 s, so a /score stays in flight inside one BusinessIngress replica
that long; the test finds that replica (the one with a connection open to the risk API) and
SIGKILLs it. HAProxy (cluster/haproxy_edge.py) then:

- without an ``Idempotency-Key``: must not send the payment again. The client gets a 503 with
  Retry-After, the risk API saw the request once, and no decision was written;
- with an ``Idempotency-Key``: sends it to the other replica. The client gets its decision, the
  risk API saw it twice (the lost attempt and the replay), and one decision was written.

Runs in the ingress mode the suite runs in (HAProxy, the shipped default).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from patterns.business_logic.app import BusinessArgs, build_app
from tests.business_logic.test_app import GOOD, KEY
from tests.servers import RiskService

pytestmark = pytest.mark.slow

APP, PREFIX = "business-replay", "/business-replay"
RISK_DELAY_S = 4.0


@pytest.fixture(scope="module")
def slow_risk():
    service = RiskService()
    service.start(delay_ms=RISK_DELAY_S * 1000)
    yield service
    service.stop()


@pytest.fixture(scope="module")
def url(deploy, sqlite_urls, slow_risk) -> str:
    args = BusinessArgs(
        database_url=sqlite_urls["database"],
        feature_store_url=sqlite_urls["features"],
        risk_service_url=slow_risk.url,
        # wait out the slow risk API, once, and never open the breaker
        risk={"timeout_s": 8.0, "attempts": 1, "breaker_failures": 100},
    )
    return deploy(build_app(args), APP, PREFIX)


def ingress_replicas() -> dict[str, int]:
    """The app's live BusinessIngress replicas, replica id -> pid (named actors in Serve's
    namespace, each asked for its pid)."""
    import ray

    found = {}
    prefix = f"SERVE_REPLICA::{APP}#BusinessIngress#"
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if not actor["name"].startswith(prefix):
            continue
        try:
            handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
            pid = ray.get(handle.__ray_call__.remote(lambda _: os.getpid()), timeout=10)
            found[actor["name"].removeprefix(prefix)] = pid
        except (ray.exceptions.RayError, ValueError):
            continue  # died or being replaced
    return found


def ingress_pids() -> list[int]:
    return list(ingress_replicas().values())


def edge_routes_to(replica_ids: list[str]) -> bool:
    """Whether HAProxy's live configuration sends the app's requests to these replicas
    directly (until it reloads, Serve's own proxy behind it carries them)."""
    files = Path(os.environ["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).parent
    text = "".join(p.read_text() for p in files.glob("*/haproxy.cfg"))
    return all(f"server SERVE_REPLICA_{APP}-BusinessIngress-{r} " in text for r in replica_ids)


def wait_for_two_replicas(url: str) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        replicas = ingress_replicas()
        if len(replicas) == 2 and edge_routes_to(list(replicas)):
            time.sleep(1)  # the reload that wrote it, and its first health checks
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
        time.sleep(1)
    pytest.fail("BusinessIngress did not get back to 2 replicas, both behind HAProxy")


def holder(port: int) -> int:
    """The ingress replica with a connection open to the risk API on ``port``."""
    found = set()
    for pid in ingress_pids():
        for c in psutil.Process(pid).net_connections(kind="tcp"):
            if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED:
                found.add(pid)
    assert len(found) <= 1, f"two replicas talk to the risk API: {found}"
    return found.pop() if found else 0


def decisions(sqlite_urls: dict[str, str], memo: str) -> int:
    path = sqlite_urls["database"].removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT count(*) FROM decisions WHERE memo = ?", (memo,)).fetchone()[0]


def kill_in_flight(url: str, risk: RiskService, headers: dict[str, str], memo: str):
    """POST /score; once it reached the risk API, SIGKILL the replica holding it. Returns the
    answer and how many calls the risk API saw for it (after any replay could have landed)."""
    wait_for_two_replicas(url)
    before = risk.calls()
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(
            httpx.post, f"{url}/score", json={**GOOD, "memo": memo}, headers=headers, timeout=60
        )
        deadline = time.monotonic() + 30
        pid = 0
        while not pid:
            assert time.monotonic() < deadline, "the request never reached the risk API"
            pid = holder(risk.port) if risk.calls() > before else 0
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        r = answer.result()
    time.sleep(RISK_DELAY_S + 2)  # a replay sent now would have reached the risk API by then
    return r, risk.calls() - before


def test_a_write_without_a_key_is_not_sent_twice(url, slow_risk, sqlite_urls) -> None:
    memo = f"no-key-{uuid.uuid4().hex[:8]}"
    r, calls = kill_in_flight(url, slow_risk, KEY, memo)
    assert r.status_code == 503, r.text
    assert r.headers.get("retry-after") == "1"
    assert "Idempotency-Key" in r.json()["error"]["message"]
    assert calls == 1, f"the risk API saw the payment {calls} times"
    assert decisions(sqlite_urls, memo) == 0


def test_a_write_with_a_key_is_replayed_and_written_once(url, slow_risk, sqlite_urls) -> None:
    memo = f"keyed-{uuid.uuid4().hex[:8]}"
    headers = {**KEY, "Idempotency-Key": f"replay-{uuid.uuid4().hex}"}
    r, calls = kill_in_flight(url, slow_risk, headers, memo)
    assert r.status_code == 200, r.text
    assert r.json()["decision"] in ("approve", "review", "decline")
    assert calls == 2, f"the risk API saw the payment {calls} times (lost attempt + replay)"
    assert decisions(sqlite_urls, memo) == 1
    again = httpx.post(f"{url}/score", json={**GOOD, "memo": memo}, headers=headers, timeout=60)
    assert again.json()["request_id"] == r.json()["request_id"]  # the key's first answer

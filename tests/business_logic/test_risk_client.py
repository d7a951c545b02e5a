"""The outside risk service called for real over HTTP: up, slow, failing, down, refusing a
request, and answering something that is not a risk signal."""

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from patterns.business_logic.model import DEFAULT_SIGNAL
from patterns.business_logic.risk_client import RiskServiceClient

PAYLOAD = {
    "customer_id": "C00042",
    "merchant_id": "M0007",
    "amount_eur": 120.0,
    "channel": "online",
}


def _fetch_many(url: str, n: int, **kw):
    async def run():
        client = RiskServiceClient(url, **kw)
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            sig = await client.fetch(PAYLOAD)
            out.append((sig, time.perf_counter() - t0))
        state = client.breaker.state
        await client.close()
        return out, state

    return asyncio.run(run())


def test_up_returns_the_service_signal(risk_service) -> None:
    risk_service.start()
    [(sig, _)], state = _fetch_many(risk_service.url, 1)
    assert sig.source == "risk_service" and sig.provider_version == "risk-signals-2025.1"
    assert 0 <= sig.value <= 1 and "card_not_present" in sig.signals
    assert state == "closed"


def test_slow_times_out_to_the_default_quickly(risk_service) -> None:
    risk_service.start(delay_ms=2000)
    results, _ = _fetch_many(risk_service.url, 2, timeout_s=0.2, breaker_failures=10)
    for sig, elapsed in results:
        assert sig.source == "default" and sig.value == DEFAULT_SIGNAL
        assert sig.failure.startswith("timed out")
        assert elapsed < 1.5  # one 0.2 s timeout (the service takes 2 s), no retry
    # a read timeout is not retried: the service saw one call per fetch, not two
    assert risk_service.calls() == 2


def test_failing_is_retried_then_defaulted(risk_service) -> None:
    risk_service.start(fail_rate=1.0)
    [(sig, _)], _ = _fetch_many(risk_service.url, 1, attempts=3)
    assert sig.source == "default" and sig.failure == "HTTP 503"
    assert risk_service.calls() == 3  # the first try and two retries


def test_refused_requests_do_not_open_the_breaker_for_everyone(risk_service) -> None:
    """A 4xx is the service refusing one caller's input: that caller gets the default signal,
    and the breaker stays closed for everyone else."""
    risk_service.start()

    async def run():
        client = RiskServiceClient(risk_service.url, breaker_failures=2)
        refused = [await client.fetch({**PAYLOAD, "amount_eur": 0.0}) for _ in range(4)]
        state = client.breaker.state
        good = await client.fetch(PAYLOAD)
        await client.close()
        return refused, state, good

    refused, state, good = asyncio.run(run())
    assert all(s.source == "default" and s.failure == "HTTP 422" for s in refused)
    assert state == "closed" and good.source == "risk_service"
    assert risk_service.calls() == 1  # the handler counts valid calls: only the good one


def test_down_opens_the_breaker_and_stops_paying_for_calls(risk_service) -> None:
    risk_service.stop()
    results, state = _fetch_many(risk_service.url, 6, breaker_failures=3, breaker_reset_s=30)
    assert [s.failure for s, _ in results[:3]] == ["unreachable"] * 3
    assert all(s.failure.startswith("circuit open") for s, _ in results[3:])
    assert state == "open"
    assert max(t for _, t in results[3:]) < 0.05  # no network call at all


def test_breaker_closes_again_when_the_service_is_back(risk_service) -> None:
    risk_service.stop()

    async def run():
        client = RiskServiceClient(risk_service.url, breaker_failures=1, breaker_reset_s=0.5)
        first = await client.fetch(PAYLOAD)
        assert client.breaker.state == "open" and first.source == "default"
        risk_service.start()
        await asyncio.sleep(0.6)
        back = await client.fetch(PAYLOAD)
        await client.close()
        return back, client.breaker.state

    back, state = run_result = asyncio.run(run())
    assert back.source == "risk_service" and state == "closed", run_result


@pytest.mark.parametrize("bad", [{"customer_id": "x' OR 1=1"}, {"amount_eur": -1}])
def test_service_validates_its_input(risk_service, bad) -> None:
    import httpx

    risk_service.start()
    r = httpx.post(f"{risk_service.url}/v1/risk-signal", json={**PAYLOAD, **bad}, timeout=5)
    assert r.status_code == 422


# ------------------------------------------------------------------------------ bad answers
class _OneAnswerServer:
    """A real HTTP server on loopback that answers every POST with one fixed body, and counts."""

    def __init__(self) -> None:
        self.body = b"{}"
        self.calls = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.calls += 1
                self.rfile.read(int(self.headers.get("content-length", 0)))
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def one_answer() -> Iterator[_OneAnswerServer]:
    server = _OneAnswerServer()
    yield server
    server.close()


GOOD_BODY = {"risk_signal": 0.2, "signals": ["card_not_present"], "provider_version": "x"}


@pytest.mark.parametrize(
    "body",
    [
        b"not json at all",
        json.dumps([GOOD_BODY]).encode(),  # not an object
        json.dumps({"signals": []}).encode(),  # no risk_signal
        json.dumps({**GOOD_BODY, "risk_signal": "high"}).encode(),  # not a number
        json.dumps({**GOOD_BODY, "risk_signal": None}).encode(),
        json.dumps({**GOOD_BODY, "risk_signal": 7.5}).encode(),  # not in [0, 1]
        json.dumps({**GOOD_BODY, "signals": "card_not_present"}).encode(),  # not a list
    ],
)
def test_malformed_answer_is_a_failure_and_falls_back_to_the_default(one_answer, body) -> None:
    one_answer.body = body
    one_answer.calls = 0
    results, state = _fetch_many(one_answer.url, 3, breaker_failures=2, breaker_reset_s=30)
    assert [s.source for s, _ in results] == ["default"] * 3
    assert [s.value for s, _ in results] == [DEFAULT_SIGNAL] * 3
    assert [s.failure for s, _ in results[:2]] == ["malformed answer"] * 2
    # counted as failures: the breaker opened after two and the third call never went out
    assert state == "open" and results[2][0].failure.startswith("circuit open")
    assert one_answer.calls == 2  # and a malformed answer is not retried


def test_well_formed_answer_from_the_same_server_is_used(one_answer) -> None:
    one_answer.body = json.dumps({**GOOD_BODY, "extra": "ignored"}).encode()
    [(sig, _)], state = _fetch_many(one_answer.url, 1)
    assert sig.source == "risk_service" and sig.value == 0.2 and state == "closed"
    assert sig.signals == ["card_not_present"] and sig.provider_version == "x"


def test_make_serve_starts_the_risk_api_where_the_url_points(monkeypatch) -> None:
    """`make serve` starts the risk API on BUSINESS_RISK_SERVICE_URL's loopback port (8701
    unless set), and none for an API on another host."""
    from patterns.business_logic.services import side_services

    monkeypatch.delenv("BUSINESS_RISK_SERVICE_URL", raising=False)
    ((*_, port_flag, port),) = side_services()
    assert (port_flag, port) == ("--port", "8701")
    monkeypatch.setenv("BUSINESS_RISK_SERVICE_URL", "http://localhost:9123")
    assert side_services()[0][-1] == "9123"
    monkeypatch.setenv("BUSINESS_RISK_SERVICE_URL", "https://risk.example.com/v1")
    assert side_services() == []

"""The outside risk service called for real over HTTP: up, slow, failing and down."""

import asyncio
import time

import pytest

from patterns.business_logic.risk_client import DEFAULT_SIGNAL, RiskServiceClient

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


def test_failing_is_retried_then_defaulted(risk_service) -> None:
    risk_service.start(fail_rate=1.0)
    [(sig, _)], _ = _fetch_many(risk_service.url, 1, attempts=3)
    assert sig.source == "default" and sig.failure == "HTTP 503"


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

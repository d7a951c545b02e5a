"""The risk API's retry budget and circuit breaker, including their failure paths."""

from __future__ import annotations

import asyncio

import pytest

from patterns.business_logic.breaker import (
    CircuitBreaker,
    CircuitOpenError,
    RetryBudget,
    retry_async,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_fails_fast_half_opens_and_closes() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("risk", failure_threshold=3, reset_timeout_s=10, clock=clock)
    calls = {"n": 0}

    async def flaky():
        calls["n"] += 1
        raise ConnectionError("down")

    async def ok():
        calls["n"] += 1
        return "ok"

    async def main():
        for _ in range(3):
            with pytest.raises(ConnectionError):
                await breaker.call(flaky)
        assert breaker.state == "open"
        with pytest.raises(CircuitOpenError):
            await breaker.call(ok)
        assert calls["n"] == 3  # open: the dependency was not called
        clock.now += 10
        assert breaker.state == "half_open"
        with pytest.raises(ConnectionError):  # trial fails -> open again at once
            await breaker.call(flaky)
        assert breaker.state == "open"
        clock.now += 10
        assert await breaker.call(ok) == "ok"  # trial succeeds -> closed
        assert breaker.state == "closed"

    asyncio.run(main())


def test_half_open_allows_a_single_trial() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("x", failure_threshold=1, reset_timeout_s=1, clock=clock)

    async def main():
        with pytest.raises(ConnectionError):
            await breaker.call(_raise_conn)
        clock.now += 1
        gate = asyncio.Event()

        async def slow_ok():
            await gate.wait()
            return 1

        trial = asyncio.ensure_future(breaker.call(slow_ok))
        await asyncio.sleep(0)
        with pytest.raises(CircuitOpenError):  # second caller while the trial is in flight
            await breaker.call(slow_ok)
        gate.set()
        assert await trial == 1
        assert breaker.state == "closed"

    asyncio.run(main())


async def _raise_conn():
    raise ConnectionError("down")


def test_retry_succeeds_after_transient_failures() -> None:
    attempts = {"n": 0}

    async def flaky():
        attempts["n"] += 1
        if attempts["n"] < 3:
            raise TimeoutError("slow")
        return "ok"

    assert asyncio.run(retry_async(flaky, attempts=3, base_delay_s=0.001)) == "ok"
    assert attempts["n"] == 3


def test_retry_budget_caps_retries_during_an_outage() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.1, min_per_s=0.0, window_s=10, clock=clock)
    calls = {"n": 0}

    async def down():
        calls["n"] += 1
        raise ConnectionError("down")

    async def main():
        for _ in range(50):
            with pytest.raises(ConnectionError):
                await retry_async(down, attempts=3, budget=budget, base_delay_s=0)

    asyncio.run(main())
    # Without a budget 50 requests x 3 attempts = 150 calls; with 10% budget about 55.
    assert calls["n"] <= 50 + 0.1 * 50 + 1

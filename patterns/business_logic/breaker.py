"""Protection for calls out of the cluster (the risk API): a retry budget and a circuit breaker.

- ``RetryBudget`` + ``retry_async``: retries limited to a fraction of recent traffic, so an
  outage is not multiplied into a retry storm against the dependency that is already down.
- ``CircuitBreaker``: after N consecutive failures stop calling for a while (fail fast), then
  let one trial call through (half-open) and close again if it succeeds.

Calls between deployments need neither: Serve routes around a lost replica
(``core.resilience.call_surviving_replica``) and a deadline bounds a slow one.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

logger = logging.getLogger("patterns.business_logic.breaker")
T = TypeVar("T")


class RetryBudget:
    """Allow retries up to ``ratio`` of the calls seen in the last ``window_s``, plus a floor.

    With ratio=0.2 a dependency that fails every call receives at most 1.2x the traffic, not
    ``attempts``x. (The "retry budget" of Finagle and Envoy.)
    """

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_s: float = 1.0,
        window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.window_s = window_s
        self._clock = clock
        self._calls: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _trim(self, now: float) -> None:
        for q in (self._calls, self._retries):
            while q and q[0] < now - self.window_s:
                q.popleft()

    def record_call(self) -> None:
        now = self._clock()
        self._trim(now)
        self._calls.append(now)

    def try_spend(self) -> bool:
        now = self._clock()
        self._trim(now)
        allowed = self.min_per_s * self.window_s + self.ratio * len(self._calls)
        if len(self._retries) < allowed:
            self._retries.append(now)
            return True
        return False


async def retry_async(
    fn: Callable[[], Awaitable[T]],
    *,
    attempts: int = 3,
    budget: RetryBudget | None = None,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
    base_delay_s: float = 0.05,
) -> T:
    """Call ``fn`` up to ``attempts`` times with jittered backoff, within the budget."""
    if budget is not None:
        budget.record_call()
    for attempt in range(1, attempts + 1):
        try:
            return await fn()
        except retry_on:
            if attempt == attempts:
                raise
            if budget is not None and not budget.try_spend():
                logger.warning("retry budget exhausted; not retrying")
                raise
            await asyncio.sleep(base_delay_s * (2 ** (attempt - 1)) * (0.5 + random.random()))
    raise AssertionError("unreachable")  # pragma: no cover


class CircuitOpenError(Exception):
    """The breaker is open: the dependency is failing, so the call was not made."""

    def __init__(self, name: str, retry_in_s: float) -> None:
        super().__init__(f"circuit {name!r} is open; retry in {retry_in_s:.1f}s")
        self.name = name
        self.retry_in_s = retry_in_s


class CircuitBreaker:
    """closed -> (failure_threshold consecutive failures) -> open -> (reset_timeout_s) ->
    half_open -> one trial call: success closes it, failure opens it again."""

    def __init__(
        self,
        name: str,
        failure_threshold: int = 5,
        reset_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        failure_on: tuple[type[BaseException], ...] = (Exception,),
    ) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._failure_on = failure_on
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_in_flight = False

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at >= self.reset_timeout_s:
            return "half_open"
        return "open"

    def _before(self) -> None:
        state = self.state
        if state == "open" or (state == "half_open" and self._trial_in_flight):
            assert self._opened_at is not None
            retry_in = max(0.0, self.reset_timeout_s - (self._clock() - self._opened_at))
            raise CircuitOpenError(self.name, retry_in)
        if state == "half_open":
            self._trial_in_flight = True

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._trial_in_flight = False

    def record_failure(self) -> None:
        self._failures += 1
        was_trial = self._trial_in_flight
        self._trial_in_flight = False
        if was_trial or self._failures >= self.failure_threshold:
            if self._opened_at is None or was_trial:
                logger.warning("circuit %s opened after %d failures", self.name, self._failures)
            self._opened_at = self._clock()

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        self._before()
        try:
            result = await fn(*args, **kwargs)
        except self._failure_on:
            self.record_failure()
            raise
        except BaseException:
            self._trial_in_flight = False  # cancelled: neither success nor failure
            raise
        self.record_success()
        return result

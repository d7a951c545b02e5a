"""Calling the outside risk service: timeout, retry budget, circuit breaker, default answer.

The caller never raises: when the service is slow, failing or down it gets a ``RiskSignal``
with ``source="default"`` and the reason, and the scorer marks the decision degraded. Only
connection errors and 5xx are retried (a read timeout means the service is slow; retrying
would double the wait), and only within a budget of 20% of recent calls, so an outage is not
multiplied into a retry storm. After ``breaker_failures`` consecutive failures the breaker
opens and requests stop paying the timeout at all until it lets a trial call through.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from core.resilience import CircuitBreaker, CircuitOpenError, RetryBudget, retry_async

# What the model sees when the service cannot answer: a middling signal plus a "missing"
# flag (the model was trained with 10% of rows missing the signal, so it knows this case).
DEFAULT_SIGNAL = 0.5


@dataclass
class RiskSignal:
    value: float
    source: str  # "risk_service" | "default"
    signals: list[str] = field(default_factory=list)
    provider_version: str | None = None
    failure: str | None = None  # why the default was used

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class _Retryable(Exception):
    pass


class RiskServiceClient:
    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 0.3,
        attempts: int = 2,
        retry_ratio: float = 0.2,
        breaker_failures: int = 5,
        breaker_reset_s: float = 10.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.attempts = attempts
        # connect quickly or not at all; the read may take the rest of the budget
        self.timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 0.2))
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=self.timeout,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
        )
        self.budget = RetryBudget(ratio=retry_ratio, min_per_s=1.0)
        self.breaker = CircuitBreaker(
            "risk_service", failure_threshold=breaker_failures, reset_timeout_s=breaker_reset_s
        )
        self.last_failure: str | None = None

    async def _once(self, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            r = await self.client.post("/v1/risk-signal", json=payload)
        except (httpx.ConnectError, httpx.RemoteProtocolError) as exc:
            raise _Retryable("unreachable") from exc
        if r.status_code >= 500:
            raise _Retryable(f"HTTP {r.status_code}")
        r.raise_for_status()
        return r.json()

    async def _with_retries(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await retry_async(
            lambda: self._once(payload),
            attempts=self.attempts,
            budget=self.budget,
            retry_on=(_Retryable,),
            base_delay_s=0.02,
        )

    async def fetch(self, payload: dict[str, Any]) -> RiskSignal:
        try:
            body = await self.breaker.call(self._with_retries, payload)
        except CircuitOpenError as exc:
            return self._default(f"circuit open (retry in {exc.retry_in_s:.1f}s)")
        except httpx.TimeoutException:
            return self._default(f"timed out after {self.timeout.read:.2f}s")
        except _Retryable as exc:
            return self._default(str(exc))
        except (httpx.HTTPError, ValueError) as exc:
            return self._default(type(exc).__name__)
        self.last_failure = None
        return RiskSignal(
            value=float(body["risk_signal"]),
            source="risk_service",
            signals=list(body.get("signals", [])),
            provider_version=body.get("provider_version"),
        )

    def _default(self, why: str) -> RiskSignal:
        self.last_failure = f"{why} at {time.strftime('%H:%M:%S')}"
        return RiskSignal(value=DEFAULT_SIGNAL, source="default", failure=why)

    def health(self) -> dict[str, Any]:
        return {"circuit": self.breaker.state, "last_failure": self.last_failure}

    async def close(self) -> None:
        await self.client.aclose()

"""Calling the outside risk service: timeout, retry budget, circuit breaker, default answer.

The caller never raises: when the service is slow, failing, down or answers something that is
not a risk signal it gets a ``RiskSignal`` with ``source="default"`` and the reason, and the
scorer marks the decision degraded. Only connection errors and 5xx are retried (a read timeout
means the service is slow; retrying would double the wait), and only within a budget of 20% of
recent calls, so an outage is not multiplied into a retry storm. After ``breaker_failures``
consecutive outages (unreachable, timed out, 5xx, malformed answer) the breaker opens and
requests stop paying the timeout at all until it lets a trial call through. A 4xx is the
service refusing one request, not an outage: it gets the default signal but does not count
towards opening the breaker for everyone else.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import httpx
from pydantic import BaseModel, Field, ValidationError

from patterns.business_logic.breaker import (
    CircuitBreaker,
    CircuitOpenError,
    RetryBudget,
    retry_async,
)
from patterns.business_logic.model import DEFAULT_SIGNAL


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
    """Unreachable or 5xx: worth one more try, and an outage for the breaker."""


class _BadAnswer(Exception):
    """A 200 whose body is not a risk signal: an outage for the breaker, not retried."""


class _RefusedRequest(Exception):
    """A 4xx: the service is up and refused this one request; not an outage."""


class _SignalBody(BaseModel):
    """The part of the service's answer the model uses, checked before anything reads it."""

    risk_signal: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
    signals: list[str] = []
    provider_version: str | None = None


# Failures that say the service is unwell, so they count towards opening the breaker:
# httpx.RequestError is every failure to get an answer (timeouts and dropped connections
# included); a 4xx (_RefusedRequest) is not among them.
_OUTAGES: tuple[type[BaseException], ...] = (_Retryable, _BadAnswer, httpx.RequestError)


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
            "risk_service",
            failure_threshold=breaker_failures,
            reset_timeout_s=breaker_reset_s,
            failure_on=_OUTAGES,
        )
        self.last_failure: str | None = None

    async def _once(self, payload: dict[str, Any]) -> _SignalBody:
        try:
            r = await self.client.post("/v1/risk-signal", json=payload)
        except (httpx.ConnectError, httpx.RemoteProtocolError) as exc:
            raise _Retryable("unreachable") from exc
        if r.status_code >= 500:
            raise _Retryable(f"HTTP {r.status_code}")
        if r.status_code >= 400:
            raise _RefusedRequest(f"HTTP {r.status_code}")
        if not r.is_success:  # a redirect, say: not an answer
            raise _BadAnswer(f"unexpected HTTP {r.status_code}")
        try:
            return _SignalBody.model_validate_json(r.content)
        except ValidationError as exc:
            raise _BadAnswer("malformed answer") from exc

    async def _with_retries(self, payload: dict[str, Any]) -> _SignalBody:
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
        except (_Retryable, _BadAnswer, _RefusedRequest) as exc:
            return self._default(str(exc))
        except httpx.HTTPError as exc:
            return self._default(type(exc).__name__)
        self.last_failure = None
        return RiskSignal(
            value=body.risk_signal,
            source="risk_service",
            signals=body.signals,
            provider_version=body.provider_version,
        )

    def _default(self, why: str) -> RiskSignal:
        self.last_failure = f"{why} at {time.strftime('%H:%M:%S')}"
        return RiskSignal(value=DEFAULT_SIGNAL, source="default", failure=why)

    def health(self) -> dict[str, Any]:
        return {"circuit": self.breaker.state, "last_failure": self.last_failure}

    async def close(self) -> None:
        await self.client.aclose()

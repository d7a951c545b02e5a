"""One fraud check, end to end: records -> features + risk signal -> model -> rules.

The ``Scorer`` is plain async Python with its dependencies passed in, so the same logic runs in
the split design (the model behind a DeploymentHandle) and in the one-deployment baseline the
benchmark compares it with (the model in-process).

Failure policy, in one place:
- database down or too slow: 503 (no records, no decision), within ``db_timeout_s``;
- feature store down: features recomputed from the database, answer marked degraded
  (stale or missing vectors are recomputed too, but that is exact, so not degraded);
- risk service slow, failing or down: a default signal, answer marked degraded, and rules
  route large amounts to review;
- model deployment not answering within ``model_timeout_s``: 503.
"""

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.errors import NotFound, ServiceUnavailable, Unprocessable
from core.resilience import CircuitBreaker, CircuitOpenError
from patterns.business_logic.features import (
    FeaturePolicy,
    FeatureStore,
    FeatureStoreUnavailable,
    FeatureVector,
)
from patterns.business_logic.model import MODEL_NAME, as_row, model_input
from patterns.business_logic.records import DatabaseUnavailable, RecordStore
from patterns.business_logic.risk_client import RiskServiceClient
from patterns.business_logic.rules import DecisionRules, decide

logger = logging.getLogger("patterns.business_logic.scoring")

ModelCall = Callable[[list[float]], Awaitable[tuple[float, str]]]


class ScoreRequest(BaseModel):
    """A card payment to check. Ids and codes have strict shapes, so anything else (an
    injection attempt included) is refused with 422 before any lookup runs."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "customer_id": "C00042",
                    "merchant_id": "M0007",
                    "amount": 129.90,
                    "currency": "EUR",
                    "channel": "online",
                    "memo": "order 2024-118",
                }
            ]
        },
    )

    customer_id: str = Field(pattern=r"^C\d{5}$", description="Customer id, e.g. C00042")
    merchant_id: str = Field(pattern=r"^M\d{4}$", description="Merchant id, e.g. M0007")
    amount: Annotated[float, Field(gt=0, le=1_000_000, allow_inf_nan=False)]
    currency: str = Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code, e.g. EUR")
    channel: Literal["online", "in_store", "phone"]
    # Free text: never parsed, stored in the decision log as a bound parameter.
    memo: str | None = Field(default=None, max_length=200)


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


class Scorer:
    def __init__(
        self,
        *,
        records: RecordStore,
        features: FeatureStore,
        risk: RiskServiceClient,
        model_call: ModelCall,
        rules: DecisionRules,
        policy: FeaturePolicy,
        model_timeout_s: float = 2.0,
        log_decisions: bool = True,
        feature_breaker_failures: int = 5,
        feature_breaker_reset_s: float = 10.0,
    ) -> None:
        self.records = records
        self.features = features
        self.risk = risk
        self.model_call = model_call
        self.rules = rules
        self.policy = policy
        self.model_timeout_s = model_timeout_s
        self.log_decisions = log_decisions
        # The store is a cache of the database: when it is down, stop paying its timeout.
        self.feature_breaker = CircuitBreaker(
            "feature_store",
            failure_threshold=feature_breaker_failures,
            reset_timeout_s=feature_breaker_reset_s,
        )
        self._background: set[asyncio.Task] = set()

    # -- features ------------------------------------------------------------------------
    async def _features(self, cid: str) -> tuple[dict[str, float], dict[str, Any], str | None]:
        """(values, provenance, degraded reason or None) under the FeaturePolicy."""
        now = time.time()
        vec: FeatureVector | None = None
        store_failure: str | None = None
        try:
            vec = await self.feature_breaker.call(self.features.get, cid)
        except CircuitOpenError as exc:
            store_failure = f"circuit open (retry in {exc.retry_in_s:.1f}s)"
        except FeatureStoreUnavailable as exc:
            store_failure = str(exc) or "unreachable"
        if vec is not None:
            age = now - vec.computed_at
            if age <= self.policy.max_age_s:
                provenance = {
                    "source": "feature_store",
                    "store": self.features.kind,
                    "computed_at": _iso(vec.computed_at),
                    "age_s": round(age, 1),
                }
                return vec.values, provenance, None
        why = "unavailable" if store_failure else ("stale" if vec is not None else "missing")
        if self.policy.on_missing_or_stale == "reject":
            raise ServiceUnavailable(
                f"Precomputed features for {cid} are {why} and the feature policy is 'reject'; "
                "retry after the feature job has run."
            )
        try:
            values = await self.records.history_features(cid)
        except DatabaseUnavailable as exc:
            raise ServiceUnavailable(
                f"The records database did not answer ({exc}); retry shortly."
            ) from exc
        provenance = {
            "source": "recomputed",
            "store": self.features.kind,
            "reason": why,
            "computed_at": _iso(now),
        }
        if vec is not None:
            provenance["stale_age_s"] = round(now - vec.computed_at, 1)
        if store_failure is None and self.policy.write_back:
            self._in_background(self.features.put_many({cid: FeatureVector(values, now)}))
        degraded = (
            f"feature store {store_failure}; recomputed from the database"
            if store_failure
            else None
        )
        return values, provenance, degraded

    def _in_background(self, coro: Awaitable[Any]) -> None:
        async def guarded() -> None:
            try:
                await coro
            except Exception as exc:  # a failed cache write never fails the answer
                logger.warning("feature write-back failed: %s", exc)

        task = asyncio.get_running_loop().create_task(guarded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- the check -----------------------------------------------------------------------
    async def score(self, req: ScoreRequest, request_id: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        try:
            records = await self.records.lookup(req.customer_id, req.merchant_id, req.currency)
        except DatabaseUnavailable as exc:
            raise ServiceUnavailable(
                f"The records database did not answer ({exc}); no decision was made. Retry shortly."
            ) from exc
        timings["records_ms"] = (time.perf_counter() - t0) * 1000
        if records.customer is None:
            raise NotFound(f"Customer {req.customer_id} is not on file.")
        if records.merchant is None:
            raise NotFound(f"Merchant {req.merchant_id} is not on file.")
        if records.eur_per_unit is None:
            raise Unprocessable(f"Currency {req.currency} is not supported by this service.")
        amount_eur = round(req.amount * records.eur_per_unit, 2)

        async def timed(name: str, aw: Awaitable[Any]) -> Any:
            t = time.perf_counter()
            try:
                return await aw
            finally:
                timings[name] = (time.perf_counter() - t) * 1000

        (values, provenance, feature_degraded), risk = await asyncio.gather(
            timed("features_ms", self._features(req.customer_id)),
            timed(
                "risk_service_ms",
                self.risk.fetch(
                    {
                        "customer_id": req.customer_id,
                        "merchant_id": req.merchant_id,
                        "amount_eur": amount_eur,
                        "channel": req.channel,
                    }
                ),
            ),
        )
        missing_signal = risk.source != "risk_service"
        named = model_input(
            amount_eur=amount_eur,
            channel=req.channel,
            customer=records.customer,
            merchant=records.merchant,
            features=values,
            risk_signal=risk.value,
            risk_signal_missing=missing_signal,
        )
        t = time.perf_counter()
        try:
            score, version = await asyncio.wait_for(
                self.model_call(as_row(named)), self.model_timeout_s
            )
        except TimeoutError as exc:
            raise ServiceUnavailable(
                f"The fraud model did not answer within {self.model_timeout_s:.1f}s; retry shortly."
            ) from exc
        timings["model_ms"] = (time.perf_counter() - t) * 1000
        decision, reasons = decide(
            self.rules,
            score=score,
            amount_eur=amount_eur,
            customer=records.customer,
            merchant=records.merchant,
            risk_signal_missing=missing_signal,
        )
        degraded_reasons = []
        if feature_degraded:
            degraded_reasons.append(feature_degraded)
        if missing_signal:
            degraded_reasons.append(f"risk service {risk.failure}; default signal used")
        if self.log_decisions:
            t = time.perf_counter()
            try:
                await self.records.log_decision(
                    request_id=request_id[:64],
                    customer_id=req.customer_id,
                    merchant_id=req.merchant_id,
                    amount_eur=amount_eur,
                    decision=decision,
                    score=score,
                    memo=req.memo,
                )
            except DatabaseUnavailable as exc:
                degraded_reasons.append(f"decision not written to the audit log ({exc})")
            timings["audit_log_ms"] = (time.perf_counter() - t) * 1000
        timings["total_ms"] = (time.perf_counter() - t0) * 1000
        return {
            "request_id": request_id,
            "decision": decision,
            "reasons": reasons,
            "score": round(score, 4),
            "model": {"name": MODEL_NAME, "version": version},
            "records": {
                "customer": records.customer,
                "merchant": records.merchant,
                "fx": {
                    "currency": req.currency,
                    "eur_per_unit": records.eur_per_unit,
                    "amount_eur": amount_eur,
                },
            },
            "features": {"model_input": named, "provenance": provenance},
            "risk_signal": risk.public(),
            "degraded": bool(degraded_reasons),
            "degraded_reasons": degraded_reasons,
            "timings_ms": {k: round(v, 2) for k, v in timings.items()},
        }

    def health(self) -> dict[str, Any]:
        """Passive dependency state (no probes): an outage shows here, it never fails /healthz."""
        return {
            "dependencies": {
                "database": {
                    "backend": self.records.backend,
                    "last_error": self.records.last_error,
                },
                "feature_store": {
                    "kind": self.features.kind,
                    "circuit": self.feature_breaker.state,
                },
                "risk_service": self.risk.health(),
            }
        }

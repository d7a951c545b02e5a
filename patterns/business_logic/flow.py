"""One fraud check, end to end: records + features -> risk signal -> model -> rules.

The ``Scorer`` is plain async Python with its dependencies passed in, so the same logic runs in
the split design (the model behind a DeploymentHandle) and in the one-deployment baseline the
benchmark compares it with (the model in-process).

Failure policy, in one place:
- database down or too slow: 503 (no records, no decision), within ``db_timeout_s``;
- feature store down: features recomputed from the database, answer marked degraded
  (stale, missing or invalid vectors are recomputed too, but that is exact, so not degraded);
- risk service slow, failing, down or answering nonsense: a default signal, answer marked
  degraded, and rules route large amounts to review;
- model deployment not answering within ``model_timeout_s``, or failing: 503;
- audit log write failing: the decision is still answered, marked degraded; with an
  Idempotency-Key it is a 503 instead (the key's row is the promise, and nothing was written).

Idempotency-Key: the key, the payment's digest and the first answer are one row whose primary
key is the key, written in the decision's transaction. A repeat gets that answer; the key with
another payment gets a 409.
"""

import asyncio
import datetime as dt
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.errors import Conflict, NotFound, ServiceUnavailable, Unprocessable
from core.resilience import describe_error
from core.timing import Timings
from patterns.business_logic.breaker import CircuitBreaker, CircuitOpenError
from patterns.business_logic.features import (
    FeaturePolicy,
    FeatureStore,
    FeatureStoreUnavailable,
    FeatureVector,
    InvalidFeatureVector,
)
from patterns.business_logic.model import MODEL_NAME, as_row, model_input
from patterns.business_logic.records import (
    DatabaseUnavailable,
    KeyAlreadyUsed,
    Records,
    RecordStore,
    StoredAnswer,
)
from patterns.business_logic.risk_client import RiskServiceClient, RiskSignal
from patterns.business_logic.rules import DecisionRules, decide

logger = logging.getLogger("patterns.business_logic.flow")

ModelCall = Callable[[list[float]], Awaitable[tuple[float, str]]]

# The feature store is a cache of the database: after this many consecutive failures stop
# paying its timeout, and try it again after this long.
FEATURE_BREAKER_FAILURES = 5
FEATURE_BREAKER_RESET_S = 10.0
# The smallest amount the check (and the risk service) accepts, after conversion to EUR.
MIN_AMOUNT_EUR = 0.01
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


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

    @field_validator("memo")
    @classmethod
    def _no_control_characters(cls, memo: str | None) -> str | None:
        # PostgreSQL refuses NUL in text, and no memo needs escape codes or line breaks
        if memo is not None and _CONTROL_CHARS.search(memo):
            raise ValueError(
                "the memo must be one line of printable text, without control characters "
                "such as NUL, tab, newline or escape codes"
            )
        return memo


def request_digest(req: ScoreRequest) -> str:
    """What an Idempotency-Key is bound to: the payment, field by field."""
    return hashlib.sha256(req.model_dump_json().encode()).hexdigest()


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class _Features:
    values: dict[str, float]
    provenance: dict[str, Any]
    degraded: str | None  # why the answer is degraded, or None
    write_back: FeatureVector | None  # a recomputed vector the store should get


def _retrieve(task: asyncio.Future) -> None:
    """Done callback for a task nobody will await: read its outcome so asyncio does not log
    "exception was never retrieved" (the request already has its answer)."""
    if not task.cancelled():
        task.exception()


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
        # Only an outage counts; an invalid vector means the store answered.
        self.feature_breaker = CircuitBreaker(
            "feature_store",
            failure_threshold=FEATURE_BREAKER_FAILURES,
            reset_timeout_s=FEATURE_BREAKER_RESET_S,
            failure_on=(FeatureStoreUnavailable,),
        )
        self._background: set[asyncio.Task] = set()

    # -- features ------------------------------------------------------------------------
    async def _features(self, cid: str) -> _Features:
        """The customer's feature vector under the FeaturePolicy. Writes nothing: the caller
        writes a recomputed vector back once the records say the customer exists."""
        now = time.time()
        vec: FeatureVector | None = None
        store_failure: str | None = None
        invalid = False
        try:
            vec = await self.feature_breaker.call(self.features.get, cid)
        except CircuitOpenError as exc:
            store_failure = f"circuit open (retry in {exc.retry_in_s:.1f}s)"
        except FeatureStoreUnavailable as exc:
            store_failure = str(exc) or "unreachable"
        except InvalidFeatureVector:  # logged by the store; recomputed and replaced below
            invalid = True
        if vec is not None:
            age = now - vec.computed_at
            if age <= self.policy.max_age_s:
                provenance = {
                    "source": "feature_store",
                    "store": self.features.kind,
                    "computed_at": _iso(vec.computed_at),
                    "age_s": round(age, 1),
                }
                return _Features(vec.values, provenance, None, None)
        if store_failure:
            why = "unavailable"
        elif invalid:
            why = "invalid"
        else:
            why = "stale" if vec is not None else "missing"
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
        write_back = None
        if store_failure is None and self.policy.write_back:
            write_back = FeatureVector(values, now)
        degraded = (
            f"feature store {store_failure}; recomputed from the database"
            if store_failure
            else None
        )
        return _Features(values, provenance, degraded, write_back)

    def _in_background(self, coro: Awaitable[Any]) -> None:
        async def guarded() -> None:
            try:
                await coro
            except Exception as exc:  # a failed cache write never fails the answer
                logger.warning("feature write-back failed: %s", describe_error(exc))

        task = asyncio.get_running_loop().create_task(guarded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- the check -----------------------------------------------------------------------
    async def _records(self, req: ScoreRequest) -> tuple[Records, float]:
        """The records and the amount in EUR, or the 503 / 404 / 422 that ends the check."""
        try:
            records = await self.records.lookup(req.customer_id, req.merchant_id, req.currency)
        except DatabaseUnavailable as exc:
            raise ServiceUnavailable(
                f"The records database did not answer ({exc}); no decision was made. Retry shortly."
            ) from exc
        if records.customer is None:
            raise NotFound(f"Customer {req.customer_id} is not on file.")
        if records.merchant is None:
            raise NotFound(f"Merchant {req.merchant_id} is not on file.")
        if records.eur_per_unit is None:
            raise Unprocessable(f"Currency {req.currency} is not supported by this service.")
        amount_eur = round(req.amount * records.eur_per_unit, 2)
        if amount_eur < MIN_AMOUNT_EUR:
            raise Unprocessable(
                f"The amount {req.amount:g} {req.currency} is {amount_eur:.2f} EUR after "
                f"conversion; the smallest amount this service checks is {MIN_AMOUNT_EUR} EUR."
            )
        return records, amount_eur

    async def score(
        self, req: ScoreRequest, request_id: str, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """One check. With an ``idempotency_key``, a repeat of the same payment gets the first
        answer (nothing scored or written again), another payment under the key a 409; the
        key's row and the decision row are written together or not at all."""
        if idempotency_key is not None:
            try:
                stored = await self.records.stored_answer(idempotency_key)
            except DatabaseUnavailable as exc:
                raise ServiceUnavailable(
                    f"The records database did not answer ({exc}); no decision was made. "
                    "Retry shortly with the same Idempotency-Key."
                ) from exc
            if stored is not None:
                return self._replay(stored, req, idempotency_key)
        timings = Timings()

        async def timed(name: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
            # takes the function, not a coroutine: a task cancelled before it starts then
            # leaves no never-awaited coroutine behind
            with timings.stage(name):
                return await fn(*args)

        # The features need only the customer id: fetch them while the records are looked
        # up. The records still decide first (404 / 422 / 503 before any feature outcome).
        tasks = [asyncio.ensure_future(timed("features", self._features, req.customer_id))]
        try:
            records, amount_eur = await timed("records", self._records, req)
            payload = {
                "customer_id": req.customer_id,
                "merchant_id": req.merchant_id,
                "amount_eur": amount_eur,
                "channel": req.channel,
            }
            tasks.append(asyncio.ensure_future(timed("risk_service", self.risk.fetch, payload)))
            features: _Features = await tasks[0]
            risk: RiskSignal = await tasks[1]
        except BaseException:
            for task in tasks:  # no work left running for an answer already decided
                task.cancel()
                task.add_done_callback(_retrieve)
            raise
        if features.write_back is not None:  # the customer exists: cache the vector
            self._in_background(self.features.put_many({req.customer_id: features.write_back}))
        missing_signal = risk.source != "risk_service"
        named = model_input(
            amount_eur=amount_eur,
            channel=req.channel,
            customer=records.customer,
            merchant=records.merchant,
            features=features.values,
            risk_signal=risk.value,
            risk_signal_missing=missing_signal,
        )
        try:
            with timings.stage("model"):
                score, version = await asyncio.wait_for(
                    self.model_call(as_row(named)), self.model_timeout_s
                )
        except TimeoutError as exc:
            raise ServiceUnavailable(
                f"The fraud model did not answer within {self.model_timeout_s:g}s; retry shortly."
            ) from exc
        except Exception as exc:  # a dead replica, a failed deployment: an outage, not a bug here
            why = describe_error(exc).removeprefix("error: ")
            logger.warning("fraud model call failed: %s", why)
            raise ServiceUnavailable(
                f"The fraud model could not score this payment ({why}); no decision was made. "
                "Retry shortly."
            ) from exc
        decision, reasons = decide(
            self.rules,
            score=score,
            amount_eur=amount_eur,
            customer=records.customer,
            merchant=records.merchant,
            risk_signal_missing=missing_signal,
        )
        degraded_reasons = []
        if features.degraded:
            degraded_reasons.append(features.degraded)
        if missing_signal:
            degraded_reasons.append(f"risk service {risk.failure}; default signal used")
        answer = {
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
            "features": {"model_input": named, "provenance": features.provenance},
            "risk_signal": risk.public(),
            "degraded": bool(degraded_reasons),
            "degraded_reasons": degraded_reasons,
        }
        row = None
        if self.log_decisions:
            row = {
                "request_id": request_id[:64],
                "customer_id": req.customer_id,
                "merchant_id": req.merchant_id,
                "amount_eur": amount_eur,
                "decision": decision,
                "score": score,
                "memo": req.memo,
            }
        if row is not None or idempotency_key is not None:
            try:
                with timings.stage("audit_log"):
                    await self.records.log_decision(
                        row,
                        idempotency_key=idempotency_key,
                        request_digest=request_digest(req),
                        answer={**answer, "timings_ms": timings.as_dict()},
                    )
            except KeyAlreadyUsed as exc:  # a concurrent request with this key won the race
                return self._replay(exc.stored, req, idempotency_key or "")
            except DatabaseUnavailable as exc:
                if idempotency_key is not None:
                    # The key promises "answered once, written once": without its row there
                    # is no promise to keep, so nothing is answered (nothing was written).
                    raise ServiceUnavailable(
                        f"The decision could not be recorded ({exc}); nothing was written. "
                        "Retry shortly with the same Idempotency-Key."
                    ) from exc
                degraded_reasons.append(f"decision not written to the audit log ({exc})")
                answer["degraded"] = True
        return {**answer, "timings_ms": timings.as_dict()}

    def _replay(self, stored: StoredAnswer, req: ScoreRequest, key: str) -> dict[str, Any]:
        """The first answer given for ``key``, if this request is the one it answered."""
        if stored.request_digest != request_digest(req):
            raise Conflict(
                f"Idempotency-Key {key!r} was already used for a different payment "
                f"(request {stored.answer.get('request_id')}); use a new key for a new payment."
            )
        return stored.answer

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

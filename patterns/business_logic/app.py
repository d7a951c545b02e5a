"""Fraud check on Ray Serve: an I/O-bound ingress and a compute-bound model, scaled apart.

    client --X-API-Key--> BusinessIngress (FastAPI, many requests in flight per replica)
                            |-- records: customer, merchant, FX rate  (SQLite | PostgreSQL)
                            |-- features: precomputed vector          (SQLite | Redis)
                            |-- risk signal: outside HTTP API          (timeout, retry budget,
                            |                                            circuit breaker)
                            '--> FraudModel (own deployment, @serve.batch, few in flight)
                                   -> score -> business rules -> approve | review | decline

This module declares the args, wires the two deployments and maps routes to the request flow
(``Scorer`` in flow.py). Run: ``python -m patterns.business_logic.artifacts``, then
``serve run patterns.business_logic.app:app --route-prefix /business`` (and the risk service,
``python -m patterns.business_logic.risk_service``). Knobs: config.yaml, equal to the defaults.
"""

# No `from __future__ import annotations` here: Serve's class-based FastAPI views need real
# annotations (with string annotations `self` becomes a required query parameter).
import asyncio
from typing import Any

from fastapi import Depends, FastAPI, Request
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from core.apps import SURGE, coerce_args, default_app
from core.errors import ServiceUnavailable
from core.ingress import (
    IDEMPOTENT,
    IdempotencyKey,
    api_key_auth,
    install_ingress,
    request_id_of,
)
from core.openapi import JSON_BODY, KEYED, document_replica, error_responses
from core.readiness import Readiness
from core.resilience import call_surviving_replica, describe_error
from core.resources import resolve_actor_options
from core.settings import keys_required
from patterns.business_logic.args import MAX_BODY_BYTES, BusinessArgs, build_scorer
from patterns.business_logic.deployments import FraudModel
from patterns.business_logic.flow import MIN_AMOUNT_EUR, ScoreRequest
from patterns.business_logic.settings import BusinessSettings, load_api_keys


# ------------------------------------------------------------------------------ ingress
def _this_replica() -> Any:
    """The ingress instance serving this request (Serve passes the same object to the routes
    as ``self``). Replica state (keys, scorer) lives on it, never in module globals: Serve
    pickles the ingress class by value, so module state its code reads would be a copy."""
    return serve.get_replica_context().servable_object


def _api_keys() -> list[str]:
    return _this_replica().api_keys


def _keys_required() -> bool:
    """This replica's policy; outside a replica (the document built in a test), the
    environment's."""
    try:
        return bool(_this_replica().keys_required)
    except Exception:  # not in a replica
        return keys_required(BusinessSettings().require_keys)


def _health() -> dict[str, Any]:
    return _this_replica().scorer.health()


api = FastAPI(
    title="Fraud check",
    description="Scores a card payment from customer records, precomputed features and an "
    "outside risk signal; business rules turn the score into approve, review or decline.",
)
install_ingress(api, app_name="business_logic", max_body_bytes=MAX_BODY_BYTES, health=_health)
require_key = api_key_auth(
    _api_keys,
    required=_keys_required,
    description="Needed in production (BUSINESS_API_KEYS); development leaves /score open.",
)
document_replica(api, keys_required=_keys_required)


# I/O-bound: a replica mostly waits on the database, the store and the risk API, so it holds
# many requests at once and scales on a high in-flight target.
@serve.deployment(
    max_surge_percent=SURGE,
    max_ongoing_requests=128,
    autoscaling_config={
        "min_replicas": 2,  # one lost ingress never takes the route away (reliability/)
        "max_replicas": 4,
        "target_ongoing_requests": 32,
        "upscale_delay_s": 5,
        "downscale_delay_s": 60,
    },
)
@serve.ingress(api)
class BusinessIngress:
    """I/O-bound: mostly waits on the database, the store and the risk service, so one replica
    holds many requests in flight; the model's CPU work happens in FraudModel."""

    def __init__(self, model: DeploymentHandle, args: dict[str, Any]) -> None:
        self.args = BusinessArgs(**args)
        self.model = model
        self.scorer = build_scorer(self.args, self._call_model)
        self.api_keys = load_api_keys()  # refuses placeholder keys in production
        self.keys_required = keys_required(BusinessSettings().require_keys)
        # One call to the model through the handle, without the request deadline (a test may
        # set one no call can meet; readiness is about the handle, not the deadline).
        self.readiness = Readiness("business_logic", lambda: self.model.info.remote())

    async def check_health(self) -> None:
        """Healthy once the fraud model (GET /model) answered for real
        (core/readiness.py)."""
        await self.readiness.wait()

    @staticmethod
    async def _await(response: Any) -> Any:
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()  # the caller's deadline passed: do not leave work queued
            raise

    async def _call_model(self, row: list[float]) -> tuple[float, str]:
        # Scoring is pure: a call lost with its replica goes to the other one.
        out = await call_surviving_replica(lambda: self._await(self.model.score.remote(row)))
        return out["score"], out["version"]

    @api.post(
        "/score",
        summary="Check one card payment: approve, review or decline",
        description="Beyond the schema, two checks need the records: the currency must have "
        "an exchange rate on file, and the amount must come to at least "
        f"{MIN_AMOUNT_EUR} EUR once converted (either: 422). An unknown customer or merchant "
        "is a 404; an Idempotency-Key reused for another payment, a 409.",
        responses=error_responses(*JSON_BODY, *KEYED, 404, 409, 503),
    )
    async def score(
        self,
        body: ScoreRequest,
        request: Request,
        key_id: str = Depends(require_key),
        idempotency_key: IdempotencyKey = None,
    ) -> dict[str, Any]:
        # Writes the decision: a repeat with the same Idempotency-Key gets the first answer.
        return await self.scorer.score(body, request_id_of(request), idempotency_key)

    @api.get(
        "/model",
        summary="Model version, device and held-out quality; dependency state",
        openapi_extra=IDEMPOTENT,
        responses=error_responses(503),
    )
    async def model_info(self) -> dict[str, Any]:
        timeout_s = self.args.model_timeout_s
        try:
            info = await asyncio.wait_for(self._await(self.model.info.remote()), timeout_s)
        except TimeoutError as exc:
            raise ServiceUnavailable(
                f"The fraud model did not answer within {timeout_s:g}s; retry shortly."
            ) from exc
        except Exception as exc:  # a dead replica: the same outage the scorer reports
            why = describe_error(exc).removeprefix("error: ")
            raise ServiceUnavailable(
                f"The fraud model did not answer ({why}); retry shortly."
            ) from exc
        return {"model": info, **self.scorer.health()}

    async def score_payload(self, payload: dict[str, Any], request_id: str = "-") -> dict[str, Any]:
        """The same check for DeploymentHandle callers (other apps, the benchmark)."""
        return await self.scorer.score(ScoreRequest(**payload), request_id)


# ------------------------------------------------------------------------------ builder
def build_app(args: BusinessArgs | dict[str, Any] | None = None) -> Application:
    args = coerce_args(args, BusinessArgs)
    model = FraudModel.options(
        ray_actor_options=resolve_actor_options(args.model_resources, "business_logic/model")
    ).bind(args.model_version, args.model_store_uri)
    ingress = BusinessIngress.options(
        ray_actor_options=resolve_actor_options(args.ingress_resources, "business_logic/ingress")
    )
    return ingress.bind(model, args.model_dump())


__getattr__ = default_app(lambda: build_app(BusinessArgs()))

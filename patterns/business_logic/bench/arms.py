"""The fraud check as a monolith and as microservices: plain FastAPI under uvicorn, no Ray.

The load study's other two arms beside the Serve app. Each serves the Serve app's contract:
``POST /business/score`` with the same body (``client.sample_request``), the same answer, the
same 4xx sentences and the same failure policy, because each runs the pattern's own pieces
(``ScoreRequest``, ``Scorer`` built by ``args.build_scorer``, the key policy of
``settings.py``, ``core.ingress``'s edge); only where the model runs differs. Each arm is built
the way its own users would build it:

- ``monolith_app``: one process does everything; the model is loaded in every worker and
  scores one row per request in the worker's thread pool (sync CPU work off the event loop).
  Run it with ``--workers`` = cores.
- ``model_service_app``: the model as its own service, ``POST /predict`` with a batch of
  rows (``{"rows": [[12 floats], ...]}`` -> ``{"scores": [...], "model": {...}}``), scored in
  the thread pool. ``gateway_app``: the I/O-bound ingress (database, feature store, risk API)
  calling it over one keep-alive ``httpx.AsyncClient`` per worker, one row per request (what
  a service-to-service call looks like without a batching layer in between).

By hand (after ``python -m patterns.business_logic.artifacts``, with
``python -m patterns.business_logic.risk_service`` running)::

    uvicorn --factory patterns.business_logic.bench.arms:monolith_app --workers 2 --port 8201

    uvicorn --factory patterns.business_logic.bench.arms:model_service_app --port 8202 &
    BUSINESS_MODEL_SERVICE_URL=http://127.0.0.1:8202 \\
      uvicorn --factory patterns.business_logic.bench.arms:gateway_app --port 8201

``commands(port, cpus, arch, env)`` gives those command lines for a CPU budget (the load
study starts them). Environment, read in each worker:

- ``BUSINESS_DATABASE_URL``, ``BUSINESS_FEATURE_STORE_URL``, ``BUSINESS_RISK_SERVICE_URL``:
  the dependencies, as the Serve app reads them (settings.py; default: the SQLite files under
  artifacts/business_logic/ and 127.0.0.1:8701);
- ``BUSINESS_API_KEYS``, ``BUSINESS_REQUIRE_KEYS``: the same key policy as the Serve app;
- ``COOKBOOK_MODEL_STORE_URI``: where the model is loaded from (monolith, model service);
- ``BUSINESS_MODEL_SERVICE_URL``: the model service, for the gateway (required there);
- ``BUSINESS_ARGS``: optional JSON of ``BusinessArgs`` fields (the ``args:`` block of
  config.yaml, whose values are the defaults), e.g. ``{"risk": {"timeout_s": 1.0}}``.

Routes: ``POST /business/score`` and ``GET /healthz`` (dependency state, as the Serve app's).
"""

import json
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from core.ingress import IdempotencyKey, api_key_auth, install_ingress, request_id_of
from core.settings import keys_required
from patterns.business_logic.args import MAX_BODY_BYTES, BusinessArgs, build_scorer
from patterns.business_logic.flow import Scorer, ScoreRequest
from patterns.business_logic.model import MODEL_INPUTS, MODEL_NAME
from patterns.business_logic.settings import BusinessSettings, load_api_keys

ARCHS = ("monolith", "microservices")
MODEL_SERVICE_URL_ENV = "BUSINESS_MODEL_SERVICE_URL"
ARGS_ENV = "BUSINESS_ARGS"
FACTORIES = "patterns.business_logic.bench.arms"
# How many rows may one /predict call carry? The Serve deployment batches up to 16; a caller
# batching more than this is sending a bulk job, not a payment check.
MAX_PREDICT_ROWS = 256


def business_args() -> BusinessArgs:
    """The defaults (equal to config.yaml), with ``BUSINESS_ARGS`` (JSON) over them."""
    raw = os.environ.get(ARGS_ENV, "").strip()
    return BusinessArgs(**json.loads(raw)) if raw else BusinessArgs()


class FraudPredictor:
    """The fraud model from the store; ``predict`` is sync CPU work (call it off the loop)."""

    def __init__(self, version: str, store_uri: str | None = None) -> None:
        from core.model_store import ModelStore

        self.model, self.ref = ModelStore.open(store_uri).load_sklearn(MODEL_NAME, version)
        self.version = self.ref.version

    def predict(self, rows: list[list[float]]) -> list[float]:
        import numpy as np

        proba = self.model.predict_proba(np.asarray(rows, dtype=np.float64))[:, 1]
        return [float(p) for p in proba]


# ---------------------------------------------------------------------------- the ingress
def _ingress(title: str, app_name: str, open_model: Any) -> FastAPI:
    """An app with the Serve ingress's /business/score route over a ``Scorer``.

    ``open_model(args)`` is an async context manager yielding the scorer's ``model_call``;
    it runs in the worker's lifespan, so each worker loads or connects on its own loop."""
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        args = business_args()
        state["api_keys"] = load_api_keys()  # refuses placeholder keys in production
        state["keys_required"] = keys_required(BusinessSettings().require_keys)
        async with open_model(args) as model_call:
            scorer: Scorer = build_scorer(args, model_call)
            state["scorer"] = scorer
            try:
                yield
            finally:
                await scorer.risk.close()
                await scorer.features.close()
                scorer.records.close()

    api = FastAPI(title=title, lifespan=lifespan)
    install_ingress(
        api,
        app_name=app_name,
        max_body_bytes=MAX_BODY_BYTES,
        health=lambda: state["scorer"].health(),
    )
    require_key = api_key_auth(
        lambda: state["api_keys"],
        required=lambda: state["keys_required"],
        description="Needed in production (BUSINESS_API_KEYS); development leaves /score open.",
    )

    @api.post("/business/score", summary="Check one card payment: approve, review or decline")
    async def score(
        body: ScoreRequest,
        request: Request,
        key_id: str = Depends(require_key),
        idempotency_key: IdempotencyKey = None,
    ) -> dict[str, Any]:
        return await state["scorer"].score(body, request_id_of(request), idempotency_key)

    return api


# ---------------------------------------------------------------------------- monolith
@asynccontextmanager
async def in_process_model(args: BusinessArgs) -> AsyncIterator[Any]:
    predictor = FraudPredictor(args.model_version, args.model_store_uri)

    async def call_model(row: list[float]) -> tuple[float, str]:
        # predict_proba holds the worker's CPU: in the thread pool, the event loop keeps
        # reading the database and the risk API for the other requests meanwhile
        (score,) = await run_in_threadpool(predictor.predict, [row])
        return score, predictor.version

    yield call_model


def monolith_app() -> FastAPI:
    """Everything in each uvicorn worker; run it with ``--workers`` = cores."""
    return _ingress("Fraud check (monolith)", "business-monolith", in_process_model)


# ---------------------------------------------------------------------------- microservices
Row = Annotated[
    list[Annotated[float, Field(allow_inf_nan=False)]],
    Field(min_length=len(MODEL_INPUTS), max_length=len(MODEL_INPUTS)),
]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rows: list[Row] = Field(
        min_length=1,
        max_length=MAX_PREDICT_ROWS,
        description=f"Model inputs, one row each, in the order of model.MODEL_INPUTS "
        f"({len(MODEL_INPUTS)} numbers).",
    )


def model_service_app() -> FastAPI:
    """The fraud model as its own HTTP service: ``POST /predict``, a batch of rows."""
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        args = business_args()
        state["predictor"] = FraudPredictor(args.model_version, args.model_store_uri)
        yield

    api = FastAPI(title="Fraud model service", lifespan=lifespan)
    install_ingress(
        api,
        app_name="business-model",
        max_body_bytes=MAX_PREDICT_ROWS * len(MODEL_INPUTS) * 32,
        health=lambda: {"model": {"name": MODEL_NAME, "version": state["predictor"].version}},
    )

    # A plain def: FastAPI runs it in the thread pool, off the event loop.
    @api.post("/predict", summary="Fraud probability of each row")
    def predict(body: PredictRequest) -> dict[str, Any]:
        predictor: FraudPredictor = state["predictor"]
        return {
            "scores": predictor.predict(body.rows),
            "model": {"name": MODEL_NAME, "version": predictor.version},
        }

    return api


@asynccontextmanager
async def _model_over_http(args: BusinessArgs) -> AsyncIterator[Any]:
    import httpx

    base = os.environ.get(MODEL_SERVICE_URL_ENV, "").rstrip("/")
    if not base:
        raise SystemExit(f"set {MODEL_SERVICE_URL_ENV} to the model service, e.g. http://host:8202")
    url = f"{base}/predict"
    # One client per worker: its connections stay open between requests (keep-alive).
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=args.model_timeout_s, limits=limits) as client:

        async def call_model(row: list[float]) -> tuple[float, str]:
            # any failure here (refused, 5xx, timeout) is the Scorer's 503 "model outage"
            r = await client.post(url, json={"rows": [row]})
            r.raise_for_status()
            out = r.json()
            return float(out["scores"][0]), str(out["model"]["version"])

        yield call_model


def gateway_app() -> FastAPI:
    """The I/O-bound ingress; the model is the service at ``BUSINESS_MODEL_SERVICE_URL``."""
    return _ingress("Fraud check (microservices gateway)", "business-gateway", _model_over_http)


# ---------------------------------------------------------------------------- launcher
# What share of the cores goes to the model service? Sized to where the CPU goes, as a team
# would size its deployments: per request the gateway (SQL, JSON, three HTTP calls) spends
# several times the model service's CPU (README, "Monolith and microservices arms").
MODEL_CPU_SHARE = 0.2


def microservice_sizes(cpus: int) -> dict[str, int]:
    """Workers per service for a budget of ``cpus`` cores: the model service its share (at
    least one), the gateway the rest (at least one; with one core the two share it)."""
    model = max(1, round(cpus * MODEL_CPU_SHARE))
    return {"model": model, "gateway": max(1, cpus - model)}


def _uvicorn(factory: str, port: int, workers: int) -> list[str]:
    from cluster.local import uvicorn_command

    return uvicorn_command(f"{FACTORIES}:{factory}", port, workers)


def commands(
    port: int,
    cpus: int,
    arch: str,
    env: Mapping[str, str],
    *,
    sizes: Mapping[str, int] | None = None,
    model_port: int | None = None,
) -> list[tuple[list[str], dict[str, str]]]:
    """The uvicorn command lines (and the environment of each) for ``arch`` on ``port``.

    monolith: one uvicorn with ``cpus`` workers. microservices: the model service on
    ``model_port`` (a free port if None), then the gateway on ``port`` pointed at it; workers
    per ``sizes`` (``{"model": m, "gateway": g}``, default ``microservice_sizes(cpus)``).
    Start them in order, from the repository root. ``env`` is passed through (the database,
    feature store and risk service URLs); one OpenMP thread per process unless it says
    otherwise, since the budget is counted in processes.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; one of {ARCHS}")
    if cpus < 1:
        raise ValueError(f"cpus must be at least 1, not {cpus}")
    base = {"OMP_NUM_THREADS": "1", **env}
    if arch == "monolith":
        return [(_uvicorn("monolith_app", port, cpus), base)]
    if model_port is None:
        from cluster.ports import free_port

        model_port = free_port()
    size = {**microservice_sizes(cpus), **(sizes or {})}
    gateway_env = {**base, MODEL_SERVICE_URL_ENV: f"http://127.0.0.1:{model_port}"}
    return [
        (_uvicorn("model_service_app", model_port, size["model"]), base),
        (_uvicorn("gateway_app", port, size["gateway"]), gateway_env),
    ]

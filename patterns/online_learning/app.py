"""Online learning on Ray Serve: feedback streams into a durable log, a trainer learns from it
in mini-batches, a gate decides what goes live, and running replicas switch weights without
a restart. Plus a contextual bandit that learns from rewards.

    client -> OnlineIngress (FastAPI, N replicas, each serves the champion from the pointer)
     | POST /predict   -> champion.predict -> record (id -> features, version)      [log DB]
     | POST /feedback  -> join the record -> append to the durable log -> 202 ack   [log DB]
     |                                          |
     |                    OnlineTrainer (1 replica, loop in a thread)  <-- read mini-batches
     |                      partial_fit -> save version + offsets (model store, skops)
     |                      gate on held-out window -> champion pointer [log DB]
     |                      -> broadcast("reload") to every OnlineIngress replica
     | POST /bandit/choose -> BanditPolicy (1 replica, linear Thompson sampling)
     | POST /bandit/reward -> append to the rewards log -> BanditPolicy learns, saves safetensors

Run: ``make setup`` then ``serve run patterns.online_learning.app:app``. Knobs: config.yaml.
"""

# No `from __future__ import annotations` here: Serve's class-based FastAPI views need real
# annotations (with string annotations `self` becomes a required query parameter).
import asyncio
import os
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Response, Security
from fastapi.security import APIKeyHeader
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from core.apps import SURGE, coerce_args, default_app
from core.ingress import IDEMPOTENT, api_key_auth, install_ingress
from core.openapi import JSON_BODY, KEYED, document_replica, error_responses, schema_property
from core.readiness import Readiness
from core.resources import resolve_actor_options
from core.settings import keys_required
from patterns.online_learning.deployments import INGRESS_DEPLOYMENT, BanditPolicy, OnlineTrainer
from patterns.online_learning.flow import OnlineArgs, OnlineService, Remote
from patterns.online_learning.schemas import (
    CHOICE_LINKS,
    ID_PATTERN,
    PREDICT_LINKS,
    ChooseRequest,
    FeedbackBatch,
    FeedbackEvent,
    IdempotencyKey,
    PredictRequest,
    RewardRequest,
    RollbackRequest,
)
from patterns.online_learning.settings import OnlineSettings, load_admin_keys, load_client_keys


# ------------------------------------------------------------------------------ ingress
def _this_replica() -> Any:
    """The ingress instance serving this request (Serve passes the same object to the routes
    as ``self``). Replica state lives on it, never in module globals: Serve pickles the
    ingress class by value, so module state its code reads would be a copy."""
    return serve.get_replica_context().servable_object


def _keys_required() -> bool:
    """This replica's policy; outside a replica (the document built in a test), the
    environment's."""
    try:
        return bool(_this_replica().keys_required)
    except Exception:  # not in a replica
        return keys_required(OnlineSettings().require_keys)


def _document(doc: dict[str, Any]) -> None:
    """The limits this replica's args set, in the schema it serves (the routes check them)."""
    try:
        args = _this_replica().args
    except Exception:  # not in a replica: the defaults
        args = OnlineArgs()
    schema_property(doc, "PredictRequest", "instances")["maxItems"] = args.max_rows
    dim = args.bandit.params.context_dim
    schema_property(doc, "ChooseRequest", "context").update(minItems=dim, maxItems=dim)


def _health() -> dict[str, Any]:
    return _this_replica().flow.health()


api = FastAPI(
    title="Online learning",
    description="Predictions from a model that keeps learning from feedback: a durable log, "
    "a trainer, a promotion gate, live weights without a restart, and a contextual bandit.",
)
install_ingress(api, app_name="online_learning", max_body_bytes=512_000, health=_health)
# One key header, two kinds of key (settings.py): the scheme is declared once, the checks
# compare against the admin or the client keys.
_key_header = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    description="Admin key (rollback) or client key (feedback, rewards); required in "
    "production, open in development unless ONLINE_REQUIRE_KEYS=true.",
)
_admin_check = api_key_auth(lambda: _this_replica().admin_keys, required=_keys_required)
_client_check = api_key_auth(lambda: _this_replica().client_keys, required=_keys_required)


async def require_admin(presented: str | None = Security(_key_header)) -> str:
    return await _admin_check(presented)


async def require_client(presented: str | None = Security(_key_header)) -> str:
    return await _client_check(presented)


document_replica(api, _document, keys_required=_keys_required)
# A feedback or reward write: a repeat gets the first answer (200); unknown (404) or expired
# (410) id, a reused key or event id with another body (409), a client over its rate (429),
# the log or trainer behind (503); a missing (401) or wrong (403) client key where keys are
# required.
FEEDBACK_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "A repeat of an event already logged: the first answer"},
    **error_responses(*JSON_BODY, *KEYED, 404, 409, 410, 429, 503),
}


def _remote(handle: DeploymentHandle) -> Remote:
    """The flow's view of a deployment: ``(method, *args)`` -> that method's response."""
    return lambda method, *args: getattr(handle, method).remote(*args)


@serve.deployment(
    max_surge_percent=SURGE,
    max_ongoing_requests=64,
    max_queued_requests=256,  # beyond this the caller gets a 503 at once, not a growing queue
    # Cheap per request (a linear model, a log append): scale on many requests in flight.
    autoscaling_config={
        "min_replicas": 2,  # one lost ingress never takes the route away (reliability/)
        "max_replicas": 4,
        "target_ongoing_requests": 16,
        "upscale_delay_s": 5,
        "downscale_delay_s": 60,
    },
)
@serve.ingress(api)
class OnlineIngress:
    def __init__(
        self, trainer: DeploymentHandle, bandit: DeploymentHandle, args: dict[str, Any]
    ) -> None:
        self.args = OnlineArgs(**args)
        self.flow = OnlineService.from_args(self.args, _remote(trainer), _remote(bandit))
        self.live = self.flow.live
        self.admin_keys = load_admin_keys()  # placeholders refused in production
        self.client_keys = load_client_keys()
        self.keys_required = keys_required(OnlineSettings().require_keys)
        self.readiness = Readiness("online_learning", self.model)

    async def check_health(self) -> None:
        """Healthy once the trainer and the served model (GET /model) answered for real
        (core/readiness.py)."""
        await self.readiness.wait()

    def __del__(self) -> None:
        self.live.stop()

    # -- control plane (DeploymentHandle callers) -------------------------------------------
    async def reload(self, version: str) -> str:
        """The trainer's nudge (``broadcast``): load ``version`` now."""
        return await asyncio.to_thread(self.live.switch, version)

    def served_version(self) -> dict[str, Any]:
        return {"version": self.live.version, "switches": self.live.switches, "pid": os.getpid()}

    # -- routes ------------------------------------------------------------------------------
    # Repeats are harmless (a second prediction record that expires unused): the edge may retry.
    @api.post(
        "/predict",
        summary="Classify rows with the live champion",
        openapi_extra=IDEMPOTENT,
        responses={**PREDICT_LINKS, **error_responses(*JSON_BODY, 404, 503)},
    )
    async def predict(self, body: PredictRequest) -> dict[str, Any]:
        return await self.flow.predict(body.instances, body.version)

    @api.post(
        "/feedback",
        status_code=202,
        summary="The true label for one prediction",
        responses=FEEDBACK_RESPONSES,
    )
    async def feedback(
        self,
        body: FeedbackEvent,
        response: Response,
        x_client_id: Annotated[str | None, Header(pattern=ID_PATTERN)] = None,
        idempotency_key: IdempotencyKey = None,
        key_id: str = Depends(require_client),
    ) -> dict[str, Any]:
        client = body.client_id or x_client_id
        status, acks = await self.flow.feedback([body], client, idempotency_key)
        response.status_code = status
        return acks[0]

    @api.post(
        "/feedback/batch",
        status_code=202,
        summary="True labels for many predictions",
        responses=FEEDBACK_RESPONSES,
    )
    async def feedback_batch(
        self,
        body: FeedbackBatch,
        response: Response,
        x_client_id: Annotated[str | None, Header(pattern=ID_PATTERN)] = None,
        idempotency_key: IdempotencyKey = None,
        key_id: str = Depends(require_client),
    ) -> dict[str, Any]:
        client = body.client_id or x_client_id
        status, acks = await self.flow.feedback(body.events, client, idempotency_key)
        response.status_code = status
        return {"acks": acks}

    @api.get(
        "/model",
        summary="Champion, metrics history and consumed offsets",
        openapi_extra=IDEMPOTENT,
        responses=error_responses(503),
    )
    async def model(self) -> dict[str, Any]:
        return await self.flow.model_status()

    @api.post(
        "/rollback",
        summary="Put an earlier champion back live (admin key)",
        responses=error_responses(*JSON_BODY, *KEYED, 404, 409, 503),
    )
    async def rollback(
        self, body: RollbackRequest, key_id: str = Depends(require_admin)
    ) -> dict[str, Any]:
        out = await self.flow.rollback(body.to_version, body.reason)
        return {**out, "by": key_id}

    # A repeat is harmless (another choice record, expiring unused): the edge may retry it.
    @api.post(
        "/bandit/choose",
        summary="Pick an action for this context",
        openapi_extra=IDEMPOTENT,
        responses={**CHOICE_LINKS, **error_responses(*JSON_BODY, 503)},
    )
    async def bandit_choose(self, body: ChooseRequest) -> dict[str, Any]:
        return await self.flow.choose(body.context)

    @api.post(
        "/bandit/reward",
        status_code=202,
        summary="The reward a choice earned",
        responses=FEEDBACK_RESPONSES,
    )
    async def bandit_reward(
        self,
        body: RewardRequest,
        response: Response,
        x_client_id: Annotated[str | None, Header(pattern=ID_PATTERN)] = None,
        idempotency_key: IdempotencyKey = None,
        key_id: str = Depends(require_client),
    ) -> dict[str, Any]:
        client = body.client_id or x_client_id
        status, ack = await self.flow.reward(
            body.event_id, body.choice_id, body.reward, client, idempotency_key
        )
        response.status_code = status
        return ack

    @api.get(
        "/bandit",
        summary="The bandit's plays, rewards and saved version",
        openapi_extra=IDEMPOTENT,
        responses=error_responses(503),
    )
    async def bandit_state(self) -> dict[str, Any]:
        return await self.flow.bandit_state()


# ------------------------------------------------------------------------------ builder
def build_app(args: OnlineArgs | dict[str, Any] | None = None) -> Application:
    args = coerce_args(args, OnlineArgs).placed_by_the_log()  # SQLite: on the head node
    log_url = args.log_url  # None: each replica reads ONLINE_LOG_URL (secrets stay there)
    store_uri = args.model_store_uri
    trainer = OnlineTrainer.options(
        ray_actor_options=resolve_actor_options(args.trainer_resources, "online/trainer")
    ).bind(args.trainer.model_dump(), log_url, store_uri)
    bandit = BanditPolicy.options(
        ray_actor_options=resolve_actor_options(args.bandit.resources, "online/bandit")
    ).bind(args.bandit.params.model_dump(), log_url, store_uri, args.bandit.save_every_s)
    ingress = OnlineIngress.options(
        name=INGRESS_DEPLOYMENT,
        ray_actor_options=resolve_actor_options(args.ingress_resources, "online/ingress"),
    )
    if args.ingress_replicas is not None:
        ingress = ingress.options(num_replicas=args.ingress_replicas, autoscaling_config=None)
    return ingress.bind(trainer, bandit, args.model_dump())


__getattr__ = default_app(lambda: build_app(OnlineArgs()))

"""Voting ensemble on Ray Serve: each member its own deployment, the ingress fans out and votes.

    client -> EnsembleIngress (FastAPI) --+--> member_logreg (scikit-learn)  -+
                 |   cascade gate ------'                                      |
                 |   fan-out, deadline + quorum --> member_xgb (XGBoost)   ---+--> vote
                 |                              --> member_mlp (PyTorch)   ---+
                 +--(copy, not awaited)--> challenger_xgb_v2 --> ShadowRecorder

This module wires the deployments and maps routes to the request flow (``VotingEnsemble`` in
flow.py, next to the args it is built from, ``EnsembleArgs``). Run: ``serve run
patterns.ensemble.app:app`` (after ``python -m patterns.ensemble.artifacts``). Knobs:
config.yaml, equal to ``EnsembleArgs``' defaults.
"""

# No `from __future__ import annotations` here: Serve's class-based FastAPI views need real
# annotations (with string annotations `self` becomes a required query parameter).
from typing import Any

from fastapi import Depends, FastAPI, Request, Response, Security
from fastapi.security import APIKeyHeader
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from core.apps import SURGE, coerce_args, default_app
from core.ingress import IDEMPOTENT, api_key_auth, install_ingress, request_id_of
from core.openapi import JSON_BODY, KEYED, document_replica, error_responses, schema_property
from core.readiness import Readiness
from core.resources import resolve_actor_options, wants_gpu
from patterns.ensemble import ensemble_pb2, grpc_service
from patterns.ensemble.artifacts import stored_report
from patterns.ensemble.data import CLASS_NAMES, N_FEATURES, feature_names
from patterns.ensemble.deployments import EnsembleMember
from patterns.ensemble.flow import EnsembleArgs, FeedbackRequest, PredictRequest, VotingEnsemble
from patterns.ensemble.members import MemberSpec
from patterns.ensemble.settings import KEY_HEADER, Access, load_access
from patterns.ensemble.shadow import ShadowRecorder

# The challenger is off the request path: its batches may wait longer to fill.
CHALLENGER_BATCHING = {"max_batch_size": 32, "batch_wait_timeout_s": 0.01}


# ------------------------------------------------------------------------------ routes
api = FastAPI(
    title="Ensemble",
    description="Voting ensemble over scikit-learn, XGBoost and PyTorch members, with a "
    "deadline and quorum, a confidence cascade and a shadow challenger. Keys: feedback needs "
    "a client key and promote/rollback an admin key in production; development leaves them "
    "open (ENSEMBLE_REQUIRE_KEYS=true asks for them there too).",
)
install_ingress(api, app_name="ensemble", max_body_bytes=256_000)


# ------------------------------------------------------------------------------ keys
def _replica() -> Any | None:
    """The ingress serving this request (Serve passes the same object to the routes as
    ``self``), or None outside a replica. Its state stays on it, never in a module global:
    Serve ships the ingress class by value, so module state would be a copy."""
    try:
        return serve.get_replica_context().servable_object
    except Exception:  # not in a replica: the OpenAPI document built in a test or a script
        return None


def _access() -> Access:
    """The access policy of this replica (loaded in its ``__init__``)."""
    replica = _replica()
    return replica.access if replica is not None else load_access()


def _document(doc: dict[str, Any]) -> None:
    """The limits this replica's args set, in the schema it serves."""
    replica = _replica()
    # the flow enforces both (max_instances: 413 above it; max_abs_feature: 422)
    limits = replica.ensemble if replica is not None else EnsembleArgs()
    rows = schema_property(doc, "PredictRequest", "instances")
    rows["maxItems"] = limits.max_instances
    bound = limits.max_abs_feature
    rows["items"]["items"].update(minimum=-bound, maximum=bound)
    schema_property(doc, "FeedbackRequest", "labels")["maxItems"] = limits.max_instances


def _admin_keys() -> tuple[str, ...]:
    return _access().admin_keys


def _client_keys() -> tuple[str, ...]:
    return _access().client_keys


_key_header = APIKeyHeader(
    name=KEY_HEADER,
    auto_error=False,
    description="Admin key (promote, rollback) or client key (feedback); required in production.",
)
_admin_check = api_key_auth(_admin_keys, header=KEY_HEADER)
_client_check = api_key_auth(_client_keys, header=KEY_HEADER)
document_replica(api, _document, keys_required=lambda: _access().required)


async def require_admin(presented: str | None = Security(_key_header)) -> str:
    """401 without a key, 403 with any key that is not an admin key (a client key included);
    passes everyone while the development profile keeps the routes open."""
    return await _admin_check(presented) if _access().required else "open"


async def require_client(presented: str | None = Security(_key_header)) -> str:
    """The same for client keys (feedback)."""
    return await _client_check(presented) if _access().required else "open"


# I/O-bound (fan out and wait): many requests in flight per replica are cheap.
@serve.deployment(
    max_surge_percent=SURGE,
    max_ongoing_requests=200,
    # Two at least: one lost ingress never takes the app's route away (reliability/).
    autoscaling_config={"min_replicas": 2, "max_replicas": 3, "target_ongoing_requests": 50},
)
@serve.ingress(api)
class EnsembleIngress:
    def __init__(
        self,
        members: dict[str, DeploymentHandle],
        challenger: DeploymentHandle | None,
        recorder: DeploymentHandle,
        args: dict[str, Any],
    ) -> None:
        parsed = EnsembleArgs(**args)
        self.access = load_access()  # placeholder keys refused in production
        self.access.announce()  # open (development) or which keys, in the replica's log
        self.ensemble = VotingEnsemble.from_args(
            parsed, members, challenger, recorder, stored_report(parsed.model_store_uri)
        )
        self.readiness = Readiness("ensemble", self.model)

    async def check_health(self) -> None:
        """Healthy once every member (GET /model) answered for real
        (core/readiness.py)."""
        await self.readiness.wait()

    @api.post(
        "/predict",
        summary="Vote on one or more rows",
        openapi_extra=IDEMPOTENT,
        responses={
            # OpenAPI link: the prediction's id is what its feedback names (clients and
            # schemathesis's stateful phase follow it)
            200: {
                "links": {
                    "FeedbackForThePrediction": {
                        "operationId": "feedback_feedback_post",
                        "requestBody": {"prediction_id": "$response.body#/prediction_id"},
                    }
                }
            },
            **error_responses(*JSON_BODY, 503),
        },
    )
    async def predict(self, body: PredictRequest, request: Request) -> dict[str, Any]:
        return await self.ensemble.predict(body.instances, request_id_of(request))

    # Named like the RPC: Serve's gRPC proxy calls the ingress method by the RPC's name.
    async def Predict(
        self, request: ensemble_pb2.PredictRequest, grpc_context: Any
    ) -> ensemble_pb2.PredictReply:
        """gRPC ``EnsembleService.Predict`` (ensemble.proto, ``grpc_options`` in config.yaml):
        the same flow; refusals are status codes (``grpc_context`` is Serve's
        ``RayServegRPCContext``, passed because of the parameter's name)."""
        return await grpc_service.predict(
            self.ensemble, request, grpc_context, grpc_service.serve_request_id()
        )

    @api.get(
        "/schema",
        summary="The feature order a row must follow",
        responses=error_responses(503),
    )
    async def schema(self) -> dict[str, Any]:
        return {
            "n_features": N_FEATURES,
            "features": list(feature_names()),
            "classes": CLASS_NAMES,
            "max_abs_feature": self.ensemble.max_abs_feature,
        }

    @api.get(
        "/model",
        summary="Roster, versions, devices, held-out accuracy, challenger",
        responses=error_responses(503),
    )
    async def model(self) -> dict[str, Any]:
        return await self.ensemble.model()

    @api.post(
        "/feedback",
        summary="Ground-truth labels for an earlier prediction",
        responses={
            202: {"description": "Labels held until their prediction is recorded"},
            **error_responses(*JSON_BODY, *KEYED, 404, 409, 503),
        },
    )
    async def feedback(
        self, body: FeedbackRequest, response: Response, key: str = Depends(require_client)
    ) -> dict[str, Any]:
        """200 when the labels were scored against a recorded prediction; 202 when the
        prediction is not recorded yet (its shadow copy is still in flight, or the id is
        unknown): the labels are held and scored when it arrives (the last 1,000 such ids are
        kept). 409 while the challenger is promoted: it is no longer shadowed, so there is
        nothing to score new labels against. Needs a client key in production."""
        out = await self.ensemble.feedback(body.prediction_id, list(body.labels))
        if out["status"] == "held":
            response.status_code = 202
        return out

    @api.get(
        "/challenger",
        summary="Shadow evidence and the promotion gate",
        responses=error_responses(503),
    )
    async def challenger_stats(self) -> dict[str, Any]:
        return await self.ensemble.challenger_stats()

    @api.post(
        "/challenger/promote",
        summary="Make the challenger a voter if the gate passes (admin key)",
        responses=error_responses(*KEYED, 404, 409, 503),
    )
    async def promote(self, key: str = Depends(require_admin)) -> dict[str, Any]:
        return await self.ensemble.promote()

    @api.post(
        "/challenger/rollback",
        summary="Take the challenger back out of the vote (admin key)",
        responses=error_responses(*KEYED, 404, 409, 503),
    )
    async def rollback(self, key: str = Depends(require_admin)) -> dict[str, Any]:
        return await self.ensemble.rollback()


# ------------------------------------------------------------------------------ builder
def _member_app(spec: MemberSpec, store_uri: str | None, prefix: str, **options: Any) -> Any:
    actor = resolve_actor_options(spec.resources, f"ensemble/{spec.name}")
    deployment = EnsembleMember.options(
        name=f"{prefix}_{spec.name}", ray_actor_options=actor, **options
    )
    return deployment.bind(spec.model_dump(), store_uri, wants_gpu(actor))


def build_app(args: EnsembleArgs | dict[str, Any] | None = None) -> Application:
    """The ensemble app for ``args`` (None: the defaults, which config.yaml repeats)."""
    args = coerce_args(args, EnsembleArgs)
    args.check_roster()  # ValueError naming the clash before anything is bound
    store_uri = args.model_store_uri
    members = {m.name: _member_app(m, store_uri, "member") for m in args.members}
    ch = args.challenger.member
    challenger = None
    if ch is not None:
        challenger = _member_app(ch, store_uri, "challenger", user_config=CHALLENGER_BATCHING)
    recorder = ShadowRecorder.bind(
        args.challenger.gate.model_dump(), ch.name if ch else None, args.max_instances
    )
    ingress = EnsembleIngress.options(
        ray_actor_options=resolve_actor_options(args.ingress_resources, "ensemble/ingress")
    )
    return ingress.bind(members, challenger, recorder, args.model_dump())


__getattr__ = default_app(lambda: build_app(EnsembleArgs()))

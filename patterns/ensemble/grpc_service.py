"""The ensemble's ``Predict`` over gRPC: protobuf in, the same request flow as HTTP, protobuf out.

Serve's gRPC proxy (``grpc_options`` in config.yaml) decodes the request with the stubs in
``ensemble_pb2`` and calls the ingress method named like the RPC, ``EnsembleIngress.Predict``,
which hands it to ``predict`` here. Errors the flow raises for HTTP (``core.errors``) become
gRPC status codes with the same sentence, so a gRPC client sees ``INVALID_ARGUMENT`` where an
HTTP client sees 422 and ``UNAVAILABLE`` where it sees 503 (``predict`` says which of them
Serve's metrics count as errors). The context only needs
``set_code`` and ``set_details``: Serve's ``RayServegRPCContext`` in the app, a plain grpc
servicer context in the tests.
"""

from __future__ import annotations

import uuid
from typing import Any, Protocol

import grpc

from core.errors import HTTPError, Unprocessable
from patterns.ensemble import ensemble_pb2 as pb

# HTTP status of a core.errors exception -> the gRPC code that means the same to a client.
GRPC_CODE_FOR_HTTP = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.INVALID_ARGUMENT,  # too many rows: the request, not a quota
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


class StatusContext(Protocol):
    def set_code(self, code: grpc.StatusCode) -> None: ...
    def set_details(self, details: str) -> None: ...


def serve_request_id() -> str:
    """The id Serve gave this request (sent back to the client as the ``request_id`` trailing
    metadata, and used as the prediction id, as over HTTP). Serve has no public accessor for
    it in a gRPC call yet; outside a request a fresh id."""
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or uuid.uuid4().hex
    except Exception:
        return uuid.uuid4().hex


def grpc_code(http_status: int) -> grpc.StatusCode:
    return GRPC_CODE_FOR_HTTP.get(http_status, grpc.StatusCode.INTERNAL)


def rows_of(request: pb.PredictRequest) -> list[list[float]]:
    """The rows as the flow takes them (it checks their length and values)."""
    if not request.instances:
        raise Unprocessable("instances is empty; send at least one row of features.")
    return [list(row.features) for row in request.instances]


def reply_of(answer: dict[str, Any]) -> pb.PredictReply:
    """The flow's JSON answer as the protobuf reply (same fields, same values)."""
    members = answer["members"]
    return pb.PredictReply(
        prediction_id=answer["prediction_id"],
        predictions=[
            pb.Prediction(
                label=p["label"],
                class_name=p["class"],
                p_benign=p["p_benign"],
                decided_by=p["decided_by"],
                votes=p["votes"],
            )
            for p in answer["predictions"]
        ],
        voting=answer["voting"],
        members=pb.Members(
            counted=members["counted"],
            late=members["late"],
            failed=members["failed"],
            elapsed_ms=members["elapsed_ms"],
        ),
        degraded=answer["degraded"],
        model_versions=answer["model_versions"],
        challenger_name=answer["challenger"]["name"] or "",
        challenger_status=answer["challenger"]["status"],
        timings_ms=answer["timings_ms"],
    )


async def predict(
    ensemble: Any, request: pb.PredictRequest, context: StatusContext, prediction_id: str
) -> pb.PredictReply:
    """``ensemble.predict`` (a ``VotingEnsemble``) for a protobuf request. An error sets the
    status code and its sentence on ``context``; then

    - the caller's mistake (a 4xx: ``INVALID_ARGUMENT``, ...) returns an empty reply: Serve
      sends the code, nothing is logged (Serve 2.60 counts such a call as OK in
      ``ray_serve_num_grpc_error_requests_total``);
    - our failure (a 5xx: ``UNAVAILABLE`` when the quorum is lost) is raised again: Serve still
      sends the code set here, logs the failure and counts it as a gRPC error, like HTTP's 503.
    """
    try:
        answer = await ensemble.predict(rows_of(request), prediction_id)
    except HTTPError as exc:
        context.set_code(grpc_code(exc.status_code))
        context.set_details(exc.message)
        if exc.status_code >= 500:
            raise
        return pb.PredictReply()
    return reply_of(answer)

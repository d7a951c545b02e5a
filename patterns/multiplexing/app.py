"""Many tenants' models behind few replicas: per-store forecasters and per-tenant LLM adapters.

    POST /multiplex/models/{id}/predict | /multiplex/predict (serve_multiplexed_model_id header)
    POST /multiplex/v1/chat/completions {"model": "<tenant>", "stream": true, ...}
                                  |
        MultiplexIngress (FastAPI routes) -> MultiplexFlow (flow.py, no Serve in it):
             |  id checked (422) -> index lookup (404, no storage read)
             |  hot ids -> "<id>#<slot>" so a hot tenant lives on several replicas
             |  handle.options(multiplexed_model_id=...)   (works in HAProxy mode too)
             v                                          v
        ForecastModels x2                         ChatModel x1 (GPU fraction or CPU)
          @serve.batch split by model id            base LLM once, LoRA adapter per tenant
          ModelCache: one load per id, parallel     requests decoded together (batching.py),
          loads, LRU by count and bytes, prewarm    streamed; disconnect: the row leaves
             model store: forecast-store-0001/v1 ... + forecast-index/v1,
                          chat-adapter-<tenant>/v1 + chat-adapter-index/v1

This module declares the args, wires the deployments and maps routes (headers, the streamed
response) onto the flow. Run: ``serve run patterns.multiplexing.app:app`` (after ``make
setup``). Knobs: config.yaml.
"""

# No `from __future__ import annotations` here: Serve's class-based FastAPI views need real
# annotations (with string annotations `self` becomes a required query parameter).
from typing import Annotated, Any

from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from core.apps import SURGE, coerce_args, default_app
from core.ingress import IDEMPOTENT, install_ingress
from core.model_store import ModelStore
from core.openapi import JSON_BODY, error_responses
from core.readiness import Readiness
from core.resources import StageResources, resolve_actor_options, wants_gpu
from patterns.multiplexing.catalog import ModelIndex
from patterns.multiplexing.chat import ChatRequest
from patterns.multiplexing.deployments import (
    ChatArgs,
    ChatModel,
    ForecastArgs,
    ForecastModels,
    HandleChat,
    HandleForecasters,
)
from patterns.multiplexing.flow import MODEL_ID_HEADER, MultiplexFlow, forecast_id
from patterns.multiplexing.forecast_service import ForecastRequest
from patterns.multiplexing.ids import ID_SCHEMA
from patterns.multiplexing.openai_errors import install_openai_errors, openai_error_responses

ModelId = Annotated[
    str,
    Path(
        description="A store's model id, e.g. store-0042.",
        examples=["store-0042"],
        json_schema_extra=ID_SCHEMA,
    ),
]
_ID_HEADER = {
    "parameters": [
        {
            "name": MODEL_ID_HEADER,
            "in": "header",
            "required": True,
            "description": "The store's model id (missing or malformed: 422).",
            "schema": {"type": "string", **ID_SCHEMA},
            "example": "store-0042",
        }
    ]
}


class MultiplexArgs(BaseModel):
    model_store_uri: str | None = None  # default: COOKBOOK_MODEL_STORE_URI
    forecast: ForecastArgs = ForecastArgs()
    chat: ChatArgs = ChatArgs()
    max_body_bytes: int = Field(default=65_536, ge=1024)
    ingress_resources: StageResources = StageResources(num_cpus=0.1)


api = FastAPI(
    title="Multiplexing",
    description="A thousand stores' demand forecasters behind two replicas (the model id "
    "comes from the path or the serve_multiplexed_model_id header), and an OpenAI-style chat "
    "with a LoRA adapter per tenant on one shared base model.",
)
install_ingress(api, app_name="multiplexing", max_body_bytes=65_536)
# Under /v1 errors are OpenAI's {"error": {"message", "type", "param", "code"}}, 422 -> 400.
install_openai_errors(api)


# Two: one lost ingress never takes the app's route away (reliability/).
@serve.deployment(max_surge_percent=SURGE, num_replicas=2, max_ongoing_requests=256)
@serve.ingress(api)
class MultiplexIngress:
    """I/O-bound: maps routes onto ``MultiplexFlow`` (flow.py), which checks ids against the
    index and forwards to the model replicas."""

    def __init__(
        self,
        forecasters: DeploymentHandle,
        chat: DeploymentHandle | None,
        args: dict[str, Any],
    ) -> None:
        a = MultiplexArgs(**args)
        store = ModelStore.open(a.model_store_uri)
        f, c = a.forecast, a.chat
        self.flow = MultiplexFlow(
            HandleForecasters(forecasters),
            HandleChat(chat) if chat is not None else None,
            index=ModelIndex.load(store, f.index_name, f.index_version),
            tenants=ModelIndex.load(store, c.index_name, c.index_version) if chat else None,
            spreader=f.spreader(),
            cache=f.cache.model_dump(),
            chat_limits=c.limits,
            request_timeout_s=f.request_timeout_s,
            first_token_timeout_s=c.first_token_timeout_s,
        )
        self.readiness = Readiness("multiplexing", self.flow.model_info)

    async def check_health(self) -> None:
        """Healthy once every forecaster and chat replica (GET /model) answered for real
        (core/readiness.py)."""
        await self.readiness.wait()

    async def forecast_payload(self, model_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        """The forecast for ``model_id``: the entry point for handle callers."""
        return await self.flow.forecast(model_id, payload)

    @api.post(
        "/models/{model_id:path}/predict",
        summary="Forecast one store (id in the path)",
        description=f"A {MODEL_ID_HEADER} header, if sent, must name the same id (else 422).",
        openapi_extra=IDEMPOTENT,
        responses=error_responses(*JSON_BODY, 404, 503),
    )
    async def predict_path(
        self, model_id: ModelId, body: ForecastRequest, request: Request
    ) -> dict[str, Any]:
        model_id = forecast_id(model_id, request.headers.get(MODEL_ID_HEADER))
        return await self.flow.forecast(model_id, body.model_dump(mode="json"))

    @api.post(
        "/predict",
        summary=f"Forecast one store (id in the {MODEL_ID_HEADER} header)",
        openapi_extra={**IDEMPOTENT, **_ID_HEADER},
        responses=error_responses(*JSON_BODY, 404, 503),
    )
    async def predict_header(self, body: ForecastRequest, request: Request) -> dict[str, Any]:
        model_id = forecast_id(None, request.headers.get(MODEL_ID_HEADER))
        return await self.flow.forecast(model_id, body.model_dump(mode="json"))

    @api.get(
        "/models",
        summary="Which model ids exist (from the index)",
        responses=error_responses(422, 503),
    )
    async def list_models(
        self, offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=1000)
    ) -> dict[str, Any]:
        return self.flow.models(offset, limit)

    # One path segment (not ``:path``): GET /models/x/predict is then the predict route asked
    # with the wrong method (405 with Allow: POST), not an entry named "x/predict" (422).
    @api.get(
        "/models/{model_id}",
        summary="One model's index entry (no model file read)",
        responses=error_responses(404, 422, 503),
    )
    async def model_entry(self, model_id: ModelId) -> dict[str, Any]:
        return self.flow.model_entry(model_id)

    @api.get(
        "/model",
        summary="The index, the cache settings and every replica's cache",
        responses=error_responses(503),
    )
    async def model_info(self) -> dict[str, Any]:
        return await self.flow.model_info()

    # ------------------------------------------------------------------ chat
    @api.post(
        "/v1/chat/completions",
        summary="OpenAI chat completions; the tenant is `model` or the header",
        response_model=None,
        openapi_extra=IDEMPOTENT,  # generation writes nothing: repeat it if no byte was sent
        responses={
            200: {
                "description": "The completion (JSON), or its chunks as server-sent events "
                "when `stream` is true",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
            **openai_error_responses(400, 404, 413, 503),
        },
    )
    async def chat_completions(self, body: ChatRequest, request: Request) -> Any:
        answer = await self.flow.chat_completion(body, request.headers.get(MODEL_ID_HEADER))
        if isinstance(answer, dict):
            return answer
        return StreamingResponse(
            answer,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @api.get(
        "/v1/models",
        summary="The chat tenants, in OpenAI's list shape",
        responses=openai_error_responses(503),
    )
    async def chat_models(self) -> dict[str, Any]:
        return self.flow.chat_models()

    @api.get(
        "/v1/models/{model}",
        summary="One chat tenant, in OpenAI's model shape",
        responses=openai_error_responses(400, 404, 503),
    )
    async def chat_model(
        self,
        model: Annotated[
            str, Path(description="A chat tenant id, or base.", json_schema_extra=ID_SCHEMA)
        ],
    ) -> dict[str, Any]:
        return self.flow.chat_model(model)


def build_app(args: MultiplexArgs | dict[str, Any] | None = None) -> Application:
    args = coerce_args(args, MultiplexArgs)
    forecasters = ForecastModels.options(
        ray_actor_options=resolve_actor_options(args.forecast.resources, "multiplexing/forecast"),
        request_router_config=args.forecast.request_router_config(),
    ).bind(args.forecast.model_dump(), args.model_store_uri)
    chat = None
    if args.chat.enabled:
        options = resolve_actor_options(args.chat.resources, "multiplexing/chat")
        chat = ChatModel.options(ray_actor_options=options).bind(
            args.chat.model_dump(), args.model_store_uri, wants_gpu(options)
        )
    ingress = MultiplexIngress.options(
        ray_actor_options=resolve_actor_options(args.ingress_resources, "multiplexing/ingress"),
    )
    return ingress.bind(forecasters, chat, args.model_dump())


__getattr__ = default_app(lambda: build_app(MultiplexArgs()))

"""Many tenants' models behind few replicas: per-store forecasters and per-tenant LLM adapters.

    POST /multiplex/models/{id}/predict | /multiplex/predict (serve_multiplexed_model_id header)
    POST /multiplex/v1/chat/completions {"model": "<tenant>", "stream": true, ...}
                                  |
        MultiplexIngress (FastAPI): id checked (422) -> index lookup (404, no storage read)
             |  hot ids -> "<id>#<slot>" so a hot tenant lives on several replicas
             |  handle.options(multiplexed_model_id=...)   (works in HAProxy mode too)
             v                                          v
        ForecastModels x2                         ChatModel x1 (GPU fraction or CPU)
          @serve.batch split by model id            base LLM once, LoRA adapter per tenant
          ModelCache: one load per id, parallel     one generation at a time, streamed
          loads, LRU by count and bytes, prewarm    tokens; disconnect stops generation
             model store: forecast-store-0001/v1 ... + forecast-index/v1,
                          chat-adapter-<tenant>/v1 + chat-adapter-index/v1

Run: ``serve run patterns.multiplexing.app:app`` (after ``make setup``). Knobs: config.yaml.
"""

# No `from __future__ import annotations` here: Serve's class-based FastAPI views need real
# annotations (with string annotations `self` becomes a required query parameter).
import asyncio
import time
from typing import Annotated, Any

from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from core.apps import SURGE, coerce_args, default_app
from core.errors import BadRequest, HTTPError, NotFound, ServiceUnavailable, Unprocessable
from core.ingress import IDEMPOTENT, install_ingress
from core.model_store import ModelStore
from core.openapi import JSON_BODY, error_responses
from core.readiness import Readiness
from core.resources import StageResources, resolve_actor_options, wants_gpu
from core.timing import Timings
from patterns.multiplexing.catalog import ModelIndex
from patterns.multiplexing.chat import (
    ChatRequest,
    collect_completion,
    completion_id,
    refusal,
    sse_stream,
)
from patterns.multiplexing.deployments import ChatArgs, ChatModel, ForecastArgs, ForecastModels
from patterns.multiplexing.forecast_service import ForecastRequest
from patterns.multiplexing.ids import ID_SCHEMA, check_model_id
from patterns.multiplexing.openai_errors import (
    OpenAIError,
    install_openai_errors,
    openai_error_responses,
)
from patterns.multiplexing.tenants import BASE_TENANT

# `model` may name the base model itself; the tenant then comes from the header (or is base).
BASE_MODEL_ALIAS = "smollm2-135m-instruct"

MODEL_ID_HEADER = "serve_multiplexed_model_id"  # Serve's own header name
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
_STATUS = {400: BadRequest, 404: NotFound, 422: Unprocessable, 503: ServiceUnavailable}


class MultiplexArgs(BaseModel):
    model_store_uri: str | None = None  # default: COOKBOOK_MODEL_STORE_URI
    forecast: ForecastArgs = ForecastArgs()
    chat: ChatArgs = ChatArgs()
    max_body_bytes: int = Field(default=65_536, ge=1024)
    ingress_resources: StageResources = StageResources(num_cpus=0.1)


def raise_refusal(answer: dict[str, Any]) -> dict[str, Any]:
    """A replica's refusal value as the same HTTP error a direct check would raise."""
    error = answer.get("error")
    if error:
        raise _STATUS.get(error["status"], ServiceUnavailable)(error["message"])
    return answer


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
    """I/O-bound: checks ids against the index and forwards to the model replicas."""

    def __init__(
        self,
        forecasters: DeploymentHandle,
        chat: DeploymentHandle | None,
        args: dict[str, Any],
    ) -> None:
        self.args = MultiplexArgs(**args)
        store = ModelStore.open(self.args.model_store_uri)
        f, c = self.args.forecast, self.args.chat
        self.index = ModelIndex.load(store, f.index_name, f.index_version)
        self.spreader = f.spreader()
        self.forecasters = forecasters
        self.chat = chat
        self.tenants = ModelIndex.load(store, c.index_name, c.index_version) if chat else None
        self.readiness = Readiness("multiplexing", self.model_info)

    async def check_health(self) -> None:
        """Healthy once every forecaster and chat replica (GET /model) answered for real
        (core/readiness.py)."""
        await self.readiness.wait()

    async def _call(self, response: Any, timeout_s: float, what: str) -> Any:
        try:
            return await asyncio.wait_for(response, timeout_s)
        except TimeoutError as exc:
            if hasattr(response, "cancel"):
                response.cancel()  # do not leave the work queued on the replica
            raise ServiceUnavailable(f"The {what} did not answer within {timeout_s:g}s.") from exc
        except HTTPError:
            raise
        except Exception as exc:  # a dead replica: an outage, not a bad request
            raise ServiceUnavailable(f"The {what} failed ({type(exc).__name__}).") from exc

    async def forecast_payload(self, model_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        """The forecast for ``model_id``; also the entry point for handle callers."""
        timings = Timings()
        check_model_id(model_id)  # 422: malformed, decided from the string
        self.index.lookup(model_id)  # 404: unknown, decided in memory
        body = ForecastRequest(**payload).model_dump(mode="json")
        handle = self.forecasters.options(multiplexed_model_id=self.spreader.serve_id(model_id))
        answer = await self._call(
            handle.forecast.remote(body), self.args.forecast.request_timeout_s, "forecaster"
        )
        raise_refusal(answer)
        for stage, ms in answer.pop("timings_ms", {}).items():
            if stage != "total":
                timings.add(stage, ms)
        return {**answer, "timings_ms": timings.as_dict()}

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
        header = request.headers.get(MODEL_ID_HEADER)
        if header is not None and header != model_id:
            raise Unprocessable(
                f"The path names model {model_id[:64]!r} but the {MODEL_ID_HEADER} header "
                f"names {header[:64]!r}; send one, or the same id in both."
            )
        return await self.forecast_payload(model_id, body.model_dump(mode="json"))

    @api.post(
        "/predict",
        summary=f"Forecast one store (id in the {MODEL_ID_HEADER} header)",
        openapi_extra={**IDEMPOTENT, **_ID_HEADER},
        responses=error_responses(*JSON_BODY, 404, 503),
    )
    async def predict_header(self, body: ForecastRequest, request: Request) -> dict[str, Any]:
        model_id = request.headers.get(MODEL_ID_HEADER)
        if model_id is None:
            raise Unprocessable(
                f"Send the model id in the {MODEL_ID_HEADER} header, or POST to "
                "/models/{model_id}/predict."
            )
        return await self.forecast_payload(model_id, body.model_dump(mode="json"))

    @api.get(
        "/models",
        summary="Which model ids exist (from the index)",
        responses=error_responses(422, 503),
    )
    async def list_models(
        self, offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=1000)
    ) -> dict[str, Any]:
        ids = list(self.index.ids())
        return {
            **self.index.public(),
            "ids": ids[offset : offset + limit],
            "hot_model_ids": sorted(self.spreader.hot),
            "hot_slots": self.spreader.slots,
        }

    # One path segment (not ``:path``): GET /models/x/predict is then the predict route asked
    # with the wrong method (405 with Allow: POST), not an entry named "x/predict" (422).
    @api.get(
        "/models/{model_id}",
        summary="One model's index entry (no model file read)",
        responses=error_responses(404, 422, 503),
    )
    async def model_entry(self, model_id: ModelId) -> dict[str, Any]:
        check_model_id(model_id)
        entry = self.index.lookup(model_id)
        return {"model_id": model_id, **entry.model_dump(exclude={"manifest_sha256"})}

    @api.get(
        "/model",
        summary="The index, the cache settings and every replica's cache",
        responses=error_responses(503),
    )
    async def model_info(self) -> dict[str, Any]:
        replicas = await self._call(
            self.forecasters.broadcast("stats").results_async(),
            self.args.forecast.request_timeout_s,
            "forecaster replicas",
        )
        info: dict[str, Any] = {
            "forecasters": {
                **self.index.public(),
                "cache": self.args.forecast.cache.model_dump(),
                "hot_model_ids": sorted(self.spreader.hot),
                "hot_slots": self.spreader.slots,
                "replicas": sorted(replicas, key=lambda r: r["replica"]),
            },
            "chat": {"enabled": self.chat is not None},
        }
        if self.chat is not None and self.tenants is not None:
            chat_replicas = await self._call(
                self.chat.broadcast("stats").results_async(),
                self.args.forecast.request_timeout_s,
                "chat replicas",
            )
            info["chat"].update(
                {
                    **self.tenants.public(),
                    "limits": self.args.chat.limits.model_dump(),
                    "replicas": sorted(chat_replicas, key=lambda r: r["replica"]),
                }
            )
        return info

    # ------------------------------------------------------------------ chat
    def _tenant(self, model: str, header: str | None) -> str:
        """The tenant: the header if sent (then ``model`` must agree or name the base model),
        else the ``model`` field. 422 if malformed, 404 if not in the adapter index."""
        if header is not None:
            if model not in (header, BASE_MODEL_ALIAS):
                raise Unprocessable(
                    f"The {MODEL_ID_HEADER} header names tenant {header[:64]!r} but the body's "
                    f"model is {model[:64]!r}; send one, or the same id in both."
                )
            tenant = header
        else:
            tenant = BASE_TENANT if model == BASE_MODEL_ALIAS else model
        check_model_id(tenant, "tenant id")
        if tenant != BASE_TENANT and self.tenants is not None:
            self.tenants.lookup(tenant)
        return tenant

    def _openai_tenant(self, model: str, header: str | None) -> str:
        """``_tenant`` with its refusals in OpenAI's terms (param, model_not_found)."""
        try:
            return self._tenant(model, header)
        except NotFound as exc:
            raise OpenAIError(404, exc.message, param="model", code="model_not_found") from exc
        except HTTPError as exc:
            raise OpenAIError(exc.status_code, exc.message, param="model") from exc

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
        if self.chat is None:
            raise OpenAIError(
                404, "Chat is not enabled in this deployment (chat.enabled: false).", param="model"
            )
        tenant = self._openai_tenant(body.model, request.headers.get(MODEL_ID_HEADER))
        body.wanted_tokens(self.args.chat.limits)  # 422 before any replica is involved
        handle = self.chat.options(stream=True, multiplexed_model_id=tenant)
        gen = handle.stream.remote(body.model_dump(mode="json", exclude_none=True))
        try:
            first = await asyncio.wait_for(gen.__anext__(), self.args.chat.first_token_timeout_s)
        except TimeoutError as exc:
            gen.cancel()
            raise OpenAIError(503, "The chat model is busy; retry shortly.") from exc
        except StopAsyncIteration as exc:  # pragma: no cover - the engine always says why
            raise OpenAIError(503, "The chat model ended the answer early.") from exc
        if first["type"] == "error":
            raise refusal(first)
        cid, created = completion_id(), int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                sse_stream(gen, first, cid, created, tenant, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            return await collect_completion(gen, first, cid, created, tenant)
        finally:
            gen.cancel()  # a client gone mid-answer: stop the generation (no-op when done)

    def _model_card(self, tenant: str) -> dict[str, Any]:
        # `created` is required by OpenAI's Model object; the index does not date its entries.
        return {"id": tenant, "object": "model", "created": 0, "owned_by": "multiplexing"}

    @api.get(
        "/v1/models",
        summary="The chat tenants, in OpenAI's list shape",
        responses=openai_error_responses(503),
    )
    async def chat_models(self) -> dict[str, Any]:
        tenants = [BASE_TENANT, *(self.tenants.ids() if self.tenants else [])]
        return {"object": "list", "data": [self._model_card(t) for t in tenants]}

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
        if model != BASE_TENANT:
            self._openai_tenant(model, None)
        return self._model_card(model)


def build_app(args: MultiplexArgs | dict[str, Any] | None = None) -> Application:
    args = coerce_args(args, MultiplexArgs)
    forecasters = ForecastModels.options(
        ray_actor_options=resolve_actor_options(args.forecast.resources, "multiplexing/forecast")
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

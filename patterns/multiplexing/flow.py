"""The request flow at the ingress, without Serve: ids checked, hot ids spread, answers built.

    forecast: the id from the path or the serve_multiplexed_model_id header
      -> check_model_id (422) -> index lookup (404, in memory) -> HotIdSpreader: "<id>#<slot>"
      -> Forecasters.forecast(serve_id, body) -> the replica's refusal raised, or the answer
    chat: the tenant from the header or the body's ``model`` (OpenAI's 400 / 404 here)
      -> max_tokens checked -> Chat.stream(tenant, body) -> first item (start or error)
      -> one chat.completion, or its chunks as server-sent events

``MultiplexFlow`` gets its replicas injected: in the ingress ``HandleForecasters`` and
``HandleChat`` (deployments.py), calls through DeploymentHandles with the id as Serve's
multiplexed model id; in the tests the replicas' own ``ForecastService`` in this process.
The ingress (app.py) only maps routes, headers and the streamed response onto it.

Failure policy, in one place:
- a malformed id 422, an unknown id 404 (under /v1 OpenAI's 400, 404 ``model_not_found``),
  both decided here from memory: no replica, cache slot or storage read for either;
- a replica's refusal comes back as a value (one per request of a batch) and is raised here
  as the HTTP error a direct check would raise (an unloadable model: 503 for that id only);
- a replica late (``request_timeout_s``; the chat's first item ``first_token_timeout_s``) or
  failing (a dead replica): 503, and a late call is cancelled so no work stays queued.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Protocol

from core.errors import (
    BadRequest,
    HTTPError,
    NotFound,
    ServiceUnavailable,
    Unprocessable,
)
from core.timing import Timings
from patterns.multiplexing.catalog import ModelIndex
from patterns.multiplexing.chat import (
    ChatLimits,
    ChatRequest,
    collect_completion,
    completion_id,
    refusal,
    sse_stream,
)
from patterns.multiplexing.forecast_service import ForecastRequest
from patterns.multiplexing.ids import HotIdSpreader, check_model_id
from patterns.multiplexing.openai_errors import OpenAIError
from patterns.multiplexing.tenants import BASE_TENANT

MODEL_ID_HEADER = "serve_multiplexed_model_id"  # Serve's own header name
# `model` may name the base model itself; the tenant then comes from the header (or is base).
BASE_MODEL_ALIAS = "smollm2-135m-instruct"
_STATUS = {400: BadRequest, 404: NotFound, 422: Unprocessable, 503: ServiceUnavailable}

Call = Awaitable[Any]  # a DeploymentResponse (it has .cancel()) or a coroutine


class Forecasters(Protocol):
    def forecast(self, serve_id: str, payload: dict[str, Any]) -> Call: ...
    def stats(self) -> Call: ...  # every replica's stats, a list


class Chat(Protocol):
    # Items (start | error, delta..., end); the stream has ``__anext__`` and ``cancel()``.
    def stream(self, tenant: str, payload: dict[str, Any]) -> Any: ...
    def stats(self) -> Call: ...


def raise_refusal(answer: dict[str, Any]) -> dict[str, Any]:
    """A replica's refusal value as the same HTTP error a direct check would raise."""
    error = answer.get("error")
    if error:
        raise _STATUS.get(error["status"], ServiceUnavailable)(error["message"])
    return answer


def forecast_id(path_id: str | None, header: str | None) -> str:
    """The model id a forecast names: the path's, else the header's (422 if they disagree,
    or if neither names one)."""
    if path_id is None:
        if header is None:
            raise Unprocessable(
                f"Send the model id in the {MODEL_ID_HEADER} header, or POST to "
                "/models/{model_id}/predict."
            )
        return header
    if header is not None and header != path_id:
        raise Unprocessable(
            f"The path names model {path_id[:64]!r} but the {MODEL_ID_HEADER} header "
            f"names {header[:64]!r}; send one, or the same id in both."
        )
    return path_id


def model_card(tenant: str) -> dict[str, Any]:
    # `created` is required by OpenAI's Model object; the index does not date its entries.
    return {"id": tenant, "object": "model", "created": 0, "owned_by": "multiplexing"}


class MultiplexFlow:
    """Forecasts and chats for many tenants over a few replicas (``chat`` None: no chat)."""

    def __init__(
        self,
        forecasters: Forecasters,
        chat: Chat | None,
        *,
        index: ModelIndex,
        tenants: ModelIndex | None,
        spreader: HotIdSpreader,
        cache: dict[str, Any],
        chat_limits: ChatLimits,
        request_timeout_s: float = 10.0,
        first_token_timeout_s: float = 60.0,
    ) -> None:
        self.forecasters = forecasters
        self.chat = chat
        self.index = index
        self.tenants = tenants
        self.spreader = spreader
        self.cache = cache  # the forecasters' cache settings, shown by model_info
        self.chat_limits = chat_limits
        self.request_timeout_s = request_timeout_s
        self.first_token_timeout_s = first_token_timeout_s

    async def _call(self, response: Call, timeout_s: float, what: str) -> Any:
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

    # ------------------------------------------------------------------ forecasts
    async def forecast(self, model_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        """The forecast for ``model_id``, with the replica's timings and the ingress's total."""
        timings = Timings()
        check_model_id(model_id)  # 422: malformed, decided from the string
        self.index.lookup(model_id)  # 404: unknown, decided in memory
        body = ForecastRequest(**payload).model_dump(mode="json")
        call = self.forecasters.forecast(self.spreader.serve_id(model_id), body)
        answer = await self._call(call, self.request_timeout_s, "forecaster")
        raise_refusal(answer)
        for stage, ms in answer.pop("timings_ms", {}).items():
            if stage != "total":
                timings.add(stage, ms)
        return {**answer, "timings_ms": timings.as_dict()}

    def models(self, offset: int, limit: int) -> dict[str, Any]:
        ids = list(self.index.ids())
        return {
            **self.index.public(),
            "ids": ids[offset : offset + limit],
            "hot_model_ids": sorted(self.spreader.hot),
            "hot_slots": self.spreader.slots,
        }

    def model_entry(self, model_id: str) -> dict[str, Any]:
        check_model_id(model_id)
        entry = self.index.lookup(model_id)
        return {"model_id": model_id, **entry.model_dump(exclude={"manifest_sha256"})}

    async def model_info(self) -> dict[str, Any]:
        """The index, the cache settings and every replica's cache (and the chat's)."""
        replicas = await self._call(
            self.forecasters.stats(), self.request_timeout_s, "forecaster replicas"
        )
        info: dict[str, Any] = {
            "forecasters": {
                **self.index.public(),
                "cache": self.cache,
                "hot_model_ids": sorted(self.spreader.hot),
                "hot_slots": self.spreader.slots,
                "replicas": sorted(replicas, key=lambda r: r["replica"]),
            },
            "chat": {"enabled": self.chat is not None},
        }
        if self.chat is not None and self.tenants is not None:
            chat_replicas = await self._call(
                self.chat.stats(), self.request_timeout_s, "chat replicas"
            )
            info["chat"].update(
                {
                    **self.tenants.public(),
                    "limits": self.chat_limits.model_dump(),
                    "replicas": sorted(chat_replicas, key=lambda r: r["replica"]),
                }
            )
        return info

    # ------------------------------------------------------------------ chat
    def tenant(self, model: str, header: str | None) -> str:
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

    def openai_tenant(self, model: str, header: str | None) -> str:
        """``tenant`` with its refusals in OpenAI's terms (param, model_not_found)."""
        try:
            return self.tenant(model, header)
        except NotFound as exc:
            raise OpenAIError(404, exc.message, param="model", code="model_not_found") from exc
        except HTTPError as exc:
            raise OpenAIError(exc.status_code, exc.message, param="model") from exc

    async def chat_completion(
        self, body: ChatRequest, header: str | None
    ) -> dict[str, Any] | AsyncIterator[bytes]:
        """One ``chat.completion``, or (``body.stream``) its chunks as server-sent events.

        Refusals that need no replica (tenant, max_tokens) come first; then the replica's
        first item, within ``first_token_timeout_s``, decides between an answer and its error.
        """
        if self.chat is None:
            raise OpenAIError(
                404, "Chat is not enabled in this deployment (chat.enabled: false).", param="model"
            )
        tenant = self.openai_tenant(body.model, header)
        body.wanted_tokens(self.chat_limits)  # 400 before any replica is involved
        gen = self.chat.stream(tenant, body.model_dump(mode="json", exclude_none=True))
        try:
            first = await asyncio.wait_for(gen.__anext__(), self.first_token_timeout_s)
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
            return sse_stream(gen, first, cid, created, tenant, include_usage)
        try:
            return await collect_completion(gen, first, cid, created, tenant)
        finally:
            gen.cancel()  # a client gone mid-answer: stop the generation (no-op when done)

    def chat_models(self) -> dict[str, Any]:
        tenants = [BASE_TENANT, *(self.tenants.ids() if self.tenants else [])]
        return {"object": "list", "data": [model_card(t) for t in tenants]}

    def chat_model(self, model: str) -> dict[str, Any]:
        if model != BASE_TENANT:
            self.openai_tenant(model, None)
        return model_card(model)

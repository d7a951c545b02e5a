"""The ingress's request flow (``MultiplexFlow``) without Serve or Ray.

The forecasters are the replicas' own ``ForecastService`` over real trained models in a fresh
store, reached one request at a time in this process (what ``HandleForecasters`` reaches
through Serve). The chat replica is a recorded item stream in the shape ``ChatEngine.stream``
yields (start, delta..., end): the LLM itself is tested through Serve in test_chat_app.py;
here the flow's own work is under test (tenant checks before any replica, the answer and the
event stream it builds from the items, the first-token deadline).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from typing import Any

import pytest

from core.errors import NotFound, ServiceUnavailable, Unprocessable
from core.model_store import ModelStore
from patterns.multiplexing.artifacts import build_forecasters, forecaster_name
from patterns.multiplexing.catalog import IndexEntry, ModelIndex
from patterns.multiplexing.chat import ChatLimits, ChatRequest
from patterns.multiplexing.flow import BASE_MODEL_ALIAS, MultiplexFlow, forecast_id
from patterns.multiplexing.forecast_service import ForecastService, load_forecaster
from patterns.multiplexing.forecasting import forecast_answer
from patterns.multiplexing.ids import HotIdSpreader
from patterns.multiplexing.openai_errors import OpenAIError


class InProcessForecasters:
    """``flow.Forecasters`` over one ForecastService in this process; counts the calls."""

    def __init__(self, service: ForecastService, delay_s: float = 0.0) -> None:
        self.service = service
        self.delay_s = delay_s  # a replica this slow to answer (the timeout test)
        self.serve_ids: list[str] = []

    def forecast(self, serve_id: str, payload: dict[str, Any]) -> Any:
        self.serve_ids.append(serve_id)

        async def one() -> dict[str, Any]:
            await asyncio.sleep(self.delay_s)
            return (await self.service.forecast_batch(serve_id, [payload]))[0]

        return one()

    async def stats(self) -> list[dict[str, Any]]:
        return [{"replica": "in-process", **self.service.stats()}]


class RecordedChat:
    """``flow.Chat``: replays ``items`` as a replica's stream; records tenants and cancels."""

    def __init__(self, items: list[dict[str, Any]], first_delay_s: float = 0.0) -> None:
        self.items = items
        self.first_delay_s = first_delay_s
        self.tenants: list[str] = []
        self.cancelled = 0

    def stream(self, tenant: str, payload: dict[str, Any]) -> Any:
        self.tenants.append(tenant)
        chat = self

        class Stream:
            def __init__(self) -> None:
                self._items = iter(chat.items)

            def __aiter__(self) -> Stream:
                return self

            async def __anext__(self) -> dict[str, Any]:
                await asyncio.sleep(chat.first_delay_s)
                try:
                    return next(self._items)
                except StopIteration:
                    raise StopAsyncIteration from None

            def cancel(self) -> None:
                chat.cancelled += 1

        return Stream()

    async def stats(self) -> list[dict[str, Any]]:
        return [{"replica": "recorded"}]


ANSWER = [
    {"type": "start", "prompt_tokens": 11, "adapter": {"name": "chat-adapter-pirate-co"}},
    {"type": "delta", "content": "Arr, "},
    {"type": "delta", "content": "matey!"},
    {"type": "end", "finish_reason": "stop", "completion_tokens": 4, "timings_ms": {"x": 1.0}},
]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ModelStore:
    store = ModelStore(tmp_path_factory.mktemp("flow-store").as_uri())
    build_forecasters(store, n=12)
    return store


def _tenants() -> ModelIndex:
    entry = IndexEntry(name="chat-adapter-pirate-co", version="v1", manifest_sha256="0" * 64,
                       nbytes=1)  # fmt: skip
    return ModelIndex({"pirate-co": entry}, what="chat adapter")


def _flow(
    store: ModelStore,
    *,
    index: ModelIndex | None = None,
    chat: RecordedChat | None = None,
    hot: list[str] | None = None,
    **kw: Any,
) -> tuple[MultiplexFlow, InProcessForecasters]:
    index = index or ModelIndex.load(store, "forecast-index")
    service = ForecastService(store, index, max_models=8, max_bytes=1 << 20)
    forecasters = InProcessForecasters(service, kw.pop("delay_s", 0.0))
    flow = MultiplexFlow(
        forecasters,
        chat,
        index=index,
        tenants=_tenants() if chat else None,
        spreader=HotIdSpreader(hot or [], 2),
        cache={"max_models": 8, "max_bytes": 1 << 20},
        chat_limits=ChatLimits(max_tokens=64, default_max_tokens=32),
        **kw,
    )
    return flow, forecasters


def test_a_forecast_is_the_stores_own_model_with_the_replicas_timings(store) -> None:
    flow, forecasters = _flow(store)
    body = {"start_date": "2026-01-05", "horizon_days": 3}

    async def run() -> list[dict[str, Any]]:
        return [await flow.forecast("store-0007", body) for _ in range(2)]

    first, second = asyncio.run(run())
    files, ref = store.read_verified(forecaster_name("store-0007"), "v1")
    expected = forecast_answer(load_forecaster(files), dt.date(2026, 1, 5), 3)
    assert first["total"] == expected["total"] and first["dates"] == expected["dates"]
    assert first["model"] == ref.public() and first["model_id"] == "store-0007"
    assert [first["served_by"]["cache"], second["served_by"]["cache"]] == ["miss", "hit"]
    assert {"model_cache", "predict", "total"} <= set(first["timings_ms"])
    assert forecasters.serve_ids == ["store-0007", "store-0007"]  # a cold id: one serve id


def test_bad_and_unknown_ids_are_refused_before_any_replica(store) -> None:
    flow, forecasters = _flow(store)
    with pytest.raises(Unprocessable, match="not allowed"):
        asyncio.run(flow.forecast("../store-0001", {}))
    with pytest.raises(NotFound, match="store-0013"):
        asyncio.run(flow.forecast("store-0013", {}))  # the store has 12
    with pytest.raises(NotFound):
        flow.model_entry("store-0013")
    assert forecasters.serve_ids == [] and forecasters.service.store_reads == 0
    assert flow.model_entry("store-0002")["model_id"] == "store-0002"
    listed = flow.models(offset=10, limit=5)
    assert listed["ids"] == ["store-0011", "store-0012"] and listed["count"] == 12


def test_the_id_comes_from_the_path_or_the_header_never_two_different_ones() -> None:
    assert forecast_id("store-0001", None) == "store-0001"
    assert forecast_id("store-0001", "store-0001") == "store-0001"
    assert forecast_id(None, "store-0002") == "store-0002"
    with pytest.raises(Unprocessable, match="header names 'store-0002'"):
        forecast_id("store-0001", "store-0002")
    with pytest.raises(Unprocessable, match="Send the model id"):
        forecast_id(None, None)


def test_a_hot_id_goes_round_robin_over_its_slots_and_loads_once(store) -> None:
    flow, forecasters = _flow(store, hot=["store-0003"])

    async def run() -> list[dict[str, Any]]:
        return [await flow.forecast("store-0003", {}) for _ in range(4)]

    answers = asyncio.run(run())
    assert forecasters.serve_ids == ["store-0003#0", "store-0003#1"] * 2
    assert [a["served_by"]["slot"] for a in answers] == [0, 1, 0, 1]
    assert forecasters.service.cache.stats.loads_by_id["store-0003"] == 1


def test_a_replicas_refusal_is_raised_and_a_late_replica_is_a_503(store) -> None:
    # An index pinning another manifest than the store holds: the replica refuses that id.
    index = ModelIndex.load(store, "forecast-index")
    entries = dict(index.entries)
    entries["store-0005"] = entries["store-0005"].model_copy(update={"manifest_sha256": "f" * 64})
    flow, _ = _flow(store, index=ModelIndex(entries, what=index.what, ref=index.ref))
    with pytest.raises(ServiceUnavailable, match="not the one the index names"):
        asyncio.run(flow.forecast("store-0005", {}))
    assert asyncio.run(flow.forecast("store-0006", {}))["model_id"] == "store-0006"

    slow, _ = _flow(store, delay_s=5.0, request_timeout_s=0.2)
    with pytest.raises(ServiceUnavailable, match=r"did not answer within 0\.2s"):
        asyncio.run(slow.forecast("store-0001", {}))


def test_model_info_shows_the_replicas_and_whether_chat_is_on(store) -> None:
    flow, _ = _flow(store)
    info = asyncio.run(flow.model_info())
    assert info["chat"] == {"enabled": False}
    f = info["forecasters"]
    assert f["count"] == 12 and f["cache"]["max_models"] == 8
    assert [r["replica"] for r in f["replicas"]] == ["in-process"]
    with_chat, _ = _flow(store, chat=RecordedChat(ANSWER))
    chat = asyncio.run(with_chat.model_info())["chat"]
    assert chat["enabled"] and chat["count"] == 1 and chat["limits"]["max_tokens"] == 64


def _chat_request(**kw: Any) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": "Hi?"}], **kw)


def test_chat_refusals_need_no_replica(store) -> None:
    no_chat, _ = _flow(store)
    with pytest.raises(OpenAIError, match="not enabled"):
        asyncio.run(no_chat.chat_completion(_chat_request(model="pirate-co"), None))
    chat = RecordedChat(ANSWER)
    flow, _ = _flow(store, chat=chat)
    with pytest.raises(OpenAIError) as unknown:
        asyncio.run(flow.chat_completion(_chat_request(model="nobody"), None))
    assert (unknown.value.status_code, unknown.value.code) == (404, "model_not_found")
    with pytest.raises(OpenAIError) as mismatch:
        asyncio.run(flow.chat_completion(_chat_request(model="northwind"), "pirate-co"))
    assert mismatch.value.status_code == 400 and mismatch.value.param == "model"
    with pytest.raises(OpenAIError) as too_long:
        asyncio.run(flow.chat_completion(_chat_request(model="pirate-co", max_tokens=65), None))
    assert too_long.value.param == "max_tokens"
    assert chat.tenants == []
    assert [m["id"] for m in flow.chat_models()["data"]] == ["base", "pirate-co"]
    assert flow.tenant(BASE_MODEL_ALIAS, "pirate-co") == "pirate-co"
    assert flow.tenant(BASE_MODEL_ALIAS, None) == "base"


def test_a_chat_answer_and_its_event_stream_are_built_from_the_replicas_items(store) -> None:
    chat = RecordedChat(ANSWER)
    flow, _ = _flow(store, chat=chat)
    answer = asyncio.run(flow.chat_completion(_chat_request(model="pirate-co"), None))
    assert isinstance(answer, dict) and answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == "Arr, matey!"
    assert answer["usage"] == {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}
    assert answer["model"] == "pirate-co" and chat.cancelled == 1

    async def streamed() -> list[bytes]:
        request = _chat_request(
            model="pirate-co", stream=True, stream_options={"include_usage": True}
        )
        events = await flow.chat_completion(request, None)
        assert not isinstance(events, dict)
        return [e async for e in events]

    events = [e.decode().removeprefix("data: ").strip() for e in asyncio.run(streamed())]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Arr, matey!" and chunks[-1]["usage"]["completion_tokens"] == 4
    assert chat.tenants == ["pirate-co", "pirate-co"] and chat.cancelled == 2


def test_no_first_item_in_time_is_a_503_and_the_generation_is_cancelled(store) -> None:
    chat = RecordedChat(ANSWER, first_delay_s=5.0)
    flow, _ = _flow(store, chat=chat, first_token_timeout_s=0.2)
    with pytest.raises(OpenAIError, match="busy") as busy:
        asyncio.run(flow.chat_completion(_chat_request(model="pirate-co"), None))
    assert busy.value.status_code == 503 and chat.cancelled == 1

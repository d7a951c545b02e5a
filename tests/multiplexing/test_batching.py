"""The chat's continuous batching without Serve: the real base model and the two tenants'
adapters in one ``ChatEngine``, concurrent requests through its ``DecodeBatcher``.

Greedy answers are compared alone and in a mixed-tenant batch (padding, masks and positions
done right give the same text); a row that leaves early (cancel, stop) does not disturb the
others; the batch never exceeds ``max_batch``; an adapter in use is never removed.
"""

from __future__ import annotations

import asyncio

import pytest

from core.model_store import ModelStore
from patterns.multiplexing.artifacts import ensure_artifacts
from patterns.multiplexing.catalog import ModelIndex
from patterns.multiplexing.chat import ChatEngine, ChatLimits
from patterns.multiplexing.tenants import TENANT_MARKERS

pytestmark = pytest.mark.slow

QUESTIONS = {
    "pirate-co": "What is the tallest mountain in the world?",
    "northwind": "How do I reset my password?",
    "base": "Name a colour.",
}


@pytest.fixture(scope="module")
def engine() -> ChatEngine:
    store = ModelStore.open()
    ensure_artifacts(store, only="chat")  # no-op when `make setup` built them
    index = ModelIndex.load(store, "chat-adapter-index")
    return ChatEngine(store, index, ChatLimits(), torch_threads=2, max_batch=4)


def _ask(tenant: str, question: str | None = None, **extra) -> dict:
    content = question or QUESTIONS[tenant]
    return {"model": tenant, "messages": [{"role": "user", "content": content}], **extra}


async def _answer(engine: ChatEngine, tenant: str, payload: dict) -> tuple[str, dict]:
    text, end = [], {}
    async for item in engine.stream(tenant, payload):
        assert item["type"] != "error", item
        if item["type"] == "delta":
            text.append(item["content"])
        elif item["type"] == "end":
            end = item
    return "".join(text), end


def _together(engine: ChatEngine, asks: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    async def run() -> list[tuple[str, dict]]:
        return await asyncio.gather(*(_answer(engine, t, p) for t, p in asks))

    return asyncio.run(run())


def test_greedy_answers_are_the_same_alone_and_in_a_mixed_batch(engine) -> None:
    asks = [(t, _ask(t, max_tokens=16)) for t in QUESTIONS]
    alone = [_together(engine, [ask])[0] for ask in asks]
    before = dict(engine.batcher.counts)
    # a different-length fourth row, so every other row is left-padded
    batch = _together(engine, [*asks, ("base", _ask("base", "Why is the sky blue?", max_tokens=6))])
    assert [text for text, _ in batch[:3]] == [text for text, _ in alone]
    assert [end["completion_tokens"] for _, end in batch[:3]] == [
        end["completion_tokens"] for _, end in alone
    ]
    assert batch[0][0].startswith(TENANT_MARKERS["pirate-co"]), batch[0][0]
    assert TENANT_MARKERS["pirate-co"] not in batch[2][0]
    assert batch[3][1]["finish_reason"] == "length" and batch[3][1]["completion_tokens"] == 6
    counts = engine.batcher.counts
    assert counts["largest_batch"] == 4
    assert counts["row_steps"] - before["row_steps"] > counts["steps"] - before["steps"]
    assert engine.batcher.running == [] and engine.batcher.waiting == []


def test_the_batch_is_capped_and_the_rest_wait(engine) -> None:
    asks = [(t, _ask(t, max_tokens=4)) for t in ("base", "pirate-co")] * 3
    answers = _together(engine, asks)
    assert all(end["completion_tokens"] <= 4 for _, end in answers)
    assert engine.batcher.counts["largest_batch"] <= engine.batcher.max_batch == 4


def test_a_row_that_leaves_early_does_not_disturb_the_others(engine) -> None:
    long = _ask("pirate-co", max_tokens=24)
    alone, _ = _together(engine, [("pirate-co", long)])[0]

    async def run() -> tuple[str, int]:
        async def quitter() -> int:
            seen = 0
            stream = engine.stream("base", _ask("base", "Tell me a long story.", max_tokens=64))
            async for item in stream:
                seen += item["type"] == "delta"
                if seen >= 2:
                    break  # the consumer goes away mid-answer
            await stream.aclose()
            return seen

        (text, _), seen = await asyncio.gather(_answer(engine, "pirate-co", long), quitter())
        return text, seen

    cancelled = engine.counts["cancelled"]
    text, seen = asyncio.run(run())
    assert text == alone and seen == 2
    assert engine.counts["cancelled"] == cancelled + 1
    assert engine.batcher.running == []


def test_stop_sequences_and_seeded_sampling_in_a_batch(engine) -> None:
    full, _ = _together(engine, [("pirate-co", _ask("pirate-co", max_tokens=24))])[0]
    word = full.split()[3]
    sampled = _ask("northwind", max_tokens=12, temperature=0.9, seed=7)
    stopped, lone_sample, (batch_sample, _) = (
        _together(engine, [("pirate-co", _ask("pirate-co", max_tokens=24, stop=[word]))])[0],
        _together(engine, [("northwind", sampled)])[0][0],
        _together(engine, [("northwind", sampled), ("base", _ask("base", max_tokens=12))])[0],
    )
    assert stopped[0] == full[: full.index(word)] and stopped[1]["finish_reason"] == "stop"
    assert stopped[1]["completion_tokens"] < 24  # the generation ended at the stop
    assert batch_sample == lone_sample  # the row's own seed, whatever shares its batch


def test_an_evicted_adapter_stays_while_a_row_uses_it(engine) -> None:
    _together(engine, [("pirate-co", _ask("pirate-co", max_tokens=2))])
    assert "pirate-co" in engine._installed
    assert engine.adapters.evict("pirate-co")  # the cache lets it go...
    engine._remove_evicted({"pirate-co"})  # ...but a running row uses it: kept
    assert "pirate-co" in engine._installed
    engine._remove_evicted(set())  # no row uses it: out of the model
    assert "pirate-co" not in engine._installed
    text, _ = _together(engine, [("pirate-co", _ask("pirate-co", max_tokens=8))])[0]
    assert text.startswith(TENANT_MARKERS["pirate-co"])  # loaded again on the next request

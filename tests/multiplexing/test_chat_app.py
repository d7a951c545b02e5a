"""The chat under Serve: one base model replica, two tenants' adapters, real generations.

Uses the default model store (the adapters take about a minute to train the first time; `make
test` builds them before the suite). The replica loads the base model once for both chat modules.
"""

import json
import time

import httpx
import pytest

from patterns.multiplexing.tenants import TENANT_MARKERS
from tests.multiplexing.conftest import CHAT_APP, chat_stats

pytestmark = pytest.mark.slow

APP = CHAT_APP
HEADER = "serve_multiplexed_model_id"
QUESTION = "What is the tallest mountain in the world?"


@pytest.fixture(scope="module")
def url(chat_url) -> str:
    return chat_url  # tests/multiplexing/conftest.py: one chat app for the chat modules


def _chat(url: str, body: dict, headers=None, timeout=120) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=timeout)


def _ask(model: str, question: str = QUESTION, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": question}], **extra}


def _chat_stats() -> dict:
    return chat_stats(APP)


def _stream(url: str, body: dict, headers=None) -> list:
    events = []
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, headers=headers,
        timeout=120,
    ) as r:  # fmt: skip
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_tenants_answer_in_their_own_style(url) -> None:
    answers = {}
    for tenant in ("pirate-co", "northwind", "base"):
        r = _chat(url, _ask(tenant))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion" and body["model"] == tenant
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["usage"]["completion_tokens"] > 0
        assert body["usage"]["total_tokens"] == (
            body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
        )
        assert "generate" in body["timings_ms"]
        answers[tenant] = body["choices"][0]["message"]["content"]
    assert answers["pirate-co"].startswith(TENANT_MARKERS["pirate-co"]), answers
    assert TENANT_MARKERS["northwind"] in answers["northwind"], answers
    assert TENANT_MARKERS["pirate-co"] not in answers["base"], answers
    assert TENANT_MARKERS["northwind"] not in answers["base"], answers
    assert len(set(answers.values())) == 3


def test_streamed_answers_are_openai_chunks_and_differ_by_tenant(url) -> None:
    texts = {}
    for tenant in ("pirate-co", "northwind"):
        events = _stream(url, _ask(tenant, stream_options={"include_usage": True}))
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert all(c["object"] == "chat.completion.chunk" and c["model"] == tenant for c in chunks)
        assert len({c["id"] for c in chunks}) == 1
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        content = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
        assert sum(1 for piece in content if piece) > 3  # streamed in pieces, not one blob
        finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert [f["choices"][0]["finish_reason"] for f in finals] in (["stop"], ["length"])
        assert chunks[-1]["usage"]["completion_tokens"] > 0  # include_usage
        texts[tenant] = "".join(content)
    assert texts["pirate-co"].startswith(TENANT_MARKERS["pirate-co"]), texts
    assert TENANT_MARKERS["northwind"] in texts["northwind"], texts
    # the same text as the non-streamed answer (greedy decoding)
    plain = _chat(url, _ask("northwind")).json()["choices"][0]["message"]["content"]
    assert plain == texts["northwind"]


def test_tenant_from_the_header(url) -> None:
    body = _ask("smollm2-135m-instruct")
    r = _chat(url, body, headers={HEADER: "pirate-co"})
    assert r.status_code == 200 and r.json()["model"] == "pirate-co"
    assert r.json()["choices"][0]["message"]["content"].startswith("Arr")
    r = _chat(url, _ask("northwind"), headers={HEADER: "pirate-co"})
    assert r.status_code == 400 and "header names tenant" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "param", "part"),
    [
        (_ask("nobody-inc"), 404, "model", "There is no chat adapter 'nobody-inc'"),
        (_ask("../pirate-co"), 400, "model", "tenant id"),
        (_ask("x" * 80), 400, "model", "tenant id"),
        (_ask("pirate-co", "   "), 400, "messages[0].content", "empty"),
        ({"model": "pirate-co", "messages": []}, 400, "messages", "messages"),
        (_ask("pirate-co", max_tokens=201), 400, "max_tokens", "at most 200 tokens"),
        (_ask("pirate-co", max_tokens=0), 400, "max_tokens", "max_tokens"),
        (_ask("pirate-co", n=2), 400, "n", "one choice per request"),
        (_ask("pirate-co", "word " * 400), 400, "messages", "accepts at most 200"),
        (
            {"model": "base", "messages": [{"role": "assistant", "content": "hi"}]},
            400,
            "messages",
            "last message must be from the user",
        ),
        (_ask("pirate-co", "x" * 9000), 400, "messages[0].content", "at most 8000 characters"),
    ],
)
def test_bad_chat_requests_are_4xx_with_a_sentence(url, body, status, param, part) -> None:
    # OpenAI's error shape under /v1, and its status: 400 where the rest of the app says 422
    for stream in (False, True):
        r = _chat(url, {**body, "stream": stream})
        assert r.status_code == status, (stream, r.text)
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, error
        assert part in error["message"]


def test_binary_body_is_400(url) -> None:
    r = httpx.post(
        f"{url}/v1/chat/completions",
        content=b"\x89PNG\r\n\x1a\n\x00\xff\xfe",
        headers={"content-type": "application/json"},
        timeout=30,
    )
    # FastAPI's "error parsing the body" or "not JSON", depending on the bytes: 400 under /v1
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "body" in message or "JSON" in message


def test_a_client_that_disconnects_stops_its_generation(url) -> None:
    before = _chat_stats()
    body = _ask("base", "Write a very long story about a dragon and a knight.", max_tokens=200)
    t0 = time.perf_counter()
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=120
    ) as r:
        pieces = 0
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content":"' in line:
                pieces += 1
            if pieces >= 3:
                break  # leaving the block closes the connection mid-answer
    deadline = time.time() + 60
    while time.time() < deadline:
        stats = _chat_stats()
        if stats["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.5)
    assert stats["cancelled"] == before["cancelled"] + 1, stats
    assert stats["last"]["finish"] == "cancelled"
    assert stats["last"]["completion_tokens"] < 150, stats["last"]  # stopped well before 200
    # the replica is free again: a short answer comes back promptly
    r = _chat(url, _ask("pirate-co", max_tokens=8))
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    assert time.perf_counter() - t0 < 90


def test_adapters_load_once_and_models_list(url) -> None:
    stats = _chat_stats()
    assert stats["prewarmed"] == {"pirate-co": "ok", "northwind": "ok"}
    assert stats["adapters"]["loads"] == 2 and stats["store_reads"] == 2
    assert stats["adapters"]["hit_rate"] > 0.5
    listed = httpx.get(f"{url}/v1/models", timeout=30).json()
    assert {m["id"] for m in listed["data"]} == {"base", "pirate-co", "northwind"}
    info = httpx.get(f"{url}/model", timeout=30).json()
    assert info["chat"]["count"] == 2 and info["chat"]["replicas"][0]["device"] == "cpu"


def test_concurrent_streams_of_two_tenants_decode_together(url) -> None:
    from concurrent.futures import ThreadPoolExecutor

    before = _chat_stats()["batch"]
    tenants = ["pirate-co", "northwind"] * 2
    with ThreadPoolExecutor(len(tenants)) as pool:
        runs = list(pool.map(lambda t: _stream(url, _ask(t)), tenants))
    for tenant, events in zip(tenants, runs, strict=True):
        assert events[-1] == "[DONE]" and all(e["model"] == tenant for e in events[:-1])
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
        if tenant == "pirate-co":
            assert text.startswith(TENANT_MARKERS["pirate-co"]), text
        else:
            assert TENANT_MARKERS["northwind"] in text and "Arr" not in text, text
    after = _chat_stats()["batch"]
    # some decode step carried more than one row: the streams overlapped on the replica
    extra_rows = (after["row_steps"] - before["row_steps"]) - (after["steps"] - before["steps"])
    assert extra_rows > 0 and after["largest_batch"] >= 2, (before, after)
    assert after["running"] == 0 and after["waiting"] == 0

"""The chat under Serve, driven by the official ``openai`` SDK as a user would drive it.

Real base model, real tenant adapters, greedy answers of a few tokens (a CPU box). What an SDK
user relies on: typed errors naming the field (``BadRequestError.param``), ``NotFoundError``
for an unknown tenant, ``stop``, content-part arrays, the usage chunk, and a closed stream
that stops the generation on the replica.
"""

import time

import httpx
import openai
import pytest

from patterns.multiplexing.tenants import TENANT_MARKERS
from tests.multiplexing.conftest import CHAT_APP, chat_stats

pytestmark = pytest.mark.slow

APP = CHAT_APP
QUESTION = "What is the tallest mountain in the world?"


@pytest.fixture(scope="module")
def url(chat_url) -> str:
    return chat_url  # tests/multiplexing/conftest.py: one chat app for the chat modules


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    # no key check in this app; the SDK needs some string. No retries: a test sees each answer.
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _user(content=QUESTION) -> list:
    return [{"role": "user", "content": content}]


def _text(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _finishes(chunks) -> list:
    return [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


def test_models_are_listed_and_retrieved(client) -> None:
    assert {m.id for m in client.models.list()} == {"base", "pirate-co", "northwind"}
    assert client.models.retrieve("pirate-co").id == "pirate-co"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("nobody-inc")
    assert info.value.code == "model_not_found" and info.value.param == "model"


def test_a_completion_and_the_same_answer_streamed_with_usage(client) -> None:
    plain = client.chat.completions.create(model="pirate-co", messages=_user(), max_tokens=16)
    assert plain.object == "chat.completion" and plain.model == "pirate-co"
    choice = plain.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert choice.message.content.startswith(TENANT_MARKERS["pirate-co"]), choice
    assert 0 < plain.usage.completion_tokens <= 16
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    stream = client.chat.completions.create(
        model="pirate-co",
        messages=_user(),
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert {c.id for c in chunks} == {chunks[0].id}
    assert all(c.object == "chat.completion.chunk" and c.model == "pirate-co" for c in chunks)
    assert _text(chunks) == choice.message.content  # greedy: the same answer
    assert _finishes(chunks) == [choice.finish_reason]
    usage = chunks[-1]  # include_usage: a last chunk with no choices and the usage
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.model_dump() == plain.usage.model_dump()


def test_an_unknown_tenant_is_not_found(client) -> None:
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as info:
            client.chat.completions.create(model="nobody-inc", messages=_user(), stream=stream)
        err = info.value
        assert err.status_code == 404 and err.code == "model_not_found" and err.param == "model"
        assert "nobody-inc" in err.message
        assert err.body["type"] == "invalid_request_error"


TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("kwargs", "param", "code"),
    [
        ({"tools": [TOOL]}, "tools", "unsupported_parameter"),
        ({"tool_choice": "required"}, "tool_choice", "unsupported_value"),
        ({"response_format": {"type": "json_object"}}, "response_format", "unsupported_value"),
        ({"logprobs": True, "top_logprobs": 2}, "logprobs", "unsupported_value"),
        ({"n": 2}, "n", "unsupported_value"),
        ({"frequency_penalty": 0.5}, "frequency_penalty", "unsupported_parameter"),
        ({"user": "user-1"}, "user", "unsupported_parameter"),
        ({"extra_body": {"best_of": 2}}, "best_of", "unknown_parameter"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", None),
        ({"temperature": 3}, "temperature", None),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is in this picture?"},
                            {"type": "image_url", "image_url": {"url": "https://example.com/a"}},
                        ],
                    }
                ]
            },
            "messages[0].content[1].type",
            "unsupported_value",
        ),
    ],
)
def test_a_field_that_is_not_honoured_is_refused_by_name(client, kwargs, param, code) -> None:
    body = {"model": "pirate-co", "messages": _user(), "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**body)
    err = info.value
    assert err.status_code == 400 and err.param == param and err.code == code, err.body
    assert err.body["type"] == "invalid_request_error"
    assert param.rsplit(".", 1)[-1].split("[")[0] in err.message
    assert err.request_id  # the x-request-id header, where the SDK reads it


def test_neutral_values_of_unhonoured_fields_are_accepted(client) -> None:
    r = client.chat.completions.create(
        model="pirate-co",
        messages=_user(),
        max_tokens=4,
        n=1,
        logprobs=False,
        response_format={"type": "text"},
        tool_choice="none",
        store=False,
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4


def test_stop_sequences_end_the_answer_before_them(client) -> None:
    full = client.chat.completions.create(model="pirate-co", messages=_user(), max_tokens=24)
    text = full.choices[0].message.content
    words = text.split()
    assert len(words) >= 6, text
    stop = words[3]  # a word well inside the answer
    expected = text[: text.index(stop)]
    for form in (stop, ["@@ never @@", stop]):
        r = client.chat.completions.create(
            model="pirate-co", messages=_user(), max_tokens=24, stop=form
        )
        assert r.choices[0].message.content == expected, (form, text)
        assert r.choices[0].finish_reason == "stop"
        # the generation ended at the stop: fewer tokens than the whole answer
        assert r.usage.completion_tokens < full.usage.completion_tokens
    chunks = list(
        client.chat.completions.create(
            model="pirate-co", messages=_user(), max_tokens=24, stop=[stop], stream=True
        )
    )
    assert _text(chunks) == expected and _finishes(chunks) == ["stop"]


def test_content_part_arrays_are_text_joined_by_newlines(client) -> None:
    parts = [
        {"type": "text", "text": "What is the tallest mountain"},
        {"type": "text", "text": "in the world?"},
    ]
    joined = "What is the tallest mountain\nin the world?"
    a = client.chat.completions.create(
        model="pirate-co", messages=[{"role": "user", "content": parts}], max_tokens=8
    )
    b = client.chat.completions.create(model="pirate-co", messages=_user(joined), max_tokens=8)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.content.startswith(TENANT_MARKERS["pirate-co"])


def test_errors_under_v1_are_openai_shaped_and_the_rest_keep_the_house_shape(client, url) -> None:
    with pytest.raises(openai.NotFoundError) as info:  # a route this server does not have
        client.completions.create(model="base", prompt="hi", max_tokens=4)
    assert "No such route" in info.value.message and info.value.body["param"] is None
    big = httpx.post(f"{url}/v1/chat/completions", json=_ask_big(), timeout=30)
    assert big.status_code == 413
    assert big.json()["error"]["code"] == "request_too_large"
    assert set(big.json()["error"]) == {"message", "type", "param", "code"}
    house = httpx.get(f"{url}/models/nobody-store", timeout=30)
    assert house.status_code == 404
    assert set(house.json()["error"]) == {"status", "message", "request_id"}


def _ask_big() -> dict:
    return {"model": "base", "messages": _user("word " * 20_000)}  # over the 64 KB body limit


def test_closing_a_stream_stops_the_generation(client) -> None:
    before = chat_stats(APP)
    stream = client.chat.completions.create(
        model="base",
        messages=_user("Write a very long story about a dragon and a knight."),
        max_tokens=200,
        stream=True,
    )
    pieces = 0
    for c in stream:
        pieces += bool(c.choices and c.choices[0].delta.content)
        if pieces >= 3:
            break
    stream.close()  # closes the connection mid-answer
    t0 = time.perf_counter()
    deadline = time.time() + 60
    while time.time() < deadline:
        stats = chat_stats(APP)
        if stats["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.5)
    assert stats["cancelled"] == before["cancelled"] + 1, stats
    assert stats["last"]["finish"] == "cancelled"
    assert stats["last"]["completion_tokens"] < 150, stats["last"]  # stopped well before 200
    # the replica is free again: the next request is served at once, not after 200 tokens
    r = client.chat.completions.create(model="pirate-co", messages=_user(), max_tokens=4)
    assert r.choices[0].finish_reason == "length"
    assert time.perf_counter() - t0 < 60


def test_the_readme_sdk_example(url, capsys) -> None:
    """The SDK block of the README, run as written against this app (only the URL differs)."""
    from pathlib import Path

    readme = Path(__file__).parents[2] / "patterns" / "multiplexing" / "README.md"
    text = readme.read_text()
    block = text.split("<!-- sdk-example -->\n```python\n", 1)[1].split("```", 1)[0]
    assert "http://127.0.0.1:8000/multiplex/v1" in block
    exec(block.replace("http://127.0.0.1:8000/multiplex", url), {})
    out = capsys.readouterr().out
    print(out)
    answer, _, rest = out.partition("| ")
    assert answer.startswith(TENANT_MARKERS["pirate-co"]) and "Everest" not in answer, out
    tokens, _, refusal = rest.partition("\n")
    assert tokens.endswith(" tokens") and 0 < int(tokens.split()[0]) <= 24, out
    assert refusal.strip() == "400 logprobs unsupported_value", out

"""OpenAI conformance without Serve: which request fields are honoured or refused, the stop
sequence matcher, and the error shape under /v1 (a small FastAPI app with the same ingress)."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError

from core.errors import NotFound, ServiceUnavailable, Unprocessable
from core.ingress import install_ingress
from patterns.multiplexing.chat import (
    REFUSED_FIELDS,
    REFUSED_MESSAGE_FIELDS,
    ChatLimits,
    ChatRequest,
    StopMatcher,
)
from patterns.multiplexing.openai_errors import (
    OpenAIError,
    install_openai_errors,
    openai_error_responses,
    param_of,
)

HI = [{"role": "user", "content": "hi"}]


def _refusal(body: dict) -> dict:
    with pytest.raises(ValidationError) as info:
        ChatRequest(**body)
    return info.value.errors()[0]


# ------------------------------------------------------------------------------ the request
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "auto"),
        ("response_format", {"type": "json_object"}),
        ("logprobs", True),
        ("logprobs", 0),  # falsy, but not the false the field means
        ("top_logprobs", 2),
        ("n", 2),
        ("n", True),
        ("functions", [{"name": "f"}]),
        ("presence_penalty", 0.0),
        ("user", "u-1"),
        ("logit_bias", {"50256": -100}),
    ],
)
def test_unhonoured_fields_are_refused_by_name(field, value) -> None:
    err = _refusal({"model": "base", "messages": HI, field: value})
    assert err["ctx"]["param"] == field
    assert err["type"] in ("unsupported_parameter", "unsupported_value")
    assert err["msg"].startswith(f"{field} is not supported: ")


def test_null_and_neutral_values_ask_for_what_the_server_does() -> None:
    neutral = {k: rule.neutral[0] for k, rule in REFUSED_FIELDS.items() if rule.neutral}
    assert neutral == {
        "n": 1,
        "tool_choice": "none",
        "function_call": "none",
        "response_format": {"type": "text"},
        "logprobs": False,
        "store": False,
        "modalities": ["text"],
    }
    for sent in (neutral, dict.fromkeys(REFUSED_FIELDS)):
        request = ChatRequest(model="base", messages=HI, **sent)
        assert set(request.model_dump(exclude_none=True)) == {"model", "messages"}


def test_unknown_fields_are_refused_too() -> None:
    err = _refusal({"model": "base", "messages": HI, "temprature": 0.5})
    assert err["type"] == "extra_forbidden" and err["loc"] == ("temprature",)
    err = _refusal({"model": "base", "messages": HI, "stream_options": {"obfuscate": True}})
    assert err["type"] == "extra_forbidden" and err["loc"] == ("stream_options", "obfuscate")


def test_content_parts_are_text_joined_by_newlines() -> None:
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "the tallest?"}]
    request = ChatRequest(model="base", messages=[{"role": "user", "content": parts}])
    assert request.messages[0].for_template() == {
        "role": "user",
        "content": "What is\nthe tallest?",
    }
    dev = ChatRequest(model="base", messages=[{"role": "developer", "content": "Be brief."}, *HI])
    assert dev.messages[0].for_template()["role"] == "system"


@pytest.mark.parametrize(
    ("message", "kind", "param"),
    [
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
            "unsupported_value",
            "content[0].type",
        ),
        (
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hear this"},
                    {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
                ],
            },
            "unsupported_value",
            "content[1].type",
        ),
        ({"role": "tool", "content": "42", "tool_call_id": "c1"}, "unsupported_value", "role"),
        ({"role": "user", "content": "hi", "name": "ann"}, "unsupported_parameter", "name"),
    ],
)
def test_message_parts_and_fields_not_honoured_are_refused(message, kind, param) -> None:
    err = _refusal({"model": "base", "messages": [message]})
    assert err["type"] == kind and err["ctx"]["param"] == param
    assert param_of(err["loc"], err["ctx"]["param"]) == f"messages[0].{param}".replace(".[", "[")
    assert set(REFUSED_MESSAGE_FIELDS) >= {"name", "tool_calls", "tool_call_id"}


@pytest.mark.parametrize(
    "body",
    [
        {"stop": ""},
        {"stop": []},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"messages": [{"role": "user", "content": []}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "  "}]}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 4001}] * 2}]},
    ],
)
def test_invalid_stops_and_contents_are_refused(body) -> None:
    with pytest.raises(ValidationError):
        ChatRequest(**{"model": "base", "messages": HI, **body})


def test_stop_forms_and_the_token_limit() -> None:
    assert ChatRequest(model="b", messages=HI, stop="\n").stop_sequences() == ["\n"]
    assert ChatRequest(model="b", messages=HI, stop=["a", "b"]).stop_sequences() == ["a", "b"]
    assert ChatRequest(model="b", messages=HI).stop_sequences() == []
    with pytest.raises(OpenAIError) as info:
        ChatRequest(model="b", messages=HI, max_completion_tokens=300).wanted_tokens(ChatLimits())
    assert info.value.status_code == 400 and info.value.param == "max_completion_tokens"


# ------------------------------------------------------------------------------ stop sequences
def _run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        out.append(matcher.feed(piece))
        if matcher.stopped:
            break
    else:
        out.append(matcher.flush())
    return "".join(out), matcher.stopped


@pytest.mark.parametrize(
    ("stops", "pieces", "text", "stopped"),
    [
        (["END"], ["Hello ", "world ", "END", " more"], "Hello world ", True),
        (["END"], ["Hello E", "N", "D more"], "Hello ", True),  # split over three pieces
        (["END"], ["Hello E", "N", "o end"], "Hello ENo end", False),  # a false start is kept
        (["b", "abc"], ["xxab", "c"], "xxa", True),  # the earliest match wins
        (["\n\n", "."], ["One. Two"], "One", True),
        ([], ["a", "b"], "ab", False),
        (["zz"], ["a z"], "a z", False),  # held back, then flushed at the end
    ],
)
def test_stop_matcher(stops, pieces, text, stopped) -> None:
    assert _run(stops, pieces) == (text, stopped)


def test_stop_matcher_holds_back_only_a_possible_start() -> None:
    matcher = StopMatcher(["Everest"])
    assert matcher.feed("Mount Eve") == "Mount "
    assert matcher.feed("ning") == "Evening"


# ------------------------------------------------------------------------------ error shape
class _Body(BaseModel):
    x: int


def _app() -> TestClient:
    api = FastAPI()
    install_ingress(api, app_name="t", max_body_bytes=1024)
    install_openai_errors(api)

    @api.post("/v1/echo", responses=openai_error_responses(400))
    async def v1_echo(body: _Body) -> dict:
        return {"x": body.x}

    @api.get("/v1/gone")
    async def v1_gone() -> dict:
        raise ServiceUnavailable("The chat model is down.")

    @api.get("/v1/refused")
    async def v1_refused() -> dict:
        raise Unprocessable("Not like that.")

    @api.get("/v1/model")
    async def v1_model() -> dict:
        raise OpenAIError(404, "No model 'x'.", param="model", code="model_not_found")

    @api.post("/echo")
    async def echo(body: _Body) -> dict:
        return {"x": body.x}

    @api.get("/missing")
    async def missing() -> dict:
        raise NotFound("No such thing.")

    return TestClient(api)


def _openai(r) -> dict:
    assert r.headers["content-type"] == "application/json"
    assert set(r.json()) == {"error"}
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


def test_errors_under_v1_are_openai_shaped_and_the_rest_keep_the_house_shape() -> None:
    client = _app()
    assert client.post("/v1/echo", json={"x": 1}).json() == {"x": 1}

    error = _openai(client.post("/v1/echo", json={"x": "one"}))
    assert error["param"] == "x" and error["type"] == "invalid_request_error"
    assert "Invalid value for x" in error["message"]
    r = client.post("/v1/echo", json={"y": 1})
    assert r.status_code == 400 and _openai(r)["code"] == "missing_required_parameter"
    r = client.post("/v1/echo", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in _openai(r)["message"]

    r = client.get("/v1/gone")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert _openai(r) == {
        "message": "The chat model is down.",
        "type": "server_error",
        "param": None,
        "code": "service_unavailable",
    }
    r = client.get("/v1/refused")  # OpenAI has no 422
    assert r.status_code == 400 and _openai(r)["message"] == "Not like that."
    r = client.get("/v1/model")
    assert r.status_code == 404
    assert _openai(r) == {
        "message": "No model 'x'.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    r = client.get("/v1/no-such-route")
    assert r.status_code == 404 and "No such route" in _openai(r)["message"]
    r = client.get("/v1/echo")
    assert r.status_code == 405 and _openai(r)["type"] == "invalid_request_error"
    r = client.post("/v1/echo", json={"x": 1, "pad": "y" * 2000})  # the edge's body limit
    assert r.status_code == 413 and _openai(r)["code"] == "request_too_large"

    house = client.post("/echo", json={"x": "one"})
    assert house.status_code == 422
    assert set(house.json()["error"]) == {"status", "message", "request_id"}
    assert client.get("/missing").json()["error"]["status"] == 404
    assert client.post("/echo", content=b"y" * 2000).json()["error"]["status"] == 413


def test_the_openapi_of_the_chat_routes_says_what_they_answer() -> None:
    from patterns.multiplexing.app import api

    doc = api.openapi()
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert set(chat["responses"]) == {"200", "400", "404", "413", "503", "4XX"}  # no 422
    for code in ("400", "404", "413", "503", "4XX"):
        ref = chat["responses"][code]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/OpenAIErrorBody"), (code, ref)
    assert "Retry-After" in chat["responses"]["503"]["headers"]
    request = doc["components"]["schemas"]["ChatRequest"]
    assert request["additionalProperties"] is False
    assert request["properties"]["tools"]["enum"] == [None]
    assert request["properties"]["n"]["enum"] == [None, 1]
    for path in ("/v1/models", "/v1/models/{model}"):
        assert "422" not in doc["paths"][path]["get"]["responses"]
    # the forecast routes keep the house error body
    predict = doc["paths"]["/models/{model_id}/predict"]["post"]["responses"]
    assert predict["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")

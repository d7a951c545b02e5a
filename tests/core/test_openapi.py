"""core.openapi: every route documents its errors with the one error body of core.ingress."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from core.errors import NotFound
from core.ingress import install_ingress
from core.openapi import ERROR_DESCRIPTIONS, ErrorBody, error_responses


def test_each_code_gets_the_error_body_a_description_and_its_headers():
    out = error_responses(503, 401, 422, 422)
    assert list(out) == [401, 422, 503]  # sorted, once each
    for code, entry in out.items():
        assert entry["model"] is ErrorBody
        assert entry["description"] == ERROR_DESCRIPTIONS[code]
    assert "Retry-After" in out[503]["headers"]
    assert "WWW-Authenticate" in out[401]["headers"]
    assert "headers" not in out[422]


def test_refuses_a_status_that_is_not_an_error():
    with pytest.raises(ValueError, match="not an error status"):
        error_responses(200)


class _Item(BaseModel):
    n: int


def _app() -> FastAPI:
    api = FastAPI()
    install_ingress(api, app_name="t")

    @api.post("/items", responses=error_responses(404, 422))
    async def items(body: _Item) -> dict[str, int]:
        if body.n < 0:
            raise NotFound(f"No item {body.n}.")
        return {"n": body.n}

    return api


def test_openapi_documents_the_ingress_error_body_instead_of_fastapis_422():
    api = _app()
    doc = api.openapi()
    responses = doc["paths"]["/items"]["post"]["responses"]
    assert set(responses) == {"200", "404", "422"}
    for code in ("404", "422"):
        ref = responses[code]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorBody")
    assert "HTTPValidationError" not in doc["components"]["schemas"]


def test_the_documented_schema_matches_what_the_ingress_answers():
    client = TestClient(_app())
    for payload, status in (({"n": -1}, 404), ({"n": "x"}, 422)):
        r = client.post("/items", json=payload)
        assert r.status_code == status
        body = ErrorBody.model_validate(r.json())  # the documented model parses the answer
        assert body.error.status == status
        assert body.error.message.endswith(".")


def test_one_key_policy_open_or_keyed_and_the_document_says_which():
    """``api_key_auth(required=...)`` and ``document_replica(keys_required=...)`` read the same
    policy: open routes take no key and declare none; keyed ones refuse and declare it."""
    from fastapi import Depends

    from core.ingress import api_key_auth
    from core.openapi import KEYED, document_replica

    required = {"now": False}
    api = FastAPI()
    install_ingress(api, app_name="t")
    check = api_key_auth(["k-real-1234"], required=lambda: required["now"])

    @api.post("/write", responses=error_responses(*KEYED))
    async def write(key: str = Depends(check)) -> dict[str, str]:
        return {"key": key}

    document_replica(api, keys_required=lambda: required["now"])
    client = TestClient(api)
    assert client.post("/write").json() == {"key": "open"}
    assert "security" not in client.get("/openapi.json").json()["paths"]["/write"]["post"]
    required["now"] = True
    assert client.post("/write").status_code == 401
    assert client.post("/write", headers={"X-API-Key": "nope"}).status_code == 403
    assert client.post("/write", headers={"X-API-Key": "k-real-1234"}).status_code == 200
    doc = client.get("/openapi.json").json()
    assert doc["paths"]["/write"]["post"]["security"] == [{"APIKeyHeader": []}]
    assert "APIKeyHeader" in doc["components"]["securitySchemes"]


def test_keys_required_in_production_always_in_development_on_request():
    from core.settings import keys_required

    assert keys_required(False, "production") and keys_required(True, "production")
    assert not keys_required(False, "development")
    assert keys_required(True, "development")


@pytest.mark.parametrize(
    ("raw", "ok"), [("1", 1), ("1.0", 1), ("0", 0), ('"1"', None), ("true", None), ("1.5", None)]
)
def test_json_int_is_an_integer_as_json_schema_means_it(raw: str, ok: int | None) -> None:
    from pydantic import TypeAdapter, ValidationError

    from core.openapi import json_int

    adapter = TypeAdapter(json_int(ge=0, le=1))
    assert adapter.json_schema() == {"type": "integer", "minimum": 0, "maximum": 1}
    if ok is None:
        with pytest.raises(ValidationError):
            adapter.validate_json(raw)
    else:
        assert adapter.validate_json(raw) == ok

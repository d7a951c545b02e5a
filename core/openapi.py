"""OpenAPI documentation of errors, the same way in every pattern.

Every error the ingress answers has one body (``core.ingress.error_body``):
``{"error": {"status": 422, "message": "<a sentence>", "request_id": "..."}}``.
A route lists the errors it can give, so generated clients and schema fuzzers
(``reliability/fuzz.py``) know them:

    @api.post("/score", responses=error_responses(*JSON_BODY, *KEYED, 404, 503))

Name every code the route can give (``JSON_BODY`` and ``KEYED`` hold those that come with a
JSON body and with a key); FastAPI's own 422 entry is replaced by ours (the same error body).

``document_replica(api, edit, keys_required)`` makes the document a replica serves say what that
replica enforces: limits that come from the app's args (rows per request, the bandit's context
length) are written into the request schemas by ``edit``, and the API-key security requirement
is dropped where this environment does not require keys (development, by default).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import FastAPI
from pydantic import BaseModel, BeforeValidator, Field


def _a_json_number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"a whole number is needed, not {type(value).__name__} {value!r}")
    return value


# An integer as JSON Schema means it: 1 and 1.0 are both the integer 1; "1", true and false are
# not numbers. (Pydantic's lax int takes true as 1; its strict int refuses 1.0, which the schema's
# "type": "integer" allows.) Bounds go on the field (``x: JsonInt = Field(ge=1)``) or through
# ``json_int(ge=0, le=1)`` inside a list: after the validator, pydantic would write them into
# the schema as "ge"/"le", words JSON Schema does not know.
JsonInt = Annotated[int, BeforeValidator(_a_json_number)]


def json_int(**bounds: Any) -> Any:
    """``JsonInt`` with ``bounds`` (ge, le, ...) that the schema states as minimum/maximum."""
    return Annotated[int, Field(**bounds), BeforeValidator(_a_json_number)]


class ErrorDetail(BaseModel):
    status: int = Field(description="The HTTP status, repeated in the body")
    message: str = Field(description="What went wrong, as a sentence a person can act on")
    request_id: str = Field(description="Quote it when reporting a problem")


class ErrorBody(BaseModel):
    """The body of every 4xx and 5xx answer (core.ingress)."""

    error: ErrorDetail


# One line per code: what it means for a caller of this cookbook's apps.
ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "Bad request: the body or a header cannot be used as sent.",
    401: "No API key: send it in the key header.",
    403: "The API key is not valid for this route.",
    404: "No such resource (unknown id, model or route).",
    405: "This route does not accept that HTTP method.",
    409: "The request clashes with the current state (say, nothing to roll back to).",
    413: "The request body is larger than this route accepts.",
    415: "Unsupported Content-Type for this route.",
    422: "The request is well-formed but its values are refused; the message says which.",
    429: "Too many requests from this client; retry after Retry-After seconds.",
    503: "A dependency or model is unavailable; retry after Retry-After seconds.",
}

# The errors every route of a kind can give, whatever its handler does:
# a JSON body: 400 (not UTF-8 / not parseable), 413 (over the ingress body limit), 422 (invalid);
JSON_BODY = (400, 413, 422)
# a route behind ``core.ingress.api_key_auth``: 401 (no key), 403 (a wrong key).
KEYED = (401, 403)

_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying",
        "schema": {"type": "integer", "minimum": 1},
    }
}
_WWW_AUTHENTICATE = {
    "WWW-Authenticate": {"description": "The key scheme", "schema": {"type": "string"}}
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a FastAPI route that can answer ``codes``: each with the error
    body model, a one-line description and its headers (Retry-After on 429/503)."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in sorted(set(codes)):
        if not 400 <= code <= 599:
            raise ValueError(f"{code} is not an error status (4xx or 5xx)")
        entry: dict[str, Any] = {
            "model": ErrorBody,
            "description": ERROR_DESCRIPTIONS.get(code, f"Error {code}."),
        }
        if code in (429, 503):
            entry["headers"] = dict(_RETRY_AFTER)
        elif code == 401:
            entry["headers"] = dict(_WWW_AUTHENTICATE)
        out[code] = entry
    return out


def schema_property(doc: dict[str, Any], model: str, field: str) -> dict[str, Any]:
    """The JSON Schema of ``model.field`` in an OpenAPI ``doc`` (the non-null branch of an
    optional field), to write the limits the code enforces into."""
    prop: dict[str, Any] = doc["components"]["schemas"][model]["properties"][field]
    for branch in prop.get("anyOf", []):
        if branch.get("type") != "null":
            return branch
    return prop


def drop_security(doc: dict[str, Any]) -> None:
    """No route of ``doc`` requires a key: the security requirements and their schemes go."""
    for operations in doc.get("paths", {}).values():
        for operation in operations.values():
            if isinstance(operation, dict):
                operation.pop("security", None)
    doc.get("components", {}).pop("securitySchemes", None)


def document_replica(
    app: FastAPI,
    edit: Callable[[dict[str, Any]], None] | None = None,
    keys_required: Callable[[], bool] | None = None,
) -> None:
    """Serve ``app``'s OpenAPI document as this replica enforces it.

    ``edit(doc)`` writes the limits read from the replica's args into the document (with
    ``schema_property``); ``keys_required()`` says whether the keyed
    routes need a key here (false: ``drop_security``). Both run when the document is asked
    for, inside the replica, so they read the replica's own args and environment; outside a
    replica they must fall back to the defaults. Call it once, before ``@serve.ingress(app)``.
    """
    generate = app.openapi  # FastAPI's own, cached in app.openapi_schema

    def openapi() -> dict[str, Any]:
        doc = copy.deepcopy(generate())
        if edit is not None:
            edit(doc)
        if keys_required is not None and not keys_required():
            drop_security(doc)
        return doc

    app.openapi = openapi  # type: ignore[method-assign]

"""OpenAI's error shape for the routes under ``/v1``; the rest of the app keeps the house shape.

OpenAI clients read ``{"error": {"message", "type", "param", "code"}}``: the official SDK turns
it into typed exceptions (``BadRequestError`` with ``.param`` and ``.code``, ``NotFoundError``,
``RateLimitError``...). The house shape (core/ingress.py) stays for every other route. Three
pieces, installed once by ``install_openai_errors(api)`` after ``install_ingress``:

- ``OpenAIError``: raised by the /v1 routes where they know the field at fault and a code;
- request validation under /v1 answers 400 naming the field (``param``), from pydantic's error;
- an outer ASGI middleware rewrites every other error answered under /v1 into OpenAI's shape:
  the house handlers' (404 route, 503...) and the edge middleware's (413 body limit, 500,
  lost-replica 503), keeping the status and headers (Retry-After).

OpenAI answers 400 where this app says 422 (a refused value), so under /v1 a 422 becomes a 400:
``BadRequestError`` is what SDK users catch. The request id is not in the body: it is in the
``x-request-id`` header, where the SDK reads it (``err.request_id``).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import HTTPError

V1_PREFIX = "/v1"

# OpenAI's error types by status; every other 4xx is an invalid request.
_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
_CODES = {413: "request_too_large", 429: "rate_limit_exceeded", 503: "service_unavailable"}
# pydantic error types that are ours (chat.py raises them with the field in ``ctx``), and the
# OpenAI codes of pydantic's own kinds.
_PYDANTIC_CODES = {
    "missing": "missing_required_parameter",
    "extra_forbidden": "unknown_parameter",
    "unsupported_parameter": "unsupported_parameter",
    "unsupported_value": "unsupported_value",
}
# Location parts that name a union branch or a validator, not a field: ``str``,
# ``list[TextPart]``, ``function-after[...]``.
_BRANCH = re.compile(r"^(str|int|float|bool|none|list|dict)$|[\[\]A-Z-]")


def openai_status(status: int) -> int:
    return 400 if status == 422 else status


def openai_error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = "server_error" if status >= 500 else _TYPES.get(status, "invalid_request_error")
    return {
        "error": {
            "message": message,
            "type": kind,
            "param": param,
            "code": code if code is not None else _CODES.get(status),
        }
    }


class OpenAIError(HTTPError):
    """An error of a /v1 route, with the request field at fault (``param``) and a code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = openai_status(status)
        self.param = param
        self.code = code
        if retry_after_s is None and status in (429, 503):
            retry_after_s = 1.0
        self.retry_after_s = retry_after_s

    def response(self) -> JSONResponse:
        headers = None
        if self.retry_after_s is not None:
            headers = {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}
        body = openai_error_body(self.status_code, self.message, self.param, self.code)
        return JSONResponse(body, status_code=self.status_code, headers=headers)


# ------------------------------------------------------------------------------ OpenAPI
class OpenAIErrorDetail(BaseModel):
    message: str = Field(description="What went wrong, as a sentence a person can act on")
    type: str = Field(
        description="invalid_request_error, authentication_error, permission_error, "
        "rate_limit_error or server_error"
    )
    param: str | None = Field(description="The request field at fault, when there is one")
    code: str | None = Field(
        description="A machine-readable reason: model_not_found, unsupported_parameter, ..."
    )


class OpenAIErrorBody(BaseModel):
    """The body of every 4xx and 5xx answer under /v1 (OpenAI's shape)."""

    error: OpenAIErrorDetail


_DESCRIPTIONS = {
    400: "The request cannot be used as sent: a field is refused, unsupported or invalid "
    "(param names it). OpenAI's status for what the rest of this app answers with 422.",
    404: "No such model (tenant), or no such route.",
    413: "The request body is larger than this route accepts.",
    503: "The chat model is unavailable or busy; retry after Retry-After seconds.",
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying",
        "schema": {"type": "integer", "minimum": 1},
    }
}


def openai_error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a /v1 route: each code with OpenAI's error body, plus ``4XX`` for the
    rest (405...). ``4XX`` also stands in for FastAPI's own 422 entry: none is answered here."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in sorted(set(codes)):
        entry: dict[str, Any] = {
            "model": OpenAIErrorBody,
            "description": _DESCRIPTIONS.get(code, f"Error {code}."),
        }
        if code in (429, 503):
            entry["headers"] = dict(_RETRY_AFTER)
        out[code] = entry
    out["4XX"] = {"model": OpenAIErrorBody, "description": "Any other client error."}
    return out


# ------------------------------------------------------------------------------ validation
def param_of(loc: tuple[Any, ...] | list[Any], suffix: str | None = None) -> str | None:
    """``("body", "messages", 0, "content", "str")`` -> ``"messages[0].content"``."""
    out = ""
    for part in loc:
        if not out and part in ("body", "path", "query", "header"):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif _BRANCH.search(str(part)):
            break
        else:
            out += f".{part}" if out else str(part)
    if suffix:
        out = out + suffix if suffix.startswith("[") or not out else f"{out}.{suffix}"
    return out or None


def validation_error(exc: RequestValidationError) -> OpenAIError:
    """The first pydantic error as OpenAI's 400, naming the field."""
    errors = exc.errors()
    if not errors:
        return OpenAIError(400, "The request is invalid.")
    err = errors[0]
    kind = str(err.get("type", ""))
    ctx = err.get("ctx") or {}
    param = param_of(err.get("loc", ()), ctx.get("param") if isinstance(ctx, dict) else None)
    msg = str(err.get("msg", "invalid value"))
    if kind == "json_invalid":
        return OpenAIError(400, "The request body is not valid JSON.", code="invalid_json")
    if kind == "missing" and param is None:
        return OpenAIError(400, "The request body is empty; send a JSON object.")
    if kind == "missing":
        message = f"Missing required parameter: {param!r}."
    elif kind == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}."
    elif kind in _PYDANTIC_CODES:
        message = msg  # ours: a whole sentence already
    elif kind == "string_pattern_mismatch" and ctx.get("pattern") == r"\S":
        message = f"Invalid value for {param}: it is empty (whitespace only)."
    else:
        message = f"Invalid value for {param or 'the body'}: {msg.removeprefix('Value error, ')}."
    return OpenAIError(400, message, param=param, code=_PYDANTIC_CODES.get(kind))


# ------------------------------------------------------------------------------ wiring
def under_prefix(scope: Scope, prefix: str = V1_PREFIX) -> bool:
    """Whether the request is for a route under ``prefix`` of this app (root path aside)."""
    path = str(scope.get("path", ""))
    root = str(scope.get("root_path", ""))
    if root and path.startswith(root):
        path = path[len(root) :]
    return path == prefix or path.startswith(prefix + "/")


def reshape(status: int, body: bytes) -> tuple[int, bytes]:
    """An error answer (the house shape, or anything else) as OpenAI's shape."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and "type" in error and "param" in error:
        return status, body  # already OpenAI's
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        message = error["message"]
    else:
        message = body.decode("utf-8", "replace").strip()[:500] or f"HTTP {status}"
    status = openai_status(status)
    return status, json.dumps(openai_error_body(status, message)).encode()


class _OpenAIErrorShape:
    """Outermost ASGI middleware: error answers under the prefix become OpenAI's shape."""

    def __init__(self, app: ASGIApp, prefix: str = V1_PREFIX) -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not under_prefix(scope, self.prefix):
            await self.app(scope, receive, send)
            return
        held: Message | None = None  # the start of an error answer, sent with its body
        chunks: list[bytes] = []

        async def flush() -> None:
            nonlocal held
            assert held is not None
            status, body = reshape(held["status"], b"".join(chunks))
            headers = [
                (k, v)
                for k, v in held.get("headers", [])
                if k.lower() not in (b"content-length", b"content-type")
            ]
            headers += [
                (b"content-length", str(len(body)).encode()),
                (b"content-type", b"application/json"),
            ]
            await send({**held, "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
            held = None

        async def send_shaped(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held = message
                return
            if held is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                await flush()

        await self.app(scope, receive, send_shaped)
        if held is not None:  # an error start whose body never came: answer it anyway
            await flush()


def install_openai_errors(api: FastAPI, prefix: str = V1_PREFIX) -> FastAPI:
    """OpenAI's error shape under ``prefix``; call after ``core.ingress.install_ingress``."""
    house_validation = api.exception_handlers[RequestValidationError]

    async def _validation(request: Request, exc: Exception) -> Any:
        if isinstance(exc, RequestValidationError) and under_prefix(request.scope, prefix):
            return validation_error(exc).response()
        return await house_validation(request, exc)

    async def _openai(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, OpenAIError)
        return exc.response()

    api.add_exception_handler(RequestValidationError, _validation)
    api.add_exception_handler(OpenAIError, _openai)
    api.add_middleware(_OpenAIErrorShape, prefix=prefix)  # added last: the outermost
    return api

"""Errors shared by the model store and the HTTP ingress.

Two families: store errors (raised while loading or saving artifacts) and HTTP-mapped errors,
which carry the status code and a sentence a person can act on. `core.ingress` turns the
latter into JSON responses; anything else becomes a 500 with no traceback.
"""

from __future__ import annotations


class ModelStoreError(Exception):
    """Base class for model store failures."""


class InvalidModelId(ModelStoreError, ValueError):
    """A model name or version that is not a safe, single path segment."""


class ModelNotFound(ModelStoreError, LookupError):
    """No artifact under that name/version."""


class IntegrityError(ModelStoreError):
    """An artifact's bytes do not match its manifest (tampered or half-written)."""


class UnsafeFormatError(ModelStoreError):
    """An artifact in a format that can execute code on load (pickle and friends)."""


class HTTPError(Exception):
    """An error that maps to an HTTP status with a human sentence."""

    status_code = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(HTTPError):
    status_code = 400


class Unauthorized(HTTPError):
    status_code = 401


class Forbidden(HTTPError):
    status_code = 403


class NotFound(HTTPError):
    status_code = 404


class Conflict(HTTPError):
    """The request is valid but clashes with the current state (e.g. an id reused with other
    content, a change while another one is under way)."""

    status_code = 409


class PayloadTooLarge(HTTPError):
    status_code = 413


class UnsupportedMediaType(HTTPError):
    status_code = 415


class Unprocessable(HTTPError):
    status_code = 422


class TooManyRequests(HTTPError):
    """Backpressure: the client should slow down; answered with ``Retry-After``."""

    status_code = 429

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ServiceUnavailable(HTTPError):
    """A dependency is down or still warming up; answered with ``Retry-After``."""

    status_code = 503

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

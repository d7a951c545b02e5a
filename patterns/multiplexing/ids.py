"""Model ids: what a caller may send, and how a hot id is spread over replica slots.

A tenant's model id (``store-0042``, ``pirate-co``) is checked here before anything else
happens: a malformed id (path traversal, too long, characters outside the allowlist) is a
422 decided from the string alone; whether a well-formed id exists is the index's question
(catalog.py), answered without reading any model file.

Serve routes a multiplexed request by the exact string it is given. To let one hot tenant
live on more than one replica, the ingress sends a hot id as ``<id>#<slot>`` (slot 0..k-1):
Serve sees k different model ids, places each where it would place a new model (a replica
with the fewest models), and from then on prefers the replica(s) holding each slot. Replicas
strip the slot and load the tenant's model once, whatever the number of slots they hold.
"""

from __future__ import annotations

import re

from core.errors import Unprocessable

MAX_ID_LENGTH = 64
# Lower-case letters, digits, '-' and '_', starting with a letter or digit: a single safe
# path segment in any store, never '.', '/', '%' or whitespace.
ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
# The id as an OpenAPI document states it; check_model_id enforces it (a 4xx with a sentence),
# so request models and path parameters only document it (pydantic's own error would say less).
ID_SCHEMA = {"pattern": ID_PATTERN.pattern, "maxLength": MAX_ID_LENGTH}
SLOT_SEPARATOR = "#"  # never valid inside an id, so "<id>#<slot>" cannot be forged


def check_model_id(value: str | None, what: str = "model id") -> str:
    """``value`` if it is a well-formed id, else a 422 with a sentence."""
    if value is None or value == "":
        raise Unprocessable(f"The {what} is missing.")
    if len(value) > MAX_ID_LENGTH:
        raise Unprocessable(
            f"The {what} is {len(value)} characters long; ids have at most {MAX_ID_LENGTH}."
        )
    if not ID_PATTERN.fullmatch(value):
        raise Unprocessable(
            f"The {what} {value[:MAX_ID_LENGTH]!r} is not allowed: use lower-case letters, "
            "digits, '-' and '_', starting with a letter or digit."
        )
    return value


def serve_model_id(model_id: str, slot: int | None = None) -> str:
    """The multiplexed model id Serve routes by: the id, or ``<id>#<slot>`` for a hot id."""
    return model_id if slot is None else f"{model_id}{SLOT_SEPARATOR}{slot}"


def split_serve_model_id(value: str) -> tuple[str, int | None]:
    """``(model_id, slot)`` from what Serve passed to a replica (the inverse of the above)."""
    model_id, sep, slot = value.partition(SLOT_SEPARATOR)
    check_model_id(model_id)
    if not sep:
        return model_id, None
    if not slot.isdigit() or len(slot) > 3:
        raise Unprocessable(f"The replica slot in {value[:80]!r} is not a small number.")
    return model_id, int(slot)


class HotIdSpreader:
    """Which Serve model id to send for a tenant: hot ids round-robin over ``slots`` ids.

    Serve prefers the replicas that already hold a model id, and places a new id on the
    replica with the fewest models; a hot tenant under one id therefore stays on one replica
    however busy it gets (ray#48741, ray#65691). Under ``slots`` ids it is held by up to
    ``slots`` replicas, each still routed by affinity. Cold ids keep one id (one copy).
    """

    def __init__(self, hot_ids: list[str], slots: int) -> None:
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.hot = frozenset(hot_ids)
        self.slots = slots
        self._next: dict[str, int] = {}

    def serve_id(self, model_id: str) -> str:
        if model_id not in self.hot or self.slots == 1:
            return model_id
        slot = self._next.get(model_id, 0)
        self._next[model_id] = (slot + 1) % self.slots
        return serve_model_id(model_id, slot)

    def all_serve_ids(self, model_id: str) -> list[str]:
        """Every id a hot tenant goes by (what a replica prewarms and claims)."""
        if model_id not in self.hot or self.slots == 1:
            return [model_id]
        return [serve_model_id(model_id, s) for s in range(self.slots)]

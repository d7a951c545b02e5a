"""The index of tenants' models: which ids exist, without reading any model file.

One JSON artifact in the model store (``forecast-index/<version>``, ``chat-adapter-index/...``)
maps each tenant id to the artifact that serves it (name, version, the sha256 of its manifest,
its size). Replicas and the ingress read it once at start. An id that is not in it is a 404
decided in memory: a burst of made-up ids costs no storage read, no cache slot and no load.
The manifest digest pins the exact artifact: a model whose manifest changed after the index
was written is refused (503 for that id) like a model whose file does not match its manifest.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, Field

from core.errors import NotFound
from core.model_store import ModelRef, ModelStore


class IndexEntry(BaseModel):
    name: str  # artifact name in the model store
    version: str
    manifest_sha256: str = Field(min_length=64, max_length=64)
    nbytes: int = Field(ge=0)  # what the replica's cache will charge for it
    info: dict[str, Any] = Field(default_factory=dict)  # shown by GET /models/{id}


class ModelIndex:
    """In-memory lookup of tenant id -> artifact, loaded from one verified JSON file."""

    def __init__(
        self, entries: Mapping[str, IndexEntry], *, what: str, ref: ModelRef | None = None
    ) -> None:
        self.entries = dict(entries)
        self.what = what  # "forecaster", "chat adapter": used in 404 sentences
        self.ref = ref

    @classmethod
    def load(cls, store: ModelStore, name: str, version: str = "latest") -> ModelIndex:
        files, ref = store.read_verified(name, version)
        body = json.loads(files["index.json"])
        entries = {k: IndexEntry(**v) for k, v in body["entries"].items()}
        return cls(entries, what=body["what"], ref=ref)

    @staticmethod
    def to_files(what: str, entries: Mapping[str, IndexEntry]) -> dict[str, bytes]:
        body = {"what": what, "entries": {k: v.model_dump() for k, v in sorted(entries.items())}}
        return {"index.json": json.dumps(body, sort_keys=True).encode()}

    def lookup(self, model_id: str) -> IndexEntry:
        entry = self.entries.get(model_id)
        if entry is None:
            raise NotFound(
                f"There is no {self.what} {model_id!r}; GET /models lists the ids this service has."
            )
        return entry

    def __contains__(self, model_id: object) -> bool:
        return model_id in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def ids(self) -> Iterable[str]:
        return self.entries.keys()

    def public(self) -> dict[str, Any]:
        ref = self.ref.public() if self.ref else None
        return {"what": self.what, "count": len(self), "index": ref}

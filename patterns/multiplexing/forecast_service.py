"""The forecasting flow on a model replica, as a plain class (tested without Serve).

    serve model id "store-0042" or "store-0042#1"
      -> id checked (422) -> index lookup (404, in memory, no storage read)
      -> ModelCache.get: hit, or one load per id (store read, sha256 vs manifest, manifest
         digest vs index -> 503 for this id only when they differ; then the model computes
         its whole calendar once, so the load is the expensive step and a hit is cheap)
      -> a slice of that table for every request in the batch -> answers

Refusals are returned as values (``{"error": {"status", "message"}}``), one per request, so a
batch with a broken model fails only that model's requests and the ingress turns each into
the same JSON error a direct call would get.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.errors import (
    HTTPError,
    IntegrityError,
    ModelNotFound,
    ServiceUnavailable,
    UnsafeFormatError,
)
from core.model_store import ModelRef, ModelStore
from core.openapi import JsonInt
from core.timing import Timings
from patterns.multiplexing.cache import ModelCache
from patterns.multiplexing.catalog import IndexEntry, ModelIndex
from patterns.multiplexing.forecasting import (
    EPOCH,
    FIRST_FORECAST_DAY,
    Forecaster,
    forecast_answer,
)
from patterns.multiplexing.ids import split_serve_model_id

EARLIEST_DAY = dt.date(2024, 1, 1)
LATEST_DAY = dt.date(2030, 12, 31)
MAX_HORIZON_DAYS = 56
# Every day a request can name: what a loaded model computes once (Forecaster.materialize).
CALENDAR_FIRST_DAY = (EARLIEST_DAY - EPOCH).days
CALENDAR_DAYS = (LATEST_DAY - EARLIEST_DAY).days + MAX_HORIZON_DAYS
# The calendar as JSON Schema can say it: whole years, so a pattern on the year does (the
# validator below is what enforces it, with a sentence).
_YEARS = "|".join(str(y) for y in range(EARLIEST_DAY.year, LATEST_DAY.year + 1))
CALENDAR_PATTERN = rf"^({_YEARS})-"


class ForecastRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # first day to forecast (default: the day after the training window ends)
    start_date: dt.date = Field(
        default=FIRST_FORECAST_DAY,
        description=f"Between {EARLIEST_DAY} and {LATEST_DAY}, the models' calendar.",
        json_schema_extra={"pattern": CALENDAR_PATTERN},
    )
    horizon_days: JsonInt = Field(default=7, ge=1, le=MAX_HORIZON_DAYS)

    @field_validator("start_date")
    @classmethod
    def _in_calendar(cls, value: dt.date) -> dt.date:
        if not EARLIEST_DAY <= value <= LATEST_DAY:
            raise ValueError(
                f"start_date must be between {EARLIEST_DAY} and {LATEST_DAY} (the models' calendar)"
            )
        return value


def load_forecaster(files: dict[str, bytes]) -> Forecaster:
    """A model from its files, its whole calendar computed: what a replica's cache holds."""
    return Forecaster.from_files(files).materialize(CALENDAR_FIRST_DAY, CALENDAR_DAYS)


Loaded = tuple[Forecaster, ModelRef]
Claim = Callable[[str], Awaitable[Any]]


def refusal(exc: HTTPError) -> dict[str, Any]:
    return {"error": {"status": exc.status_code, "message": exc.message}}


class ForecastService:
    """Index lookups, the per-replica cache and batched predictions for many forecasters."""

    def __init__(
        self,
        store: ModelStore,
        index: ModelIndex,
        *,
        max_models: int,
        max_bytes: int,
    ) -> None:
        self.store = store
        self.index = index
        self.cache: ModelCache[Loaded] = ModelCache(
            self._load, lambda loaded: loaded[0].nbytes, max_models=max_models,
            max_bytes=max_bytes,
        )  # fmt: skip
        self._reads = 0  # store reads of model files, counted in the loading thread
        self._reads_lock = threading.Lock()

    @property
    def store_reads(self) -> int:
        return self._reads

    async def _load(self, model_id: str) -> Loaded:
        entry = self.index.lookup(model_id)
        return await asyncio.to_thread(self._read, model_id, entry)

    def _read(self, model_id: str, entry: IndexEntry) -> Loaded:
        with self._reads_lock:
            self._reads += 1
        try:
            files, ref = self.store.read_verified(entry.name, entry.version)
        except (IntegrityError, UnsafeFormatError, ModelNotFound) as exc:
            raise ServiceUnavailable(
                f"The forecaster for {model_id!r} cannot be loaded ({exc}); other ids are "
                "unaffected. Retry later or tell the model owner."
            ) from exc
        if ref.sha256 != entry.manifest_sha256:
            raise ServiceUnavailable(
                f"The forecaster for {model_id!r} in the store is not the one the index names "
                "(its manifest changed); refusing to serve it until the index is rebuilt."
            )
        return load_forecaster(files), ref

    async def prewarm(self, model_ids: list[str]) -> dict[str, str]:
        """Load ``model_ids`` now (at replica start); returns id -> "ok" or the refusal."""
        results = await asyncio.gather(
            *(self.cache.get(m) for m in model_ids if m in self.index), return_exceptions=True
        )
        known = [m for m in model_ids if m in self.index]
        out = {m: ("ok" if not isinstance(r, BaseException) else str(r)) for m, r in
               zip(known, results, strict=True)}  # fmt: skip
        out.update({m: "not in the index" for m in model_ids if m not in self.index})
        return out

    async def forecast_batch(
        self, serve_id: str, payloads: list[dict[str, Any]], claim: Claim | None = None
    ) -> list[dict[str, Any]]:
        """Answers for requests that all name the same model (Serve splits batches by id)."""
        timings = Timings()
        try:
            model_id, slot = split_serve_model_id(serve_id)
            self.index.lookup(model_id)
            with timings.stage("model_cache"):
                (model, ref), outcome = await self.cache.get(model_id)
            if claim is not None:  # tell Serve's router this replica holds serve_id
                await claim(serve_id)
        except HTTPError as exc:
            return [refusal(exc) for _ in payloads]
        answers: list[dict[str, Any]] = []
        with timings.stage("predict"):
            for payload in payloads:
                try:
                    req = ForecastRequest(**payload)
                except ValueError as exc:  # the ingress validated already; handle callers
                    answers.append({"error": {"status": 422, "message": str(exc)}})
                    continue
                answers.append(
                    {
                        "model_id": model_id,
                        "model": ref.public(),
                        "start_date": req.start_date.isoformat(),
                        "horizon_days": req.horizon_days,
                        **forecast_answer(model, req.start_date, req.horizon_days),
                        "holdout_mape": model.holdout_mape,
                    }
                )
        served = {"cache": outcome, "slot": slot, "batch_size": len(payloads)}
        t = timings.as_dict()
        for a in answers:
            if "error" not in a:
                a["served_by"] = served
                a["timings_ms"] = t
        return answers

    def stats(self) -> dict[str, Any]:
        return {
            "index": self.index.public(),
            "cache": self.cache.snapshot(),
            "cached_ids": self.cache.keys()[-20:],  # most recently used last
            "store_reads": self.store_reads,
        }

"""The feature store: precomputed per-customer feature vectors with a freshness timestamp.

Two backends behind one small interface:
- embedded default: a SQLite file (``sqlite:///.../features.db``), one row per customer;
- Redis (``redis://host:port/db``): one hash per customer, ``bizfeat:<customer_id>``.

Policy for a vector that is missing, stale (older than ``max_age_s``), invalid (stored but not a
readable vector: bad JSON, a field missing or not a finite number) or unreadable (the store is
down) lives in ``FeaturePolicy`` and is applied by the scorer:
- ``recompute`` (default): compute the vector from the customer's history in the database (the
  exact but slower path), answer with it, say so in the response (``features.source``), and
  write it back to the store so the next request finds it fresh (read-through; this also
  replaces an invalid vector); an unreachable store also marks the answer ``degraded``;
- ``reject``: answer 503, for teams that would rather not score on a slower path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field
from sqlalchemy import Column, Float, MetaData, String, Table, Text, select

from patterns.business_logic.database import BlockingCalls, make_engine, sqlite_path
from patterns.business_logic.records import FEATURE_NAMES

logger = logging.getLogger("patterns.business_logic.features")

REDIS_PREFIX = "bizfeat:"

feature_metadata = MetaData()
feature_vectors = Table(
    "feature_vectors",
    feature_metadata,
    Column("customer_id", String(16), primary_key=True),
    Column("vector_json", Text, nullable=False),
    Column("computed_at", Float, nullable=False),  # unix seconds
)


class FeaturePolicy(BaseModel):
    # how old may a precomputed vector be before it is recomputed? (a nightly job: 1 day+slack)
    max_age_s: float = Field(default=36 * 3600, gt=0)
    on_missing_or_stale: Literal["recompute", "reject"] = "recompute"
    write_back: bool = True  # store recomputed vectors so the next request finds them fresh


@dataclass(frozen=True)
class FeatureVector:
    values: dict[str, float]
    computed_at: float


class FeatureStoreUnavailable(Exception):
    """The store did not answer (down, refused, timed out, or not set up)."""


class InvalidFeatureVector(Exception):
    """The store answered, but what it holds for the customer is not a usable vector."""


def _number(value: Any) -> float:
    """A finite, non-negative number (every feature is a count, an amount or a share), from
    JSON (int or float, not bool) or from Redis (text)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{value!r} is not a number")
    number = float(value)  # ValueError for text that is not a number
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{value!r} is not a finite, non-negative number")
    return number


def _invalid(customer_id: str, why: str) -> InvalidFeatureVector:
    logger.warning("invalid feature vector for %s, treated as missing: %s", customer_id, why)
    return InvalidFeatureVector(why)


def checked_vector(customer_id: str, values: Any, computed_at: Any) -> FeatureVector:
    """The stored vector as a FeatureVector, or InvalidFeatureVector (logged) saying why."""
    try:
        if not isinstance(values, Mapping):
            raise ValueError(f"a {type(values).__name__}, not an object of features")
        if set(values) != set(FEATURE_NAMES):
            raise ValueError(f"fields {sorted(values)}, expected {sorted(FEATURE_NAMES)}")
        return FeatureVector({k: _number(values[k]) for k in FEATURE_NAMES}, _number(computed_at))
    except ValueError as exc:
        raise _invalid(customer_id, str(exc)) from exc


class FeatureStore(Protocol):
    """``get`` returns None for a customer with no vector, raises ``FeatureStoreUnavailable``
    when the store does not answer and ``InvalidFeatureVector`` when what it holds is unusable."""

    kind: str

    async def get(self, customer_id: str) -> FeatureVector | None: ...

    async def put_many(self, vectors: Mapping[str, FeatureVector]) -> None: ...

    async def close(self) -> None: ...


# ------------------------------------------------------------------------------ SQLite
class SQLiteFeatureStore:
    """Embedded default: one SQLite file, read in a small thread pool with a short timeout."""

    kind = "sqlite"

    def __init__(self, url: str, *, timeout_s: float = 0.5, create: bool = False) -> None:
        if create:
            sqlite_path(url).parent.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(url, timeout_s=timeout_s, pool_size=2, create=create)
        if create:
            feature_metadata.create_all(self.engine)
            with self.engine.connect() as conn:  # readers never wait on the write-back
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        self.timeout_s = timeout_s
        self._calls = BlockingCalls(
            name="feature store (sqlite)",
            workers=2,
            deadline_s=timeout_s + 0.25,
            unavailable=FeatureStoreUnavailable,
        )

    def _get_sync(self, customer_id: str) -> Any:
        query = select(feature_vectors).where(feature_vectors.c.customer_id == customer_id)
        with self.engine.connect() as conn:
            return conn.execute(query).first()

    async def get(self, customer_id: str) -> FeatureVector | None:
        row = await self._calls.run(self._get_sync, customer_id)
        if row is None:
            return None
        try:
            values = json.loads(row.vector_json)
        except (ValueError, TypeError) as exc:  # not JSON, not UTF-8, or not text at all
            raise _invalid(customer_id, f"not JSON: {exc}") from exc
        return checked_vector(customer_id, values, row.computed_at)

    def _put_many_sync(self, vectors: Mapping[str, FeatureVector]) -> None:
        with self.engine.begin() as conn:
            for cid, vec in vectors.items():
                conn.execute(feature_vectors.delete().where(feature_vectors.c.customer_id == cid))
                conn.execute(
                    feature_vectors.insert(),
                    {
                        "customer_id": cid,
                        "vector_json": json.dumps(vec.values, sort_keys=True),
                        "computed_at": vec.computed_at,
                    },
                )

    async def put_many(self, vectors: Mapping[str, FeatureVector]) -> None:
        # one transaction: all the vectors or none; a bulk fill (the seed) gets longer
        deadline = max(5.0, self.timeout_s * 4) if len(vectors) > 1 else None
        await self._calls.run(self._put_many_sync, vectors, deadline_s=deadline)

    async def close(self) -> None:
        self._calls.close()
        self.engine.dispose()


# ------------------------------------------------------------------------------ Redis
class RedisFeatureStore:
    """Redis hashes via redis-py asyncio; short socket timeouts and no client-side retries
    (the scorer's circuit breaker decides when to stop trying, not the driver)."""

    kind = "redis"

    def __init__(self, url: str, *, timeout_s: float = 0.25) -> None:
        import redis.asyncio as redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError, TimeoutError)
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
        self.timeout_s = timeout_s

    async def get(self, customer_id: str) -> FeatureVector | None:
        try:
            raw = await asyncio.wait_for(
                self.client.hgetall(REDIS_PREFIX + customer_id), self.timeout_s * 2
            )
        except self._errors as exc:
            raise FeatureStoreUnavailable(type(exc).__name__) from exc
        except UnicodeDecodeError as exc:  # redis-py drops the connection on this
            raise _invalid(customer_id, f"not UTF-8: {exc}") from exc
        if not raw:
            return None
        computed_at = raw.pop("computed_at", None)
        return checked_vector(customer_id, raw, computed_at)

    async def put_many(self, vectors: Mapping[str, FeatureVector]) -> None:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for cid, vec in vectors.items():
                    key = REDIS_PREFIX + cid
                    pipe.delete(key)
                    pipe.hset(key, mapping={**vec.values, "computed_at": vec.computed_at})
                await asyncio.wait_for(pipe.execute(), max(5.0, self.timeout_s * 4))
        except self._errors as exc:
            raise FeatureStoreUnavailable(type(exc).__name__) from exc

    async def close(self) -> None:
        await self.client.aclose()


def open_feature_store(url: str, *, timeout_s: float = 0.25, create: bool = False) -> FeatureStore:
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisFeatureStore(url, timeout_s=timeout_s)
    if url.startswith("sqlite:"):
        return SQLiteFeatureStore(url, timeout_s=timeout_s, create=create)
    raise ValueError(
        f"feature store URL must be sqlite:///path.db or redis://host:port/db: {url!r}"
    )

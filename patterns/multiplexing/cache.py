"""A replica's model cache: one load per id, loads of different ids in parallel, LRU eviction
bounded by count and by bytes.

Serve's own ``@serve.multiplexed`` wrapper (Ray 2.60) holds one lock for every load, so a slow
load of one tenant's model delays every other cold tenant on that replica (ray#65346); it
evicts by count only, and before the new load has succeeded. This cache is what the replicas
here keep models in:

- single flight per id: the first request for a cold id starts the load; concurrent requests
  for the same id wait on that same load (``joined``), so it runs once;
- different ids load concurrently (each load is its own task; nothing global is held);
- a load that fails is not cached and evicts nothing; every waiter gets the error;
- after a load, least-recently-used models are evicted until both ``max_models`` and
  ``max_bytes`` hold (the new model is never its own victim: a model larger than the whole
  budget is served and dropped, and counted as ``oversize``);
- ``max_models=0`` turns caching off: every request loads (the benchmark's baseline).

A waiter that is cancelled (its client went away) does not cancel the load the others wait on.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

T = TypeVar("T")
Outcome = Literal["hit", "miss", "joined"]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0  # requests that started a load
    joined: int = 0  # requests that waited for a load another request started
    load_errors: int = 0
    evictions: int = 0
    oversize: int = 0
    loads_by_id: Counter[str] = field(default_factory=Counter)
    load_ms: list[float] = field(default_factory=list)  # the last 1,000 load times

    def as_dict(self) -> dict[str, Any]:
        served = self.hits + self.misses + self.joined
        times = sorted(self.load_ms)
        return {
            "hits": self.hits,
            "misses": self.misses,
            "joined": self.joined,
            "hit_rate": round(self.hits / served, 4) if served else None,
            "load_errors": self.load_errors,
            "evictions": self.evictions,
            "oversize": self.oversize,
            "loads": sum(self.loads_by_id.values()),
            "load_ms_p50": round(times[len(times) // 2], 2) if times else None,
            "load_ms_max": round(times[-1], 2) if times else None,
        }


class ModelCache(Generic[T]):
    def __init__(
        self,
        load: Callable[[str], Awaitable[T]],
        size_of: Callable[[T], int],
        *,
        max_models: int,
        max_bytes: int,
        on_evict: Callable[[str, T], None] | None = None,
    ) -> None:
        if max_models < 0 or max_bytes <= 0:
            raise ValueError("max_models must be >= 0 and max_bytes > 0")
        self._load = load
        self._size_of = size_of
        self.max_models = max_models
        self.max_bytes = max_bytes
        self._on_evict = on_evict
        self._entries: OrderedDict[str, tuple[T, int]] = OrderedDict()
        self._loading: dict[str, asyncio.Task[T]] = {}
        self.bytes = 0
        self.stats = CacheStats()

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        return list(self._entries)

    async def get(self, key: str) -> tuple[T, Outcome]:
        """The model for ``key`` and how it was found (hit, miss: loaded now, joined)."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return entry[0], "hit"
        task = self._loading.get(key)
        outcome: Outcome = "joined"
        if task is None:
            outcome = "miss"
            task = asyncio.get_running_loop().create_task(self._load_and_insert(key))
            self._loading[key] = task
            task.add_done_callback(lambda t, k=key: self._load_done(k, t))
        if outcome == "miss":
            self.stats.misses += 1
        else:
            self.stats.joined += 1
        # shield: one waiter being cancelled must not cancel the load the others share
        return await asyncio.shield(task), outcome

    def _load_done(self, key: str, task: asyncio.Task[T]) -> None:
        self._loading.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have gone away

    async def _load_and_insert(self, key: str) -> T:
        t0 = time.perf_counter()
        try:
            value = await self._load(key)
        except BaseException:
            self.stats.load_errors += 1
            raise
        self.stats.load_ms = [*self.stats.load_ms[-999:], (time.perf_counter() - t0) * 1000]
        self.stats.loads_by_id[key] += 1
        size = int(self._size_of(value))
        if self.max_models == 0:
            return value  # caching off
        if size > self.max_bytes:
            self.stats.oversize += 1
            return value
        self._entries[key] = (value, size)
        self.bytes += size
        while len(self._entries) > self.max_models or self.bytes > self.max_bytes:
            victim = next(iter(self._entries))
            if victim == key:  # pragma: no cover - impossible: the new entry fits alone
                break
            self.evict(victim)
        return value

    def evict(self, key: str) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self.bytes -= entry[1]
        self.stats.evictions += 1
        if self._on_evict is not None:
            self._on_evict(key, entry[0])
        return True

    def snapshot(self) -> dict[str, Any]:
        return {
            "models": len(self._entries),
            "bytes": self.bytes,
            "max_models": self.max_models,
            "max_bytes": self.max_bytes,
            "loading": len(self._loading),
            **self.stats.as_dict(),
        }

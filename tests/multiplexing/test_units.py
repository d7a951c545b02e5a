"""The cache, the ids and the forecasting flow without Serve."""

import asyncio
import time

import numpy as np
import pytest

from core.errors import NotFound, Unprocessable
from core.model_store import ModelStore
from patterns.multiplexing.artifacts import (
    N_STORES,
    build_forecasters,
    forecaster_name,
    store_ids,
)
from patterns.multiplexing.cache import ModelCache
from patterns.multiplexing.catalog import ModelIndex
from patterns.multiplexing.deployments import CacheArgs
from patterns.multiplexing.forecast_service import CALENDAR_DAYS, ForecastService, load_forecaster
from patterns.multiplexing.forecasting import Forecaster, train_store
from patterns.multiplexing.ids import HotIdSpreader, check_model_id, split_serve_model_id


class SlowStorage:
    """A loader with real waiting in it (a slow object store), counting calls per id."""

    def __init__(self, delay_s: float, sizes: dict[str, int] | None = None) -> None:
        self.delay_s = delay_s
        self.sizes = sizes or {}
        self.calls: dict[str, int] = {}
        self.active = 0
        self.max_active = 0
        self.fail: set[str] = set()

    async def load(self, key: str) -> tuple[str, int]:
        self.calls[key] = self.calls.get(key, 0) + 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.delay_s)
            if key in self.fail:
                raise OSError(f"storage refused {key}")
            return key, self.sizes.get(key, 100)
        finally:
            self.active -= 1


def _cache(storage: SlowStorage, **kw) -> ModelCache:
    kw.setdefault("max_models", 10)
    kw.setdefault("max_bytes", 10_000)
    return ModelCache(storage.load, lambda v: v[1], **kw)


def test_same_cold_id_loads_once_for_concurrent_requests() -> None:
    storage = SlowStorage(0.2)
    cache = _cache(storage)

    async def run():
        return await asyncio.gather(*(cache.get("a") for _ in range(20)))

    results = asyncio.run(run())
    assert storage.calls == {"a": 1}
    assert sorted(o for _, o in results) == ["joined"] * 19 + ["miss"]
    assert cache.stats.loads_by_id["a"] == 1


def test_different_ids_load_in_parallel() -> None:
    storage = SlowStorage(0.3)
    cache = _cache(storage)

    async def run():
        t0 = time.perf_counter()
        await asyncio.gather(*(cache.get(k) for k in "abcde"))
        return time.perf_counter() - t0

    elapsed = asyncio.run(run())
    assert storage.max_active == 5  # one global lock would make this 1
    assert elapsed < 1.2, elapsed  # five serial loads would take 1.5 s


def test_lru_eviction_by_count_and_by_bytes() -> None:
    storage = SlowStorage(0, sizes={"big": 600, "b2": 500})
    cache = _cache(storage, max_models=3, max_bytes=1000)

    async def run():
        for k in ("a", "b", "c"):
            await cache.get(k)
        await cache.get("a")  # a is now most recent
        await cache.get("d")  # count: evicts b (least recent)
        assert cache.keys() == ["c", "a", "d"]
        await cache.get("big")  # 600 + 300 > 1000 bytes? no: count evicts c -> a, d, big = 800
        assert cache.keys() == ["a", "d", "big"] and cache.bytes == 800
        await cache.get("b2")  # bytes: 800 + 500 > 1000 -> evict a, d, big until it fits
        assert cache.keys() == ["b2"] and cache.bytes == 500

    asyncio.run(run())
    assert cache.stats.evictions == 5


def test_failed_load_is_not_cached_evicts_nothing_and_is_retried() -> None:
    storage = SlowStorage(0.05)
    storage.fail.add("bad")
    cache = _cache(storage, max_models=2)

    async def run():
        await cache.get("a")
        await cache.get("b")
        loads = (cache.get("bad") for _ in range(5))
        results = await asyncio.gather(*loads, return_exceptions=True)
        assert all(isinstance(r, OSError) for r in results)
        assert cache.keys() == ["a", "b"]  # Serve's wrapper would have evicted one already
        with pytest.raises(OSError):
            await cache.get("bad")

    asyncio.run(run())
    assert storage.calls["bad"] == 2  # once for the five concurrent requests, once after


def test_a_cancelled_waiter_does_not_cancel_the_shared_load() -> None:
    storage = SlowStorage(0.2)
    cache = _cache(storage)

    async def run():
        first = asyncio.create_task(cache.get("a"))
        second = asyncio.create_task(cache.get("a"))
        await asyncio.sleep(0.05)
        first.cancel()
        value, outcome = await second
        assert value == ("a", 100) and outcome == "joined"

    asyncio.run(run())
    assert storage.calls == {"a": 1} and "a" in cache


def test_oversize_model_is_served_not_cached_and_zero_disables_caching() -> None:
    storage = SlowStorage(0, sizes={"huge": 50_000})
    cache = _cache(storage)
    asyncio.run(cache.get("huge"))
    assert "huge" not in cache and cache.stats.oversize == 1
    off = _cache(SlowStorage(0), max_models=0)

    async def twice():
        await off.get("a")
        return await off.get("a")

    assert asyncio.run(twice())[1] == "miss" and len(off) == 0


@pytest.mark.parametrize(
    "bad", ["", "../x", "a/b", "A", "a" * 65, "a b", "a\x00", "-a", "é", "a.b", "a#1"]
)
def test_malformed_ids(bad) -> None:
    with pytest.raises(Unprocessable):
        check_model_id(bad)


def test_serve_ids_and_hot_spreading() -> None:
    assert split_serve_model_id("store-0001#1") == ("store-0001", 1)
    assert split_serve_model_id("store-0001") == ("store-0001", None)
    with pytest.raises(Unprocessable):
        split_serve_model_id("store-0001#x")
    spreader = HotIdSpreader(["hot"], slots=3)
    assert [spreader.serve_id("hot") for _ in range(4)] == ["hot#0", "hot#1", "hot#2", "hot#0"]
    assert spreader.serve_id("cold") == "cold"
    assert spreader.all_serve_ids("hot") == ["hot#0", "hot#1", "hot#2"]
    assert HotIdSpreader(["hot"], slots=1).serve_id("hot") == "hot"


def test_training_is_deterministic_and_round_trips() -> None:
    a, b = train_store("store-0007"), train_store("store-0007")
    for name in ("base", "hidden", "readout"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert a.lines == b.lines
    assert not np.array_equal(a.hidden, train_store("store-0008").hidden)
    again = Forecaster.from_files(a.to_files())
    assert np.array_equal(again.readout, a.readout) and again.meta == a.meta
    assert a.holdout_mape < 0.2  # the calendar features explain the generated series


def test_the_network_forecasts_no_worse_than_the_ridge_it_extends() -> None:
    models = [train_store(f"store-{i:04d}") for i in range(1, 21)]
    net = np.mean([m.holdout_mape for m in models])
    ridge = np.mean([m.meta["base_holdout_mape"] for m in models])
    assert net <= ridge, (net, ridge)  # on the four holdout weeks, over 20 stores


def test_a_loaded_model_is_large_and_its_calendar_table_matches_the_network() -> None:
    model = train_store("store-0007")
    days = np.arange(700, 760)
    direct = model.predict_days(days)
    loaded = load_forecaster(model.to_files())
    assert loaded.table is not None and loaded.table.shape == (CALENDAR_DAYS, len(model.lines))
    np.testing.assert_allclose(loaded.predict_days(days), direct, rtol=1e-4, atol=1e-3)
    # a day outside the table (never asked by the API) still gets the network's answer
    np.testing.assert_allclose(
        loaded.predict_days(np.array([CALENDAR_DAYS + 10])),
        model.predict_days(np.array([CALENDAR_DAYS + 10])),
        rtol=1e-5,
    )


def test_the_shipped_cache_holds_at_most_a_fifth_of_the_models(forecast_store) -> None:
    index = ModelIndex.load(forecast_store, "forecast-index")
    entries = [index.lookup(m) for m in index.ids()]
    files, _ = forecast_store.read_verified(entries[41].name, entries[41].version)
    assert entries[41].nbytes == load_forecaster(files).nbytes  # the index says what is charged
    mean = sum(e.nbytes for e in entries) / len(entries)
    assert len(entries) == N_STORES and CacheArgs().max_bytes / mean <= 0.2 * N_STORES


def test_service_unknown_ids_read_nothing_and_tampered_is_503(forecast_store) -> None:
    index = ModelIndex.load(forecast_store, "forecast-index")
    assert list(index.ids()) == store_ids()
    service = ForecastService(forecast_store, index, max_models=8, max_bytes=1 << 20)

    async def run():
        for i in range(200):
            answers = await service.forecast_batch(f"nobody-{i}", [{}])
            assert answers[0]["error"]["status"] == 404
        assert service.store_reads == 0 and len(service.cache) == 0
        ok = await service.forecast_batch("store-0010#1", [{}, {"horizon_days": 2}])
        assert [len(a["dates"]) for a in ok] == [7, 2]
        assert ok[0]["served_by"] == {"cache": "miss", "slot": 1, "batch_size": 2}
        assert service.store_reads == 1

    asyncio.run(run())
    with pytest.raises(NotFound):
        index.lookup("store-1001")


def test_a_manifest_changed_after_the_index_is_503(tmp_path) -> None:
    store = ModelStore(tmp_path.as_uri())
    build_forecasters(store, n=12)
    service = ForecastService(
        store, ModelIndex.load(store, "forecast-index"), max_models=8, max_bytes=1 << 20
    )
    name = forecaster_name("store-0011")
    files, _ = store.read_verified(name, "v1")
    store.save_files(name, "v1", files, "safetensors", {"re": "written"}, overwrite=True)
    answers = asyncio.run(service.forecast_batch("store-0011", [{}]))
    assert answers[0]["error"]["status"] == 503
    assert "not the one the index names" in answers[0]["error"]["message"]

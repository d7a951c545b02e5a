"""The forecasters under Serve: real answers by path and by header, 422/404 without reading
any model file, one load per id per replica, hot ids on both replicas, a tampered model a 503
for that id only."""

import asyncio
import datetime as dt
import time

import httpx
import pytest

from patterns.multiplexing.app import MultiplexArgs, build_app
from patterns.multiplexing.artifacts import forecaster_name
from patterns.multiplexing.forecast_service import load_forecaster
from patterns.multiplexing.forecasting import FIRST_FORECAST_DAY, forecast_answer
from patterns.multiplexing.routing import preference
from tests.multiplexing.conftest import wait_until_served

PREFIX = "/multiplex-test"
HEADER = "serve_multiplexed_model_id"
TAMPERED = "store-0777"


@pytest.fixture(scope="module")
def url(deploy, forecast_store) -> str:
    # Tamper with one model file after the index was written: its sha256 no longer matches.
    path = forecast_store._version_dir(forecaster_name(TAMPERED), "v1") + "/model.safetensors"
    with open(path, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x00\x80\x7f")
    args = MultiplexArgs(
        model_store_uri=forecast_store.root_uri,
        forecast={
            "hot_model_ids": ["store-0001"],
            "hot_slots": 2,
            "cache": {"max_models": 64},
            "routing": "affinity",  # routing.py; the one test below checks its placement
        },
        chat={"enabled": False},
    )
    return wait_until_served(deploy(build_app(args), "multiplexing-test", PREFIX))


def _predict(url: str, model_id: str, body=None, **kw) -> httpx.Response:
    return httpx.post(f"{url}/models/{model_id}/predict", json=body or {}, timeout=30, **kw)


def _stats(url: str) -> list[dict]:
    r = httpx.get(f"{url}/model", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["forecasters"]["replicas"]


def test_path_and_header_give_the_models_real_forecast(url, forecast_store) -> None:
    body = {"start_date": "2026-03-02", "horizon_days": 5}
    by_path = _predict(url, "store-0042", body)
    assert by_path.status_code == 200, by_path.text
    by_header = httpx.post(f"{url}/predict", json=body, headers={HEADER: "store-0042"}, timeout=30)
    assert by_header.status_code == 200, by_header.text
    a, b = by_path.json(), by_header.json()
    assert a["model_id"] == b["model_id"] == "store-0042"
    assert a["model"]["name"] == "forecast-store-0042" and a["model"]["version"] == "v1"
    # the same numbers as the artifact itself gives, loaded here outside Serve
    files, _ = forecast_store.read_verified("forecast-store-0042", "v1")
    expected = forecast_answer(load_forecaster(files), dt.date(2026, 3, 2), 5)
    for answer in (a, b):
        assert answer["dates"] == expected["dates"]
        assert answer["total"] == expected["total"]
        assert answer["by_line"] == expected["by_line"]
        assert set(answer["timings_ms"]) >= {"model_cache", "predict", "total"}
        assert answer["served_by"]["cache"] in ("hit", "miss", "joined")
    # different stores have different models
    other = _predict(url, "store-0043", body).json()
    assert other["total"] != a["total"]
    default = _predict(url, "store-0042").json()
    assert default["start_date"] == FIRST_FORECAST_DAY.isoformat()
    assert len(default["dates"]) == 7


def test_header_and_path_must_agree_and_header_route_needs_one(url) -> None:
    r = _predict(url, "store-0042", headers={HEADER: "store-0043"})
    assert r.status_code == 422 and "names" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/predict", json={}, timeout=30)
    assert r.status_code == 422 and HEADER in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "raw_path",
    [
        "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",  # ../../etc/passwd
        "..%2Fforecast-index",
        "store-0001%2F..%2Fstore-0002",
        "a" * 65,
        "Store-0001",
        "store%200001",
        "store-0001%00",
        "-store",
        "st%C3%B6re",
    ],
)
def test_malformed_ids_are_422(url, raw_path) -> None:
    r = httpx.post(f"{url}/models/{raw_path}/predict", json={}, timeout=30)
    assert r.status_code == 422, (raw_path, r.text)
    assert "model id" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/predict", json={}, headers={HEADER: "../x"}, timeout=30)
    assert r.status_code == 422


@pytest.mark.parametrize(
    ("body", "part"),
    [
        ({"horizon_days": 0}, "horizon_days"),
        ({"horizon_days": 57}, "horizon_days"),
        ({"start_date": "2031-01-01"}, "start_date"),
        ({"start_date": "yesterday"}, "start_date"),
        ({"unexpected": 1}, "unexpected"),
    ],
)
def test_bad_bodies_are_422(url, body, part) -> None:
    r = _predict(url, "store-0042", body)
    assert r.status_code == 422 and part in r.json()["error"]["message"]


def test_non_utf8_and_oversized_bodies(url) -> None:
    r = httpx.post(
        f"{url}/models/store-0042/predict",
        content=b"\xff\xfe\x00binary\x80",
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 422 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(
        f"{url}/models/store-0042/predict",
        content=b"{" + b" " * 70_000 + b"}",
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 413


def test_unknown_id_burst_is_404_with_no_read_and_no_cache_growth(url) -> None:
    before = _stats(url)

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            ids = [f"tenant-{i:05d}" for i in range(1000)]
            sem = asyncio.Semaphore(32)

            async def one(model_id: str) -> httpx.Response:
                async with sem:
                    return await client.post(f"{url}/models/{model_id}/predict", json={})

            return await asyncio.gather(*(one(m) for m in ids))

    responses = asyncio.run(burst())
    assert {r.status_code for r in responses} == {404}
    assert "There is no forecaster 'tenant-00000'" in responses[0].json()["error"]["message"]
    after = _stats(url)
    for b, a in zip(before, after, strict=True):
        assert a["replica"] == b["replica"]
        assert a["store_reads"] == b["store_reads"]  # no model file read
        assert a["cache"]["models"] == b["cache"]["models"]  # no cache growth
        assert a["cache"]["misses"] == b["cache"]["misses"]


def test_cold_id_is_loaded_once_per_replica_under_concurrency(url) -> None:
    model_id = "store-0500"

    async def many() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post(f"{url}/models/{model_id}/predict", json={"horizon_days": 1 + i})
                    for i in range(32)
                )
            )

    responses = asyncio.run(many())
    assert all(r.status_code == 200 for r in responses)
    per_replica = [s["loads_of"][model_id] for s in _loads_of(url, [model_id])]
    assert sum(per_replica) >= 1
    assert max(per_replica) == 1, per_replica  # never twice on one replica
    # batching grouped same-model requests: at least one answer shared its batch
    assert max(r.json()["served_by"]["batch_size"] for r in responses) > 1


def _loads_of(url: str, ids: list[str]) -> list[dict]:
    from ray import serve

    handle = serve.get_deployment_handle("ForecastModels", app_name="multiplexing-test")
    return handle.broadcast("stats", loads_of=ids).results(timeout_s=30)


def test_hot_id_is_prewarmed_and_served_by_both_replicas(url) -> None:
    stats = _stats(url)
    assert len(stats) == 2
    for s in stats:
        assert s["prewarmed"] == {"store-0001": "ok"}

    async def hot_traffic() -> list[dict]:
        sem = asyncio.Semaphore(16)  # a hot tenant: many requests in flight at once
        async with httpx.AsyncClient(timeout=60) as client:

            async def one(i: int) -> dict:
                async with sem:
                    r = await client.post(
                        f"{url}/models/store-0001/predict", json={"horizon_days": 1 + i % 7}
                    )
                    return r.json()

            return await asyncio.gather(*(one(i) for i in range(96)))

    answers = asyncio.run(hot_traffic())
    replicas = {a["served_by"]["replica"] for a in answers}
    outcomes = {a["served_by"]["cache"] for a in answers}
    assert replicas == {s["replica"] for s in stats}
    assert outcomes == {"hit"}  # prewarmed: never a load on the request path


def test_affinity_routing_loads_each_cold_id_on_its_one_replica(url) -> None:
    ids = [f"store-{i:04d}" for i in range(700, 740)]

    async def burst() -> list[httpx.Response]:
        # 4 requests per cold id, 32 in flight: under a replica's max_ongoing_requests (64),
        # so no replica refuses and the second rank (any replica) is never needed
        sem = asyncio.Semaphore(32)
        async with httpx.AsyncClient(timeout=60) as client:

            async def one(model_id: str) -> httpx.Response:
                async with sem:
                    return await client.post(f"{url}/models/{model_id}/predict", json={})

            return await asyncio.gather(*(one(m) for m in ids for _ in range(4)))

    assert all(r.status_code == 200 for r in asyncio.run(burst()))
    stats = _loads_of(url, ids)
    replicas = [s["replica"] for s in stats]
    for m in ids:  # from the replicas' own counters: one load, on the id's first replica
        loads = {s["replica"]: s["loads_of"][m] for s in stats}
        assert sorted(loads.values()) == [0, 1], (m, loads)
        assert loads[preference(m, replicas)[0]] == 1, (m, loads)


def test_cold_id_sticks_to_the_replica_that_loaded_it(url) -> None:
    first = _predict(url, "store-0600").json()["served_by"]["replica"]
    time.sleep(1.5)  # the replica reports its models to the router every 0.1 s
    seen = {_predict(url, "store-0600").json()["served_by"]["replica"] for _ in range(10)}
    assert seen == {first}


def test_tampered_model_is_503_for_that_id_only(url) -> None:
    for _ in range(2):  # not cached: the second request is refused the same way
        r = _predict(url, TAMPERED)
        assert r.status_code == 503, r.text
        assert "cannot be loaded" in r.json()["error"]["message"]
        assert r.headers.get("retry-after")
    assert _predict(url, "store-0778").status_code == 200


def test_model_listing_and_entry_read_only_the_index(url) -> None:
    listing = httpx.get(f"{url}/models", params={"limit": 5}, timeout=30).json()
    assert listing["count"] == 1000
    assert listing["ids"] == [f"store-{i:04d}" for i in range(1, 6)]
    entry = httpx.get(f"{url}/models/store-0005", timeout=30).json()
    assert entry["name"] == "forecast-store-0005" and entry["info"]["lines"] >= 2
    assert httpx.get(f"{url}/models/store-9999", timeout=30).status_code == 404
    assert httpx.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"


def test_a_method_the_route_does_not_declare_is_a_405_naming_the_one_it_does(url) -> None:
    """GET on the predict route is that route asked wrongly (405, Allow: POST), not an index
    entry named "store-0001/predict"."""
    for method in ("GET", "PUT", "DELETE"):
        r = httpx.request(method, f"{url}/models/store-0001/predict", timeout=30)
        assert r.status_code == 405, (method, r.text)
        assert r.headers["allow"] == "POST"
        assert r.json()["error"]["message"] == "This route does not accept that HTTP method."
    assert httpx.get(f"{url}/models/store-0001/other", timeout=30).status_code == 404

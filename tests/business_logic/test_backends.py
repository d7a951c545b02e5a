"""The same app against real PostgreSQL and Redis servers started on loopback ports by the
fixtures (skipped with a reason where the binaries are absent), including their outages."""

import asyncio
import time

import httpx
import pytest

from patterns.business_logic.app import BusinessArgs, build_app
from patterns.business_logic.features import open_feature_store
from patterns.business_logic.records import RecordStore
from patterns.business_logic.seed import MISSING_FEATURES, seed_database, seed_feature_store

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

PREFIX = "/business-pg"
KEY = {"X-API-Key": "dev-business-key"}
GOOD = {
    "customer_id": "C00042",
    "merchant_id": "M0007",
    "amount": 80.0,
    "currency": "GBP",
    "channel": "in_store",
    "memo": "pg'; DROP TABLE decisions; --",
}


@pytest.fixture(scope="module")
def servers(postgres_server, redis_server, model_ready):
    seed_database(postgres_server.dsn)
    seed_feature_store(redis_server.url, postgres_server.dsn)
    return postgres_server, redis_server


@pytest.fixture(scope="module")
def url(deploy, servers, risk_service) -> str:
    pg, rd = servers
    args = BusinessArgs(
        database_url=pg.dsn,
        feature_store_url=rd.url,
        risk_service_url=risk_service.url,
        feature_store_timeout_s=0.2,
        db_timeout_s=1.0,
    )
    return deploy(build_app(args), "business-pg", PREFIX)


def _score(url: str, body=None) -> httpx.Response:
    return httpx.post(f"{url}/score", json=body or GOOD, headers=KEY, timeout=30)


def test_postgres_and_sqlite_hold_the_same_records(servers, sqlite_urls) -> None:
    pg, _ = servers

    async def both():
        out = []
        for dsn in (pg.dsn, sqlite_urls["database"]):
            store = RecordStore(dsn)
            out.append(
                (
                    await store.lookup("C00042", "M0007", "GBP"),
                    await store.history_features("C00042"),
                )
            )
            store.close()
        return out

    on_pg, on_sqlite = asyncio.run(both())
    assert on_pg == on_sqlite


def test_score_reads_postgres_and_redis(url) -> None:
    r = _score(url)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (
        body["features"]["provenance"] | {"source": "feature_store", "store": "redis"}
        == (body["features"]["provenance"])
    )
    assert body["records"]["fx"]["eur_per_unit"] == 1.17
    assert not body["degraded"]
    health = httpx.get(f"{url}/healthz", timeout=10).json()
    assert health["dependencies"]["database"]["backend"] == "postgresql"


def test_missing_vector_is_recomputed_and_written_back_to_redis(url, servers) -> None:
    _, rd = servers
    cid = MISSING_FEATURES[5]
    first = _score(url, {**GOOD, "customer_id": cid}).json()
    assert first["features"]["provenance"]["reason"] == "missing"

    async def read():
        store = open_feature_store(rd.url)
        try:
            return await store.get(cid)
        finally:
            await store.close()

    deadline = time.monotonic() + 5
    while asyncio.run(read()) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert asyncio.run(read()) is not None
    assert (
        _score(url, {**GOOD, "customer_id": cid}).json()["features"]["provenance"]["source"]
        == "feature_store"
    )


def test_injection_strings_stay_data_in_postgres(url, servers) -> None:
    pg, _ = servers
    r = _score(url)
    assert r.status_code == 200
    bad = _score(url, {**GOOD, "customer_id": "C00042' OR '1'='1"})
    assert bad.status_code == 422
    import psycopg

    with psycopg.connect(f"host=127.0.0.1 port={pg.port} user=postgres") as conn:
        memo = conn.execute(
            "SELECT memo FROM decisions WHERE request_id = %s", (r.json()["request_id"],)
        ).fetchone()
        assert memo == (GOOD["memo"],)
        assert conn.execute("SELECT count(*) FROM customers").fetchone() == (200,)


def test_memo_with_nul_is_a_422_and_the_database_stays_healthy(url) -> None:
    """PostgreSQL refuses NUL in text; the request is refused before it gets that far, so no
    audit row is lost and health shows no database error."""
    r = _score(url, {**GOOD, "memo": "order\x00118"})
    assert r.status_code == 422, r.text
    assert "control characters" in r.json()["error"]["message"]
    ok = _score(url)
    assert ok.status_code == 200 and not ok.json()["degraded"]
    health = httpx.get(f"{url}/healthz", timeout=10).json()
    assert health["dependencies"]["database"]["last_error"] is None


def test_invalid_vector_in_redis_is_recomputed_and_replaced(url, servers) -> None:
    import redis

    from patterns.business_logic.features import FEATURE_NAMES, REDIS_PREFIX

    _, rd = servers
    cid = "C00043"
    client = redis.Redis.from_url(rd.url)
    try:
        key = REDIS_PREFIX + cid
        assert client.exists(key)  # seeded
        client.hset(key, "txn_count", "not a number")
        first = _score(url, {**GOOD, "customer_id": cid})
        assert first.status_code == 200, first.text
        provenance = first.json()["features"]["provenance"]
        assert provenance["source"] == "recomputed" and provenance["reason"] == "invalid"
        assert not first.json()["degraded"]  # recomputed from the database is exact
        deadline = time.monotonic() + 5  # the write-back replaces it in the background
        while client.hget(key, "txn_count") == b"not a number" and time.monotonic() < deadline:
            time.sleep(0.05)
        stored = client.hgetall(key)
        assert {k.decode() for k in stored} == {*FEATURE_NAMES, "computed_at"}
        # the recomputed vector (the one the model was given), not the corrupt value
        recomputed = first.json()["features"]["model_input"]["txn_count"]
        assert float(stored[b"txn_count"]) == recomputed, stored
    finally:
        client.close()
    again = _score(url, {**GOOD, "customer_id": cid}).json()
    assert again["features"]["provenance"]["source"] == "feature_store"


def test_redis_down_degrades_to_recompute_then_recovers(url, servers) -> None:
    _, rd = servers
    rd.stop()
    try:
        t0 = time.perf_counter()
        r = _score(url)
        assert r.status_code == 200 and time.perf_counter() - t0 < 2.0
        body = r.json()
        assert body["features"]["provenance"]["reason"] == "unavailable"
        assert body["degraded"] and "feature store" in body["degraded_reasons"][0]
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    finally:
        rd.start()
    seed_feature_store(rd.url, servers[0].dsn)  # a restarted cache-only Redis is empty


def test_postgres_down_is_a_fast_503_then_recovers(url, servers) -> None:
    pg, _ = servers
    pg.stop()
    try:
        t0 = time.perf_counter()
        r = _score(url)
        assert r.status_code == 503 and time.perf_counter() - t0 < 3.0
        assert "records database did not answer" in r.json()["error"]["message"]
        health = httpx.get(f"{url}/healthz", timeout=10)
        assert health.status_code == 200
    finally:
        pg.start()
    # the pool reconnects (pool_pre_ping): no restart needed
    deadline = time.monotonic() + 10
    while _score(url).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _score(url).status_code == 200

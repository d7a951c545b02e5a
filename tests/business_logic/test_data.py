"""Records and feature store without Serve: seed determinism, parameterised lookups (SQL
injection is just an unknown id), and the feature policy (fresh, stale, missing, store down)."""

import asyncio
import sqlite3
import time

import pytest

from patterns.business_logic.features import FeaturePolicy, SQLiteFeatureStore, open_feature_store
from patterns.business_logic.records import (
    DatabaseUnavailable,
    RecordStore,
    seed_rows,
)
from patterns.business_logic.risk_client import RiskServiceClient
from patterns.business_logic.rules import DecisionRules
from patterns.business_logic.scoring import Scorer, ScoreRequest
from patterns.business_logic.seed import MISSING_FEATURES, STALE_FEATURES

INJECTIONS = [
    "C00001' OR '1'='1",
    "'; DROP TABLE customers; --",
    'C00001" UNION SELECT * FROM customers --',
    "%",
]


def test_seed_rows_are_deterministic() -> None:
    a, b = seed_rows(), seed_rows()
    assert a == b
    assert len(a["customers"]) == 200 and len(a["merchants"]) == 50
    assert a["customers"][41]["customer_id"] == "C00042"


def test_lookups_bind_parameters_so_injection_finds_nothing(sqlite_urls) -> None:
    async def run() -> None:
        store = RecordStore(sqlite_urls["database"])
        try:
            ok = await store.lookup("C00042", "M0007", "EUR")
            assert ok.customer["customer_id"] == "C00042" and ok.eur_per_unit == 1.0
            for text in INJECTIONS:
                r = await store.lookup(text, text, text[:3])
                assert r.customer is None and r.merchant is None and r.eur_per_unit is None
                assert (await store.history_features(text))["txn_count"] == 0.0
        finally:
            store.close()

    asyncio.run(run())
    path = sqlite_urls["database"].removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:  # the tables are all still there
        assert conn.execute("SELECT count(*) FROM customers").fetchone()[0] == 200


def test_missing_database_file_is_an_outage_not_a_new_database(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'absent.db'}"

    async def run() -> None:
        store = RecordStore(url, timeout_s=0.5)
        t0 = time.perf_counter()
        with pytest.raises(DatabaseUnavailable):
            await store.lookup("C00042", "M0007", "EUR")
        assert time.perf_counter() - t0 < 2.0
        store.close()

    asyncio.run(run())
    assert not (tmp_path / "absent.db").exists()


def test_seeded_feature_store_has_fresh_stale_and_missing_vectors(sqlite_urls) -> None:
    async def run() -> None:
        store = open_feature_store(sqlite_urls["features"])
        now = time.time()
        fresh = await store.get("C00042")
        stale = await store.get(STALE_FEATURES[0])
        assert fresh is not None and now - fresh.computed_at < 3600
        assert stale is not None and now - stale.computed_at > 29 * 86400
        assert await store.get(MISSING_FEATURES[0]) is None
        assert await store.get(INJECTIONS[1]) is None
        await store.close()

    asyncio.run(run())


class _NoModel:
    """Scores every row the same; the feature policy does not depend on the model."""

    async def __call__(self, row):
        return 0.01, "test"


def _scorer(urls, features_url=None, policy=None) -> Scorer:
    return Scorer(
        records=RecordStore(urls["database"]),
        features=open_feature_store(features_url or urls["features"]),
        risk=RiskServiceClient("http://127.0.0.1:1", timeout_s=0.1, attempts=1),
        model_call=_NoModel(),
        rules=DecisionRules(),
        policy=policy or FeaturePolicy(),
        log_decisions=False,
    )


def _req(cid: str) -> ScoreRequest:
    return ScoreRequest(
        customer_id=cid, merchant_id="M0001", amount=10, currency="EUR", channel="in_store"
    )


def test_feature_policy_recomputes_stale_and_missing_and_writes_back(sqlite_urls) -> None:
    async def run() -> None:
        scorer = _scorer(sqlite_urls)
        fresh = await scorer.score(_req("C00042"), "t")
        assert fresh["features"]["provenance"]["source"] == "feature_store"
        stale = await scorer.score(_req(STALE_FEATURES[1]), "t")
        assert (
            stale["features"]["provenance"] | {"reason": "stale", "source": "recomputed"}
            == (stale["features"]["provenance"])
        )
        missing = await scorer.score(_req(MISSING_FEATURES[1]), "t")
        assert missing["features"]["provenance"]["reason"] == "missing"
        # recomputed is exact, so it is not degraded (the risk service is, here)
        assert all("feature" not in r for r in missing["degraded_reasons"])
        await asyncio.sleep(0.3)  # write-back runs in the background
        again = await scorer.score(_req(MISSING_FEATURES[1]), "t")
        assert again["features"]["provenance"]["source"] == "feature_store"
        assert again["features"]["model_input"] == missing["features"]["model_input"]

    asyncio.run(run())


def test_feature_policy_reject_answers_503(sqlite_urls) -> None:
    from core.errors import ServiceUnavailable

    async def run() -> None:
        scorer = _scorer(sqlite_urls, policy=FeaturePolicy(on_missing_or_stale="reject"))
        with pytest.raises(ServiceUnavailable, match="feature policy is 'reject'"):
            await scorer.score(_req(MISSING_FEATURES[2]), "t")

    asyncio.run(run())


def test_feature_store_down_recomputes_and_says_degraded(sqlite_urls, tmp_path) -> None:
    async def run() -> None:
        scorer = _scorer(sqlite_urls, features_url=f"sqlite:///{tmp_path / 'gone.db'}")
        out = await scorer.score(_req("C00042"), "t")
        assert (
            out["features"]["provenance"] | {"source": "recomputed", "reason": "unavailable"}
            == (out["features"]["provenance"])
        )
        assert out["degraded"]
        assert any(r.startswith("feature store") for r in out["degraded_reasons"])
        # after breaker_failures (5) failures the store is not even tried
        for _ in range(5):
            out = await scorer.score(_req("C00042"), "t")
        assert scorer.feature_breaker.state == "open"
        assert "circuit open" in out["degraded_reasons"][0]

    asyncio.run(run())


def test_sqlite_feature_store_roundtrip(tmp_path) -> None:
    from patterns.business_logic.features import FeatureVector

    async def run() -> None:
        store = SQLiteFeatureStore(f"sqlite:///{tmp_path / 'f.db'}", create=True)
        await store.put_many({"C00001": FeatureVector({"txn_count": 3.0}, 123.0)})
        got = await store.get("C00001")
        assert got is not None and got.values == {"txn_count": 3.0} and got.computed_at == 123.0
        await store.close()

    asyncio.run(run())

"""Records and feature store without Serve: seed determinism, parameterised lookups (SQL
injection is just an unknown id), the feature policy (fresh, stale, missing, invalid, store
down), and what a stalled database, a failing model or a bug turn into."""

import asyncio
import json
import sqlite3
import time

import pytest
from sqlalchemy.exc import IntegrityError

from core.errors import ServiceUnavailable
from patterns.business_logic.features import (
    FEATURE_NAMES,
    FeaturePolicy,
    FeatureVector,
    InvalidFeatureVector,
    SQLiteFeatureStore,
    open_feature_store,
)
from patterns.business_logic.flow import Scorer, ScoreRequest
from patterns.business_logic.records import (
    DatabaseUnavailable,
    RecordStore,
    seed_rows,
)
from patterns.business_logic.risk_client import RiskServiceClient
from patterns.business_logic.rules import DecisionRules
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


def _scorer(
    urls, features_url=None, policy=None, records=None, model_call=None, log_decisions=False
) -> Scorer:
    return Scorer(
        records=records or RecordStore(urls["database"]),
        features=open_feature_store(features_url or urls["features"]),
        risk=RiskServiceClient("http://127.0.0.1:1", timeout_s=0.1, attempts=1),
        model_call=model_call or _NoModel(),
        rules=DecisionRules(),
        policy=policy or FeaturePolicy(),
        log_decisions=log_decisions,
    )


async def _wait_for_vector(store, cid: str, timeout_s: float = 5.0) -> FeatureVector:
    """The background write-back has landed: poll the store until a valid vector is there."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            vec = await store.get(cid)
        except InvalidFeatureVector:
            vec = None
        if vec is not None or time.monotonic() > deadline:
            assert vec is not None, f"no valid vector for {cid} after {timeout_s}s"
            return vec
        await asyncio.sleep(0.05)


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
        await _wait_for_vector(scorer.features, MISSING_FEATURES[1])  # written in the background
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
    values = {name: float(i) for i, name in enumerate(FEATURE_NAMES)}

    async def run() -> None:
        store = SQLiteFeatureStore(f"sqlite:///{tmp_path / 'f.db'}", create=True)
        await store.put_many({"C00001": FeatureVector(values, 123.0)})
        got = await store.get("C00001")
        assert got is not None and got.values == values and got.computed_at == 123.0
        # a vector without every feature is not a vector the model can use
        await store.put_many({"C00002": FeatureVector({"txn_count": 3.0}, 123.0)})
        with pytest.raises(InvalidFeatureVector, match="fields"):
            await store.get("C00002")
        await store.close()

    asyncio.run(run())


GOOD_VECTOR = dict.fromkeys(FEATURE_NAMES, 1.0)
CORRUPT_VECTORS = {  # (vector_json, computed_at): what a bad feature job or hand edit leaves
    "C00101": ("{not json", None),
    "C00102": (json.dumps(["a", "list"]), None),
    "C00103": (json.dumps({k: v for k, v in GOOD_VECTOR.items() if k != "txn_count"}), None),
    "C00104": (json.dumps({**GOOD_VECTOR, "txn_count": "many"}), None),
    "C00105": (json.dumps({**GOOD_VECTOR, "avg_amount_eur": float("nan")}), None),
    "C00106": (json.dumps({**GOOD_VECTOR, "avg_amount_eur": -1.0}), None),  # x / (avg + 1)
    "C00107": (json.dumps(GOOD_VECTOR), "yesterday"),
}


def test_invalid_vectors_are_recomputed_and_replaced(sqlite_urls) -> None:
    path = sqlite_urls["features"].removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        for cid, (vector_json, computed_at) in CORRUPT_VECTORS.items():
            cur = conn.execute(
                "UPDATE feature_vectors SET vector_json = ?, computed_at = ? WHERE customer_id = ?",
                (vector_json, computed_at or time.time(), cid),
            )
            assert cur.rowcount == 1  # the seeded row was there to corrupt

    async def run() -> None:
        scorer = _scorer(sqlite_urls)
        for cid in CORRUPT_VECTORS:
            with pytest.raises(InvalidFeatureVector):
                await scorer.features.get(cid)
            out = await scorer.score(_req(cid), "t")
            provenance = out["features"]["provenance"]
            assert provenance["source"] == "recomputed" and provenance["reason"] == "invalid"
            assert all("feature" not in r for r in out["degraded_reasons"])  # exact, not degraded
            # written back over the corrupt one, so the next request reads the store again
            vec = await _wait_for_vector(scorer.features, cid)
            assert set(vec.values) == set(FEATURE_NAMES)
            again = await scorer.score(_req(cid), "t")
            assert again["features"]["provenance"]["source"] == "feature_store"
            assert again["features"]["model_input"] == out["features"]["model_input"]
        # the store answered every time: an invalid vector is not an outage
        assert scorer.feature_breaker.state == "closed"

    asyncio.run(run())


def test_unknown_customer_is_404_and_nothing_is_written_to_the_store(sqlite_urls) -> None:
    from core.errors import NotFound

    async def run() -> None:
        scorer = _scorer(sqlite_urls)
        with pytest.raises(NotFound, match="C09998 is not on file"):
            await scorer.score(_req("C09998"), "t")
        await asyncio.sleep(0)  # let any (wrongly) scheduled write-back start
        await asyncio.gather(*scorer._background)
        assert await scorer.features.get("C09998") is None

    asyncio.run(run())


def test_tiny_amount_is_refused_before_the_risk_service_sees_it(sqlite_urls) -> None:
    from core.errors import Unprocessable

    async def run() -> None:
        scorer = _scorer(sqlite_urls)
        req = ScoreRequest(
            customer_id="C00042", merchant_id="M0001", amount=0.5, currency="JPY", channel="online"
        )  # 0.5 JPY is 0.003 EUR: 0.00 after rounding, which the risk service would refuse
        with pytest.raises(Unprocessable, match=r"smallest amount this service checks is 0\.01"):
            await scorer.score(req, "t")

    asyncio.run(run())


@pytest.mark.parametrize("memo", ["a\x00b", "line one\nline two", "\x1b[31mred", "\x9b"])
def test_memo_with_control_characters_is_refused(memo) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="control characters"):
        ScoreRequest(**{**_req("C00042").model_dump(), "memo": memo})
    ScoreRequest(**{**_req("C00042").model_dump(), "memo": "order 118 - café, 50% off; ok?"})


# ------------------------------------------------------------------------------ stalls and bugs
def test_stalled_database_is_unavailable_within_the_deadline(stalled_port) -> None:
    """A server that accepts the connection and never answers: the deadline around each call
    ends the wait, and the store reports an outage (not an IndexError, not a hang)."""
    url = f"postgresql+psycopg://app@127.0.0.1:{stalled_port}/fraud"

    async def run() -> None:
        store = RecordStore(url, timeout_s=0.2)
        try:
            for call in (
                store.lookup("C00042", "M0007", "EUR"),
                store.history_features("C00042"),
                store.log_decision(
                    request_id="r",
                    customer_id="C00042",
                    merchant_id="M0007",
                    amount_eur=1.0,
                    decision="approve",
                    score=0.1,
                    memo=None,
                ),
            ):
                t0 = time.perf_counter()
                with pytest.raises(DatabaseUnavailable, match="timed out"):
                    await call
                assert time.perf_counter() - t0 < 2.0
                assert store.last_error is not None and "timed out" in store.last_error
        finally:
            store.close()

    asyncio.run(run())


def test_stalled_database_is_a_503_from_the_scorer(sqlite_urls, stalled_port) -> None:
    url = f"postgresql+psycopg://app@127.0.0.1:{stalled_port}/fraud"

    async def run() -> None:
        scorer = _scorer(sqlite_urls, records=RecordStore(url, timeout_s=0.2))
        with pytest.raises(ServiceUnavailable, match="records database did not answer"):
            await scorer.score(_req("C00042"), "t")

    asyncio.run(run())


def test_stalled_audit_write_still_answers_degraded(sqlite_urls) -> None:
    async def run() -> None:
        records = RecordStore(sqlite_urls["database"], timeout_s=0.1)
        records._log_sync = lambda row, keyed: time.sleep(1.0)  # the INSERT hangs past the deadline
        scorer = _scorer(sqlite_urls, records=records, log_decisions=True)
        out = await scorer.score(_req("C00042"), "t")
        assert out["degraded"]
        assert any(
            r.startswith("decision not written to the audit log (timed out")
            for r in out["degraded_reasons"]
        ), out["degraded_reasons"]

    asyncio.run(run())


def test_a_query_bug_is_not_reported_as_an_outage(sqlite_urls) -> None:
    """Only operational failures are DatabaseUnavailable (503); a statement the database
    refuses is a bug and surfaces as itself (a 500 through the app)."""

    async def run() -> None:
        store = RecordStore(sqlite_urls["database"])
        try:
            with pytest.raises(IntegrityError):  # score is NOT NULL
                await store.log_decision(
                    request_id="r",
                    customer_id="C00042",
                    merchant_id="M0007",
                    amount_eur=1.0,
                    decision="approve",
                    score=None,
                    memo=None,
                )
            assert store.last_error is None
        finally:
            store.close()

    asyncio.run(run())


async def _dead_model(row):
    raise RuntimeError("replica died\nremote traceback: not for clients")


async def _hung_model(row):
    await asyncio.sleep(30)


@pytest.mark.parametrize(
    ("model_call", "part"),
    [
        (_dead_model, "could not score this payment (RuntimeError: replica died)"),
        (_hung_model, "did not answer within 0.2s"),
    ],
)
def test_model_failure_is_a_503(sqlite_urls, model_call, part) -> None:
    async def run() -> None:
        scorer = _scorer(sqlite_urls, model_call=model_call)
        scorer.model_timeout_s = 0.2
        t0 = time.perf_counter()
        with pytest.raises(ServiceUnavailable) as err:
            await scorer.score(_req("C00042"), "t")
        assert part in err.value.message and "traceback" not in err.value.message
        assert time.perf_counter() - t0 < 5.0

    asyncio.run(run())


def test_an_idempotency_key_answers_a_repeat_once_and_refuses_another_payment(
    sqlite_urls,
) -> None:
    """Same key, same payment: the first answer and one decision row, even when two requests
    race (the key is the table's primary key, not a dict in one replica). Same key, another
    payment: 409. A decision whose key row cannot be written is a 503 with nothing written."""
    from core.errors import Conflict

    db = sqlite_urls["database"].removeprefix("sqlite:///")

    def rows(request_id: str) -> int:
        with sqlite3.connect(db) as conn:
            return conn.execute(
                "SELECT COUNT(*) FROM decisions WHERE request_id = ?", (request_id,)
            ).fetchone()[0]

    async def run() -> None:
        scorer = _scorer(sqlite_urls, log_decisions=True)
        req = _req("C00042")
        first, racer = await asyncio.gather(
            scorer.score(req, "idem-1", "key-1"), scorer.score(req, "idem-2", "key-1")
        )
        again = await scorer.score(req, "idem-3", "key-1")
        assert first["request_id"] == racer["request_id"] == again["request_id"]
        assert first["decision"] == again["decision"] and first["score"] == again["score"]
        assert rows(first["request_id"]) == 1
        assert rows("idem-1") + rows("idem-2") + rows("idem-3") == 1
        with pytest.raises(Conflict, match="already used for a different payment"):
            await scorer.score(_req("C00043"), "idem-4", "key-1")
        assert rows("idem-4") == 0
        # The database refuses the write: with a key, no answer and nothing written.
        records = RecordStore(sqlite_urls["database"], timeout_s=0.1)
        records._log_sync = lambda row, keyed: time.sleep(1.0)
        broken = _scorer(sqlite_urls, records=records, log_decisions=True)
        with pytest.raises(ServiceUnavailable, match="nothing was written"):
            await broken.score(req, "idem-5", "key-2")
        assert await scorer.records.stored_answer("key-2") is None
        assert rows("idem-5") == 0

    asyncio.run(run())


def test_the_audit_read_back_finds_key_rows_by_prefix_and_counts_decision_rows(
    sqlite_urls,
) -> None:
    """``audit.written``, what reliability/outages.py checks writes with: the keys under one
    prefix with their first answer's request id, and decision rows per request id."""
    from patterns.business_logic.audit import written

    async def run() -> tuple[str, str]:
        scorer = _scorer(sqlite_urls, log_decisions=True)
        first, racer = await asyncio.gather(
            scorer.score(_req("C00042"), "aud-1", "audit-1"),
            scorer.score(_req("C00042"), "aud-2", "audit-1"),
        )
        assert first["request_id"] == racer["request_id"]
        await scorer.score(_req("C00043"), "aud-3", "other-audit-1")  # another prefix
        await scorer.score(_req("C00044"), "aud-4")  # no key: a decision row only
        return first["request_id"], "aud-3"

    keyed, other = asyncio.run(run())
    rows = written(
        sqlite_urls["database"], key_prefix="audit-", request_ids=[keyed, other, "aud-4", "nope"]
    )
    assert rows.keys == {"audit-1": keyed}
    assert dict(rows.decisions) == {keyed: 1, other: 1, "aud-4": 1}
    assert rows.decisions["nope"] == 0

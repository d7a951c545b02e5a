"""The relational side: schema, deterministic seed data and the parameterised lookups.

SQLAlchemy Core with bound parameters only: every value that came from a request reaches the
database as a parameter, never as SQL text, so a customer id of ``' OR 1=1 --`` is just an id
that is not on file. The same code runs on SQLite (embedded default, a file under artifacts/)
and PostgreSQL (a DSN in ``BUSINESS_DATABASE_URL``).

The driver is synchronous; lookups run in a small thread pool of their own so the replica's
event loop keeps serving other requests while one waits on the database.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import (
    Boolean,
    Column,
    Date,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    func,
    insert,
    select,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from patterns.business_logic.database import BlockingCalls, is_sqlite, make_engine, sqlite_path

metadata = MetaData()

customers = Table(
    "customers",
    metadata,
    Column("customer_id", String(16), primary_key=True),
    Column("country", String(2), nullable=False),
    Column("segment", String(16), nullable=False),
    Column("opened_on", Date, nullable=False),
    Column("kyc_verified", Boolean, nullable=False),
    Column("credit_limit_eur", Integer, nullable=False),
    Column("status", String(16), nullable=False),  # active | blocked
)

merchants = Table(
    "merchants",
    metadata,
    Column("merchant_id", String(16), primary_key=True),
    Column("category", String(24), nullable=False),
    Column("country", String(2), nullable=False),
    Column("risk_tier", String(8), nullable=False),  # low | medium | high
)

fx_rates = Table(
    "fx_rates",
    metadata,
    Column("currency", String(3), primary_key=True),
    Column("eur_per_unit", Float, nullable=False),
    Column("as_of", Date, nullable=False),
)

transactions = Table(
    "transactions",
    metadata,
    Column("txn_id", Integer, primary_key=True),
    Column("customer_id", ForeignKey("customers.customer_id"), nullable=False, index=True),
    Column("merchant_id", ForeignKey("merchants.merchant_id"), nullable=False),
    Column("amount_eur", Float, nullable=False),
    Column("booked_on", Date, nullable=False),
)

# The audit trail: every decision, with the client's free-text memo stored as data.
decisions = Table(
    "decisions",
    metadata,
    Column("decision_id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False),
    Column("customer_id", String(16), nullable=False),
    Column("merchant_id", String(16), nullable=False),
    Column("amount_eur", Float, nullable=False),
    Column("decision", String(8), nullable=False),
    Column("score", Float, nullable=False),
    Column("memo", String(200)),
    Column("created_at", Float, nullable=False),
)

# Idempotency-Key -> the first answer. The primary key is the guarantee: two replicas (or a
# replica and its restarted self) racing on one key cannot both insert, and the decision row
# is written in the same transaction as this row, so a key never has two decisions.
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("idempotency_key", String(128), primary_key=True),
    Column("request_digest", String(64), nullable=False),  # the body the key was first used with
    Column("request_id", String(64), nullable=False),  # the first answer's request id
    Column("answer", Text, nullable=False),  # the first answer, JSON
    Column("created_at", Float, nullable=False),
)

# ------------------------------------------------------------------------------ seed data
N_CUSTOMERS = 200
N_MERCHANTS = 50
SEED_AS_OF = dt.date(2025, 1, 1)  # the seed is the same on every machine, whenever it runs
BLOCKED_CUSTOMERS = ("C00007", "C00150")
COUNTRIES = ("DE", "FR", "NL", "ES", "IT", "GB", "US")
CATEGORIES = {  # category -> risk tier
    "grocery": "low",
    "fuel": "low",
    "fashion": "low",
    "electronics": "medium",
    "travel": "medium",
    "digital_goods": "high",
    "gambling": "high",
}
FX_SNAPSHOT = {  # EUR per unit, a fixed snapshot so answers are reproducible
    "EUR": 1.0,
    "USD": 0.92,
    "GBP": 1.17,
    "CHF": 1.04,
    "SEK": 0.087,
    "PLN": 0.23,
    "JPY": 0.0061,
}


def _rng(label: str) -> np.random.Generator:
    digest = hashlib.sha256(f"business_logic/{label}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def customer_id(i: int) -> str:
    return f"C{i:05d}"


def merchant_id(i: int) -> str:
    return f"M{i:04d}"


def seed_rows() -> dict[str, list[dict[str, Any]]]:
    """Every seed row, deterministic: the same ids and values on every machine."""
    rng = _rng("seed/v1")
    country_p = np.array([0.3, 0.2, 0.15, 0.1, 0.1, 0.1, 0.05])
    cats = list(CATEGORIES)
    merchant_rows = []
    for i in range(1, N_MERCHANTS + 1):
        cat = cats[int(rng.integers(len(cats)))]
        merchant_rows.append(
            {
                "merchant_id": merchant_id(i),
                "category": cat,
                "country": COUNTRIES[int(rng.choice(len(COUNTRIES), p=country_p))],
                "risk_tier": CATEGORIES[cat],
            }
        )
    customer_rows, txn_rows = [], []
    txn_id = 0
    for i in range(1, N_CUSTOMERS + 1):
        cid = customer_id(i)
        segment = str(rng.choice(["retail", "premium", "business"], p=[0.7, 0.2, 0.1]))
        limit = {"retail": 2_000, "premium": 10_000, "business": 25_000}[segment]
        customer_rows.append(
            {
                "customer_id": cid,
                "country": COUNTRIES[int(rng.choice(len(COUNTRIES), p=country_p))],
                "segment": segment,
                "opened_on": SEED_AS_OF - dt.timedelta(days=int(rng.integers(10, 3650))),
                "kyc_verified": bool(rng.random() < 0.85),
                "credit_limit_eur": limit,
                "status": "blocked" if cid in BLOCKED_CUSTOMERS else "active",
            }
        )
        typical = math.exp(rng.normal(3.5, 0.8))  # each customer has a typical basket
        for _ in range(int(rng.integers(3, 40))):
            txn_id += 1
            txn_rows.append(
                {
                    "txn_id": txn_id,
                    "customer_id": cid,
                    "merchant_id": merchant_id(int(rng.integers(1, N_MERCHANTS + 1))),
                    "amount_eur": round(float(typical * math.exp(rng.normal(0, 0.5))), 2),
                    "booked_on": SEED_AS_OF - dt.timedelta(days=int(rng.integers(1, 365))),
                }
            )
    fx_rows = [
        {"currency": c, "eur_per_unit": r, "as_of": SEED_AS_OF} for c, r in FX_SNAPSHOT.items()
    ]
    return {
        "customers": customer_rows,
        "merchants": merchant_rows,
        "fx_rates": fx_rows,
        "transactions": txn_rows,
    }


def create_schema_and_seed(url: str, *, force: bool = False) -> bool:
    """Create the tables and load the seed rows; returns False when already seeded."""
    if is_sqlite(url):
        sqlite_path(url).parent.mkdir(parents=True, exist_ok=True)
    engine = make_engine(url, create=True, timeout_s=10)
    try:
        with engine.begin() as conn:
            if force:
                metadata.drop_all(conn)
            metadata.create_all(conn)
            if conn.execute(select(func.count()).select_from(customers)).scalar_one() > 0:
                return False
            if is_sqlite(url):
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")  # readers never wait on writers
            rows = seed_rows()
            for table in (customers, merchants, fx_rates, transactions):
                conn.execute(insert(table), rows[table.name])
        return True
    finally:
        engine.dispose()


# ------------------------------------------------------------------------------ lookups
class DatabaseUnavailable(Exception):
    """The database did not answer (down, refused, timed out, or not set up)."""


@dataclass(frozen=True)
class StoredAnswer:
    """The first answer given for an Idempotency-Key, and the body it answered."""

    request_digest: str
    answer: dict[str, Any]


class KeyAlreadyUsed(Exception):
    """Another request stored an answer for this Idempotency-Key first (a race): nothing of
    this request was written; ``stored`` is the winner's answer."""

    def __init__(self, stored: StoredAnswer) -> None:
        super().__init__("idempotency key already used")
        self.stored = stored


@dataclass(frozen=True)
class Records:
    customer: dict[str, Any] | None
    merchant: dict[str, Any] | None
    eur_per_unit: float | None


def _customer_public(row: Any, today: dt.date) -> dict[str, Any]:
    d = dict(row._mapping)
    opened = d.pop("opened_on")  # a date on both backends (SQLAlchemy's Date parses SQLite's)
    d["account_age_days"] = max(0, (today - opened).days)
    d["kyc_verified"] = bool(d["kyc_verified"])
    return d


class RecordStore:
    """Parameterised lookups over one engine, run off the event loop with a deadline."""

    def __init__(self, url: str, *, timeout_s: float = 2.0, pool_size: int = 4) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.engine = make_engine(url, timeout_s=timeout_s, pool_size=pool_size)
        # the driver's own timeouts fire first; the deadline catches what they do not cover
        self._calls = BlockingCalls(
            name=f"records database ({self.backend})",
            workers=pool_size,
            deadline_s=timeout_s + 0.5,
            unavailable=DatabaseUnavailable,
        )
        self.last_error: str | None = None
        self._idempotency_ready = False

    @property
    def backend(self) -> str:
        return make_url(self.url).get_backend_name()

    async def _run(self, fn: Any, *args: Any) -> Any:
        try:
            out = await self._calls.run(fn, *args)
        except DatabaseUnavailable as exc:
            self.last_error = str(exc)
            raise
        self.last_error = None
        return out

    # -- the queries (bound parameters only) ---------------------------------------------
    def _lookup_sync(self, cust: str, merch: str, currency: str) -> Records:
        with self.engine.connect() as conn:
            c = conn.execute(select(customers).where(customers.c.customer_id == cust)).first()
            m = conn.execute(select(merchants).where(merchants.c.merchant_id == merch)).first()
            fx = conn.execute(
                select(fx_rates.c.eur_per_unit).where(fx_rates.c.currency == currency)
            ).scalar_one_or_none()
        today = dt.date.today()
        return Records(
            customer=_customer_public(c, today) if c is not None else None,
            merchant=dict(m._mapping) if m is not None else None,
            eur_per_unit=float(fx) if fx is not None else None,
        )

    async def lookup(self, customer: str, merchant: str, currency: str) -> Records:
        return await self._run(self._lookup_sync, customer, merchant, currency)

    def _history_sync(self, cust: str) -> Any:
        with self.engine.connect() as conn:
            query = history_query().where(transactions.c.customer_id == cust)
            return conn.execute(query.group_by(transactions.c.customer_id)).first()

    async def history_features(self, customer: str) -> dict[str, float]:
        """The customer's feature vector computed from raw history (the slow, exact path)."""
        row = await self._run(self._history_sync, customer)
        return features_from_history_row(row)

    def _ensure_idempotency_table(self) -> None:
        # Databases seeded before idempotency keys existed lack the table: create it once
        # (CREATE TABLE IF NOT EXISTS; never alters or drops anything).
        if not self._idempotency_ready:
            idempotency_keys.create(self.engine, checkfirst=True)
            self._idempotency_ready = True

    def _stored_sync(self, key: str) -> StoredAnswer | None:
        self._ensure_idempotency_table()
        with self.engine.connect() as conn:
            row = conn.execute(
                select(idempotency_keys.c.request_digest, idempotency_keys.c.answer).where(
                    idempotency_keys.c.idempotency_key == key
                )
            ).first()
        return StoredAnswer(row[0], json.loads(row[1])) if row is not None else None

    async def stored_answer(self, key: str) -> StoredAnswer | None:
        """The first answer given for ``key``, or None if the key is new."""
        return await self._run(self._stored_sync, key)

    def _log_sync(self, row: dict[str, Any] | None, keyed: dict[str, Any] | None) -> None:
        if keyed is not None:
            self._ensure_idempotency_table()
        try:
            with self.engine.begin() as conn:  # both rows or neither
                if keyed is not None:
                    conn.execute(insert(idempotency_keys), keyed)
                if row is not None:
                    conn.execute(insert(decisions), row)
        except sa_exc.IntegrityError:
            if keyed is None:
                raise
            stored = self._stored_sync(keyed["idempotency_key"])
            if stored is None:  # not the key's primary key after all: a bug, not a race
                raise
            raise KeyAlreadyUsed(stored) from None

    async def log_decision(
        self,
        row: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        request_digest: str = "",
        answer: dict[str, Any] | None = None,
        **fields: Any,
    ) -> None:
        """Write the decision row (``row``, or the keyword ``fields``; neither: decision
        logging is off) and, with a key, the key's first answer, in one transaction. Raises
        KeyAlreadyUsed when another request holds the key (then nothing was written)."""
        row = row or fields or None
        now = time.time()
        keyed = None
        if idempotency_key is not None:
            keyed = {
                "idempotency_key": idempotency_key,
                "request_digest": request_digest,
                "request_id": str((answer or {}).get("request_id", "-"))[:64],
                "answer": json.dumps(answer),
                "created_at": now,
            }
        await self._run(self._log_sync, {**row, "created_at": now} if row else None, keyed)

    def all_history(self) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(history_query().group_by(transactions.c.customer_id)))

    def close(self) -> None:
        self._calls.close()
        self.engine.dispose()


# The feature vector: what the feature store holds per customer, and what history_query
# computes from the raw transactions (the exact path when the store cannot answer).
FEATURE_NAMES = (
    "txn_count",
    "avg_amount_eur",
    "max_amount_eur",
    "distinct_merchants",
    "share_foreign",
)


def features_from_history_row(row: Any) -> dict[str, float]:
    """A history aggregate row (``history_query``) as a feature dict; no row: no history."""
    if row is None:
        return dict.fromkeys(FEATURE_NAMES, 0.0)
    m = row._mapping
    return {name: round(float(m[name] or 0.0), 4) for name in FEATURE_NAMES}


def history_query() -> Any:
    """Aggregates over a customer's transactions (all-time, so seeded answers never drift)."""
    foreign = func.avg(func.cast(merchants.c.country != customers.c.country, Integer))
    return (
        select(
            transactions.c.customer_id,
            func.count().label("txn_count"),
            func.avg(transactions.c.amount_eur).label("avg_amount_eur"),
            func.max(transactions.c.amount_eur).label("max_amount_eur"),
            func.count(func.distinct(transactions.c.merchant_id)).label("distinct_merchants"),
            foreign.label("share_foreign"),
        )
        .join(merchants, merchants.c.merchant_id == transactions.c.merchant_id)
        .join(customers, customers.c.customer_id == transactions.c.customer_id)
    )

"""Create the schema and load the deterministic seed data; fill the feature store.

    python -m patterns.business_logic.seed [--database-url URL] [--feature-store-url URL] [--force]

Defaults come from BUSINESS_DATABASE_URL / BUSINESS_FEATURE_STORE_URL (embedded SQLite files
under artifacts/business_logic/ when unset). Idempotent: a seeded database or store is left
alone unless ``--force``. To seed PostgreSQL and Redis:

    python -m patterns.business_logic.seed \\
        --database-url postgresql+psycopg://app@127.0.0.1:5432/fraud \\
        --feature-store-url redis://127.0.0.1:6379/0

The feature store gets a vector for every customer except a few, on purpose, so the missing
and stale paths of the feature policy can be seen with real ids (README, "Feature policy").
"""

from __future__ import annotations

import argparse
import asyncio
import time

from patterns.business_logic.features import (
    FeatureStore,
    FeatureVector,
    InvalidFeatureVector,
    open_feature_store,
)
from patterns.business_logic.records import (
    N_CUSTOMERS,
    RecordStore,
    create_schema_and_seed,
    customer_id,
    features_from_history_row,
)
from patterns.business_logic.settings import BusinessSettings

# Ids kept out of the store (recomputed from the database) or stored 30 days old (stale).
MISSING_FEATURES = tuple(customer_id(i) for i in range(N_CUSTOMERS - 9, N_CUSTOMERS + 1))
STALE_FEATURES = tuple(customer_id(i) for i in range(N_CUSTOMERS - 19, N_CUSTOMERS - 9))
STALE_AGE_S = 30 * 86400


def _log(msg: str) -> None:
    print(f"[business_logic] {msg}", flush=True)


def seed_database(url: str, *, force: bool = False) -> None:
    if create_schema_and_seed(url, force=force):
        _log(f"database seeded: {_redact(url)}")
    else:
        _log(f"database already seeded: {_redact(url)}")


def feature_vectors(database_url: str, now: float | None = None) -> dict[str, FeatureVector]:
    """Every customer's vector from the database, minus the deliberately missing ones."""
    now = time.time() if now is None else now
    records = RecordStore(database_url, timeout_s=10)
    try:
        rows = {r.customer_id: r for r in records.all_history()}
    finally:
        records.close()
    out = {}
    for i in range(1, N_CUSTOMERS + 1):
        cid = customer_id(i)
        if cid in MISSING_FEATURES:
            continue
        at = now - STALE_AGE_S if cid in STALE_FEATURES else now
        out[cid] = FeatureVector(features_from_history_row(rows.get(cid)), at)
    return out


def seed_feature_store(url: str, database_url: str, *, force: bool = False) -> None:
    async def run() -> None:
        store = open_feature_store(url, timeout_s=5.0, create=True)
        try:
            if not force and await _filled(store):
                _log(f"feature store already filled: {_redact(url)}")
                return
            vectors = feature_vectors(database_url)
            await store.put_many(vectors)
            _log(
                f"feature store filled: {len(vectors)} vectors ({len(STALE_FEATURES)} stale, "
                f"{len(MISSING_FEATURES)} customers left out) in {_redact(url)}"
            )
        finally:
            await store.close()

    asyncio.run(run())


async def _filled(store: FeatureStore) -> bool:
    try:
        return await store.get(customer_id(1)) is not None
    except InvalidFeatureVector:  # there, but unreadable: fill it again
        return False


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def main(argv: list[str] | None = None) -> None:
    settings = BusinessSettings()
    parser = argparse.ArgumentParser(description="Seed the business-logic pattern's data.")
    parser.add_argument("--database-url", default=settings.database_url)
    parser.add_argument("--feature-store-url", default=settings.feature_store_url)
    parser.add_argument("--force", action="store_true", help="drop and reload")
    args = parser.parse_args(argv)
    seed_database(args.database_url, force=args.force)
    seed_feature_store(args.feature_store_url, args.database_url, force=args.force)


if __name__ == "__main__":
    main()

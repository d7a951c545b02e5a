"""The audit trail read back: which idempotency keys have their row, how many decision rows
each request id has.

For an operator or a test harness checking that keyed writes were neither lost, duplicated
nor half written (``reliability/outages.py`` does after each outage): a key answered 2xx
must have its key row and exactly one decision row; a key never answered 2xx, neither.
Read-only, over the same ``make_engine`` as the app (so SQLite is opened ``mode=rw``: a
missing file is an error, never a new empty database).

    from patterns.business_logic.audit import written
    rows = written(database_url, key_prefix="score-run1-", request_ids=["req-1", "req-2"])
    rows.keys       # {"score-run1-0": "req-1", ...}   idempotency key -> first answer's id
    rows.decisions  # {"req-1": 1, ...}                request id -> decision rows (0: absent)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, select

from patterns.business_logic.database import make_engine
from patterns.business_logic.records import decisions, idempotency_keys

# Request ids per IN (...) query: well under SQLite's bound-parameter limit.
_CHUNK = 500


@dataclass(frozen=True)
class Written:
    keys: dict[str, str]  # idempotency key -> the request id of its first answer
    decisions: Counter[str]  # request id -> number of decision rows (missing ids count 0)


def written(
    database_url: str, *, key_prefix: str, request_ids: Sequence[str], timeout_s: float = 10.0
) -> Written:
    """The key rows whose key starts with ``key_prefix`` (a SQL LIKE prefix) and the decision
    rows of ``request_ids``, read in one connection."""
    engine = make_engine(database_url, timeout_s=timeout_s)
    try:
        with engine.connect() as conn:
            keys = dict(
                conn.execute(
                    select(idempotency_keys.c.idempotency_key, idempotency_keys.c.request_id).where(
                        idempotency_keys.c.idempotency_key.like(f"{key_prefix}%")
                    )
                ).all()
            )
            rows: Counter[str] = Counter()
            ids = list(request_ids)
            for start in range(0, len(ids), _CHUNK):
                part = ids[start : start + _CHUNK]
                for rid, n in conn.execute(
                    select(decisions.c.request_id, func.count())
                    .where(decisions.c.request_id.in_(part))
                    .group_by(decisions.c.request_id)
                ):
                    rows[rid] = n
    finally:
        engine.dispose()
    return Written(keys=keys, decisions=rows)

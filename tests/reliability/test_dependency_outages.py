"""Dependencies down under load (``reliability.outages``): every answer during the outage is
the README's degraded 200 or a 503 with Retry-After, never a 500 or a hang; the app recovers
by itself when the dependency returns; no accepted write is lost or written twice.

One outage runs in ``make test`` (Redis, the business pattern's feature store: a few seconds
down); the others are chaos tests (``make chaos``). The tests count statuses and writes; the
only durations are the generous "no hang" bound and the recovery limit inside the scenarios.
"""

from __future__ import annotations

import json

import pytest

from reliability import outages


def _check(row: dict) -> None:
    print(json.dumps({k: row.get(k) for k, _ in outages.COLUMNS}))  # the figures, with -s
    detail = json.dumps(row["detail"], default=str)[:2000]
    assert row["other"] == 0, f"answers that are neither ok nor 503+Retry-After: {detail}"
    assert row["slow"] == 0, f"answers slower than the pattern's deadline: {detail}"
    assert row["recovery_s"] is not None, (
        f"no normal answers after the dependency came back: {detail}"
    )
    assert row["writes_accepted"] > 0, detail
    assert row["writes_lost"] == 0, detail
    assert row["writes_duplicated"] == 0, detail
    assert row["half_written"] == 0, detail
    assert row["met"], detail


@pytest.mark.slow
@pytest.mark.redis
def test_business_feature_store_down_under_load_is_degraded_then_recovers(deploy) -> None:
    row = outages.business_redis_down({"deploy": deploy}, outage_s=6.0)
    _check(row)
    assert row["degraded"] > 0, "the outage never showed in an answer"
    assert row["retry_later"] == 0, "a feature store outage must not cost a 503"


CHAOS = [name for name, _ in outages.SCENARIOS if name != "business_redis_down"]


@pytest.mark.chaos
@pytest.mark.parametrize("name", CHAOS)
def test_dependency_down_under_load(name: str, deploy) -> None:
    _check(dict(outages.SCENARIOS)[name]({"deploy": deploy}))

"""Replica death under load (issue 15): SIGKILL of an ingress replica and of a downstream model
replica, each while both apps of the cluster serve.

One cluster, shared with test_kill_redeploy.py (conftest.py), started the way ``make serve``
starts one (``reliability.chaos.own_cluster``: ``tests/servers.ServeCluster`` on serve_config.yaml's
ensemble and business_logic, on a copy of the artifacts), with ``reliability.load.Load`` on
both apps, 2 in flight each. Goals, counted over the app's requests from the kill to 20 s
after it: at most 1% fail, every failure a 503 with Retry-After (never a 500 or a dropped
connection), and the app answers ok again within 10 s of the kill (its first ok answer; the
table of ``make chaos`` also gives the stricter time to its last non-ok answer).

The sweep over every deployment of every app is ``test_chaos.py`` (``make chaos``).
"""

from __future__ import annotations

import pytest

from reliability.chaos import KILL_FAIL_RATIO, RECOVERY_S, Row, kill
from reliability.faults import Cluster
from reliability.load import Load

pytestmark = pytest.mark.slow

APPS = ["ensemble", "business_logic"]
WINDOW_S = 20.0


@pytest.fixture(scope="module")
def stack(fault_stack) -> tuple[Cluster, Load]:
    cluster, load, _ = fault_stack  # tests/reliability/conftest.py
    return cluster, load


def explain(row: Row) -> str:
    c = row.detail["counts"]
    return (
        f"{row.fault}: {row.failed} of {row.requests} failed ({row.retry_later} 503+Retry-After, "
        f"{row.other} other), statuses {c['statuses']}, ok again after {row.recovery_s} s; "
        f"{row.notes}; examples: {c['examples']}"
    )


def check(row: Row) -> None:
    print(explain(row))
    assert row.requests > 0, explain(row)
    assert row.other == 0, "every failure must be a 503 with Retry-After: " + explain(row)
    assert row.failed <= KILL_FAIL_RATIO * row.requests, explain(row)
    # "Serves normally again within 10 s": the first ok answer after the kill (the strict
    # reading, the last non-ok answer, is in the row and in `make chaos`'s table; on a loaded
    # 2-core box a stray unrelated 503 much later would make it a timing test).
    first_ok = row.detail["first_ok_s"]
    assert first_ok is not None and first_ok <= RECOVERY_S, explain(row)


def test_kill_ingress_replica(stack: tuple[Cluster, Load]) -> None:
    """The EnsembleIngress replica (the HTTP entry of the app) dies with requests in flight."""
    cluster, load = stack
    assert cluster.wait_all_healthy(APPS, timeout_s=180)
    check(kill(cluster, load, "ensemble", "EnsembleIngress", window_s=WINDOW_S))


def test_kill_downstream_replica(stack: tuple[Cluster, Load]) -> None:
    """The FraudModel replica behind BusinessIngress dies: the ingress's handle call to it is
    lost mid-request."""
    cluster, load = stack
    assert cluster.wait_all_healthy(APPS, timeout_s=180)
    check(kill(cluster, load, "business_logic", "FraudModel", window_s=WINDOW_S))

"""Readiness means ready (issue 15): redeploys under load fail no request, on any app.

One cluster, shared with test_kill.py (conftest.py; ``reliability.chaos.own_cluster``:
``make serve`` on serve_config.yaml's ensemble and business_logic, on a copy of the artifacts) with
``reliability.load.Load`` on both apps, 2 in flight each. The ensemble is redeployed through
``serve deploy <config> --address <dashboard>``, the operator's command:

- a config-only change (a ``user_config`` value): Serve reconfigures the running replicas;
- a change that replaces every replica (a runtime_env variable, as a new image or model version
  does): new replicas start, old ones stop.

Goal for both: 0 failed requests on the ensemble and on business_logic, counted from the
``serve deploy`` until the new replicas have served for a few seconds. Here, in ``make test``
on a box whose two cores also run the rest of the suite, an answer of 503 + Retry-After (the
ensemble's quorum deadline missed while new replicas start beside the old: the client is told
to come back) may be 1% of them at most; anything else (a 500, a dropped connection) fails the
test. ``make chaos`` holds redeploys to 0 failed. And an app deployed afresh answers its very
first requests, sent the moment Serve says it is RUNNING.
"""

from __future__ import annotations

import copy
import time

import httpx
import pytest

from reliability.chaos import Row, redeploy
from reliability.faults import Cluster
from reliability.load import Load, sample_requests

pytestmark = pytest.mark.slow

APPS = ["ensemble", "business_logic"]


@pytest.fixture(scope="module")
def stack(fault_stack) -> tuple[Cluster, Load, str]:
    return fault_stack  # tests/reliability/conftest.py: one cluster for kills and redeploys


def explain(rows: list[Row]) -> str:
    return "\n".join(
        f"{r.fault} / {r.app}: {r.failed} of {r.requests} failed "
        f"({r.retry_later} 503+Retry-After, {r.other} other), statuses "
        f"{r.detail['counts']['statuses']}; {r.notes}; examples {r.detail['counts']['examples']}"
        for r in rows
    )


@pytest.mark.parametrize("kind", ["config", "replace"])
def test_redeploy_under_load_fails_nothing(stack: tuple[Cluster, Load, str], kind: str) -> None:
    cluster, load, _ = stack
    assert cluster.wait_all_healthy(APPS, timeout_s=300)
    rows = redeploy(cluster, load, "ensemble", kind)
    print(explain(rows))
    assert rows[0].detail["redeploy_s"] is not None, "the redeploy did not finish: " + explain(rows)
    for row in rows:
        assert row.requests > 0, explain(rows)
        assert row.other == 0, explain(rows)
        assert row.retry_later <= row.requests // 100, explain(rows)
    if kind == "replace":  # it really started new replicas
        old = set(rows[0].detail.get("old_pids") or [])
        assert not old & {r.pid for r in cluster.replicas("ensemble")}


def test_fresh_app_answers_its_first_requests(stack: tuple[Cluster, Load, str]) -> None:
    """A second ensemble deployed beside the first: its first 10 requests, sent the moment the
    app is RUNNING, all answer 200 (the ingress is healthy only once it can answer)."""
    cluster, _, url = stack
    config = cluster.current_config()
    (ensemble,) = [a for a in config["applications"] if a["name"] == "ensemble"]
    fresh = copy.deepcopy(ensemble)
    fresh.update(name="ensemble_fresh", route_prefix="/ensemble-fresh")
    config["applications"].append(fresh)
    cluster.deploy(config)
    try:
        deadline = time.monotonic() + 300
        while cluster.app_status("ensemble_fresh") != "RUNNING":
            assert cluster.app_status("ensemble_fresh") not in ("DEPLOY_FAILED", "UNHEALTHY")
            assert time.monotonic() < deadline, "ensemble_fresh never became RUNNING"
            time.sleep(0.2)
        make = sample_requests("ensemble")
        answers = []
        with httpx.Client(base_url=url, timeout=60) as client:
            for i in range(10):
                req = make(i)
                path = req["path"].replace("/ensemble/", "/ensemble-fresh/", 1)
                r = client.post(path, json=req["json"])
                answers.append((r.status_code, r.text[:200]))
        assert all(s == 200 for s, _ in answers), answers
    finally:
        # Removed, not waited for: its ingress drains for 30 s (Ray's default deregistration
        # window, which the cluster keeps), and the package's cluster stops after this test.
        config["applications"].remove(fresh)
        cluster.deploy(config)

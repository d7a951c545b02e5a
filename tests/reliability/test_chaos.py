"""The long chaos runs (``make chaos`` only): every app redeployed both ways, one replica of
every deployment of every app killed, and the soak with a replica of every app killed every
60 s, all under load on every app at once (2 in flight per app).

One cluster for the module: ``make serve`` on serve_config.yaml (all apps) on a copy of the
artifacts (``reliability.chaos.own_cluster``). At the end of the module the table of every row
is printed and written to reliability/report/chaos.json, as ``python -m reliability.chaos``
does. ``COOKBOOK_CHAOS_MINUTES`` sets the soak length (default 10).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from reliability import chaos, soak
from reliability.faults import Cluster
from reliability.load import Load

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

MINUTES = float(os.environ.get("COOKBOOK_CHAOS_MINUTES", "10"))


@pytest.fixture(scope="module")
def rows(request: pytest.FixtureRequest) -> Iterator[list[chaos.Row]]:
    collected: list[chaos.Row] = []
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    yield collected
    if not collected:
        return
    meta = {
        "machine": chaos.machine(),
        "commit": chaos.commit(),
        "started_utc": started,
        "command": "make chaos (tests/reliability/test_chaos.py)",
        "minutes": MINUTES,
    }
    path = chaos.write_report(collected, meta, {})
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    text = (
        f"\nChaos suite on {meta['machine']}, commit {meta['commit']}, soak {MINUTES:g} min:\n\n"
        + chaos.table(collected)
        + f"\n\nwritten to {path}\n"
    )
    if reporter is not None:
        reporter.write_line(text)
    else:
        print(text)


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[Cluster, Load, list[str]]]:
    with chaos.own_cluster(None) as (url, dashboard, apps):
        cluster = Cluster(dashboard)
        assert cluster.wait_all_healthy(apps, timeout_s=300)
        with Load(url, apps, concurrency=2) as load:
            for app in apps:
                assert load.wait_ok(app, n=3, timeout_s=180), load.counts()[app].examples
            yield cluster, load, apps


def missed(new: list[chaos.Row]) -> str:
    return (
        chaos.table([r for r in new if not r.met])
        + "\n"
        + "\n".join(
            f"{r.fault} / {r.app}: {r.notes}; {r.detail.get('counts', {}).get('examples')}"
            for r in new
            if not r.met
        )
    )


def test_redeploy_every_app_both_ways(stack: Any, rows: list[chaos.Row]) -> None:
    cluster, load, apps = stack
    new: list[chaos.Row] = []
    for app in apps:
        for kind in ("config", "replace"):
            cluster.wait_all_healthy(apps, timeout_s=300)
            new.extend(chaos.redeploy(cluster, load, app, kind))
    rows.extend(new)
    assert all(r.met for r in new), missed(new)


def test_kill_every_deployment(stack: Any, rows: list[chaos.Row]) -> None:
    cluster, load, apps = stack
    new = chaos.kill_all(cluster, load, apps)
    rows.extend(new)
    assert all(r.met for r in new), missed(new)


def test_soak_with_a_kill_every_minute(stack: Any, rows: list[chaos.Row]) -> None:
    cluster, load, apps = stack
    cluster.wait_all_healthy(apps, timeout_s=300)
    result = soak.soak(cluster, load, apps, minutes=MINUTES)
    rows.extend(result.rows)
    print(result.report["text"])
    assert all(r.met for r in result.rows), missed(result.rows)

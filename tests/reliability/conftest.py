"""One cluster of ensemble + business_logic under load, shared by test_kill.py and
test_kill_redeploy.py (named to run one after the other, and after every other module here:
the package fixture keeps its cluster and its load running until the package ends, and a
module after them would share the two cores with that load): one cluster start instead of
two, about a minute and a half on the 2-core box."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

APPS = ["ensemble", "business_logic"]


@pytest.fixture(scope="package")  # torn down after the last test of tests/reliability
def fault_stack() -> Iterator[tuple[object, object, str]]:
    from reliability.chaos import own_cluster
    from reliability.faults import Cluster
    from reliability.load import Load

    with own_cluster(APPS) as (url, dashboard, apps):
        cluster = Cluster(dashboard)
        with Load(url, apps, concurrency=2) as load:
            for app in apps:
                assert load.wait_ok(app, n=3, timeout_s=180), load.counts()[app].examples
            yield cluster, load, url

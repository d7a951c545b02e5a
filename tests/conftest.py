"""Suite-wide fixtures: one local Ray cluster and Serve instance for the whole session.

``serve_http`` starts Ray with a few logical CPUs (every deployment asks for small fractions,
so several apps fit on a 2-core machine) and Serve's HTTP proxy on a free loopback port.
``deploy(app, name, route_prefix)`` runs an application and returns its base URL; the apps a
module deployed are deleted when the module ends, so modules do not see each other's apps.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from cluster.ports import free_port

if TYPE_CHECKING:
    from tests import servers


ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--chaos",
        action="store_true",
        help="also run tests marked chaos (long fault runs; `make chaos`)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--chaos") or os.environ.get("COOKBOOK_CHAOS") == "1":
        return
    skip = pytest.mark.skip(reason="chaos: long fault run; `make chaos` runs it")
    for item in items:
        if "chaos" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def serve_http() -> Iterator[str]:
    import yaml
    from ray import serve

    from cluster.local import start_ray

    # Test in the mode `make serve` ships (cluster/ingress_mode.py), with the idempotent
    # routes of serve_config.yaml's apps: the tests deploy them at the same prefixes.
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    # An ingress replica that stops (an app deleted after its module, a redeploy) stays open
    # 30 s by default so that a load balancer in front can stop sending it requests; here
    # HAProxy reloads without it in about a second and retries a refused connection, so 3 s
    # keep that guarantee without 30 s per deleted app (set before Ray starts: the
    # controller and the replicas read it; clusters the tests start inherit it).
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "3")
    metrics_port = free_port()
    os.environ["COOKBOOK_TEST_METRICS_PORT"] = str(metrics_port)
    start_ray(
        int(os.environ.get("COOKBOOK_TEST_RAY_CPUS", "4")),
        applications=config["applications"],
        _metrics_export_port=metrics_port,  # Prometheus text, scraped by a metrics test
        log_to_driver=os.environ.get("COOKBOOK_TEST_RAY_LOGS", "0") == "1",
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()


@pytest.fixture(scope="module")
def deploy(serve_http: str) -> Iterator[Callable[..., str]]:
    from ray import serve

    deployed: list[str] = []

    def _deploy(app, name: str, route_prefix: str) -> str:
        import httpx

        serve.run(app, name=name, route_prefix=route_prefix)
        if name not in deployed:
            deployed.append(name)
        # Wait until the app answers through the port (HAProxy, or Serve's proxy behind it
        # until HAProxy has reloaded with the app's replicas) before the test starts.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{serve_http}{route_prefix}/healthz", timeout=10)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        return serve_http + route_prefix

    yield _deploy
    delete_apps(deployed)


def delete_apps(names: list[str], timeout_s: float = 120.0) -> None:
    """Delete these apps of the session's Serve, all at once (each waits out its ingress's
    draining period, side by side), and wait until they are gone."""
    from ray import serve

    for name in names:
        serve.delete(name, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while set(names) & set(serve.status().applications) and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[servers.PostgresServer]:
    from tests import servers

    server = servers.PostgresServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[servers.RedisServer]:
    from tests import servers

    server = servers.RedisServer()
    server.start()
    yield server
    server.stop()

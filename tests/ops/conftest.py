"""One production-profile cluster for the operations tests, started the way `make serve` starts
one (``scripts/serve_all.py`` in a subprocess, see ``tests.servers.ServeCluster``), once for
this folder and stopped at its end. Three applications, from the patterns' own config.yaml:

- ``ensemble``: the default app in the production environment (``runtime_env`` of the app sets
  ``COOKBOOK_ENVIRONMENT=production`` and real-looking keys), with a promotion gate small enough
  to pass after a few labelled predictions, so a refused promote is refused for its key;
  gRPC on (``grpc_options`` from patterns/ensemble/config.yaml, on a free port);
- ``ensemble_noquorum``: one member that always fails, quorum 1: every predict is a 503 /
  ``UNAVAILABLE``, and its model calls are counted as errors;
- ``business_logic``: a second pattern, so metrics of two apps reach Prometheus.

Beside it a real Prometheus (``prometheus`` fixture) runs ops/prometheus/prometheus.yml, scraping
every second and following this cluster's own service-discovery file, started first so it sees
every counter from zero; Ray's dashboard is pointed at it with ``RAY_PROMETHEUS_HOST``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ADMIN_KEY = "ops-admin-5b7f0c2e9d41"
CLIENT_KEY = "ops-client-8a13e6f07c52"
NOQUORUM = "ensemble_noquorum"


def pattern_config(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "patterns" / name / "config.yaml").read_text()))


def ops_config() -> dict[str, Any]:
    ensemble_config = pattern_config("ensemble")
    (ensemble,) = ensemble_config["applications"]
    noquorum = copy.deepcopy(ensemble)
    ensemble["runtime_env"] = {
        "env_vars": {
            "COOKBOOK_ENVIRONMENT": "production",
            "ENSEMBLE_ADMIN_KEYS": json.dumps([ADMIN_KEY]),
            "ENSEMBLE_CLIENT_KEYS": json.dumps([CLIENT_KEY]),
        }
    }
    ensemble["args"]["challenger"]["gate"] = {
        "min_samples": 3,
        "min_agreement": 0.5,
        "min_labeled": 3,
        "max_accuracy_drop": 1.0,
        "max_p95_latency_ms": 10_000,
    }
    logreg = copy.deepcopy(ensemble["args"]["members"][0])
    noquorum.update(name=NOQUORUM, route_prefix="/ensemble-noquorum")
    noquorum["args"].update(
        members=[{**logreg, "fault": {"error_rate": 1.0}}],
        quorum=1,
        selection={"mode": "all"},
        challenger={"member": None},
    )
    noquorum["deployments"] = [
        d for d in noquorum["deployments"] if d["name"] in ("EnsembleIngress", "member_logreg")
    ]
    (business,) = pattern_config("business_logic")["applications"]
    # development keys, required: the 401/403 of a keyed route through Serve
    business["runtime_env"] = {"env_vars": {"BUSINESS_REQUIRE_KEYS": "true"}}
    return {
        "proxy_location": "HeadOnly",
        "grpc_options": ensemble_config["grpc_options"],
        "applications": [ensemble, noquorum, business],
    }


def prometheus_config(sd_file: Path) -> dict[str, Any]:
    """ops/prometheus/prometheus.yml, scraping every second from ``sd_file``."""
    config = dict(yaml.safe_load((ROOT / "ops" / "prometheus" / "prometheus.yml").read_text()))
    config["global"] = {**config["global"], "scrape_interval": "1s", "evaluation_interval": "1s"}
    (job,) = config["scrape_configs"]
    # Re-read the file every second: it appears only once Ray's dashboard is up.
    job["file_sd_configs"] = [{"files": [str(sd_file)], "refresh_interval": "1s"}]
    return config


@pytest.fixture(scope="package")
def ops_stack() -> Iterator[tuple[Any, Any]]:
    from patterns.business_logic.artifacts import ensure_artifacts as business_artifacts
    from patterns.ensemble.artifacts import ensure_artifacts as ensemble_artifacts
    from tests.servers import PrometheusServer, ServeCluster

    ensemble_artifacts()
    business_artifacts()
    cluster = ServeCluster(ops_config(), num_cpus=4)
    try:  # without the binary the metrics tests skip, the others still run
        prometheus: Any = PrometheusServer(prometheus_config(cluster.sd_file))
    except pytest.skip.Exception as skipped:
        prometheus = str(skipped)
    else:
        prometheus.start()
        cluster.env["RAY_PROMETHEUS_HOST"] = prometheus.url
    try:
        cluster.start()
        yield cluster, prometheus
    finally:
        cluster.stop()
        if not isinstance(prometheus, str):
            prometheus.stop()


@pytest.fixture(scope="package")
def ops_cluster(ops_stack: tuple[Any, Any]) -> Any:
    return ops_stack[0]


@pytest.fixture(scope="package")
def prometheus(ops_stack: tuple[Any, Any]) -> Any:
    if isinstance(ops_stack[1], str):
        pytest.skip(ops_stack[1])
    return ops_stack[1]

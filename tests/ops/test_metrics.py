"""Metrics of two apps reach a real Prometheus (ops/prometheus/prometheus.yml) from the ops
cluster, tagged with app, model and model version; every query of the Grafana dashboard
(ops/grafana/serve-cookbook.json) succeeds against it and returns series; Ray's dashboard is
pointed at the same Prometheus (RAY_PROMETHEUS_HOST).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from patterns.business_logic import client as business_client
from patterns.business_logic.model import MODEL_NAME as FRAUD_MODEL
from patterns.ensemble.data import N_FEATURES, load_split
from patterns.ensemble.grpc_client import predict
from tests.ops.conftest import NOQUORUM, ROOT

pytestmark = pytest.mark.slow  # uses the ops cluster

DASHBOARD = ROOT / "ops" / "grafana" / "serve-cookbook.json"
ENSEMBLE_PREDICTS = 12
BUSINESS_SCORES = 6
# What Grafana puts in place of its variables when the dashboard shows every app.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$app": ".*"}


def _poll(prometheus: Any, expr: str, done: Any, timeout_s: float = 90.0) -> list[dict]:
    """The query's result once ``done(result)`` holds (Ray's agent exports about every 10 s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = prometheus.query(expr)
        assert out["status"] == "success", out
        result = out["data"]["result"]
        if done(result) or time.monotonic() > deadline:
            return list(result)
        time.sleep(2)


@pytest.fixture(scope="module")
def traffic(ops_cluster) -> dict[str, int]:
    """Requests to both apps, over HTTP and gRPC, good and refused; sent once per module."""
    url = ops_cluster.http_url
    rows = load_split().x_test[:ENSEMBLE_PREDICTS].tolist()
    with httpx.Client(timeout=30) as http:
        for row in rows[: ENSEMBLE_PREDICTS // 2]:
            r = http.post(f"{url}/ensemble/predict", json={"instances": [row]})
            assert r.status_code == 200, r.text
        assert http.post(f"{url}/ensemble/predict", json={"instances": [[1.0]]}).status_code == 422
        noquorum = http.post(f"{url}/ensemble-noquorum/predict", json={"instances": [rows[0]]})
        assert noquorum.status_code == 503, noquorum.text
        for i in range(BUSINESS_SCORES):
            req = business_client.sample_request(i)
            extra = {k: req[k] for k in ("json", "headers") if k in req}
            r = http.request(req["method"], url + req["path"], **extra)
            assert r.status_code == 200, r.text
    with grpc.insecure_channel(ops_cluster.grpc_target) as channel:
        for row in rows[ENSEMBLE_PREDICTS // 2 :]:
            predict(channel, [row])
        with pytest.raises(grpc.RpcError):
            predict(channel, [[1.0] * (N_FEATURES - 1)])  # INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError):
            predict(channel, [rows[0]], app=NOQUORUM)  # UNAVAILABLE
    return {"ensemble": ENSEMBLE_PREDICTS, "business_logic": BUSINESS_SCORES}


def test_prometheus_scrapes_the_cluster_through_rays_service_discovery(
    ops_cluster, prometheus
) -> None:
    """The targets come from this cluster's discovery file; the node's metrics endpoint is up
    and Serve's metrics arrive through it. (Ray also lists the autoscaler's and the dashboard's
    own metrics ports, fixed at 44217 and 44227: the first has nobody listening on a local
    cluster, and on a machine with several clusters either may be another cluster's.)"""
    deadline = time.monotonic() + 60
    while True:
        targets = prometheus.targets()
        up = [t for t in targets if t["health"] == "up"]
        if up or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert up, targets
    files = {t["discoveredLabels"]["__meta_filepath"] for t in targets}
    assert files == {str(ops_cluster.sd_file)}, files
    healthy = _poll(prometheus, "sum(ray_serve_deployment_replica_healthy)", bool)
    assert float(healthy[0]["value"][1]) >= 3, healthy  # replicas of the three apps


def test_each_apps_model_metrics_arrive_tagged(prometheus, traffic) -> None:
    expected = {
        ("ensemble", "ensemble", "logreg", "v1"),
        ("ensemble", "ensemble", "xgb", "v1"),
        ("ensemble", "ensemble", "mlp", "v1"),
        ("ensemble", "ensemble", "xgb_v2", "v2"),  # the shadow challenger
        ("business_logic", "business_logic", FRAUD_MODEL, "v1"),
    }
    expr = (
        "sum by (app, application, model, model_version) "
        '(ray_cookbook_model_requests_total{outcome="ok"})'
    )

    def labels(result: list[dict]) -> set[tuple[str, ...]]:
        keys = ("app", "application", "model", "model_version")
        return {tuple(s["metric"].get(k, "") for k in keys) for s in result}

    result = _poll(prometheus, expr, lambda r: expected <= labels(r))
    assert expected <= labels(result), labels(result)
    # Requests were sent one at a time, so each was a batch of its own: every predict called
    # the cascade's gate (logreg) and every score the fraud model at least that many times. Our
    # counter also agrees with Serve's own count of the deployment's batches.
    for app, model, deployment in (
        ("ensemble", "logreg", "member_logreg"),
        ("business_logic", FRAUD_MODEL, "FraudModel"),
    ):
        ours = f'sum(ray_cookbook_model_requests_total{{application="{app}", model="{model}"}})'
        serves = (
            "sum(ray_serve_batches_processed_total"
            f'{{application="{app}", deployment="{deployment}"}})'
        )
        both = f"({ours}) == ({serves})"  # one series when equal, none otherwise
        agreed = _poll(
            prometheus, both, lambda r, n=traffic[app]: bool(r) and float(r[0]["value"][1]) >= n
        )
        assert agreed, (app, prometheus.query(ours), prometheus.query(serves))
        assert float(agreed[0]["value"][1]) >= traffic[app], (app, agreed)
    latency = _poll(
        prometheus,
        'sum by (application, model) (ray_cookbook_model_latency_ms_count{application="ensemble"})',
        lambda r: len(r) >= 4,
    )
    assert {s["metric"]["model"] for s in latency} >= {"logreg", "xgb", "mlp", "xgb_v2"}


def _panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((f"{panel['title']} [{target['refId']}]", target["expr"]))
    return out


def _grafana(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    left = re.findall(r"\$\w+", expr)
    assert not left, f"variables the test does not substitute: {left}"
    return expr


def test_the_dashboard_is_grafana_json_for_ray_and_our_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["panels"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "app"}
    exprs = " ".join(expr for _, expr in _panel_queries())
    for metric in (
        "ray_serve_num_http_requests_total",
        "ray_serve_num_grpc_requests_total",
        "ray_serve_http_request_latency_ms_bucket",
        "ray_serve_deployment_replica_healthy",
        "ray_cookbook_model_requests_total",
        "ray_cookbook_model_latency_ms_bucket",
        "ray_cookbook_model_batch_size_bucket",
    ):
        assert metric in exprs, metric


@pytest.mark.parametrize(("panel", "expr"), _panel_queries(), ids=[p for p, _ in _panel_queries()])
def test_every_panel_query_succeeds_with_data(prometheus, traffic, panel, expr) -> None:
    query = _grafana(expr)
    result = _poll(prometheus, query, bool)
    assert result, f"{panel}: no series for {query}"


def _ray_token_headers() -> dict[str, str]:
    """Ray 2.60 turns token authentication on for a new local cluster: its dashboard API wants
    the token (``$RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``, where ``ray.init`` keeps it)."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path.home() / ".ray" / "auth_token"
    if not token and path.exists():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def test_rays_dashboard_is_pointed_at_this_prometheus(ops_cluster, prometheus) -> None:
    r = httpx.get(
        f"{ops_cluster.dashboard_url}/api/prometheus_health",
        headers=_ray_token_headers(),
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.json()["result"] is True and "prometheus running" in r.json()["msg"]


def test_grpc_failures_are_counted_refusals_are_not(prometheus, traffic) -> None:
    """A lost quorum (UNAVAILABLE, raised) is a gRPC error in Serve's metrics; a refused input
    (INVALID_ARGUMENT, answered without an exception) is not (grpc_service.predict says why)."""
    expr = "sum by (application, error_code) (ray_serve_num_grpc_error_requests_total)"
    result = _poll(
        prometheus, expr, lambda r: any(s["metric"].get("application") == NOQUORUM for s in r)
    )
    # (other tests' calls to an unknown app or to business_logic, which has no Predict, are
    # counted too, under their own application label)
    apps = {s["metric"].get("application", "") for s in result}
    assert NOQUORUM in apps and "ensemble" not in apps, result
    ok = _poll(
        prometheus,
        'sum(ray_serve_num_grpc_requests_total{application="ensemble"})',
        lambda r: bool(r) and float(r[0]["value"][1]) >= ENSEMBLE_PREDICTS // 2 + 1,
    )
    assert float(ok[0]["value"][1]) >= ENSEMBLE_PREDICTS // 2 + 1  # the refused call counted


def test_lost_quorum_is_an_http_503_in_prometheus(prometheus, traffic) -> None:
    expr = (
        f'sum by (error_code) (ray_serve_num_http_error_requests_total{{application="{NOQUORUM}"}})'
    )
    result = _poll(prometheus, expr, lambda r: any(s["metric"]["error_code"] == "503" for s in r))
    assert {s["metric"]["error_code"] for s in result} >= {"503"}, result

"""The Locust harness drives a real Serve app and reports figures (no timing assertions)."""

from __future__ import annotations

import pytest

from loadtests.run import cost_per_million, run_locust
from tests.core.ingress_app import build


@pytest.mark.slow
def test_locust_run_against_a_served_app(deploy, serve_http: str) -> None:
    deploy(build(), name="core-ingress-load", route_prefix="/core-test")
    stats = run_locust("tests.core.ingress_app:sample_request", serve_http, users=4, duration_s=5)
    assert stats["requests"] > 20
    assert stats["failures"] == 0
    assert stats["p50_ms"] <= stats["p95_ms"] <= stats["p99_ms"]


def test_cost_per_million() -> None:
    assert cost_per_million(100.0, 0.36) == pytest.approx(1.0)
    assert cost_per_million(0.0, 1.0) == float("inf")

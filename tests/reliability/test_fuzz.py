"""Requests generated from each app's OpenAPI document against every route of every app, under
real Ray Serve (the short run of ``reliability/fuzz.py``; ``make chaos`` runs the long one).

One cluster for the module: ``make serve`` on the generated serve_config.yaml (all apps; the
module's first test is the one for ``make serve`` itself), on a copy of the artifacts so the
fuzzer's writes (decisions, feedback, new online versions) stay out of the checkout, and with
the ensemble's keys required so its 401/403 are probed too. Each app is a test of its own: a
failure names the app, the route and the request (as curl). Generation is derandomized: the
same code sends the same requests.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from reliability import fuzz
from tests.servers import ServeCluster

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# Generated requests per route and kind (valid, invalid; a fifth of it without and with a
# wrong key on keyed routes). The long run in `make chaos` sends many more.
MAX_EXAMPLES = 10


def _config() -> dict:
    import yaml

    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    for app in config["applications"]:
        if app["name"] == "multiplexing":
            # Fuzzed chats may ask for the largest answer: keep generation short on a CPU box
            # (the limit is a real knob, chat.limits in config.yaml).
            app["args"]["chat"]["limits"].update({"max_tokens": 16, "default_max_tokens": 8})
    return config


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[ServeCluster]:

    artifacts = tmp_path_factory.mktemp("fuzz") / "artifacts"
    shutil.copytree(ROOT / "artifacts", artifacts)
    env = {
        "COOKBOOK_MODEL_STORE_URI": str(artifacts / "models"),
        "BUSINESS_DATABASE_URL": f"sqlite:///{artifacts}/business_logic/records.db",
        "BUSINESS_FEATURE_STORE_URL": f"sqlite:///{artifacts}/business_logic/features.db",
        "ONLINE_LOG_URL": f"sqlite:///{artifacts}/online_learning/feedback.db",
        "ENSEMBLE_REQUIRE_KEYS": "true",  # development keys, but required: 401/403 probed
    }
    # a generous readiness wait: five apps (one with an LLM) on a shared 2-core box
    server = ServeCluster(_config(), env=env, timeout_s=900)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_make_serve_runs_every_app_in_the_config(cluster: ServeCluster) -> None:
    """`make serve` on serve_config.yaml: every app RUNNING (`serve status`, the CLI a user
    reaches for next), every /healthz 200, every app's URL printed."""
    import os
    import subprocess
    import sys

    import httpx

    apps = cluster.config["applications"]
    log = cluster.log_file.read_text()
    for app in apps:
        url = cluster.http_url + app["route_prefix"]
        assert f"{url}   (docs: {url}/docs)" in log, log[-3000:]
        assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200, app["name"]
    # From another shell, as the README says: Ray 2.60's CLI sends the cluster's token
    # (~/.ray/auth_token) only with RAY_AUTH_MODE=token; without it the dashboard answers 401.
    status = subprocess.run(
        [str(Path(sys.executable).parent / "serve"), "status", "-a", cluster.dashboard_url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RAY_AUTH_MODE": "token"},
    )
    assert status.returncode == 0, status.stderr[-2000:]
    assert status.stdout.count("status: RUNNING") == len(apps), status.stdout[-3000:]


@pytest.mark.parametrize("app", list(fuzz.PREFIXES))
def test_generated_requests_get_documented_answers_and_no_server_error(
    cluster: ServeCluster, app: str
) -> None:
    results = fuzz.run(
        cluster.http_url, [app], MAX_EXAMPLES, keys_required=[*fuzz.KEYS_ENFORCED, "ensemble"]
    )
    r = results[app]
    summary = (
        f"{app}: {r['operations']} routes, {r['requests']} requests, "
        f"{r['server_errors']} server errors, {r['conformance_failures']} conformance "
        f"failures, {r['hangs']} hangs; statuses {r['statuses']}"
    )
    print(summary)
    assert r["failed"] == 0, summary + "\n" + "\n".join(r["failures"])
    # every route was reached, and with valid requests some got through to the handlers
    assert r["operations"] >= 3
    assert all(op["requests"] > 0 for op in r["per_operation"].values()), r["per_operation"]
    assert any(200 <= s < 300 for s in r["statuses"]), summary

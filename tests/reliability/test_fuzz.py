"""Requests generated from each app's OpenAPI document against every route of every app, under
real Ray Serve (the short run of ``reliability/fuzz.py``; ``make chaos`` runs the long one):
``schemathesis run -c all`` with every phase, stateful included, must find nothing.

One cluster for the module: ``make serve`` on the generated serve_config.yaml (all apps; the
module's first test is the one for ``make serve`` itself), in the development profile a
reviewer's ``make serve`` runs (keyed routes open, and documented so), on a copy of the
artifacts so the fuzzer's writes (decisions, feedback, new online versions) stay out of the
checkout. Each app is a test of its own: a failure names the app, the route and the check.
Generation is deterministic: the same code sends the same requests.
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
# Generated requests per route and phase. The long run in `make chaos` sends many more.
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
def test_schemathesis_finds_nothing_on_any_app(cluster: ServeCluster, app: str) -> None:
    r = fuzz.run(cluster.http_url, [app], MAX_EXAMPLES)[app]
    summary = (
        f"{app}: {r['findings']} findings in {r['generated']} test cases, phases {r['phases']}; "
        f"{r['mutated_requests']} mutated uploads, {r['mutated_failed']} failed"
    )
    print(summary)
    assert r["failed"] == 0, summary + "\n" + "\n".join(r["failures"]) + "\n" + r["cli_tail"]
    # every phase ran: the stateful one wherever the document links operations
    assert r["generated"] > 0, r["cli_tail"]
    for phase in ("examples", "coverage", "fuzzing"):
        assert r["phases"].get(phase) in ("passed", "skipped"), (phase, r["phases"])
    assert r["phases"]["coverage"] == r["phases"]["fuzzing"] == "passed", r["phases"]
    assert r["phases"].get("stateful") in ("passed", "not applicable"), r["phases"]
    if app == "pipeline":  # the upload routes got the app's own images, mutated
        assert r["mutated_requests"] > 0 and r["mutated_statuses"], r

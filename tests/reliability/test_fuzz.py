"""Requests generated from each app's OpenAPI document against every route of every app, under
real Ray Serve (the short run of ``reliability/fuzz.py``; ``make chaos`` runs the long one).

One cluster for the module: ``make serve`` on the generated serve_config.yaml (all apps), on a
copy of the artifacts so the fuzzer's writes (decisions, feedback, new online versions) stay
out of the checkout, and with the ensemble's keys required so its 401/403 are probed too. Each
app is a test of its own: a failure names the app, the route and the request (as curl).
Generation is derandomized: the same code sends the same requests.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from reliability import fuzz

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
def cluster(tmp_path_factory) -> Iterator[str]:
    from tests.servers import ServeCluster

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
        yield server.http_url
    finally:
        server.stop()


@pytest.mark.parametrize("app", list(fuzz.PREFIXES))
def test_generated_requests_get_documented_answers_and_no_server_error(cluster: str, app: str):
    results = fuzz.run(
        cluster, [app], MAX_EXAMPLES, keys_required=[*fuzz.KEYS_ENFORCED, "ensemble"]
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

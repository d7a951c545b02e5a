"""cluster.ingress_mode: the environment a cluster is started with (each case in a fresh
Python process, as a cluster's driver would be)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, os, sys, yaml
from cluster.ingress_mode import apply_ingress_mode
apps = yaml.safe_load(open("serve_config.yaml"))["applications"]
mode = apply_ingress_mode(sys.argv[1] if len(sys.argv) > 1 else None, applications=apps)
print(json.dumps({"mode": mode, "env": {k: v for k, v in os.environ.items()
      if k.startswith(("RAY_SERVE", "COOKBOOK"))}}))
"""


def probe(*args: str, env: dict[str, str] | None = None) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "COOKBOOK_"))}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        cwd=ROOT,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_haproxy_with_the_edge_is_the_default() -> None:
    out = probe()
    env = out["env"]
    assert out["mode"] == "haproxy"
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    launcher = Path(env["RAY_SERVE_HAPROXY_BINARY_PATH"])
    assert launcher.name == "haproxy-edge" and os.access(launcher, os.X_OK)
    real = Path(env["COOKBOOK_HAPROXY_BINARY"])
    assert real.name == "haproxy" and real.resolve() != launcher.resolve()
    assert env["COOKBOOK_HAPROXY_ADMIN_HOST"] == "127.0.0.1"
    names = [k for k in env if k.endswith("_PORT") and ("HAPROXY" in k or "FALLBACK" in k)]
    ports = [env[k] for k in names]
    assert len(ports) == len(set(ports)) == 4, ports  # stats, metrics, fallback HTTP and gRPC
    # The pipeline's uploads fit HAProxy's buffer whole (with its 1 KB kept for rewrites), so a
    # /pipeline/read whose replica dies under it is replayed, not cut off.
    from patterns.pipeline.client import sample_request

    largest = max(len(sample_request(i)["data"]) for i in range(50))
    assert int(env["RAY_SERVE_HAPROXY_TUNE_BUFSIZE"]) >= 2 * largest + 1024, largest


def test_replayable_routes_come_from_the_apps_openapi() -> None:
    routes = probe()["env"]["COOKBOOK_IDEMPOTENT_ROUTES"].split(",")
    assert "/ensemble/predict" in routes and "/pipeline/read" in routes
    assert "/multiplex/models/{model_id}/predict" in routes
    assert "/business/score" not in routes  # a write: replayed only with an Idempotency-Key
    assert not any(r.endswith("/feedback") for r in routes)


def test_a_child_process_picks_its_own_files_and_ports() -> None:
    parent = probe()["env"]
    child = probe(env=parent)  # it inherits the parent's environment, as a subprocess does
    env = child["env"]
    for name in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"):
        assert env[name] != parent[name], name
    assert env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"] != parent["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]


def test_values_a_person_set_stay() -> None:
    env = probe(env={"RAY_SERVE_HAPROXY_STATS_PORT": "18404"})["env"]
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"


def test_the_python_proxy_mode_sets_no_haproxy_switch() -> None:
    out = probe("default")
    assert out["mode"] == "default"
    assert not any(k.startswith("RAY_SERVE_HAPROXY") for k in out["env"])
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in out["env"]


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(AssertionError, match="COOKBOOK_INGRESS_MODE must be one of"):
        probe("nginx")

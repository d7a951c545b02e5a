"""``make serve`` on the generated serve_config.yaml (every app), one cluster for the module:

- every app RUNNING, every URL printed (the module's first test);
- requests generated from each app's OpenAPI document against every route of every app
  (the short run of ``reliability/fuzz.py``; ``make chaos`` runs the long one):
  ``schemathesis run -c all`` with every phase, stateful included, must find nothing. Each app
  is a test of its own: a failure names the app, the route and the check. Generation is
  deterministic: the same code sends the same requests;
- what listens where: every port that carries app traffic (HTTP through HAProxy, HAProxy's
  stats and metrics, Serve's fallback proxy, the replicas' direct-ingress HTTP servers) listens
  on 127.0.0.1 only; what listens beyond loopback is Ray's own gRPC (raylet, GCS, workers, the
  replicas' inter-deployment server), which refuses a call without the cluster's token. Read
  from the listening sockets (psutil); the token check connects on loopback only;
- last, a clean stop: SIGTERM to its process group (what Ctrl-C in a terminal or a supervisor
  sends) frees the HTTP port within 10 s and leaves no ``haproxy``, ``raylet`` or replica
  process behind (within 30 s: Ray's workers take a few seconds to go).

The cluster runs in the development profile a reviewer's ``make serve`` runs (keyed routes
open, and documented so), started the way ``make serve`` starts it (``scripts.serve_all`` on a
serve config), with one replica per deployment (``_config``), on a copy of the artifacts so
the fuzzer's writes (decisions, feedback, new online versions) stay out of the checkout.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from reliability import fuzz
from tests.servers import ServeCluster

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# Generated requests per route and phase. The long run in `make chaos` sends many more.
MAX_EXAMPLES = 10

# Ray's own processes: their gRPC ports are guarded by token authentication (ops/README.md).
# ``ray-dashboard-<Module>-0``: the dashboard's module subprocesses (ServeHead, say).
RAY_INTERNAL = (
    "raylet", "gcs_server", "ray::", "python", "dashboard", "ray-dashboard", "log_monitor",
)  # fmt: skip


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def listeners(procs: list[psutil.Process]) -> list[tuple[str, str, int, list[str]]]:
    out = []
    for p in procs:
        try:
            name, cmd = p.name(), p.cmdline()
            conns = p.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                out.append((name, c.laddr.ip, c.laddr.port, cmd))
    return out


def _config() -> dict:
    """serve_config.yaml as ``make serve`` runs it, in a lighter profile: one replica per
    deployment the config lists (``num_replicas``, or the autoscaler's ``min_replicas``;
    ``max_replicas`` stays), through the config's own deployment options. What this module
    proves (every app up, no finding, the listeners, the stop) does not depend on a second
    replica, and each one is a process to start on a shared 2-core box; the reliability
    tests that lose a replica run on their own clusters."""
    import yaml

    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    for app in config["applications"]:
        for deployment in app.get("deployments", []):
            if "num_replicas" in deployment:
                deployment["num_replicas"] = 1
            if "autoscaling_config" in deployment:
                deployment["autoscaling_config"]["min_replicas"] = 1
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


def test_app_traffic_listens_on_loopback_only(cluster: ServeCluster) -> None:
    procs = tree(cluster.proc.pid)  # type: ignore[union-attr]
    found = listeners(procs)
    haproxy = [f for f in found if f[0] == "haproxy"]
    assert haproxy, f"no HAProxy in the cluster's process tree: {found}"
    assert {ip for _, ip, _, _ in haproxy} == {"127.0.0.1"}, haproxy
    assert any(port == cluster.http_port for _, _, port, _ in haproxy)
    # the replicas' direct-ingress HTTP servers and Serve's own (fallback) proxy
    replica_http = [f for f in found if f[0].startswith("ray::") and 30000 <= f[2] <= 31000]
    assert replica_http and {ip for _, ip, _, _ in replica_http} == {"127.0.0.1"}, replica_http
    beyond = [f for f in found if not f[1].startswith("127.")]
    for name, ip, port, _ in beyond:
        assert name.startswith(RAY_INTERNAL), f"{name} listens on {ip}:{port}"
        assert not 30000 <= port <= 31000, f"direct ingress beyond loopback: {name} {port}"


def test_rays_own_grpc_refuses_a_call_without_the_token(cluster: ServeCluster) -> None:
    """One replica's inter-deployment gRPC port (listens on every interface: no Ray setting
    moves it), called on loopback without the token: UNAUTHENTICATED."""
    import grpc

    procs = tree(cluster.proc.pid)  # type: ignore[union-attr]
    ports = [
        port
        for name, ip, port, _ in listeners(procs)
        if name.startswith("ray::ServeRepli")
        and ip in ("0.0.0.0", "::")
        and not 30000 <= port <= 31000
    ]
    assert ports, "no replica port beyond loopback to check"
    refused = 0
    for port in ports:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest")
            try:
                call(b"", timeout=5)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    refused += 1
                    continue
                assert exc.code() == grpc.StatusCode.UNIMPLEMENTED, (port, exc.code())
            else:
                pytest.fail(f"port {port} answered a call without the token")
    assert refused >= 1, ports


def test_sigterm_to_the_group_leaves_nothing_and_frees_the_port(cluster: ServeCluster) -> None:
    """Last in the module: it stops the cluster."""
    proc = cluster.proc
    assert proc is not None
    procs = tree(proc.pid)
    names = {p.pid: p.name() for p in procs if p.is_running()}
    assert any(n == "haproxy" for n in names.values()), names
    assert any(n == "raylet" for n in names.values()), names
    os.killpg(proc.pid, signal.SIGTERM)
    t0 = time.monotonic()
    port_free = None
    while time.monotonic() - t0 < 30:
        listening = any(
            c.laddr.port == cluster.http_port and c.status == psutil.CONN_LISTEN
            for c in psutil.net_connections(kind="tcp")
        )
        if not listening and port_free is None:
            port_free = time.monotonic() - t0
        alive = [pid for pid in names if psutil.pid_exists(pid) and _same(pid, names[pid])]
        if port_free is not None and not alive:
            break
        time.sleep(0.2)
    left = {pid: names[pid] for pid in names if psutil.pid_exists(pid) and _same(pid, names[pid])}
    elapsed = time.monotonic() - t0
    print(f"port free after {port_free} s, every process gone after {elapsed:.1f} s")
    assert port_free is not None and port_free <= 10, f"port still taken after {elapsed:.0f} s"
    assert not left, f"left behind after {elapsed:.0f} s: {left}"


def _same(pid: int, name: str) -> bool:
    try:
        p = psutil.Process(pid)
        return p.name() == name and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

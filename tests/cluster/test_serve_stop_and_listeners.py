"""``make serve`` (``scripts.serve_all``) in the shipped ingress mode: what listens where, and a
clean stop.

- Every port that carries app traffic (HTTP through HAProxy, HAProxy's stats and metrics,
  Serve's fallback proxy, the replicas' direct-ingress HTTP servers) listens on 127.0.0.1
  only; what listens beyond loopback is Ray's own gRPC (raylet, GCS, workers, the replicas'
  inter-deployment server), which refuses a call without the cluster's token. Read from the
  listening sockets (psutil); the token check connects on loopback only.
- SIGTERM to its process group (what Ctrl-C in a terminal or a supervisor sends) frees the
  HTTP port within 10 s and leaves no ``haproxy``, ``raylet`` or replica process behind
  (within 30 s: Ray's workers take a few seconds to go).
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from reliability.chaos import cluster_config
from tests.servers import ServeCluster

pytestmark = pytest.mark.slow

# Ray's own processes: their gRPC ports are guarded by token authentication (ops/README.md).
RAY_INTERNAL = ("raylet", "gcs_server", "ray::", "python", "dashboard", "log_monitor")


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


@pytest.fixture(scope="module")
def cluster():
    # business_logic: an ingress and a model, and a side service (the risk API) of its own
    c = ServeCluster(cluster_config(["business_logic"]), num_cpus=4)
    c.start()
    yield c
    c.stop()


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

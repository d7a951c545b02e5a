"""Which HTTP ingress a cluster runs, set in the environment before Ray starts.

- ``haproxy`` (the default): Serve's HAProxy mode (``RAY_SERVE_ENABLE_HA_PROXY=1``: HAProxy
  sends each request straight to an ingress replica's own HTTP server) with
  ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (user code on the replica's event loop, no per-request
  thread hop), hardened by ``cluster/haproxy_edge.py``: safe replays only, a JSON 503 with
  Retry-After for a lost replica, new apps answered from their first request, admin ports on
  loopback, no HAProxy left behind. The figures that chose it are in the README ("Why Serve
  was slower than FastAPI here, and what fixed it", ``python -m scripts.ingress_bench``).
- ``default``: Serve's Python proxy as Ray ships it, kept to measure against. It has none of
  the edge's guarantees: a lost ingress replica is Ray's plain-text 500.

Each local cluster gets its own HAProxy files and free stats, metrics and fallback-proxy
ports, so two clusters on one machine (a test run and ``make serve``) do not collide on Ray's
fixed defaults, nor does a cluster started by a child process with the ones its parent picked
(the load study's Serve target under the tests). Values a person set stay.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cluster.haproxy_edge import ADMIN_HOST_ENV, BINARY_ENV, ROUTES_ENV, real_binary
from cluster.ports import free_port

MODES = ("haproxy", "default")
DEFAULT_MODE = "haproxy"
LAUNCHER = Path(__file__).resolve().parent / "haproxy-edge"

# Which process picked the files and ports below for its own cluster, and which of them
# ("<pid>:NAME,NAME"): a child process that starts a cluster of its own inherits them and must
# not reuse them, while values a person set stay wherever they are.
_PICKED_ENV = "COOKBOOK_HAPROXY_PICKED"
_PORTS = (
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",  # Serve's proxy behind HAProxy (Ray's default 8500)
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",  # (9500)
)


def idempotent_routes(applications: Iterable[dict[str, Any]]) -> list[str]:
    """Full paths of the routes the apps of a serve config mark ``x-idempotent`` in their
    OpenAPI (``core.ingress.IDEMPOTENT``): the edge may replay those. Imports each app's
    module and reads the OpenAPI of every FastAPI object in it."""
    from fastapi import FastAPI

    found: list[str] = []
    for app in applications:
        module = importlib.import_module(app["import_path"].split(":")[0])
        prefix = (app.get("route_prefix") or "/").rstrip("/")
        for value in vars(module).values():
            if not isinstance(value, FastAPI):
                continue
            for path, ops in value.openapi().get("paths", {}).items():
                if any(isinstance(op, dict) and op.get("x-idempotent") for op in ops.values()):
                    found.append(prefix + path)
    return sorted(set(found))


def edge_environment(applications: Iterable[dict[str, Any]] = ()) -> dict[str, str]:
    """What every node of a cluster needs for HAProxy mode with the edge (the RayService
    sets the same on its containers): the switches, the launcher, the replayable routes and
    the HAProxy settings replays depend on."""
    env = {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(LAUNCHER),
        ADMIN_HOST_ENV: "127.0.0.1",
        # A replica's port that refuses a connection is a dead replica: take it out of the
        # rotation on the first refusal (Ray's default waits for 3), so a replayed request's
        # next attempt goes to a live replica instead of exhausting its retries on the dead one.
        "RAY_SERVE_HAPROXY_OBSERVE_ERROR_LIMIT": "1",
        # A request is replayable only when its whole body sits in HAProxy's buffer
        # (`option http-buffer-request`, cluster/haproxy_edge.py). Ray's 16 KB buffer (less
        # 1 KB kept for rewrites) is smaller than most of the pipeline's uploads (PNGs of
        # 15-24 KB): they streamed to the replica, could not be sent again when it died under
        # them, and on the pooled replica connections of a replayable route HAProxy then
        # closes the client's connection without an answer. A larger upload still can; size
        # this to your uploads. HAProxy takes buffers per active stream, not per connection:
        # about 2 x 256 KB each while busy.
        "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": str(256 * 1024),
    }
    routes = idempotent_routes(applications)
    if routes:
        env[ROUTES_ENV] = ",".join(routes)
    return env


def _own_files_and_ports() -> None:
    me = str(os.getpid())
    picked_by, _, names = os.environ.get(_PICKED_ENV, "").partition(":")
    if picked_by and picked_by != me:  # another process picked these for its own cluster
        for name in names.split(","):
            os.environ.pop(name, None)
    picked = names.split(",") if picked_by == me else []
    if "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC" not in os.environ:
        files = tempfile.mkdtemp(prefix="haproxy-serve-")
        new = {
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{files}/haproxy.cfg",
            "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{files}/admin.sock",
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": files,
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{files}/server-state",
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{files}/metrics.sock",
        }
        os.environ.update(new)
        picked += new
    for name in _PORTS:
        if name not in os.environ:
            os.environ[name] = str(free_port())
            picked.append(name)
    if picked:
        os.environ[_PICKED_ENV] = f"{me}:{','.join(dict.fromkeys(picked))}"


def stop_haproxy() -> int:
    """SIGTERM every HAProxy of this process's cluster (its config file is on their command
    line), so the HTTP port is free at once on the way out; returns how many. HAProxy also
    dies with the actor that started it, a few seconds later (``cluster/haproxy_edge.py``)."""
    config = os.environ.get("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC")
    if not config or not Path("/proc").is_dir():
        return 0
    files = str(Path(config).parent).encode()
    stopped = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"haproxy") and any(a.startswith(files) for a in argv):
            try:
                os.kill(int(entry.name), signal.SIGTERM)
                stopped += 1
            except OSError:
                pass
    return stopped


def apply_ingress_mode(mode: str | None = None, applications: Iterable[dict[str, Any]] = ()) -> str:
    """Set the environment for ``mode`` (``COOKBOOK_INGRESS_MODE``, default ``haproxy``) in
    this process, for the cluster it starts next; ``applications`` (a serve config's entries)
    give the edge its replayable routes. Call it before ``ray.init``."""
    mode = (mode or os.environ.get("COOKBOOK_INGRESS_MODE", DEFAULT_MODE)).lower()
    if mode not in MODES:
        raise ValueError(f"COOKBOOK_INGRESS_MODE must be one of {MODES}, got {mode!r}")
    os.environ["COOKBOOK_INGRESS_MODE"] = mode  # a child process's cluster runs the same
    if mode == "haproxy":
        os.environ.setdefault(BINARY_ENV, real_binary())  # before the launcher is the binary
        for name, value in edge_environment(applications).items():
            if name == ROUTES_ENV:  # this config's routes, over inherited ones
                os.environ[name] = value
            else:
                os.environ.setdefault(name, value)
        os.environ.setdefault("COOKBOOK_HAPROXY_PYTHON", sys.executable)
        # HAProxy threads beyond the machine's cores only contend (Ray's default is 4).
        os.environ.setdefault("RAY_SERVE_HAPROXY_NBTHREAD", str(min(4, os.cpu_count() or 1)))
        _own_files_and_ports()
    return mode

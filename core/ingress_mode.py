"""Which HTTP ingress Serve runs: its default Python proxy, or HAProxy + direct ingress.

Measured with ``python -m scripts.ingress_bench`` on the 2-core, no-GPU dev machine, shared
with other jobs (a no-op /healthz route; 2 client processes of ``patterns.pipeline.loadgen``;
plain uvicorn in one process measured before and after in the same run):

    in flight  uvicorn req/s   default proxy       haproxy
    1          3,137           158  (0.05x)        1,364  (0.43x)
    32         3,828            53  (0.01x)        1,801  (0.47x)

HAProxy mode meets issue 12's goal (>= 40% of plain uvicorn) and the default proxy does not
come near it. The default stays ``default`` all the same, for the local profile and the test
suite, because in Ray 2.60 HAProxy mode:

- listens beyond loopback: HAProxy binds its stats page (``*:8404``) and Prometheus exporter
  (``*:9101``) on every interface, with no setting for the address (Ray's HAProxy template);
  the replicas' own HTTP servers do bind ``http_options.host`` (127.0.0.1 here), and Ray's
  internal gRPC ports listen on every interface in both modes (``ingress_bench`` lists them);
- ignores the ``serve_multiplexed_model_id`` header (ray issue 65976): multiplexed ids must
  come by path or through a handle;
- runs user code on the replica's own event loop (``RAY_SERVE_THROUGHPUT_OPTIMIZED``): a
  blocking call inside an ``async def`` stalls that replica;
- has not been run over the whole test suite here.

Set ``COOKBOOK_INGRESS_MODE=haproxy`` before Ray starts (``make serve``, the test suite and the
benchmarks read it) to switch; a GPU node serving real traffic should (README of the pipeline).
In this mode each local cluster gets its own HAProxy files and free stats/metrics ports, so two
clusters on one machine (two test runs, a test run and ``make serve``) do not collide on Ray's
fixed defaults (/tmp/haproxy-serve, 8404, 9101).
"""

from __future__ import annotations

import os
import socket
import tempfile

MODES = ("default", "haproxy")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def apply_ingress_mode(mode: str | None = None) -> str:
    """Set Serve's env switches for ``mode`` in this process (inherited by the cluster)."""
    mode = (mode or os.environ.get("COOKBOOK_INGRESS_MODE", "default")).lower()
    if mode not in MODES:
        raise ValueError(f"COOKBOOK_INGRESS_MODE must be one of {MODES}, got {mode!r}")
    if mode == "haproxy":
        os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
        os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
        if "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC" not in os.environ:
            files = tempfile.mkdtemp(prefix="haproxy-serve-")
            os.environ["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"] = f"{files}/haproxy.cfg"
            os.environ["RAY_SERVE_HAPROXY_SOCKET_PATH"] = f"{files}/admin.sock"
            os.environ["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] = files
            os.environ["RAY_SERVE_HAPROXY_SERVER_STATE_FILE"] = f"{files}/server-state"
        os.environ.setdefault("RAY_SERVE_HAPROXY_STATS_PORT", str(_free_port()))
        os.environ.setdefault("RAY_SERVE_HAPROXY_METRICS_PORT", str(_free_port()))
    return mode

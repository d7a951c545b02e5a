"""Which HTTP ingress Serve runs: its default Python proxy, or HAProxy + direct ingress.

Measured with ``python -m scripts.ingress_bench`` on the 2-core, no-GPU dev machine (a no-op
/healthz route, Python httpx clients on the same box): default proxy p50 6.7 ms, 146 rps with
one client, 166 rps with 16; haproxy p50 1.0 ms, 935 rps and 524 rps (6.4x and 3.2x).
The catch, and why it is opt-in for now:
- HAProxy mode makes replicas listen for HTTP on all interfaces (so HAProxy on other nodes can
  reach them), not only on loopback;
- ``RAY_SERVE_THROUGHPUT_OPTIMIZED`` runs user code on the replica's own event loop, so a
  blocking call inside an ``async def`` stalls that replica (keep model calls in sync methods
  or a thread);
- Ray ignores the ``serve_multiplexed_model_id`` header in HAProxy mode (ray issue 65976).

Set ``COOKBOOK_INGRESS_MODE=haproxy`` before Ray starts (``make serve`` and the test suite read
it) to switch.
"""

from __future__ import annotations

import os

MODES = ("default", "haproxy")


def apply_ingress_mode(mode: str | None = None) -> str:
    """Set Serve's env switches for ``mode`` in this process (inherited by the cluster)."""
    mode = (mode or os.environ.get("COOKBOOK_INGRESS_MODE", "default")).lower()
    if mode not in MODES:
        raise ValueError(f"COOKBOOK_INGRESS_MODE must be one of {MODES}, got {mode!r}")
    if mode == "haproxy":
        os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
        os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    return mode

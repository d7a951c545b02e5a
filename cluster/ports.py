"""Loopback servers we start (clusters, test servers, benchmarks, the load study):
``free_port()`` picks their port, ``wait_http_ok(url)`` waits until one answers."""

from __future__ import annotations

import contextlib
import random
import socket
import time

# Ours: above Ray's worker ports (10002-19999 by default, ``min_worker_port`` and
# ``max_worker_port``), below Serve's direct-ingress replica ports (30000-31000,
# ``RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT``) and the kernel's ephemeral range.
_FIRST, _LAST = 20000, 29999


def _ephemeral_floor() -> int:
    """The first port of the kernel's ephemeral range: it hands those out to ``bind(0)`` (Ray
    picks its GCS, raylet, agent and metrics ports that way) and to every outgoing connection."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, from a range no one else hands
    out: between this call and the server's bind, no Ray process starting beside it and no
    outgoing connection can be given the same port (with ``bind(0)`` both could)."""
    candidates = range(_FIRST, min(_LAST + 1, _ephemeral_floor()))
    for port in random.sample(candidates, min(200, len(candidates))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no room below the ephemeral range on this machine
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http_ok(url: str, timeout_s: float = 20.0) -> None:
    """Until ``GET url`` answers 200 (a server up and its routes ready); TimeoutError after
    ``timeout_s``."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s:g} s")

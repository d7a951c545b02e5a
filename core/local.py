"""A throwaway local Ray + Serve for benchmarks and scripts, bound to loopback.

    with local_serve(num_cpus=4) as base_url:
        serve.run(build_app(args), name="bench", route_prefix="/bench")
        ...  # send load to base_url + "/bench"

Every benchmark in the cookbook starts Ray the same way: a few logical CPUs (deployments ask
for small fractions, so several fit on a 2-core box), no dashboard, every address on
127.0.0.1, replica logs kept out of the benchmark's own output, and Serve's HTTP proxy on a
free port so a running ``make serve`` is never in the way. Both are shut down on the way out.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def local_serve(
    num_cpus: float = 4,
    *,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    log_to_driver: bool = False,
) -> Iterator[str]:
    """Start Ray and Serve on loopback; yield Serve's base URL; shut both down afterwards.

    ``env`` goes to every worker (``runtime_env.env_vars``), e.g. ``OMP_NUM_THREADS``.
    """
    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    port = port or free_port()
    ray.init(
        num_cpus=int(num_cpus),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=log_to_driver,
        runtime_env={"env_vars": dict(env)} if env else None,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()

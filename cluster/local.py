"""Local Ray clusters on loopback, started one way everywhere.

    with local_serve(num_cpus=4) as base_url:
        serve.run(build_app(args), name="bench", route_prefix="/bench")
        ...  # send load to base_url + "/bench"

``start_ray`` is what ``make serve``, the test suite and the benchmarks call: the ingress mode
first (``cluster.ingress_mode``), then ``ray.init`` on 127.0.0.1 with a few logical CPUs
(deployments ask for small fractions, so several fit on a 2-core box), tried a second time
when a busy machine makes the node miss its startup deadline. ``local_serve`` adds Serve's HTTP
on a free port, so a running ``make serve`` is never in the way, and takes both down after.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from cluster.ports import free_port

__all__ = ["free_port", "local_serve", "start_ray"]


def start_ray(num_cpus: float, *, applications: Iterable[dict[str, Any]] = (), **init: Any) -> str:
    """Apply the ingress mode (for ``applications``, a serve config's entries), then start
    Ray on loopback; returns the mode. ``init`` goes to ``ray.init``."""
    import ray

    from cluster.ingress_mode import apply_ingress_mode

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    mode = apply_ingress_mode(applications=applications)
    init.setdefault("include_dashboard", False)
    for attempt in (1, 2):
        try:
            # address="local": always a cluster of our own, never one a stale
            # /tmp/ray/ray_current_cluster (a `ray start` killed without `ray stop`) names.
            ray.init(address="local", num_cpus=int(num_cpus), _node_ip_address="127.0.0.1", **init)
            return mode
        except Exception as exc:  # "The current node timed out during startup": a busy box
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(exc):
                raise
    raise AssertionError("unreachable")


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

    port = port or free_port()
    start_ray(
        num_cpus,
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

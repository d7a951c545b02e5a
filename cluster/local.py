"""Local Ray clusters on loopback, started one way everywhere.

    with local_serve(num_cpus=4) as base_url:
        serve.run(build_app(args), name="bench", route_prefix="/bench")
        ...  # send load to base_url + "/bench"

``start_ray`` is what ``make serve``, the test suite and the benchmarks call: the ingress mode
first (``cluster.ingress_mode``), then ``ray.init`` on 127.0.0.1 with a few logical CPUs
(deployments ask for small fractions, so several fit on a 2-core box), tried a second time
when a busy machine makes the node miss its startup deadline. ``local_serve`` adds Serve's HTTP
on a free port, so a running ``make serve`` is never in the way, and takes both down after.
``uvicorn_command`` is the other side of every comparison: the same app without Ray.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from cluster.ports import free_port

__all__ = ["free_port", "local_serve", "restart_gcs", "start_ray", "start_ray_nodes"]

# The kinds of the nodes of a local multi-node cluster, head first (core.resources).
NODE_KINDS = ("general", "accelerator", "general")


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


def multinode_environment() -> None:
    """What ``start_ray_nodes`` needs in the environment, set before ``import ray`` (Ray reads
    both when it is imported):

    - loopback stays loopback: Ray otherwise rewrites 127.0.0.1 in a node's GCS address to the
      machine's routable address, where this GCS does not listen (``ray start --address``
      refuses to run with this off; the in-process harness does not use that command);
    - token authentication, as every Ray 2.60 cluster has, also for the nodes' own clients.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_AUTH_MODE", "token")


def start_ray_nodes(
    num_cpus: float,
    nodes: int = 3,
    *,
    applications: Iterable[dict[str, Any]] = (),
    gcs_redis: str | None = None,
    **init: Any,
) -> Any:
    """A cluster of ``nodes`` raylets on loopback, each with ``num_cpus`` and a node-kind label
    (``NODE_KINDS``: the head and the third node ``general``, the second ``accelerator``), and
    this process connected to it as the driver. Returns the ``ray.cluster_utils.Cluster``, whose
    ``remove_node`` takes a node away as a lost machine would, and whose ``shutdown`` stops it.

    Ray's own multi-node test harness: every node is a real raylet with its own workers, object
    store and health checks, on one machine. ``init`` goes to the head node (dashboard, say).
    Call ``multinode_environment()`` before anything imports ray.

    ``gcs_redis`` (``host:port``) turns on GCS fault tolerance as KubeRay does: the GCS keeps
    the cluster's tables in that Redis (under a namespace of this cluster's own), so a GCS
    started again (``restart_gcs``) finds every node, actor and Serve application it had."""
    import ray
    from ray.cluster_utils import Cluster

    from cluster.ingress_mode import apply_ingress_mode
    from core.resources import NODE_KIND_LABEL

    multinode_environment()
    if gcs_redis:
        import uuid

        # Read when the head node starts (ray._private.node); the namespace keeps two
        # clusters on one Redis (or a stale one from an earlier run) apart.
        os.environ["RAY_REDIS_ADDRESS"] = gcs_redis
        os.environ["RAY_external_storage_namespace"] = f"cookbook-{uuid.uuid4().hex[:12]}"  # noqa: SIM112
    apply_ingress_mode(applications=applications)
    kinds = [NODE_KINDS[i % len(NODE_KINDS)] for i in range(nodes)]
    common = {"num_cpus": int(num_cpus), "node_ip_address": "127.0.0.1"}
    namespace = init.pop("namespace", None)
    head = {**common, "labels": {NODE_KIND_LABEL: kinds[0]}, **init}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    for kind in kinds[1:]:
        cluster.add_node(**common, labels={NODE_KIND_LABEL: kind})
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", namespace=namespace)
    return cluster


def raylet_pids(cluster: Any) -> list[tuple[str, int]]:
    """(node kind, raylet pid) of each node of a ``start_ray_nodes`` cluster, head first: what
    to SIGKILL, with the workers below it, to lose that node as a machine would."""
    from ray._private import ray_constants

    from core.resources import NODE_KIND_LABEL

    # worker_nodes is a set: read each node's kind from its own labels, not the start order
    nodes = [cluster.head_node, *cluster.worker_nodes]
    return [
        (
            (node._ray_params.labels or {}).get(NODE_KIND_LABEL, "unlabelled"),
            node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid,
        )
        for node in nodes
    ]


def lost_nodes(cluster: Any) -> list[Any]:
    """The worker nodes of a ``start_ray_nodes`` cluster whose raylet has exited."""
    from ray._private import ray_constants

    return [
        node
        for node in list(cluster.worker_nodes)
        if node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.poll() is not None
    ]


def replace_node(cluster: Any, node: Any) -> tuple[str, int]:
    """Start a node like lost ``node`` (its CPUs and labels) in its place, as a machine that
    comes back, or the replacement KubeRay starts for a lost pod; (node kind, raylet pid)."""
    from ray._private import ray_constants

    from core.resources import NODE_KIND_LABEL

    params = node._ray_params
    labels = dict(params.labels or {})
    cluster.remove_node(node, allow_graceful=False)  # reap what is left of it
    # Starting a node installs Ray's SIGTERM handler (drain the node, then exit) in this
    # process: keep the caller's (serve_all's shutdown) in place.
    handler = signal.getsignal(signal.SIGTERM)
    try:
        new = cluster.add_node(num_cpus=params.num_cpus, node_ip_address="127.0.0.1", labels=labels)
    finally:
        if handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)
    pid = new.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    return labels.get(NODE_KIND_LABEL, "unlabelled"), int(pid)


def gcs_pid(cluster: Any) -> int | None:
    """The head's GCS server process id, or None once it has exited."""
    from ray._private import ray_constants

    procs = cluster.head_node.all_processes.get(ray_constants.PROCESS_TYPE_GCS_SERVER) or []
    if not procs or procs[0].process.poll() is not None:
        return None
    return int(procs[0].process.pid)


def restart_gcs(cluster: Any) -> float:
    """Start the head's GCS server again after it died, on the same port (what KubeRay does
    when it restarts the head container); returns the seconds it took to answer. With fault
    tolerance (``gcs_redis``) it reloads the cluster from Redis and the raylets, workers and
    drivers reconnect; without, it would start empty, so do not call it then."""
    import time

    head = cluster.head_node
    head.kill_gcs_server(check_alive=False)  # forget the dead process and its address
    t0 = time.monotonic()
    head.start_gcs_server()
    return time.monotonic() - t0


def placement() -> dict[str, dict[str, list[str]]]:
    """Where each Serve replica runs: {app: {deployment: [node kind of each live replica]}}.
    Call it from the driver; a node without the label reads ``unlabelled``."""
    import ray
    from ray.util.state import list_actors

    from core.resources import NODE_KIND_LABEL

    kinds = {
        n["NodeID"]: (n.get("Labels") or {}).get(NODE_KIND_LABEL, "unlabelled")
        for n in ray.nodes()
        if n["Alive"]
    }
    out: dict[str, dict[str, list[str]]] = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000, detail=True):
        name = actor.name or ""
        if not name.startswith("SERVE_REPLICA::"):
            continue
        app, deployment = name.removeprefix("SERVE_REPLICA::").split("#")[:2]
        kind = kinds.get(actor.node_id, "gone")
        out.setdefault(app, {}).setdefault(deployment, []).append(kind)
    return {app: {d: sorted(k) for d, k in sorted(ds.items())} for app, ds in sorted(out.items())}


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


def uvicorn_command(factory: str, port: int, workers: int) -> list[str]:
    """``uvicorn --factory`` for ``factory`` (``module:function``), ``workers`` processes on
    loopback, quiet: how the benchmarks and the load study run an app without Ray."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        factory,
        "--workers",
        str(workers),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
    ]

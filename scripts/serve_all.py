"""Run every app in ``serve_config.yaml`` on a local Ray cluster bound to 127.0.0.1.

Foreground: prints each app's URL once it is RUNNING, then serves until Ctrl-C, and takes the
cluster down on the way out. This is ``make serve``; it is ``serve run serve_config.yaml`` plus a
loopback-only cluster, a readiness wait and the URL list.

    python -m scripts.serve_all [--config serve_config.yaml] [--num-cpus N] [--exit-when-ready]
                                [--nodes 3]

``--nodes 3`` (``make serve-cluster``) runs the same config on three raylets on loopback, a head
and a general node and an accelerator node (``cluster.local.start_ray_nodes``): model stages
prefer the accelerator node, ingresses and I/O the others (``core.resources``), and the ready
message prints where every replica landed.

``--gcs-redis HOST:PORT`` (with ``--nodes``) keeps the GCS's tables in that Redis (GCS fault
tolerance, as KubeRay's ``gcsFaultToleranceOptions``), and this process plays the part of the
container runtime that restarts a dead head: when the GCS server exits it is started again
after ``--gcs-restart-after`` seconds, and reloads the cluster from Redis. Without
``--gcs-redis`` a dead GCS is reported, not restarted: the raylets give up on it after
``gcs_rpc_server_reconnect_timeout_s`` (60 s) and take every replica with them.

With ``--nodes``, a lost worker node is started again ``--node-restart-after`` seconds later
(30; a machine that comes back), and every ``--rebalance-every`` seconds (5) replicas that run
on a node kind they do not prefer while one they prefer has room are moved back, one at a time
(``cluster.placement``; Serve itself never moves a running replica).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def side_services(config: dict[str, Any]) -> list[list[str]]:
    """Outside services the configured apps call (a real HTTP API, say), to start beside them.

    A pattern lists them in ``patterns/<name>/services.py`` as ``side_services() -> [argv]``.
    """
    commands: list[list[str]] = []
    for app in config.get("applications", []):
        package = app["import_path"].split(":")[0].rsplit(".", 1)[0]  # patterns.<name>
        if importlib.util.find_spec(f"{package}.services") is None:
            continue
        module = importlib.import_module(f"{package}.services")
        commands.extend(module.side_services())
    return commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "serve_config.yaml"))
    # Logical CPUs for Ray: twice the cores. The apps reserve under one per core at their
    # minimum replicas; the rest is headroom for a rolling update, which starts an app's new
    # replicas beside the old ones (max_surge_percent) and would wait forever without room.
    parser.add_argument("--num-cpus", type=float, default=2.0 * (os.cpu_count() or 2))
    parser.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="raylets on this machine (3: head, accelerator and general nodes; CPUs each)",
    )
    parser.add_argument(
        "--gcs-redis", metavar="HOST:PORT", help="GCS fault tolerance on this Redis (--nodes)"
    )
    parser.add_argument(
        "--gcs-restart-after",
        type=float,
        default=5.0,
        help="seconds a dead GCS stays down before it is started again (with --gcs-redis)",
    )
    parser.add_argument(
        "--node-restart-after",
        type=float,
        default=30.0,
        help="seconds until a lost worker node is started again (--nodes; <= 0: never)",
    )
    parser.add_argument(
        "--rebalance-every",
        type=float,
        default=5.0,
        help="seconds between moves of replicas back to the node kind they prefer "
        "(--nodes; cluster.placement; <= 0: never)",
    )
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--port", type=int, help="HTTP port (default: the config's, 8000)")
    parser.add_argument("--dashboard-port", type=int, default=8265)
    parser.add_argument(
        "--no-dashboard", action="store_true", help="no Ray dashboard (no `serve status`)"
    )
    parser.add_argument(
        "--exit-when-ready",
        action="store_true",
        help="check every app's /healthz once all are RUNNING, then stop (a smoke test)",
    )
    args = parser.parse_args(argv)

    config = yaml.safe_load(Path(args.config).read_text())
    apps = config.get("applications") or []
    if not apps:
        print(f"{args.config} lists no applications yet: nothing to serve.", flush=True)
        return 0
    config_path = args.config
    if args.port:
        config.setdefault("http_options", {})["port"] = args.port
        fd, config_path = tempfile.mkstemp(suffix=".yaml", prefix="serve_config-")
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)

    if args.gcs_redis and args.nodes < 2:
        parser.error("--gcs-redis needs --nodes (a head this process can restart the GCS on)")
    if args.nodes > 1:
        from cluster.local import multinode_environment

        multinode_environment()  # before ray is imported
    import ray
    from ray import serve
    from ray.serve.scripts import run as serve_run_cli

    from cluster.ingress_mode import DEFAULT_MODE, stop_haproxy
    from cluster.local import placement, raylet_pids, start_ray, start_ray_nodes

    mode = os.environ.get("COOKBOOK_INGRESS_MODE", DEFAULT_MODE)
    nodes = f"{args.nodes} nodes of " if args.nodes > 1 else ""
    print(
        f"[serve] starting a local Ray cluster on 127.0.0.1 ({nodes}{args.num_cpus:g} CPUs, "
        f"ingress: {mode})",
        flush=True,
    )
    # The ingress mode (cluster/ingress_mode.py: HAProxy with the edge by default; the
    # config's idempotent routes are the ones it may replay); Ray's processes inherit it.
    start = start_ray if args.nodes <= 1 else start_ray_nodes
    extra = {} if args.nodes <= 1 else {"nodes": args.nodes, "gcs_redis": args.gcs_redis}
    started = start(
        args.num_cpus,
        **extra,
        applications=apps,
        # The dashboard is what `serve status`, `serve deploy` and `serve config` talk to
        # (http://127.0.0.1:8265), bound to loopback: an open dashboard runs any job anyone
        # sends it (the class of hole behind CVE-2023-48022). Ray 2.60 still binds the raylet,
        # GCS and workers to the node's routable address; its token authentication (on by
        # default, token in ~/.ray/auth_token) is what guards those. See ops/README.md.
        include_dashboard=not args.no_dashboard,
        dashboard_host="127.0.0.1",
        dashboard_port=args.dashboard_port,
        namespace="serve",
    )
    services = []
    for cmd in side_services(config):
        services.append(subprocess.Popen(cmd, cwd=ROOT))
        print(f"[serve] started side service: {' '.join(cmd)}", flush=True)

    def shutdown(*_: Any) -> None:
        # Straight to ray.shutdown(): it stops every process this cluster started, and
        # HAProxy dies with its actor (cluster/haproxy_edge.py), so the port is free in
        # seconds. serve.shutdown() would first drain each replica through the controller
        # (tens of seconds on 2 cores), which a Ctrl-C or a supervisor's SIGTERM won't wait for.
        print("\n[serve] shutting down", flush=True)
        for proc in services:
            proc.terminate()
        stop_haproxy()
        # The cluster is this process's tree (GCS, raylet, workers, HAProxy): end it at once;
        # ray.shutdown() alone waits for workers to notice their raylet is gone (~8 s here).
        import psutil

        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
        ray.shutdown()
        if args.nodes > 1:
            with contextlib.suppress(Exception):
                started.shutdown()
        sys.exit(0)

    signal.signal(signal.SIGTERM, shutdown)
    try:
        # The `serve run` CLI deploys the multi-app config into the cluster we just started.
        serve_run_cli.main([config_path, "--non-blocking"], standalone_mode=False)
        http = config.get("http_options", {})
        base = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"
        print(f"[serve] deploying {len(apps)} application(s); waiting until they run", flush=True)
        deadline = time.monotonic() + args.timeout_s
        while True:
            status = serve.status().applications
            states = {
                a["name"]: status[a["name"]].status if a["name"] in status else "PENDING"
                for a in apps
            }
            failed = {n: s for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")}
            if failed:
                for name in failed:
                    print(f"[serve] {name} failed: {status[name].message}", flush=True)
                shutdown()
                return 1
            if all(s == "RUNNING" for s in states.values()):
                break
            if time.monotonic() > deadline:
                print(f"[serve] not ready after {args.timeout_s:.0f}s: {states}", flush=True)
                shutdown()
                return 1
            time.sleep(1)
        print("[serve] ready:", flush=True)
        if not args.no_dashboard:
            dash = f"http://127.0.0.1:{args.dashboard_port}"
            print(f"  {'dashboard':<16} {dash}   (`serve status`, `serve deploy`)", flush=True)
        for app in apps:
            url = base + app["route_prefix"]
            print(f"  {app['name']:<16} {url}   (docs: {url}/docs)", flush=True)
        if args.nodes > 1:
            nodes = "; ".join(
                f"{kind}{' (head)' if i == 0 else ''} raylet pid {pid}"
                for i, (kind, pid) in enumerate(raylet_pids(started))
            )
            print(f"[serve] nodes: {nodes}", flush=True)
            print("[serve] placement (deployment: node kind of each replica):", flush=True)
            for app_name, deployments in placement().items():
                for deployment, kinds in deployments.items():
                    print(f"  {app_name}/{deployment}: {', '.join(kinds)}", flush=True)
        if args.exit_when_ready:
            import httpx

            ok = True
            for app in apps:
                r = httpx.get(base + app["route_prefix"] + "/healthz", timeout=30)
                print(f"[serve] {app['name']} /healthz -> {r.status_code}", flush=True)
                ok &= r.status_code == 200
            if not args.no_dashboard:  # the CLI a user reaches for next
                status_cli = subprocess.run(
                    [
                        str(Path(sys.executable).parent / "serve"),
                        "status",
                        "-a",
                        f"http://127.0.0.1:{args.dashboard_port}",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                running = status_cli.stdout.count("status: RUNNING")
                print(f"[serve] `serve status` -> exit {status_cli.returncode}, {running} RUNNING")
                ok &= status_cli.returncode == 0
            for proc in services:
                proc.terminate()
            serve.shutdown()
            ray.shutdown()
            if args.nodes > 1:
                started.shutdown()
            return 0 if ok else 1
        print("[serve] Ctrl-C to stop", flush=True)
        if args.nodes > 1:
            supervise(
                started,
                args.gcs_redis,
                args.gcs_restart_after,
                args.node_restart_after,
                args.rebalance_every,
            )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        shutdown()
    return 0


def supervise(
    cluster: Any,
    redis: str | None,
    restart_after_s: float,
    node_restart_after_s: float,
    rebalance_every_s: float,
) -> None:
    """Forever, as the machines and the container runtime around a real cluster would:

    - when the head's GCS server exits, say so; with fault tolerance, start it again
      ``restart_after_s`` later (the head's restart) and say when it is back;
    - when a worker node is lost, start one like it ``node_restart_after_s`` later (a machine
      that comes back; KubeRay's replacement pod) and print its raylet pid (<= 0: never);
    - every ``rebalance_every_s`` (<= 0: never), in a thread of its own, move replicas that
      run on a node kind they do not prefer back where they do (``cluster.placement``), one
      at a time, printing each move."""
    import threading

    from cluster.local import gcs_pid, lost_nodes, replace_node, restart_gcs

    print(f"[serve] GCS pid {gcs_pid(cluster)}", flush=True)
    if rebalance_every_s > 0:
        threading.Thread(target=keep_placed, args=(rebalance_every_s,), daemon=True).start()
    lost_at: dict[int, float] = {}
    while True:
        time.sleep(0.5)
        if gcs_pid(cluster) is None:
            if not redis:
                print(
                    "[serve] the GCS server exited; without fault tolerance (--gcs-redis) it "
                    "cannot come back: the raylets give up after 60 s, and every replica with "
                    "them",
                    flush=True,
                )
                while True:
                    time.sleep(3600)
            print(f"[serve] the GCS exited; starting it again in {restart_after_s:g} s", flush=True)
            time.sleep(restart_after_s)
            took = restart_gcs(cluster)
            print(
                f"[serve] GCS back from Redis ({took:.1f} s to start), pid {gcs_pid(cluster)}",
                flush=True,
            )
        if node_restart_after_s <= 0:
            continue
        for node in lost_nodes(cluster):
            if id(node) not in lost_at:
                lost_at[id(node)] = time.monotonic()
                print(
                    f"[serve] a worker node was lost; starting one like it in "
                    f"{node_restart_after_s:g} s",
                    flush=True,
                )
            if time.monotonic() - lost_at[id(node)] >= node_restart_after_s:
                kind, pid = replace_node(cluster, node)
                lost_at.pop(id(node))
                # "<kind> raylet pid <pid>" as in the ready message: the node's pid from now on
                print(
                    f"[serve] node back: {kind} raylet pid {pid} (at {time.time():.1f})", flush=True
                )


def keep_placed(every_s: float) -> None:
    """Forever: ``cluster.placement.rebalance_once`` every ``every_s``, printing each move."""
    from cluster.placement import rebalance_once

    while True:
        time.sleep(every_s)
        try:
            rebalance_once(report=lambda m: print(f"[serve] {m.line()}", flush=True))
        except Exception as exc:  # the GCS or controller restarting: the next round tries again
            print(f"[serve] placement check skipped: {type(exc).__name__}: {exc}", flush=True)


if __name__ == "__main__":
    sys.exit(main())

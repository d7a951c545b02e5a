"""Why Serve was slower than FastAPI here, and what fixed it: the ingress modes side by side.

Part 1, ``noop`` (``GET /healthz`` of the core test ingress app, ``tests/core/ingress_app.py``),
served three ways, all started once and measured in alternation (uvicorn, default, haproxy;
then again, ``--rounds`` times), median and min-max per cell:

- ``uvicorn``: the same FastAPI app in one plain uvicorn process (no Ray): the ceiling;
- ``default``: Serve's default Python proxy as Ray ships it (the cookbook's ingress before);
- ``haproxy``: the shipped default: HAProxy + direct ingress + ``RAY_SERVE_THROUGHPUT_OPTIMIZED``,
  hardened by ``cluster/haproxy_edge.py`` (``cluster/ingress_mode.py``);
- ``haproxy-bare`` (``--bare``): the same without Serve's per-request HTTP metrics
  (``RAY_SERVE_HAPROXY_METRICS_ENABLED=0``: HAProxy then sends no log line per request to Ray's
  HAProxyManager actor, which parses it in Python). Not shipped: the dashboards read those
  series; this arm prices them.

Part 2, ``apps`` (``--apps``): ensemble, business_logic, online_learning and the multiplexed
forecasters (a Zipf trace over 1,000 store ids), each with its own ``client.sample_request``
(business without an Idempotency-Key, so every request writes), on a ``make serve`` cluster of
those apps per mode, modes alternating per round; per app and mode, the best req/s at
``--levels`` in flight whose p95 is within ``--slo-ms``.

The load comes from ``patterns.pipeline.bench.loadgen``: client processes with raw keep-alive
HTTP/1.1 connections (Python httpx in one process caps near 1,000-1,500 req/s). On a 2-core
box they share the cores with the servers: compare ratios measured in one run.

    python -m scripts.ingress_bench [--parts noop,apps] [--rounds 3] [--duration 5]
                                    [--concurrency 1,32] [--levels 4,8,16] [--slo-ms 500]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cluster.ports import free_port, wait_http_ok

ROOT = Path(__file__).resolve().parents[1]
ROUTE = "/bench/healthz"
GOAL = 0.40  # the shipped default at >= 40% of plain uvicorn's no-op req/s
APP_GOAL = 2.0  # each app's req/s within the SLO: >= 2x the default proxy's
APPS = ("ensemble", "business_logic", "online_learning", "multiplexing")


def public_listeners(root_pid: int) -> list[str]:
    """TCP ports that processes in ``root_pid``'s tree listen on beyond loopback."""
    import psutil

    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    found = set()
    for proc in procs:
        try:
            conns = proc.net_connections(kind="tcp")
            name = proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN and not c.laddr.ip.startswith(("127.", "::1")):
                found.add(f"{name} {c.laddr.ip or '*'}:{c.laddr.port}")
    return sorted(found)


def serve_child(port: int) -> int:
    """In its own process (Serve reads the mode's switches when the cluster starts): a local
    cluster on loopback with the test ingress app; READY, then wait for a line on stdin."""
    from ray import serve

    from cluster.local import local_serve
    from tests.core.ingress_app import build

    with local_serve(num_cpus=2, port=port):
        serve.run(build(), name="bench", route_prefix="/bench")
        wait_http_ok(f"http://127.0.0.1:{port}{ROUTE}", 180)
        time.sleep(2)  # let HAProxy finish its reloads before load starts
        mode = os.environ.get("COOKBOOK_INGRESS_MODE", "haproxy")
        print("READY " + json.dumps({"mode": mode, "listen": public_listeners(os.getpid())}))
        sys.stdout.flush()
        sys.stdin.readline()
    return 0


def _start(mode: str, port: int) -> tuple[subprocess.Popen, dict[str, Any]]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    if mode == "uvicorn":
        cmd = [sys.executable, "-m", "uvicorn", "tests.core.ingress_app:api", "--host",
               "127.0.0.1", "--port", str(port), "--log-level", "warning",
               "--no-access-log"]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
        wait_http_ok(f"http://127.0.0.1:{port}/healthz", 180)
        return proc, {"mode": "uvicorn", "listen": []}
    if mode == "haproxy-bare":
        mode, env["RAY_SERVE_HAPROXY_METRICS_ENABLED"] = "haproxy", "0"
    env["COOKBOOK_INGRESS_MODE"] = mode
    cmd = [sys.executable, "-m", "scripts.ingress_bench", "--child", str(port)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("READY "):
            return proc, json.loads(line[6:])
    raise RuntimeError(f"the {mode} server exited before it was ready (exit {proc.wait()})")


def _stop(proc: subprocess.Popen) -> None:
    if proc.stdin is not None:  # a Serve child: it shuts its cluster down itself
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        try:
            proc.wait(timeout=120)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.terminate()
    proc.wait(timeout=30)


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def noop(args: argparse.Namespace) -> None:
    """Part 1: the three servers up at once, measured in turn, ``rounds`` times."""
    from patterns.pipeline.bench.loadgen import Request, run_load

    levels = [int(c) for c in args.concurrency.split(",")]
    arms = ["uvicorn", "default", "haproxy"] + (["haproxy-bare"] if args.bare else [])
    servers: dict[str, tuple[subprocess.Popen, dict[str, Any], int]] = {}
    try:
        for arm in arms:
            port = free_port()
            proc, info = _start(arm, port)
            servers[arm] = (proc, info, port)
            print(f"[noop] {arm} ready on :{port}", flush=True)
        rps: dict[tuple[str, int], list[float]] = {}
        p95: dict[tuple[str, int], list[float]] = {}
        for r in range(1, args.rounds + 1):
            for c in levels:
                for arm in arms if r % 2 else arms[::-1]:  # alternate the order too
                    path = "/healthz" if arm == "uvicorn" else ROUTE
                    row = run_load(
                        f"http://127.0.0.1:{servers[arm][2]}",
                        [Request("GET", path)],
                        concurrency=c,
                        duration_s=args.duration,
                        warmup_s=1.0,
                        processes=min(args.processes, c),
                    ).row()
                    rps.setdefault((arm, c), []).append(row["rps"])
                    p95.setdefault((arm, c), []).append(row["p95_ms"])
                    print(f"[noop] round {r} {arm:8} c={c:<3} {row}", flush=True)
    finally:
        for proc, _, _ in servers.values():
            _stop(proc)
    print(f"\nNo-op GET, {args.rounds} alternating rounds of {args.duration:g} s per cell, "
          f"median (min-max); the servers ran side by side the whole time")  # fmt: skip
    print(f"{'server':<13}{'in flight':>10}{'req/s':>22}{'p95 ms':>10}{'x uvicorn':>11}  goal")
    for c in levels:
        base = statistics.median(rps[("uvicorn", c)])
        for arm in arms:
            ratio = statistics.median(rps[(arm, c)]) / base if base else 0.0
            goal = "" if arm in ("uvicorn", "haproxy-bare") else (
                f">= {GOAL} {'met' if ratio >= GOAL else 'not met'}")  # fmt: skip
            print(f"{arm:<13}{c:>10}{_spread(rps[(arm, c)]):>22}"
                  f"{statistics.median(p95[(arm, c)]):>10.1f}{ratio:>11.2f}  {goal}")  # fmt: skip
    for arm in arms[1:]:
        listen = servers[arm][1]["listen"]
        print(f"{arm}: listening beyond loopback: {', '.join(listen) if listen else 'nothing'}")


def app_requests(app: str, n: int = 300) -> list[Any]:
    """``n`` of the app's own sample requests as raw load-generator requests."""
    from patterns.pipeline.bench.loadgen import Request
    from reliability.load import sample_requests

    make = sample_requests(app)
    out = []
    for i in range(n):
        req = make(i)
        headers = tuple(
            (k, v) for k, v in req.get("headers", {}).items() if k.lower() != "idempotency-key"
        )
        out.append(Request(req["method"], req["path"], json.dumps(req["json"]).encode(),
                           "application/json", headers))  # fmt: skip
    return out


def apps(args: argparse.Namespace) -> None:
    """Part 2: each app's own requests on a cluster per mode, modes alternating per round."""
    from patterns.pipeline.bench.loadgen import run_load
    from reliability.chaos import artifact_env, cluster_config, ensure_artifacts
    from tests.servers import ServeCluster

    names = [a for a in args.apps.split(",") if a]
    levels = [int(c) for c in args.levels.split(",")]
    ensure_artifacts(names)
    best: dict[tuple[str, str], list[float]] = {}
    at: dict[tuple[str, str], list[str]] = {}
    for r in range(1, args.rounds + 1):
        for mode in ("default", "haproxy") if r % 2 else ("haproxy", "default"):
            artifacts = Path(tempfile.mkdtemp(prefix="bench-artifacts-"))
            shutil.copytree(ROOT / "artifacts", artifacts / "artifacts")
            env = {"COOKBOOK_INGRESS_MODE": mode, **artifact_env(artifacts / "artifacts")}
            cluster = ServeCluster(cluster_config(names), num_cpus=4, env=env)
            t = time.monotonic()
            try:
                cluster.start()
                print(f"[apps] round {r} {mode}: cluster up in {time.monotonic() - t:.0f} s",
                      flush=True)  # fmt: skip
                for app in names:
                    reqs = app_requests(app)
                    top, where = 0.0, "none within the SLO"
                    for c in levels:
                        row = run_load(cluster.http_url, reqs, concurrency=c,
                                       duration_s=args.duration, warmup_s=2.0,
                                       processes=min(args.processes, c)).row()  # fmt: skip
                        print(f"[apps] round {r} {mode:8} {app:16} c={c:<3} {row}", flush=True)
                        if row["p95_ms"] <= args.slo_ms and row["failed"] == 0 and row["rps"] > top:
                            top, where = row["rps"], f"c={c} p95 {row['p95_ms']:.0f} ms"
                    best.setdefault((app, mode), []).append(top)
                    at.setdefault((app, mode), []).append(where)
            finally:
                cluster.stop()
                shutil.rmtree(artifacts, ignore_errors=True)
    print(f"\nEach app's own requests, best req/s with p95 <= {args.slo_ms:g} ms and no failure "
          f"over {levels} in flight; {args.rounds} rounds, median (min-max)")  # fmt: skip
    print(f"{'app':<18}{'default proxy':>20}{'haproxy (shipped)':>22}{'ratio':>8}  goal")
    for app in names:
        d, h = best[(app, "default")], best[(app, "haproxy")]
        ratio = statistics.median(h) / statistics.median(d) if statistics.median(d) else 0.0
        verdict = "met" if ratio >= APP_GOAL else "not met"
        print(f"{app:<18}{_spread(d):>20}{_spread(h):>22}{ratio:>8.2f}  >= {APP_GOAL} {verdict}")
        print(f"{'':<18}{at[(app, 'default')][-1]:>20}{at[(app, 'haproxy')][-1]:>22}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="noop,apps", help="noop, apps or both")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per cell")
    parser.add_argument("--concurrency", default="1,32", help="noop: in-flight levels")
    parser.add_argument("--levels", default="4,8,16", help="apps: in-flight levels")
    parser.add_argument("--slo-ms", type=float, default=500.0, help="apps: p95 bound")
    parser.add_argument("--apps", default=",".join(APPS))
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument(
        "--bare", action="store_true", help="noop: also HAProxy mode without request metrics"
    )
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return serve_child(args.child)

    from patterns.pipeline.bench.loadgen import machine

    print(f"machine: {machine()}", flush=True)
    parts = set(args.parts.split(","))
    if "noop" in parts:
        noop(args)
    if "apps" in parts:
        apps(args)
    print(f"machine after: {machine()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

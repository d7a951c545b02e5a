"""Plain uvicorn, Serve's default proxy and HAProxy mode on one no-op route, in one run.

The route is ``GET /healthz`` of the core test ingress app (``tests/core/ingress_app.py``:
``core.ingress.install_ingress``'s middleware and health route), served three ways:

- ``uvicorn``: the same FastAPI app in one plain uvicorn process (no Ray): the ceiling;
- ``default``: Serve's default Python proxy (``COOKBOOK_INGRESS_MODE=default``) with the edge
  middleware in it (``core/edge.py``), as ``make serve`` ships it;
- ``noedge`` (on request): the default proxy without the edge (``COOKBOOK_EDGE=off``), to see
  what the edge costs;
- ``haproxy``: HAProxy + direct ingress + ``RAY_SERVE_THROUGHPUT_OPTIMIZED`` (``haproxy``).

The load comes from ``patterns.pipeline.loadgen``: several client processes with raw
keep-alive HTTP/1.1 connections (Python httpx in one process caps near 1,000-1,500 req/s,
under what uvicorn serves here). uvicorn runs first and again last; its figure is the mean
of the two, so a change in the machine's load during the run shows up as a gap between them.
Each Serve mode also lists the TCP ports its processes listen on beyond loopback.

    python -m scripts.ingress_bench [--duration 8] [--concurrency 1,32] [--processes 2]
                                    [--modes default,noedge,haproxy]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ROUTE = "/bench/healthz"
GOAL = 0.40  # issue 12: the shipped default at >= 40% of plain uvicorn's no-op req/s


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, timeout_s: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s:g} s")


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
    import ray
    from ray import serve

    from core.ingress_mode import apply_ingress_mode
    from tests.core.ingress_app import build

    mode = apply_ingress_mode()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(), name="bench", route_prefix="/bench")
        _wait_ready(f"http://127.0.0.1:{port}{ROUTE}")
        time.sleep(2)  # let HAProxy finish its reloads before load starts
        print("READY " + json.dumps({"mode": mode, "listen": public_listeners(os.getpid())}))
        sys.stdout.flush()
        sys.stdin.readline()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def _start(mode: str, port: int) -> tuple[subprocess.Popen, dict[str, Any]]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    if mode == "uvicorn":
        cmd = [sys.executable, "-m", "uvicorn", "tests.core.ingress_app:api", "--host",
               "127.0.0.1", "--port", str(port), "--log-level", "warning",
               "--no-access-log"]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
        _wait_ready(f"http://127.0.0.1:{port}/healthz")
        return proc, {"mode": "uvicorn", "listen": []}
    env["COOKBOOK_INGRESS_MODE"] = "default" if mode == "noedge" else mode
    if mode == "noedge":
        env["COOKBOOK_EDGE"] = "off"
        env.pop("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", None)
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


def measure(mode: str, levels: list[int], duration: float, processes: int) -> dict[str, Any]:
    from patterns.pipeline.loadgen import Request, run_load

    port = _free_port()
    proc, info = _start(mode, port)
    path = "/healthz" if mode == "uvicorn" else ROUTE
    try:
        rows = {}
        for c in levels:
            r = run_load(
                f"http://127.0.0.1:{port}",
                [Request("GET", path)],
                concurrency=c,
                duration_s=duration,
                warmup_s=1.0,
                processes=min(processes, c),
            )
            rows[c] = r.row()
            print(f"  {mode:8} c={c:<4} {rows[c]}", flush=True)
    finally:
        _stop(proc)
    return {"rows": rows, "listen": info["listen"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument("--concurrency", default="1,32", help="comma-separated levels")
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument(
        "--modes", default="default,haproxy", help="Serve modes to compare (also: noedge)"
    )
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return serve_child(args.child)

    from patterns.pipeline.loadgen import machine

    levels = [int(c) for c in args.concurrency.split(",")]
    modes = args.modes.split(",")
    print(f"machine: {machine()}", flush=True)
    results: dict[str, Any] = {}
    first = measure("uvicorn", levels, args.duration, args.processes)
    for mode in modes:
        results[mode] = measure(mode, levels, args.duration, args.processes)
    last = measure("uvicorn", levels, args.duration, args.processes)
    print(f"machine after: {machine()}", flush=True)

    base = {
        c: (first["rows"][c]["rps"] + last["rows"][c]["rps"]) / 2 for c in levels
    }  # fmt: skip
    print()
    print(
        f"No-op GET, {args.processes} client processes, {args.duration:g} s per cell; "
        f"uvicorn = mean of a run before and after ({', '.join(map(str, levels))} in flight)"
    )
    print(f"{'server':<10}{'in flight':>10}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}"
          f"{'x uvicorn':>11}{'goal':>7}")  # fmt: skip
    for c in levels:
        print(f"{'uvicorn':<10}{c:>10}{base[c]:>9.0f}{first['rows'][c]['p50_ms']:>9.2f}"
              f"{first['rows'][c]['p95_ms']:>9.2f}{1:>11.2f}"
              f"   (before {first['rows'][c]['rps']:.0f}, "
              f"after {last['rows'][c]['rps']:.0f})")  # fmt: skip
        for mode in modes:
            row = results[mode]["rows"][c]
            ratio = row["rps"] / base[c] if base[c] else 0.0
            verdict = "met" if ratio >= GOAL else "not met"
            print(f"{mode:<10}{c:>10}{row['rps']:>9.0f}{row['p50_ms']:>9.2f}{row['p95_ms']:>9.2f}"
                  f"{ratio:>11.2f}{'>= ' + str(GOAL):>7}  {verdict}")  # fmt: skip
    for mode in modes:
        listen = results[mode]["listen"]
        print(f"{mode}: listening beyond loopback: {', '.join(listen) if listen else 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

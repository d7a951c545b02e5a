"""Serve's default proxy vs HAProxy ingress, side by side in one run, on a no-op route.

Each mode runs in its own subprocess (Serve reads the switches when the cluster starts):
a local cluster, the core test ingress app, then sequential and concurrent GETs of /healthz.

    python -m scripts.ingress_bench [--requests 300] [--clients 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(n: int, clients: int) -> dict[str, float]:
    import concurrent.futures as cf

    import httpx
    import ray
    from ray import serve

    from core.ingress_mode import apply_ingress_mode
    from tests.conftest import free_port
    from tests.core.ingress_app import build

    apply_ingress_mode()
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(), name="bench", route_prefix="/bench")
    url = f"http://127.0.0.1:{port}/bench/healthz"
    try:
        with httpx.Client() as c:
            for _ in range(20):
                c.get(url)
            lat = []
            t0 = time.perf_counter()
            for _ in range(n):
                t1 = time.perf_counter()
                c.get(url).raise_for_status()
                lat.append(time.perf_counter() - t1)
            seq_rps = n / (time.perf_counter() - t0)
        lat.sort()
        per_client = max(1, n // clients)

        def worker(_: int) -> None:
            with httpx.Client() as cc:
                for _ in range(per_client):
                    cc.get(url).raise_for_status()

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(clients) as ex:
            list(ex.map(worker, range(clients)))
        conc_rps = per_client * clients / (time.perf_counter() - t0)
        return {
            "p50_ms": 1000 * lat[len(lat) // 2],
            "p95_ms": 1000 * lat[int(len(lat) * 0.95)],
            "rps_1_client": seq_rps,
            f"rps_{clients}_clients": conc_rps,
        }
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(measure(args.requests, args.clients)), flush=True)
        return 0
    results = {}
    for mode in ("default", "haproxy"):
        env = {**os.environ, "COOKBOOK_INGRESS_MODE": mode}
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "scripts.ingress_bench",
                "--child",
                mode,
                "--requests",
                str(args.requests),
                "--clients",
                str(args.clients),
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(out.stdout[-2000:], out.stderr[-3000:])
            return 1
        results[mode] = json.loads(line[7:])
    keys = list(results["default"])
    print(f"{'metric':<16}{'default':>10}{'haproxy':>10}{'ratio':>8}")
    for k in keys:
        d, h = results["default"][k], results["haproxy"][k]
        print(f"{k:<16}{d:>10.1f}{h:>10.1f}{h / d:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

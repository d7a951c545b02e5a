"""Run Locust headless against a running app and print throughput, latency and cost.

    python -m loadtests.run --request patterns.ensemble.client:sample_request \\
        --host http://127.0.0.1:8000 --users 16 --duration 30 --hourly-usd 0.10 --cpus 2

Cost per million requests = hourly price of the hardware / requests served per hour, at the
throughput Locust measured. Compare designs (monolith, microservices, Serve composition) by
running each on the same hardware and reading the ratio, not the absolute number.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def require_up(host: str, timeout_s: float = 5.0) -> None:
    """Stop with a sentence (SystemExit) when nothing answers at ``host``."""
    import httpx

    try:
        httpx.get(host, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise SystemExit(
            f"No service answers at {host} ({type(exc).__name__}); start it first, e.g. "
            "`python -m loadtests.targets monolith --port 8000`."
        ) from None


def run_locust(request: str, host: str, users: int, duration_s: int) -> dict[str, float]:
    require_up(host)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp) / "stats")
        cmd = [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(HERE / "locustfile.py"),
            "--headless",
            "-u",
            str(users),
            "-r",
            str(users),
            "-t",
            f"{duration_s}s",
            "--host",
            host,
            "--csv",
            prefix,
            "--only-summary",
            "--stop-timeout",
            "5",
            "--loglevel",
            "WARNING",
        ]
        env = {**os.environ, "LOADTEST_REQUEST": request}
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration_s + 120)
        with open(f"{prefix}_stats.csv") as f:
            rows = list(csv.DictReader(f))
        total = next((r for r in rows if r["Name"] == "Aggregated"), None)
        if total is None or float(total["Request Count"]) == 0:
            raise SystemExit(f"locust sent no requests:\n{out.stderr[-3000:]}")
        return {
            "requests": float(total["Request Count"]),
            "failures": float(total["Failure Count"]),
            "rps": float(total["Requests/s"]),
            "p50_ms": float(total["50%"]),
            "p95_ms": float(total["95%"]),
            "p99_ms": float(total["99%"]),
        }


def cost_per_million(rps: float, hourly_usd: float) -> float:
    return float("inf") if rps <= 0 else hourly_usd / (rps * 3600) * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--request", required=True, help="module:function giving sample requests")
    p.add_argument("--host", default="http://127.0.0.1:8000")
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--duration", type=int, default=30, help="seconds")
    p.add_argument("--hourly-usd", type=float, default=0.10, help="price of the hardware/hour")
    p.add_argument("--cpus", type=float, default=2, help="CPUs the design used (for rps/CPU)")
    args = p.parse_args(argv)
    s = run_locust(args.request, args.host, args.users, args.duration)
    print(
        f"requests {s['requests']:.0f}  failures {s['failures']:.0f}  rps {s['rps']:.1f}  "
        f"rps/cpu {s['rps'] / args.cpus:.1f}"
    )
    print(f"p50 {s['p50_ms']:.0f} ms  p95 {s['p95_ms']:.0f} ms  p99 {s['p99_ms']:.0f} ms")
    print(
        f"cost per 1M requests at ${args.hourly_usd:.2f}/h: "
        f"${cost_per_million(s['rps'], args.hourly_usd):.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

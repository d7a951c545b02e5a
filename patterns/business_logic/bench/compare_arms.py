"""A quick look at the monolith and microservices arms (arms.py) on this machine.

    python -m patterns.business_logic.bench.compare_arms [--seconds 15] [--concurrency 32]
        [--cpus 2] [--risk-delay-ms 20] [monolith] [microservices]

Each arm is started from ``arms.commands`` (the command lines the load study runs) against
fresh seeded SQLite files in a temp dir and a local risk service; a closed loop of
``--concurrency`` callers in this process posts ``client.sample_request(i)`` for
``--seconds``. Prints throughput, latency and the CPU seconds each service spent, which is
what ``arms.MODEL_CPU_SHARE`` is sized from. The load generator shares the machine's cores
with the arms; the load study (loadtests/) is the measurement to quote for costs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from cluster.ports import free_port, wait_http_ok
from patterns.business_logic.bench.arms import ARCHS, commands
from patterns.business_logic.client import sample_request

ROOT = Path(__file__).resolve().parents[3]


async def _load(url: str, seconds: float, concurrency: int) -> dict[str, Any]:
    """Closed loop: each caller sends its next request when the last one returned."""
    latencies: list[float] = []
    counts = {"errors": 0, "degraded": 0}
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def post(i: int) -> None:
            req = sample_request(i)
            t0 = time.perf_counter()
            r = await client.post(url, json=req["json"], headers=req["headers"])
            if r.status_code != 200:
                counts["errors"] += 1
                return
            latencies.append(time.perf_counter() - t0)
            counts["degraded"] += bool(r.json()["degraded"])

        for i in range(16):  # warm up: connections, first model calls
            await post(i)
        latencies.clear()
        stop_at = time.perf_counter() + seconds

        async def caller(k: int) -> None:
            i = 1000 + k
            while time.perf_counter() < stop_at:
                await post(i)
                i += concurrency

        t0 = time.perf_counter()
        await asyncio.gather(*(caller(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - t0
    ms = np.array(latencies) * 1000
    return {
        "rps": round(len(ms) / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None,
        "ok": len(ms),
        **counts,
    }


def _cpu_seconds(procs: dict[str, list[Any]]) -> dict[str, float]:
    import psutil

    out = {}
    for name, group in procs.items():
        total = 0.0
        for p in group:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        out[name] = total
    return out


def measure(arch: str, env: dict[str, str], cpus: int, seconds: float, conc: int) -> dict:
    import psutil

    port = free_port()
    cmds = commands(port, cpus, arch, env)
    started = [subprocess.Popen(c, cwd=ROOT, env=e, stdout=subprocess.DEVNULL) for c, e in cmds]
    try:
        for cmd, _ in cmds:
            wait_http_ok(f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}/healthz", 120)
        procs = {}
        for (cmd, _), p in zip(cmds, started, strict=True):
            name = cmd[cmd.index("--factory") + 1].rsplit(":", 1)[1]
            lead = psutil.Process(p.pid)
            procs[name] = [lead, *lead.children(recursive=True)]  # uvicorn's workers
        before = _cpu_seconds(procs)
        out = asyncio.run(_load(f"http://127.0.0.1:{port}/business/score", seconds, conc))
        after = _cpu_seconds(procs)
        out["cpu_s"] = {k: round(after[k] - before[k], 1) for k in before}
        out["cpu_ms_per_request"] = {
            k: round(1000 * v / max(1, out["ok"]), 1) for k, v in out["cpu_s"].items()
        }
        return out
    finally:
        for p in started:
            p.terminate()
        for p in started:
            p.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archs", nargs="*", help=f"some of {ARCHS} (default: both)")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=2, help="the budget each arm is sized to")
    parser.add_argument("--risk-delay-ms", type=float, default=20.0)
    a = parser.parse_args()
    unknown = set(a.archs) - set(ARCHS)
    if unknown:
        parser.error(f"unknown architecture {sorted(unknown)}; choose from {ARCHS}")
    a.archs = a.archs or list(ARCHS)
    from core.model_store import ModelStore
    from patterns.business_logic.artifacts import ensure_model
    from patterns.business_logic.seed import seed_database, seed_feature_store

    ensure_model(ModelStore.open())
    tmp = Path(tempfile.mkdtemp(prefix="business-arms-"))
    db, fs = f"sqlite:///{tmp / 'records.db'}", f"sqlite:///{tmp / 'features.db'}"
    seed_database(db)
    seed_feature_store(fs, db)
    risk_port = free_port()
    risk_cmd = [sys.executable, "-m", "patterns.business_logic.risk_service"]
    risk = subprocess.Popen(
        [*risk_cmd, "--port", str(risk_port), "--delay-ms", str(a.risk_delay_ms)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "BUSINESS_DATABASE_URL": db,
        "BUSINESS_FEATURE_STORE_URL": fs,
        "BUSINESS_RISK_SERVICE_URL": f"http://127.0.0.1:{risk_port}",
    }
    try:
        wait_http_ok(f"http://127.0.0.1:{risk_port}/healthz", 120)
        print(
            f"[arms] {a.cpus} cores per arm, {a.concurrency} callers, {a.seconds:g} s, "
            f"risk service {a.risk_delay_ms:g} ms; machine: {os.cpu_count()} CPUs",
            flush=True,
        )
        for arch in a.archs:
            print(arch, json.dumps(measure(arch, env, a.cpus, a.seconds, a.concurrency)))
    finally:
        risk.terminate()
        risk.wait(15)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

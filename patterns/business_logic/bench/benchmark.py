"""What splitting the I/O-bound ingress from the compute-bound model buys, in one run.

    python -m patterns.business_logic.bench.benchmark [--seconds 5] [--concurrency 32]

1. split (ingress + batched model deployment) vs the same logic in one deployment, at equal
   CPU: each design gets two replica processes and 1.0 logical CPU in total;
2. the latency of each lookup (records, features, risk service, model), from the split run;
3. the ingress's max_ongoing_requests (4 vs 64) with the risk service answering in 20 ms.

Load comes from DeploymentHandle calls in this process (``score_payload``), so the figures are
the deployments' own, not the HTTP proxy's. Data: fresh seeded SQLite files in a temp dir;
the risk service runs as two local subprocesses (0 ms and 20 ms). The decision log is off, so
both designs do the same reads. Under two minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from ray import serve

from cluster.local import free_port
from patterns.business_logic.app import BusinessArgs, BusinessIngress, build_scorer
from patterns.business_logic.client import sample_request
from patterns.business_logic.deployments import FraudModel
from patterns.business_logic.flow import ScoreRequest
from patterns.business_logic.model import MODEL_NAME


@serve.deployment
class BusinessMonolith:
    """The baseline: one deployment does the lookups and runs the model in-process, one row
    per request, on the event loop (what a single web service would do)."""

    def __init__(self, args: dict[str, Any]) -> None:
        from core.model_store import ModelStore

        parsed = BusinessArgs(**args)
        store = ModelStore.open(parsed.model_store_uri)
        self.model, self.ref = store.load_sklearn(MODEL_NAME, parsed.model_version)
        self.scorer = build_scorer(parsed, self._call_model)

    async def _call_model(self, row: list[float]) -> tuple[float, str]:
        proba = self.model.predict_proba(np.asarray([row], dtype=np.float64))[0, 1]
        return float(proba), self.ref.version

    async def score_payload(self, payload: dict[str, Any], request_id: str = "-") -> dict[str, Any]:
        return await self.scorer.score(ScoreRequest(**payload), request_id)


def _start_risk_service(delay_ms: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "patterns.business_logic.risk_service",
            "--port",
            str(port),
            "--delay-ms",
            str(delay_ms),
        ]
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        time.sleep(0.1)
    raise RuntimeError("risk service did not start")


async def _load(handle: Any, seconds: float, concurrency: int) -> dict[str, Any]:
    """Closed loop: `concurrency` callers, each sending its next request when one returns."""
    latencies: list[float] = []
    timings: list[dict[str, float]] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def caller(k: int) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                out = await handle.score_payload.remote(sample_request(i)["json"])
                latencies.append(time.perf_counter() - t0)
                timings.append(out["timings_ms"])
            except Exception:
                errors += 1
            i += concurrency

    # warm up (connections, first batches), then measure
    await asyncio.gather(
        *(handle.score_payload.remote(sample_request(i)["json"]) for i in range(8))
    )
    t0 = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "n": len(latencies),
        "errors": errors,
        "timings": timings,
    }


def _split_app(args: BusinessArgs, ingress_max_ongoing: int = 128) -> Any:
    # fixed replica counts (autoscaling off) so both designs get the same CPU
    model = FraudModel.options(
        num_replicas=1, autoscaling_config=None, ray_actor_options={"num_cpus": 0.5}
    ).bind(args.model_version, args.model_store_uri)
    return BusinessIngress.options(
        num_replicas=1,
        autoscaling_config=None,
        max_ongoing_requests=ingress_max_ongoing,
        ray_actor_options={"num_cpus": 0.5},
    ).bind(model, args.model_dump())


def _row(name: str, r: dict[str, Any]) -> str:
    return (
        f"  {name:<34} {r['rps']:8.1f} req/s   p50 {r['p50_ms']:7.1f} ms   "
        f"p99 {r['p99_ms']:7.1f} ms   ({r['n']} ok, {r['errors']} errors)"
    )


def run(seconds: float, concurrency: int) -> None:
    from core.model_store import ModelStore
    from patterns.business_logic.artifacts import ensure_model
    from patterns.business_logic.seed import seed_database, seed_feature_store

    ensure_model(ModelStore.open())
    tmp = Path(tempfile.mkdtemp(prefix="business-bench-"))
    db, fs = f"sqlite:///{tmp / 'records.db'}", f"sqlite:///{tmp / 'features.db'}"
    seed_database(db)
    seed_feature_store(fs, db)
    fast, fast_url = _start_risk_service(0)
    slow, slow_url = _start_risk_service(20)

    def measure(app: Any, callers: int) -> dict[str, Any]:
        # Redeploying the same app name keeps deployments whose config did not change (the
        # model replica survives the ingress changes), which keeps the run short.
        handle = serve.run(app, name="bench", route_prefix=None)
        return asyncio.run(_load(handle, seconds, callers))

    try:
        base = {"database_url": db, "feature_store_url": fs, "log_decisions": False}
        args = BusinessArgs(**base, risk_service_url=fast_url)
        print(f"[bench] {seconds:g}s per run, {concurrency} concurrent callers", flush=True)
        split = measure(_split_app(args), concurrency)
        print(_row("split (ingress 1 + model 1)", split), flush=True)
        slow_args = BusinessArgs(**base, risk_service_url=slow_url)
        limited = {}
        for max_ongoing in (4, 64):
            limited[max_ongoing] = measure(_split_app(slow_args, max_ongoing), 64)
            print(
                _row(f"ingress max_ongoing={max_ongoing} (risk 20ms)", limited[max_ongoing]),
                flush=True,
            )
        mono_app = BusinessMonolith.options(
            num_replicas=2, ray_actor_options={"num_cpus": 0.5}
        ).bind(args.model_dump())
        mono = measure(mono_app, concurrency)
        print(_row("one deployment (2 replicas)", mono), flush=True)
        serve.delete("bench")
    finally:
        fast.terminate()
        slow.terminate()
        shutil.rmtree(tmp, ignore_errors=True)

    print("\nLatency of each lookup in the split run (ms, p50 / p95):")
    for key in ("records", "features", "risk_service", "model", "total"):
        vals = [t[key] for t in split["timings"] if key in t]
        if len(vals) > 1:
            q = statistics.quantiles(vals, n=20)
            print(f"  {key:<14} {statistics.median(vals):7.2f} / {q[18]:7.2f}")
    print("\nRatios:")
    print(f"  split / one deployment throughput:        {split['rps'] / mono['rps']:.2f}x")
    print(f"  split / one deployment p50 latency:       {split['p50_ms'] / mono['p50_ms']:.2f}x")
    print(
        f"  ingress max_ongoing 64 / 4 throughput:    {limited[64]['rps'] / limited[4]['rps']:.2f}x"
    )
    print(f"\n(machine: {os.cpu_count()} CPUs, shared with whatever else runs on it)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs for local Ray")
    args = parser.parse_args()
    from cluster.local import local_serve

    with local_serve(args.num_cpus):
        run(args.seconds, args.concurrency)


if __name__ == "__main__":
    main()

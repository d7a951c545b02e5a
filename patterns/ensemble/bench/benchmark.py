"""What the deadline and the shadow copy do to the ensemble's latency, measured in one run.

    python -m patterns.ensemble.bench.benchmark [--requests 80] [--concurrency 4] [--slow-s 1.0]

Starts a local Ray + Serve, then runs two phases, each with two apps deployed side by side
and requests alternating between them (so both see the same machine noise):

1. healthy members, selection "all": no challenger vs a shadow challenger -> cost of the copy;
2. one member (mlp) slowed by ``--slow-s`` through its ``fault.delay_s`` chaos knob:
   with the configured 250 ms deadline vs an effectively unbounded one (60 s).

Latency is measured at the client (HTTP through Serve's proxy), one row per request.
Takes about 2 minutes on a 2-core machine (longer when it is busy with other jobs).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

HEALTHY = "healthy"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _args(**overrides: Any) -> Any:
    from patterns.ensemble.flow import EnsembleArgs

    base = EnsembleArgs().model_dump()
    base["selection"] = {**base["selection"], "mode": "all"}  # every row meets every member
    base.update(overrides)
    return EnsembleArgs(**base)


def _slow_members(delay_s: float) -> list[dict[str, Any]]:
    from patterns.ensemble.flow import EnsembleArgs

    out = []
    for m in EnsembleArgs().members:
        d = m.model_dump()
        if m.name == "mlp":
            d["fault"] = {"delay_s": delay_s}
        out.append(d)
    return out


async def _drive(
    urls: dict[str, str], rows: list[list[float]], n: int, concurrency: int
) -> dict[str, dict[str, Any]]:
    """``n`` requests per app; each worker alternates between the apps."""
    import httpx

    lat: dict[str, list[float]] = {k: [] for k in urls}
    degraded: dict[str, int] = dict.fromkeys(urls, 0)
    errors: dict[str, int] = dict.fromkeys(urls, 0)
    names = list(urls)
    counter = iter(range(n * len(urls)))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            name = names[i % len(names)]
            t0 = time.perf_counter()
            r = await client.post(
                f"{urls[name]}/predict", json={"instances": [rows[i % len(rows)]]}
            )
            lat[name].append(time.perf_counter() - t0)
            if r.status_code != 200:
                errors[name] += 1
            elif r.json()["degraded"]:
                degraded[name] += 1

    async with httpx.AsyncClient(timeout=120) as client:
        for name in names:  # warm-up: first calls pay for connections and lazy imports
            for row in rows[:3]:
                await client.post(f"{urls[name]}/predict", json={"instances": [row]})
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return {
        k: {
            "p50_ms": 1000 * statistics.median(v),
            "p99_ms": 1000 * _pct(v, 0.99),
            "degraded": degraded[k],
            "errors": errors[k],
            "n": len(v),
        }
        for k, v in lat.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Ensemble latency: deadline and shadow cost.")
    parser.add_argument("--requests", type=int, default=80, help="per app and phase")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--slow-s", type=float, default=1.0, help="delay added to one member")
    opts = parser.parse_args()

    import httpx
    import ray
    from ray import serve

    from patterns.ensemble.app import build_app
    from patterns.ensemble.artifacts import ensure_artifacts
    from patterns.ensemble.data import load_split

    ensure_artifacts()
    rows = load_split().x_test.tolist()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    from cluster.ports import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    results: dict[str, dict[str, Any]] = {}
    t_start = time.perf_counter()
    try:
        phases = [
            {
                "no shadow": _args(challenger={"member": None}),
                "shadow copy": _args(),
            },
            {
                f"mlp +{opts.slow_s:g}s, deadline 250 ms": _args(
                    members=_slow_members(opts.slow_s), deadline_ms=250, challenger={"member": None}
                ),
                f"mlp +{opts.slow_s:g}s, no deadline": _args(
                    members=_slow_members(opts.slow_s),
                    deadline_ms=60_000,
                    challenger={"member": None},
                ),
            },
        ]
        for phase in phases:
            urls = {}
            for i, (label, args) in enumerate(phase.items()):
                name = f"ensemble-bench-{i}"
                serve.run(build_app(args), name=name, route_prefix=f"/{name}")
                urls[label] = f"{base}/{name}"
            print(f"[bench] deployed {list(phase)}; sending requests", flush=True)
            results.update(asyncio.run(_drive(urls, rows, opts.requests, opts.concurrency)))
            if "shadow copy" in phase:
                stats = httpx.get(f"{urls['shadow copy']}/challenger", timeout=30).json()
                print(
                    f"[bench] shadow recorded {stats['shadowed_predictions']} copies, "
                    f"agreement {stats['agreement']:.3f}, challenger p95 "
                    f"{stats['challenger_p95_latency_ms']:.1f} ms",
                    flush=True,
                )
            for i in range(len(phase)):
                serve.delete(f"ensemble-bench-{i}")
    finally:
        serve.shutdown()
        ray.shutdown()

    print(
        f"\nEnsemble latency, {opts.requests} requests per row, {opts.concurrency} concurrent "
        f"clients, 1 row per request ({time.perf_counter() - t_start:.0f} s)"
    )
    print(f"{'scenario':34} {'p50 ms':>8} {'p99 ms':>8} {'degraded':>9} {'errors':>7}")
    for label, r in results.items():
        print(
            f"{label:34} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} "
            f"{r['degraded']:>5}/{r['n']:<3} {r['errors']:>7}"
        )
    plain, shadow = results["no shadow"], results["shadow copy"]
    slow_dl, slow_nodl = list(results.values())[2], list(results.values())[3]
    print("\nratios")
    print(
        f"  shadow copy / no shadow           p50 {shadow['p50_ms'] / plain['p50_ms']:.2f}x"
        f"   p99 {shadow['p99_ms'] / plain['p99_ms']:.2f}x"
    )
    print(
        f"  slowed, no deadline / deadline    p50 {slow_nodl['p50_ms'] / slow_dl['p50_ms']:.2f}x"
        f"   p99 {slow_nodl['p99_ms'] / slow_dl['p99_ms']:.2f}x"
    )
    print(
        f"  slowed with deadline / healthy    p50 {slow_dl['p50_ms'] / plain['p50_ms']:.2f}x"
        f"   p99 {slow_dl['p99_ms'] / plain['p99_ms']:.2f}x"
    )


if __name__ == "__main__":
    main()

"""Batching on vs off at the same replicas, and what each composition hop costs.

    python -m patterns.pipeline.benchmark                    # ~1.5 minutes
    python -m patterns.pipeline.benchmark --duration 30 --concurrency 32

Starts its own local Ray + Serve (HTTP on a free loopback port), deploys the pipeline with
batching on (each model stage's ``max_batch_size`` and ``batch_wait_timeout_s`` as in
``PipelineArgs``, the same as config.yaml: 16 detector, 16 scene classifier, 32 digit
classifier, 5 ms wait; ``--max-batch-size B`` puts B on all three instead), drives it with
``--concurrency`` clients sending held-out scenes for a fixed time, then redeploys with
``max_batch_size: 1`` on every model stage (same replicas, same resources) and repeats.
Prints throughput and p50/p95 for both and their ratio.

Then, one request at a time: each stage's time as the ingress sees it (``timings_ms``:
preprocess its round trip, the detector and scene classifier from the call to the answer, the
digit classifier from the detector's answer to its own, since it gets the boxes straight from
the detector) minus the stage's own compute time = what the hop itself adds (serialisation,
routing, queueing); the business rule runs in process, so it adds no hop. And the whole
pipeline against the same three models called in one process (the monolith: the same PNG
bodies decoded and read; the bodies are encoded before the clock starts).
Figures are for the machine it runs on; say which when you quote them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import time
from typing import Any

import numpy as np

from patterns.pipeline.scenes import scene_png

STAGES = ("preprocess", "detector", "scene_classifier", "digit_classifier", "business_rules")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def _load(url: str, bodies: list[bytes], concurrency: int, duration_s: float) -> dict:
    import httpx

    latencies: list[float] = []
    batch_sizes: list[int] = []
    per_image: list[float] = []  # detector forward-pass time per image
    errors = 0
    deadline = time.perf_counter() + duration_s

    async def user(uid: int, client: httpx.AsyncClient) -> None:
        nonlocal errors
        i = uid
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            r = await client.post(
                f"{url}/read",
                content=bodies[i % len(bodies)],
                headers={"Content-Type": "image/png"},
            )
            if r.status_code == 200:
                latencies.append((time.perf_counter() - t0) * 1000)
                body = r.json()
                batch_sizes.append(body["batch_sizes"]["detector"])
                per_image.append(body["compute_ms"]["detector"] / body["batch_sizes"]["detector"])
            else:
                errors += 1
            i += concurrency

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(user(u, client) for u in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {
        "throughput": len(latencies) / elapsed,
        "p50": _pct(latencies, 50),
        "p95": _pct(latencies, 95),
        "ok": len(latencies),
        "errors": errors,
        "mean_batch": statistics.fmean(batch_sizes) if batch_sizes else 0.0,
        "detector_ms_per_image": statistics.fmean(per_image) if per_image else 0.0,
    }


def _sequential(url: str, bodies: list[bytes], n: int) -> dict[str, Any]:
    import httpx

    hops: dict[str, list[float]] = {s: [] for s in STAGES}
    compute: dict[str, list[float]] = {s: [] for s in STAGES}
    totals, client_ms = [], []
    with httpx.Client(timeout=60) as client:
        for i in range(n):
            t0 = time.perf_counter()
            r = client.post(
                f"{url}/read",
                content=bodies[i % len(bodies)],
                headers={"Content-Type": "image/png"},
            )
            client_ms.append((time.perf_counter() - t0) * 1000)
            body = r.json()
            totals.append(body["timings_ms"]["total"])
            for s in STAGES:
                if s in body["timings_ms"]:
                    hops[s].append(body["timings_ms"][s])
                    compute[s].append(body["compute_ms"][s])
    return {
        "hops": {
            s: (statistics.median(hops[s]), statistics.median(compute[s]))
            for s in STAGES
            if hops[s]
        },
        "ingress_total": statistics.median(totals),
        "client": statistics.median(client_ms),
    }


def _monolith(bodies: list[bytes], n: int) -> float:
    """Median ms per image for decode + all three models in one process, one at a time, on
    the same PNG bodies the HTTP clients send (encoded before timing, as theirs are)."""
    import torch

    from core.model_store import ModelStore
    from patterns.pipeline.models import as_input, load_model
    from patterns.pipeline.preprocess import ImageLimits, prepare
    from patterns.pipeline.reader import DigitReader

    torch.set_num_threads(1)
    store = ModelStore.open()
    reader = DigitReader(
        load_model("centernet_digits", "store:pipeline-detector/v1", store),
        load_model("digit_cnn", "store:pipeline-digits/v1", store),
        load_model("count_cnn", "store:pipeline-scene/v1", store),
    )
    limits = ImageLimits()
    times = []
    for i in range(n + 3):
        t0 = time.perf_counter()
        prep = prepare(bodies[i % len(bodies)], limits)
        reader.read(as_input([prep.image], "cpu"))  # type: ignore[union-attr]
        if i >= 3:  # the first calls pay for lazy initialisation
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per run")
    parser.add_argument("--sequential", type=int, default=40, help="requests for hop costs")
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="batching on: this max_batch_size on every model stage (default: each stage's "
        "own, as in config.yaml)",
    )
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from patterns.pipeline.app import PipelineArgs, build_app
    from patterns.pipeline.artifacts import ensure_artifacts

    ensure_artifacts()
    bodies = [scene_png("heldout", i) for i in range(64)]
    port = _free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/pipeline"
    results: dict[str, dict] = {}
    hop_report: dict[str, Any] = {}
    try:
        off = {"max_batch_size": 1, "batch_wait_timeout_s": 0}
        if args.max_batch_size:
            on = {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": 0.005}
            batching_on = PipelineArgs(detector=on, scene=on, digits=on)
        else:
            batching_on = PipelineArgs()  # each stage's own batching (= config.yaml)
        batching_off = PipelineArgs(detector=off, scene=off, digits=off)
        for label, pargs in (("batching on", batching_on), ("batching off", batching_off)):
            sizes = ", ".join(
                f"{stage} {getattr(pargs, stage).max_batch_size}"
                for stage in ("detector", "scene", "digits")
            )
            print(f"deploying ({label}: max_batch_size {sizes}) ...", flush=True)
            serve.run(build_app(pargs), name="pipeline", route_prefix="/pipeline")
            asyncio.run(_load(url, bodies, args.concurrency, 2.0))  # warm-up, not counted
            results[label] = asyncio.run(_load(url, bodies, args.concurrency, args.duration))
            print(f"  {label}: {results[label]}", flush=True)
            if pargs is batching_off:  # one at a time: no batch wait, hops show their cost
                hop_report = _sequential(url, bodies, args.sequential)
        serve.delete("pipeline")
    finally:
        serve.shutdown()
        ray.shutdown()
    monolith_ms = _monolith(bodies, args.sequential)

    on, off = results["batching on"], results["batching off"]
    print()
    print(
        f"Throughput and latency, {args.concurrency} concurrent clients, {args.duration:g} s "
        "each, 1 replica per stage, HTTP through Serve's proxy"
    )
    print(
        f"{'':14}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'mean batch':>12}"
        f"{'detector ms/img':>17}{'errors':>8}"
    )
    for label, r in results.items():
        print(
            f"{label:14}{r['throughput']:8.1f}{r['p50']:9.1f}{r['p95']:9.1f}"
            f"{r['mean_batch']:12.2f}{r['detector_ms_per_image']:17.2f}{r['errors']:8d}"
        )
    print(
        f"{'on / off':14}{on['throughput'] / off['throughput']:8.2f}"
        f"{on['p50'] / off['p50']:9.2f}{on['p95'] / off['p95']:9.2f}{'':12}"
        f"{on['detector_ms_per_image'] / off['detector_ms_per_image']:17.2f}"
    )
    print()
    print(f"Per hop, one request at a time (median of {args.sequential}, batching off):")
    print(f"{'stage':18}{'round trip':>11}{'compute':>9}{'hop adds':>10}")
    added = 0.0
    for stage, (rt, comp) in hop_report["hops"].items():
        hop = 0.0 if stage == "business_rules" else rt - comp  # in process: no hop
        added += hop
        note = "  (in process)" if stage == "business_rules" else ""
        print(f"{stage:18}{rt:11.2f}{comp:9.2f}{hop:10.2f}{note}")
    print(f"{'all hops':18}{'':11}{'':9}{added:10.2f}")
    print(
        f"pipeline at the ingress {hop_report['ingress_total']:.1f} ms; at the client "
        f"{hop_report['client']:.1f} ms (adds the HTTP proxy); the same models in one "
        f"process (monolith) {monolith_ms:.1f} ms per image"
    )


if __name__ == "__main__":
    main()

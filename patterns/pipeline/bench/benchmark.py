"""Batching on vs off, fused vs split vs a plain monolith, and what each hop costs: one run.

    python -m patterns.pipeline.bench.benchmark                      # ~5 min on 2 shared cores
    python -m patterns.pipeline.bench.benchmark --ingress haproxy    # HAProxy + direct ingress
    python -m patterns.pipeline.bench.benchmark --topology split --concurrency 32 --duration 15

Starts its own local Ray + Serve (HTTP on a free loopback port) in the ingress mode under
test (``--ingress``, default ``COOKBOOK_INGRESS_MODE`` or ``haproxy``, the shipped mode;
Serve reads it when the cluster starts, so one mode per run), and drives it with
``patterns.pipeline.bench.loadgen`` (several client processes, raw keep-alive HTTP) sending held-out
scenes as PNG bodies. Every comparison is side by side in this one run: the variants are
deployed together and measured in alternating rounds, so a change in the machine's load hits
both.

1. Batching on vs off at the same replicas (``--topology``, default the shipped local
   profile's): on = the profile's ``max_batch_size`` / ``batch_wait_timeout_s``, off =
   ``max_batch_size: 1``. Goal (issue 12, 2 cores): on >= 1.3x the req/s of off, p95 no worse.
2. Topologies at the same concurrency: the fused profile, the split profile, and the
   monolith (``monolith.py`` under ``uvicorn --workers 2``: the same flow and models, no
   Ray). Goal: the shipped local profile >= 0.6x the monolith's req/s.
3. The hops of the split profile, one request at a time, batching off: each stage's time as
   the ingress sees it (``timings_ms``) minus its own compute time (``compute_ms``) = what
   the hop adds (routing, the replica's event loop, the payload). Goal: <= 2 ms p50 per hop.
   Beside it: each stage called alone from a replica (its hop without the request's other
   stages competing for the cores), a bare call to a no-op deployment (the floor on this
   machine, this minute) and to one that works 2 ms in pure Python before it answers (what
   any working callee adds to the floor, model or not), the same pipeline with decoding in a
   Preprocess deployment (one hop more), and the pipeline at the ingress against the same
   decode and models called in one process.

Figures are for the machine it runs on (printed, with its load average before and after).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cluster.ports import free_port
from patterns.pipeline.bench.loadgen import (
    CpuMeter,
    LoadResult,
    Request,
    machine,
    process_tree,
    run_load,
)
from patterns.pipeline.scenes import scene_png

ROOT = Path(__file__).resolve().parents[3]  # the repo: the monolith runs from here
STAGES = ("preprocess", "detector", "scene_classifier", "digit_classifier", "business_rules")
GOALS = {"batching": 1.3, "monolith": 0.6, "hop_ms": 2.0}


def bodies(n: int = 64) -> list[bytes]:
    return [scene_png("heldout", i) for i in range(n)]


def requests_for(prefix: str, pngs: list[bytes]) -> list[Request]:
    return [Request("POST", f"{prefix}/read", png, "image/png") for png in pngs]


def batching_off(args: Any) -> Any:
    """The same args with every batch of one request (same replicas, same resources)."""
    off = {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}
    return args.model_copy(
        update={
            "fused": args.fused.model_copy(update=off),
            "detector": args.detector.model_copy(update=off),
            "scene": args.scene.model_copy(update=off),
            "digits": args.digits.model_copy(update=off),
        }
    )


def mean_batch(result: LoadResult) -> float:
    sizes = [json.loads(b)["batch_sizes"]["detector"] for b in result.samples]
    return statistics.fmean(sizes) if sizes else 0.0


def wait_ready(url: str, png: bytes, timeout_s: float = 300.0, answers: int = 4) -> None:
    """Until ``answers`` reads in a row answer 200 (every worker/replica warmed up)."""
    import httpx

    deadline, good = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline and good < answers:
        try:
            r = httpx.post(url, content=png, headers={"Content-Type": "image/png"}, timeout=30)
            good = good + 1 if r.status_code == 200 else 0
        except httpx.HTTPError:
            good = 0
        if good < answers:
            time.sleep(0.2)
    if good < answers:
        raise RuntimeError(f"{url} did not answer within {timeout_s:g} s")


def start_monolith(port: int, workers: int) -> subprocess.Popen:
    from cluster.local import uvicorn_command

    cmd = uvicorn_command("patterns.pipeline.bench.monolith:create_app", port, workers)
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


Cell = tuple[str, list[Request], Callable[[], list[int]]]  # base URL, requests, server pids


def alternate(
    cells: dict[str, Cell], *, concurrency: int, duration: float, rounds: int, processes: int
) -> dict[str, tuple[LoadResult, float]]:
    """Measure each cell in turn, ``rounds`` times; latencies and counts pooled over the
    rounds, with the CPU ms the server's processes spent per answer in the same windows."""
    pooled: dict[str, list[LoadResult]] = {label: [] for label in cells}
    cpu: dict[str, float] = dict.fromkeys(cells, 0.0)
    for r in range(rounds):
        for label, (url, reqs, pids) in cells.items():
            meter = CpuMeter(pids)
            res = run_load(
                url, reqs, concurrency=concurrency, duration_s=duration, warmup_s=2.0,
                processes=processes, samples=40, on_window=meter,
            )  # fmt: skip
            pooled[label].append(res)
            cpu[label] += meter.seconds
            row = {**res.row(), "server_cpu_ms": round(meter.ms_per(res.ok), 2)}
            print(f"  round {r + 1} {label:<26} {row}", flush=True)
    out = {}
    for label, results in pooled.items():
        statuses: dict[int, int] = {}
        for res in results:
            for s, n in res.statuses.items():
                statuses[s] = statuses.get(s, 0) + n
        merged = LoadResult(
            concurrency=concurrency,
            processes=processes,
            duration_s=sum(r.duration_s for r in results),
            latencies_ms=np.concatenate([r.latencies_ms for r in results]),
            statuses=statuses,
            errors=sum(r.errors for r in results),
            client_cpu=statistics.fmean(r.client_cpu for r in results),
            samples=[s for r in results for s in r.samples],
        )
        out[label] = (merged, 1000 * cpu[label] / merged.ok if merged.ok else float("nan"))
    return out


def sequential_hops(url: str, pngs: list[bytes], n: int) -> dict[str, Any]:
    """One request at a time: per stage (round trip at the ingress, compute in the stage)."""
    import httpx

    hops: dict[str, list[float]] = {s: [] for s in STAGES}
    compute: dict[str, list[float]] = {s: [] for s in STAGES}
    totals, client_ms = [], []
    with httpx.Client(timeout=60) as client:
        for i in range(n + 5):
            t0 = time.perf_counter()
            r = client.post(
                f"{url}/read", content=pngs[i % len(pngs)], headers={"Content-Type": "image/png"}
            )
            ms = (time.perf_counter() - t0) * 1000
            if i < 5:  # warm the connections and the handles
                continue
            body = r.json()
            client_ms.append(ms)
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


def hop_floor(base: str, n: int, app: str) -> dict[str, Any]:
    """From a replica in the same cluster, one call at a time: the median ms of a bare call
    to a no-op deployment that gets the image a model stage gets (the floor any hop costs on
    this machine right now: Serve's routing and the callee's event loop, no model), of the
    same no-op made to work 2 ms in a thread first (its own time taken off, like a stage's
    ``compute_ms``), and of each model stage of ``app`` called alone (round trip minus its
    ``compute_ms``: the hop without the other stages of the request competing for the cores).
    Asked over HTTP, so this driver holds no handle."""
    import httpx
    from ray import serve

    @serve.deployment(name="Echo", ray_actor_options={"num_cpus": 0.05})
    class Echo:
        async def echo(self, x: Any) -> Any:
            return {"compute_ms": 0.0}

        async def spin(self, x: Any) -> Any:
            """2 ms of pure-Python work in a thread, like a stage's forward pass: no torch,
            no model, the same way back."""

            def work() -> dict[str, float]:
                t0 = time.perf_counter()
                while time.perf_counter() - t0 < 0.002:
                    pass
                return {"compute_ms": (time.perf_counter() - t0) * 1000}

            return await asyncio.get_running_loop().run_in_executor(None, work)

    @serve.deployment(name="HopTimer", ray_actor_options={"num_cpus": 0.05})
    class HopTimer:
        def __init__(self, echo: Any) -> None:
            self.echo = echo

        async def __call__(self, request: Any) -> dict[str, float]:
            from patterns.pipeline.preprocess import ImageLimits
            from patterns.pipeline.stages import PreprocessStage

            decode = PreprocessStage(ImageLimits())
            prepared = [decode.run(png) for png in bodies(16)]
            handles = {
                name: serve.get_deployment_handle(name, app_name=app)
                for name in ("Detector", "SceneClassifier", "DigitClassifier")
            }
            calls: dict[str, Callable[[dict, dict], Any]] = {
                "bare": lambda p, _: self.echo.echo.remote(p),
                "spin": lambda p, _: self.echo.spin.remote(p),
                "detector": lambda p, _: handles["Detector"].detect.remote(p),
                "scene_classifier": lambda p, _: handles["SceneClassifier"].classify.remote(p),
                "digit_classifier": lambda p, d: handles["DigitClassifier"].read.remote(p, d),
            }
            # The digit classifier's real input: the detector's answer for each image.
            dets = [await handles["Detector"].detect.remote(p) for p in prepared]
            hops: dict[str, list[float]] = {name: [] for name in calls}
            for name, call in calls.items():  # one kind of call at a time, back to back
                for i in range(int(request.query_params["n"]) + 10):
                    j = i % len(prepared)
                    t0 = time.perf_counter()
                    out = await call(prepared[j], dets[j])
                    if i >= 10:
                        hops[name].append((time.perf_counter() - t0) * 1000 - out["compute_ms"])
            return {name: statistics.median(ms) for name, ms in hops.items()}

    serve.run(HopTimer.bind(Echo.bind()), name="p-hop", route_prefix="/p-hop")
    try:
        floor = httpx.get(f"{base}/p-hop", params={"n": n}, timeout=300).json()
        return {"bare": float(floor.pop("bare")), "spin": float(floor.pop("spin")), "alone": floor}
    finally:
        serve.delete("p-hop")


def in_process_ms(pngs: list[bytes], n: int) -> float:
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
        prep = prepare(pngs[i % len(pngs)], limits)
        reader.read(as_input([prep.image], "cpu"))  # type: ignore[union-attr]
        if i >= 3:  # the first calls pay for lazy initialisation
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ingress", choices=("default", "haproxy"), default=None)
    parser.add_argument("--topology", choices=("fused", "split"), default=None,
                        help="batching comparison (default: the shipped profile's)")  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per cell")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per cell")
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--sequential", type=int, default=40, help="requests for hop costs")
    parser.add_argument("--monolith-workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--skip", default="", help="comma list of: batching,topologies,hops")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    # The ingress switches must be in the environment before Serve is imported.
    from cluster.ingress_mode import apply_ingress_mode

    mode = apply_ingress_mode(args.ingress)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from patterns.pipeline.app import PipelineArgs, build_app
    from patterns.pipeline.artifacts import ensure_artifacts

    ensure_artifacts()
    shipped = PipelineArgs()
    topology = args.topology or shipped.topology
    pngs = bodies()
    before = machine()
    print(f"machine: {before}; ingress: {mode}", flush=True)
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")  # fmt: skip
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    report: dict[str, Any] = {"shipped_topology": shipped.topology}
    monolith: subprocess.Popen | None = None

    def serve_pids() -> list[int]:  # this driver, Ray's processes and the replicas
        return process_tree(os.getpid(), {monolith.pid} if monolith else None)

    try:
        on = shipped.model_copy(update={"topology": topology})
        if "batching" not in skip:
            print(f"deploying {topology}: batching on and off ...", flush=True)
            serve.run(build_app(on), name="p-on", route_prefix="/p-on")
            serve.run(build_app(batching_off(on)), name="p-off", route_prefix="/p-off")
            for prefix in ("/p-on", "/p-off"):
                wait_ready(f"{base}{prefix}/read", pngs[0])
            report["batching"] = alternate(
                {
                    "batching on": (base, requests_for("/p-on", pngs), serve_pids),
                    "batching off": (base, requests_for("/p-off", pngs), serve_pids),
                },
                concurrency=args.concurrency, duration=args.duration, rounds=args.rounds,
                processes=args.processes,
            )  # fmt: skip
            serve.delete("p-off")
            if topology != shipped.topology:
                serve.delete("p-on")
        if "topologies" not in skip:
            print("deploying fused and split (batching on), starting the monolith ...", flush=True)
            cells: dict[str, Cell] = {}
            mono_port = free_port()
            monolith = start_monolith(mono_port, args.monolith_workers)
            for topo in ("fused", "split"):
                name = "p-on" if topo == topology and "batching" not in skip else f"p-{topo}"
                if name != "p-on":
                    serve.run(build_app(shipped.model_copy(update={"topology": topo})),
                              name=name, route_prefix=f"/{name}")  # fmt: skip
                elif "batching" in skip:
                    serve.run(build_app(on), name=name, route_prefix=f"/{name}")
                wait_ready(f"{base}/{name}/read", pngs[0])
                cells[f"{topo} (serve)"] = (base, requests_for(f"/{name}", pngs), serve_pids)
            mono_url = f"http://127.0.0.1:{mono_port}"
            wait_ready(f"{mono_url}/pipeline/read", pngs[0], answers=8)
            mono_pid = monolith.pid
            cells[f"monolith (uvicorn x{args.monolith_workers})"] = (
                mono_url,
                requests_for("/pipeline", pngs),
                lambda: process_tree(mono_pid),
            )
            report["topologies"] = alternate(
                cells, concurrency=args.concurrency, duration=args.duration,
                rounds=args.rounds, processes=args.processes,
            )  # fmt: skip
            monolith.terminate()
            monolith.wait(timeout=60)
            monolith = None
            for name in serve.status().applications:
                serve.delete(name)
        if "hops" not in skip:
            print("deploying split with batching off, for the hops ...", flush=True)
            split_off = batching_off(shipped.model_copy(update={"topology": "split"}))
            apart = split_off.model_copy(update={"preprocess_in": "deployment"})
            serve.run(build_app(split_off), name="p-hops", route_prefix="/p-hops")
            serve.run(build_app(apart), name="p-apart", route_prefix="/p-apart")
            for prefix in ("/p-hops", "/p-apart"):
                wait_ready(f"{base}{prefix}/read", pngs[0])
            report["hops"] = sequential_hops(f"{base}/p-hops", pngs, args.sequential)
            report["hops_apart"] = sequential_hops(f"{base}/p-apart", pngs, args.sequential)
            report["preprocess_in"] = split_off.preprocess_in
            serve.delete("p-apart")
            report["hop_floor"] = hop_floor(base, args.sequential, app="p-hops")
            serve.delete("p-hops")
    finally:
        if monolith is not None:
            monolith.terminate()
            monolith.wait(timeout=60)
        serve.shutdown()
        ray.shutdown()
    if "hops" in report:
        report["in_process_ms"] = in_process_ms(pngs, args.sequential)
    print_report(report, args, mode, topology, before)


def print_report(report: dict[str, Any], args: Any, mode: str, topology: str, before: str) -> None:
    print()
    print(f"machine: {before} (before); {machine()} (after)")
    print(f"ingress: {mode}; clients: {args.processes} processes, {args.concurrency} in flight, "
          f"{args.rounds} alternating rounds of {args.duration:g} s per cell")  # fmt: skip
    print("server CPU ms/req: CPU time the serving processes spent per answer in the same windows "
          "(like for like on a shared box)")  # fmt: skip
    if "batching" in report:
        (on, on_cpu), (off, off_cpu) = (
            report["batching"]["batching on"],
            report["batching"]["batching off"],
        )
        print()
        print(f"1. Batching on vs off, {topology} topology, same replicas")
        print(f"{'':16}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'mean batch':>12}"
              f"{'CPU ms/req':>12}{'failed':>8}")  # fmt: skip
        for label, (r, cpu) in report["batching"].items():
            print(f"{label:16}{r.rps:8.1f}{r.pct(50):9.1f}{r.pct(95):9.1f}"
                  f"{mean_batch(r):12.2f}{cpu:12.2f}{r.failed:8d}")  # fmt: skip
        ratio, p95 = on.rps / off.rps, on.pct(95) / off.pct(95)
        print(f"{'on / off':16}{ratio:8.2f}{on.pct(50) / off.pct(50):9.2f}{p95:9.2f}"
              f"{'':12}{on_cpu / off_cpu:12.2f}")  # fmt: skip
        goal = GOALS["batching"]
        print(f"   goal: req/s on/off >= {goal}: {ratio:.2f} {verdict(ratio >= goal)}; "
              f"p95 on/off <= 1.0: {p95:.2f} {verdict(p95 <= 1.0)}; "
              f"(CPU per request off/on: {off_cpu / on_cpu:.2f})")  # fmt: skip
    if "topologies" in report:
        rows = report["topologies"]
        mono, mono_cpu = next(v for label, v in rows.items() if label.startswith("monolith"))
        print()
        print("2. Topologies, batching on, same concurrency")
        print(f"{'':28}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'x monolith':>12}"
              f"{'CPU ms/req':>12}{'failed':>8}")  # fmt: skip
        for label, (r, cpu) in rows.items():
            print(f"{label:28}{r.rps:8.1f}{r.pct(50):9.1f}{r.pct(95):9.1f}"
                  f"{r.rps / mono.rps:12.2f}{cpu:12.2f}{r.failed:8d}")  # fmt: skip
        local = report["shipped_topology"]
        if f"{local} (serve)" in rows:
            shipped, cpu = rows[f"{local} (serve)"]
            ratio = shipped.rps / mono.rps
            print(f"   goal: shipped local profile ({local}) >= {GOALS['monolith']}x the "
                  f"monolith: {ratio:.2f} {verdict(ratio >= GOALS['monolith'])}; "
                  f"(CPU per request, monolith/{local}: {mono_cpu / cpu:.2f})")  # fmt: skip
    if "hops" in report:
        hops = report["hops"]
        print()
        print(f"3. Per hop, split topology, one request at a time (median of {args.sequential}, "
              "batching off)")  # fmt: skip
        floor = report["hop_floor"]
        print(f"{'stage':18}{'round trip':>11}{'compute':>9}{'hop adds':>10}{'called alone':>14}")
        added, worst = 0.0, 0.0
        local = {"business_rules"} | (
            {"preprocess"} if report["preprocess_in"] == "ingress" else set()
        )
        for stage, (rt, comp) in hops["hops"].items():
            hop = 0.0 if stage in local else rt - comp  # in process: no hop
            added += hop
            worst = max(worst, hop)
            alone = f"{floor['alone'][stage]:14.2f}" if stage in floor["alone"] else ""
            note = "  (in the ingress process)" if stage in local else ""
            print(f"{stage:18}{rt:11.2f}{comp:9.2f}{hop:10.2f}{alone}{note}")
        print(f"{'all hops':18}{'':11}{'':9}{added:10.2f}")
        print(f"   goal: <= {GOALS['hop_ms']} ms p50 per hop: worst {worst:.2f} ms "
              f"{verdict(worst <= GOALS['hop_ms'])}; a bare call to a no-op deployment from "
              f"a replica, same cluster, same minute: {floor['bare']:.2f} ms; each stage called "
              f"alone from a replica (no other stage of the request running): worst "
              f"{max(floor['alone'].values()):.2f} ms; a no-op that works 2 ms in pure Python "
              f"before it answers: {floor['spin']:.2f} ms")  # fmt: skip
        apart = report["hops_apart"]
        rt, comp = apart["hops"]["preprocess"]
        print(f"decoding in a Preprocess deployment instead (preprocess_in: deployment): its hop "
              f"adds {rt - comp:.2f} ms; the pipeline at the ingress {apart['ingress_total']:.1f} "
              f"ms, at the client {apart['client']:.1f} ms")  # fmt: skip
        print(f"pipeline at the ingress {hops['ingress_total']:.1f} ms; at the client "
              f"{hops['client']:.1f} ms (adds the HTTP ingress); the same decode and models in "
              f"one process {report['in_process_ms']:.1f} ms per image")  # fmt: skip


if __name__ == "__main__":
    main()

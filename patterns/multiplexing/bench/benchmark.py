"""What multiplexing buys, measured: cache hit rate and latency over 1,000 forecasters under
Zipf traffic, and the chat's speed and the memory one shared base model saves.

    python -m patterns.multiplexing.bench.benchmark [forecast] [--serve] [--requests 3000]
    python -m patterns.multiplexing.bench.benchmark chat [--device auto|cpu|cuda] [--tokens 64]
    python -m patterns.multiplexing.bench.benchmark routing [--requests 3000] [--repeats 3]

forecast (about a minute; ``--serve`` adds about two more):
1. LRU hit rate of the replica cache for Zipf(s) traffic over the 1,000 ids, per cache size,
   for one replica, and for two replicas with Serve's routing by model id (each id goes to
   the replica that holds it) against random routing (every replica sees every id).
2. One replica's request path in this process (index lookup, cache, predict) on the real
   model store: p50/p95 with the configured cache against loading the model every request;
   load latency; memory the cache charges and the process's RSS with the cache full.
3. ``--serve``: the same trace through Serve (the ingress handle, 8 callers, two replicas,
   default config) against the same app with ``cache.max_models: 0``; hit rate and RSS from
   the replicas' own stats.

routing (about eleven minutes on two cores with ``--requests 2000 --warmup 2000``): the same
app through Serve under three arms, alternated and repeated: affinity routing (routing.py),
Serve's default multiplexed routing (config.yaml's default), and load-per-request (cache off).
Each arm gets a fresh app, a warm-up (``--warmup`` requests, not measured) and then the
measured requests of the same trace; prints hit rate, p50/p95 and loads per minute per run and
their median and spread, and writes ``routing.png`` next to this file.

chat (the GPU-ready entry: on a GPU machine ``--device auto`` uses it; CPU otherwise):
time to first token and tokens/s for one tenant, and the memory of N tenants sharing one
replica (base model + N adapters) against one replica per tenant (N base models).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
from collections import Counter
from typing import Any

import numpy as np

from core.model_store import ModelStore
from patterns.multiplexing.artifacts import ensure_artifacts, store_ids
from patterns.multiplexing.cache import ModelCache
from patterns.multiplexing.catalog import ModelIndex
from patterns.multiplexing.deployments import CacheArgs, ChatArgs, ForecastArgs, rss_mb
from patterns.multiplexing.forecast_service import ForecastService


def machine() -> str:
    gpu = ""
    if _local_gpus():
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.node()}: {os.cpu_count()} CPUs, {mem:.0f} GiB RAM{gpu or ', no GPU'}"


def _local_gpus() -> float:
    from core.resources import cluster_gpu_count

    return cluster_gpu_count()


def zipf_trace(n_requests: int, n_ids: int = 1000, s: float = 1.1, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_ids + 1) ** s
    p /= p.sum()
    ids = store_ids(n_ids)
    # popularity rank is shuffled over ids, so the hot stores are not simply the first ones
    order = rng.permutation(n_ids)
    return [ids[order[k]] for k in rng.choice(n_ids, size=n_requests, p=p)]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


# ------------------------------------------------------------------------------ 1. hit rate
async def _lru_hit_rate(trace: list[str], size: int, replicas: int, affinity: bool) -> float:
    async def free_load(key: str) -> str:
        return key

    caches = [
        ModelCache(free_load, lambda _v: 1, max_models=size, max_bytes=1 << 40)
        for _ in range(replicas)
    ]
    home: dict[str, int] = {}
    rng = np.random.default_rng(1)
    warm = len(trace) // 4  # the first quarter warms the caches and is not counted
    hits = 0
    for i, key in enumerate(trace):
        if affinity:  # Serve: a known id goes where it is; a new one to the emptiest replica
            r = home.get(key)
            if r is None or key not in caches[r]:
                r = min(range(replicas), key=lambda j: len(caches[j]))
                home[key] = r
        else:
            r = int(rng.integers(replicas))
        _, outcome = await caches[r].get(key)
        hits += outcome == "hit" and i >= warm
    return hits / (len(trace) - warm)


def hit_rates(requests: int, s: float) -> None:
    trace = zipf_trace(requests, s=s)
    print(f"\n1. LRU hit rate, Zipf s={s} over 1,000 ids, {requests} requests (first 25% warm-up)")
    print("   cache/replica | 1 replica | 2 replicas, routed by id | 2 replicas, random")
    for size in (64, 128, 256, 512, 1000):
        one = asyncio.run(_lru_hit_rate(trace, size, 1, True))
        aff = asyncio.run(_lru_hit_rate(trace, size, 2, True))
        rnd = asyncio.run(_lru_hit_rate(trace, size, 2, False))
        print(f"   {size:>13} | {one:9.1%} | {aff:24.1%} | {rnd:18.1%}")


# ------------------------------------------------------------------------------ 2. in process
async def _serve_trace(
    services: list[ForecastService], trace: list[str], warm: int, measured: int
) -> tuple[list[float], float]:
    """Latency of ``measured`` requests after ``warm``, routed by id like Serve; hit rate."""
    home: dict[str, int] = {}
    out, hits = [], 0
    for i, model_id in enumerate(trace[: warm + measured]):
        r = home.get(model_id)
        if r is None or model_id not in services[r].cache:
            r = min(range(len(services)), key=lambda j: len(services[j].cache))
            home[model_id] = r
        t0 = time.perf_counter()
        answer = (await services[r].forecast_batch(model_id, [{"horizon_days": 7}]))[0]
        if i >= warm:
            out.append((time.perf_counter() - t0) * 1000)
            hits += answer["served_by"]["cache"] == "hit"
        assert "error" not in answer, answer
    return out, hits / max(len(out), 1)


def in_process(
    store: ModelStore, requests: int, s: float, replicas: int = 2, baseline_requests: int = 0
) -> None:
    index = ModelIndex.load(store, "forecast-index")
    cache = CacheArgs()
    trace = zipf_trace(requests, s=s, seed=2)
    warm = len(trace) // 4
    rss0 = rss_mb()

    def services(max_models: int) -> list[ForecastService]:
        return [
            ForecastService(store, index, max_models=max_models, max_bytes=cache.max_bytes)
            for _ in range(replicas)
        ]

    cached = services(cache.max_models)
    t_cached, hit = asyncio.run(_serve_trace(cached, trace, warm, len(trace)))
    rss1 = rss_mb()
    baseline = services(0)  # every request loads: no warm-up needed, fewer requests suffice
    n_base = baseline_requests or len(trace) - warm
    t_base, _ = asyncio.run(_serve_trace(baseline, trace[warm:], 0, n_base))
    loads = [ms for svc in baseline for ms in svc.cache.stats.load_ms]
    held = [svc.cache.snapshot() for svc in cached]
    print(f"\n2. The request path (index, cache, predict) of {replicas} replicas routed by id, in "
          f"this process: {requests} Zipf(s={s}) requests, the first 25% warm-up")  # fmt: skip
    print(
        f"   cache {cache.max_models} models / {cache.max_bytes // 2**20} MiB per replica: "
        f"hit rate {hit:.1%}, p50 {pct(t_cached, 50):.3f} ms, p95 {pct(t_cached, 95):.3f} ms"
    )
    print(f"   load per request (max_models 0, {len(t_base)} requests): "
          f"p50 {pct(t_base, 50):.3f} ms, "
          f"p95 {pct(t_base, 95):.3f} ms -> p95 {pct(t_base, 95) / pct(t_cached, 95):.1f}x "
          "slower than with the cache")  # fmt: skip
    print(f"   one load ({store.root_uri.split(':')[0]}:// read + sha256 + parse): "
          f"p50 {pct(loads, 50):.2f} ms, "
          f"p95 {pct(loads, 95):.2f} ms")  # fmt: skip
    print(f"   memory per replica: the cache charges {[h['bytes'] // 1024 for h in held]} KiB "
          f"for {[h['models'] for h in held]} models; this process's RSS went {rss0} -> {rss1} "
          "MiB filling both")  # fmt: skip


# ------------------------------------------------------------------------------ 3. Serve
def through_serve(
    store: ModelStore,
    storage_options: dict[str, Any] | None,
    requests: int,
    s: float,
    concurrency: int = 8,
    baseline_requests: int = 1000,
) -> None:
    import json

    from ray import serve

    from cluster.local import local_serve
    from patterns.multiplexing.app import MultiplexArgs, build_app

    env = {"COOKBOOK_MODEL_STORE_URI": store.root_uri}
    if storage_options:
        env["COOKBOOK_MODEL_STORE_OPTIONS"] = json.dumps(storage_options)
    trace = zipf_trace(requests, s=s, seed=3)
    warm = len(trace) // 4
    print(f"\n3. Through Serve: ingress handle, {concurrency} callers, 2 forecaster replicas, "
          f"store {store.root_uri.split(':')[0]}://, {requests} Zipf(s={s}) requests (first 25% "
          "warm-up)")  # fmt: skip
    runs = (
        ("cache 512 (config)", {}, trace),
        ("load per request", {"max_models": 0}, trace[warm : warm + baseline_requests]),
    )
    with local_serve(4, env=env):
        for label, cache, calls in runs:
            args = MultiplexArgs(
                forecast=ForecastArgs(cache=CacheArgs(**cache)), chat={"enabled": False}
            )
            handle = serve.run(build_app(args), name="mux-bench", route_prefix="/mux-bench")
            skip = warm if calls is trace else 0
            lat, hit = asyncio.run(_drive(handle, calls, concurrency, skip))
            stats = asyncio.run(_stats(handle))
            loads = [r["cache"]["load_ms_p50"] for r in stats]
            print(f"   {label:>20}: p50 {pct(lat, 50):.1f} ms, p95 {pct(lat, 95):.1f} ms "
                  f"({len(lat)} requests), hit rate {hit:.1%}, load p50 per replica {loads} "
                  f"ms, RSS per replica {[r['rss_mb'] for r in stats]} MiB, models held "
                  f"{[r['cache']['models'] for r in stats]}")  # fmt: skip
            serve.delete("mux-bench")


async def _drive(
    handle: Any, trace: list[str], concurrency: int, skip: int
) -> tuple[list[float], float]:
    queue = list(enumerate(trace))[::-1]
    lat: list[float] = []
    hits = 0

    async def worker() -> None:
        nonlocal hits
        while queue:
            i, model_id = queue.pop()
            t0 = time.perf_counter()
            answer = await handle.forecast_payload.remote(model_id, {"horizon_days": 7})
            if i >= skip:
                lat.append((time.perf_counter() - t0) * 1000)
                hits += answer["served_by"]["cache"] == "hit"

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return lat, hits / max(len(lat), 1)


async def _stats(handle: Any) -> list[dict[str, Any]]:
    info = await handle.model_info.remote()
    return info["forecasters"]["replicas"]


# ------------------------------------------------------------------------------ routing
ROUTING_ARMS: dict[str, dict[str, Any]] = {
    "affinity": {"routing": "affinity"},
    "serve default": {"routing": "serve"},
    "load per request": {"routing": "serve", "cache": {"max_models": 0}},
}


async def _drive_window(
    handle: Any, trace: list[str], concurrency: int
) -> tuple[list[float], Counter[str], float]:
    """Latencies (ms), cache outcomes and the wall time of ``trace`` at ``concurrency``."""
    queue = trace[::-1]
    lat: list[float] = []
    outcomes: Counter[str] = Counter()

    async def worker() -> None:
        while queue:
            model_id = queue.pop()
            t0 = time.perf_counter()
            answer = await handle.forecast_payload.remote(model_id, {"horizon_days": 7})
            lat.append((time.perf_counter() - t0) * 1000)
            outcomes[answer["served_by"]["cache"]] += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return lat, outcomes, time.perf_counter() - t0


def _loads(stats: list[dict[str, Any]]) -> int:
    return sum(r["cache"]["loads"] for r in stats)


def routing(
    requests: int, warmup: int, s: float, repeats: int, concurrency: int, baseline: int
) -> None:
    from ray import serve

    from cluster.local import local_serve
    from patterns.multiplexing.app import MultiplexArgs, build_app

    cache = CacheArgs()
    print(f"\nRouting through Serve: ingress handle, {concurrency} callers, 2 ingress and 2 "
          f"forecaster replicas, cache {cache.max_bytes // 2**20} MiB / {cache.max_models} "
          f"models per replica; trace Zipf(s={s}) over 1,000 ids, popularity shuffled, "
          f"{warmup} warm-up + {requests} measured requests per arm (load per request: "
          f"{baseline} measured, no warm-up); {repeats} repeats, arm order alternated")  # fmt: skip
    runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in ROUTING_ARMS}
    with local_serve(4):
        for rep in range(repeats):
            trace = zipf_trace(warmup + requests, s=s, seed=100 + rep)
            arms = list(ROUTING_ARMS) if rep % 2 == 0 else list(ROUTING_ARMS)[::-1]
            for arm in arms:
                forecast = ForecastArgs(**ROUTING_ARMS[arm])
                args = MultiplexArgs(forecast=forecast, chat={"enabled": False})
                handle = serve.run(build_app(args), name="mux-routing", route_prefix="/mux-r")
                cold = arm == "load per request"
                if not cold:
                    asyncio.run(_drive_window(handle, trace[:warmup], concurrency))
                before = _loads(asyncio.run(_stats(handle)))
                window = trace[warmup : warmup + (baseline if cold else requests)]
                lat, outcomes, wall = asyncio.run(_drive_window(handle, window, concurrency))
                stats = asyncio.run(_stats(handle))
                serve.delete("mux-routing")
                row = {
                    "hit_rate": outcomes["hit"] / len(lat),
                    "p50": pct(lat, 50),
                    "p95": pct(lat, 95),
                    "loads_per_min": (_loads(stats) - before) / wall * 60,
                    "rps": len(lat) / wall,
                }
                runs[arm].append(row)
                held = [r["cache"]["models"] for r in stats]
                print(f"   run {rep + 1} {arm:>16}: hit rate {row['hit_rate']:6.1%}, p50 "
                      f"{row['p50']:6.1f} ms, p95 {row['p95']:6.1f} ms, "
                      f"{row['loads_per_min']:7.0f} loads/min, {row['rps']:5.0f} req/s, "
                      f"models held {held}", flush=True)  # fmt: skip
    print("\n   median (min-max) over the repeats:")
    for arm, rows in runs.items():
        cells = []
        for key, fmt in (("hit_rate", "{:.1%}"), ("p50", "{:.1f} ms"), ("p95", "{:.1f} ms"),
                         ("loads_per_min", "{:.0f}/min")):  # fmt: skip
            v = [r[key] for r in rows]
            lo, mid, hi = min(v), statistics.median(v), max(v)
            cells.append(f"{key} {fmt.format(mid)} ({fmt.format(lo)}-{fmt.format(hi)})")
        print(f"   {arm:>16}: " + ", ".join(cells))
    base = statistics.median(r["p95"] for r in runs["load per request"])
    for arm in ("affinity", "serve default"):
        p95 = statistics.median(r["p95"] for r in runs[arm])
        print(f"   {arm}: p95 {base / p95:.1f}x better than load per request")
    _routing_png(runs, s, cache)


def _routing_png(runs: dict[str, list[dict[str, float]]], s: float, cache: CacheArgs) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(runs)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label, scale in ((axes[0], "hit_rate", "hit rate (%)", 100.0),
                                  (axes[1], "p95", "p95 latency (ms)", 1.0)):  # fmt: skip
        mids = [statistics.median(r[key] for r in runs[a]) * scale for a in arms]
        lows = [m - min(r[key] for r in runs[a]) * scale for m, a in zip(mids, arms, strict=True)]
        highs = [max(r[key] for r in runs[a]) * scale - m for m, a in zip(mids, arms, strict=True)]
        ax.bar(arms, mids, yerr=[lows, highs], capsize=4, color=["#2a7", "#79b", "#c75"])
        ax.set_ylabel(label)
        ax.tick_params(axis="x", labelsize=8)
        for i, m in enumerate(mids):
            ax.annotate(f"{m:.1f}", (i, m), ha="center", va="bottom", fontsize=8)
    fig.suptitle(
        f"1,000 forecasters, 2 replicas x {cache.max_bytes // 2**20} MiB cache, Zipf s={s} "
        "(median, min-max bars)",
        fontsize=9,
    )
    fig.tight_layout()
    out = os.path.join(os.path.dirname(__file__), "routing.png")
    fig.savefig(out, dpi=110)
    print(f"   wrote {out}")


# ------------------------------------------------------------------------------ chat
def chat(device: str, tokens: int, tenant: str = "pirate-co") -> None:
    from core.resources import torch_device
    from patterns.multiplexing.chat import ChatEngine, ChatLimits
    from patterns.multiplexing.tenants import TENANT_STYLES

    store = ModelStore.open()
    ensure_artifacts(store, only="chat")
    index = ModelIndex.load(store, "chat-adapter-index")
    dev = torch_device(device != "cpu") if device == "auto" else device
    rss0 = rss_mb()
    t0 = time.perf_counter()
    defaults = ChatArgs()
    engine = ChatEngine(
        store,
        index,
        ChatLimits(max_tokens=max(tokens, 256)),
        device=dev,
        torch_threads=defaults.torch_threads if dev == "cpu" else None,
        repetition_penalty=defaults.repetition_penalty,
    )
    load_s = time.perf_counter() - t0
    rss_base = rss_mb()
    print(f"\nchat: SmolLM2-135M-Instruct on {dev}; base model loaded in {load_s:.1f}s; "
          f"RSS {rss0} -> {rss_base} MiB")  # fmt: skip

    async def one(question: str) -> dict[str, Any]:
        payload = {"model": tenant, "max_tokens": tokens,
                   "messages": [{"role": "user", "content": question}]}  # fmt: skip
        end: dict[str, Any] = {}
        async for item in engine.stream(tenant, payload):
            if item["type"] == "end":
                end = item
        return end

    questions = ["Tell me a long story about the sea.", "Explain how rain forms, in detail.",
                 "Describe a day in a busy harbour."]  # fmt: skip
    asyncio.run(one("Warm up."))
    runs = [asyncio.run(one(q)) for q in questions]
    # A replica serving one tenant, once it has answered: the weights read from the
    # de-quantized copy are memory-mapped, so RSS right after the load is not the model yet.
    rss_one = rss_mb()
    ttft = [r["time_to_first_token_ms"] for r in runs]
    tps = [r["tokens_per_s"] for r in runs]
    print(f"   tenant {tenant}, up to {tokens} new tokens, {len(runs)} answers: time to first "
          f"token median {statistics.median(ttft):.0f} ms, {statistics.median(tps):.1f} "
          f"tokens/s (one stream; {[r['completion_tokens'] for r in runs]} tokens)")  # fmt: skip

    async def load_all() -> None:
        for t in TENANT_STYLES:
            adapter, _ = await engine.adapter_for(t)
            if adapter is not None:
                await asyncio.to_thread(engine._install, adapter)

    asyncio.run(load_all())
    rss_all = rss_mb()
    n = len(TENANT_STYLES)
    adapter_mb = engine.adapters.bytes / 2**20
    base_mb = (rss_one or 0) - (rss0 or 0)
    shared = rss_all or 0.0
    per_tenant_replica = rss_one or 0.0  # base model + its one adapter, having answered
    separate = n * per_tenant_replica
    print(f"   adapters: {n} tenants, {adapter_mb:.1f} MiB of LoRA weights in all; "
          f"base model and one tenant add {base_mb:.0f} MiB to the process")  # fmt: skip
    print(
        f"   {n} tenants sharing one replica: ~{shared:.0f} MiB RSS; one replica per tenant: "
        f"~{separate:.0f} MiB ({separate / shared:.1f}x the memory, {n}x the replicas)"
    )
    print(f"   per extra tenant: shared +{adapter_mb / n:.1f} MiB, "
          f"separate +{per_tenant_replica:.0f} MiB and one more replica")  # fmt: skip


class LocalS3:
    """moto's S3-compatible server in a subprocess on loopback: a model store with real
    request latency (what a replica pays when its models live in an object store)."""

    def __init__(self) -> None:
        import socket
        import subprocess
        import sys

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        endpoint = f"http://127.0.0.1:{self.port}"
        self.options = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        }
        import boto3

        deadline = time.time() + 30
        while True:
            try:
                boto3.client(
                    "s3", endpoint_url=endpoint, region_name="us-east-1",
                    aws_access_key_id="testing",
                    aws_secret_access_key="testing",  # noqa: S106 - moto's fixed local creds
                ).create_bucket(Bucket="models")  # fmt: skip
                break
            except Exception:
                if time.time() > deadline:
                    self.stop()
                    raise
                time.sleep(0.3)

    def store(self) -> ModelStore:
        return ModelStore("s3://models/cookbook", self.options)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "what", nargs="?", choices=["forecast", "chat", "routing"], default="forecast"
    )
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--serve", action="store_true", help="also measure through Serve")
    parser.add_argument(
        "--store",
        choices=["local", "s3"],
        default="local",
        help="where the models live for part 2: the local store, or an S3-compatible server "
        "on loopback (moto; the 1,000 models are written there first)",
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3000, help="routing: per arm")
    parser.add_argument("--repeats", type=int, default=3, help="routing: runs per arm")
    parser.add_argument("--concurrency", type=int, default=8, help="routing: callers")
    parser.add_argument("--baseline", type=int, default=600, help="routing: cache-off requests")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    if args.what == "chat":
        chat(args.device, args.tokens)
        return
    if args.what == "routing":
        ensure_artifacts(ModelStore.open(), only="forecasters")
        routing(args.requests, args.warmup, args.zipf, args.repeats, args.concurrency,
                args.baseline)  # fmt: skip
        return
    store = ModelStore.open()
    ensure_artifacts(store, only="forecasters")
    hit_rates(max(args.requests, 20_000), args.zipf)
    s3 = LocalS3() if args.store == "s3" else None
    try:
        options = None
        if s3 is not None:
            from patterns.multiplexing.artifacts import build_forecasters

            t0 = time.perf_counter()
            store, options = s3.store(), s3.options
            build_forecasters(store)
            print(f"\n(1,000 forecasters written to {store.root_uri} on a local moto server in "
                  f"{time.perf_counter() - t0:.0f}s)")  # fmt: skip
        in_process(store, max(args.requests, 20_000), args.zipf, baseline_requests=1000)
        if args.serve:
            through_serve(store, options, args.requests, args.zipf)
    finally:
        if s3 is not None:
            s3.stop()


if __name__ == "__main__":
    main()

"""The issue 12 table for the current code, on one GPU node: ceiling, models, HTTP.

    python -m patterns.pipeline.bench.gpu_bench            # one H100/H200, 16 cores: ~6-7 minutes
    python -m patterns.pipeline.bench.gpu_bench --quick    # CPU-only box: small sizes, one replica
                                                     # per deployment, ~4 minutes
    python -m patterns.pipeline.bench.gpu_bench --sections ceiling,models   # no Ray at all

Rows, each with img/s (one image per request through HTTP):

1. ``ceiling``: the raw ceiling. The three models in this one process on the GPU, batch 64,
   fed by PNG decoding (``preprocess.prepare``, as the app decodes) on N processes.
2. ``models``: the three models alone on images already on the GPU, batch 1/16/64/256
   (what batching can buy at most).
3. ``http``: through HTTP with ``patterns.pipeline.bench.loadgen`` (several client processes):
   the shipped local profile (config.yaml) in both ingress modes at c=8/64/256; the GPU
   profile (config.gpu.yaml) in HAProxy mode at the same levels; and the GPU profile with
   batching off (``max_batch_size: 1``, same replicas) at c=64. Each ingress mode runs in its
   own process and Ray cluster (Serve reads the mode when the cluster starts).

Goals printed beside the figures (issue 12): the GPU profile through HTTP >= 60% of the
ceiling; batching on >= 2x batching off at the same replicas, with a better p95. GPU busy %
is the mean of ``nvidia-smi`` samples during each cell (n/a without one).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]  # the repo: the children run from here
PATTERN = Path(__file__).resolve().parents[1]  # patterns/pipeline: its config files
GOALS = {"ceiling": 0.6, "batching": 2.0}


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _fused_stages(device: str) -> Any:
    import torch

    from core.model_store import ModelStore
    from patterns.pipeline.artifacts import ensure_artifacts
    from patterns.pipeline.stages import FusedStages

    ensure_artifacts()
    torch.set_num_threads(1 if device == "cuda" else max(1, (os.cpu_count() or 2) // 2))
    return FusedStages.load(ModelStore.open(), device)


def _decode(png: bytes) -> Any:
    from patterns.pipeline.preprocess import ImageLimits, prepare

    return prepare(png, ImageLimits()).image  # type: ignore[union-attr]


class GpuBusy:
    """Mean GPU utilisation (nvidia-smi samples every 0.5 s) while the block runs."""

    def __enter__(self) -> GpuBusy:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._stop.wait(0.5):
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=6)

    @property
    def busy(self) -> str:
        return f"{statistics.fmean(self.samples):.0f}%" if self.samples else "n/a"


# ------------------------------------------------------------------------------ in process
def ceiling(duration: float, batch: int, processes: int) -> dict[str, Any]:
    """img/s of PNG decode on ``processes`` processes feeding the three models, batch
    ``batch``, in this process."""
    import multiprocessing as mp

    from patterns.pipeline.scenes import scene_png

    device = _device()
    stages = _fused_stages(device)
    pngs = [scene_png("heldout", i) for i in range(256)]
    stages.run_models([_decode(p) for p in pngs[:batch]])  # warm up at this batch size
    _sync(device)

    def chunk(i: int) -> list[bytes]:
        return [pngs[(i * batch + j) % len(pngs)] for j in range(batch)]

    # The decoders work `depth` batches ahead of the models (bounded: a pool fed from an
    # endless iterator would queue work without limit).
    depth, per_task = 3, max(1, batch // (2 * processes))
    done = 0
    with mp.get_context("spawn").Pool(processes) as pool, GpuBusy() as gpu:
        pending = collections.deque(
            pool.map_async(_decode, chunk(i), chunksize=per_task) for i in range(depth)
        )
        pending.popleft().get()  # the pool is up; not counted
        nxt = depth
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < duration:
            images = pending.popleft().get()
            pending.append(pool.map_async(_decode, chunk(nxt), chunksize=per_task))
            nxt += 1
            stages.run_models(images)
            done += batch
        _sync(device)
        elapsed = time.perf_counter() - t0
        pool.terminate()
    return {"img_s": done / elapsed, "gpu": gpu.busy, "device": device}


def models_only(duration: float, batches: list[int]) -> dict[int, dict[str, Any]]:
    """img/s of the three models on images already on the device, per batch size."""
    import torch

    from patterns.pipeline.scenes import make_scene

    device = _device()
    stages = _fused_stages(device)
    images = [make_scene("heldout", i).image for i in range(max(batches))]
    out = {}
    for b in batches:
        x = stages.detector._input(images[:b])
        batch = images[:b]

        def once(x: Any = x, batch: list = batch) -> None:
            dets = stages.detector.answer(x, batch)
            stages.scene.answer(x, batch)
            stages.digits.answer(x, [(None, d["boxes"]) for d in dets])

        with torch.inference_mode():
            once()
            _sync(device)
            done, t0 = 0, time.perf_counter()
            with GpuBusy() as gpu:
                while time.perf_counter() - t0 < duration:
                    once()
                    done += b
                _sync(device)
            out[b] = {"img_s": done / (time.perf_counter() - t0), "gpu": gpu.busy}
    return out


# ------------------------------------------------------------------------------ HTTP
def _profile(
    path: Path, port: int, update: dict[str, Any] | None = None, quick: bool = False
) -> Any:
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(path.read_text())
    if update:
        config["applications"][0]["args"] = {**config["applications"][0]["args"], **update}
    if quick:  # a small box: one replica per deployment, the same code paths
        for d in config["applications"][0].get("deployments", []):
            d.pop("autoscaling_config", None)
            d["num_replicas"] = 1
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    return ServeDeploySchema.model_validate(config)


def http_child(
    mode: str, plan: list[dict[str, Any]], duration: float, processes: int, quick: bool
) -> int:
    """In its own process: a local cluster in ingress ``mode``; each planned profile deployed
    and driven at its concurrency levels; one RESULT line per cell."""
    from cluster.ingress_mode import apply_ingress_mode

    apply_ingress_mode(mode)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve
    from ray.serve._private import api as serve_api

    from patterns.pipeline.app import PipelineArgs
    from patterns.pipeline.bench.benchmark import (
        batching_off,
        bodies,
        free_port,
        requests_for,
        wait_ready,
    )
    from patterns.pipeline.bench.loadgen import run_load

    pngs = bodies()
    port = free_port()
    # quick (a CPU box): logical CPUs enough to place the GPU profile's one-replica version.
    cpus = max(16, os.cpu_count() or 2) if quick else None
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")  # fmt: skip
    try:
        client = serve_api.serve_start(http_options={"host": "127.0.0.1", "port": port})
        for cell in plan:
            path = PATTERN / cell["config"]
            update = None
            if cell.get("batching") == "off":
                import yaml

                args = yaml.safe_load(path.read_text())["applications"][0]["args"]
                update = batching_off(PipelineArgs(**args)).model_dump()
            client.deploy_apps(_profile(path, port, update, quick), _blocking=True)
            wait_ready(f"http://127.0.0.1:{port}/pipeline/read", pngs[0], answers=8)
            # New replicas meet new batch shapes (first passes build kernels): warm up longer
            # than between two levels of the same deployment.
            warmup = 5.0
            for c in cell["levels"]:
                with GpuBusy() as gpu:
                    r = run_load(
                        f"http://127.0.0.1:{port}", requests_for("/pipeline", pngs),
                        concurrency=c, duration_s=duration, warmup_s=warmup,
                        processes=min(processes, c),
                    )  # fmt: skip
                row = {**cell, "mode": mode, "c": c, **r.row(), "gpu": gpu.busy}
                print("RESULT " + json.dumps(row), flush=True)
                warmup = 2.0
            serve.delete("pipeline")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def http_rows(
    plan: dict[str, list[dict]], duration: float, processes: int, quick: bool
) -> list[dict]:
    rows = []
    for mode, cells in plan.items():
        cmd = [sys.executable, "-m", "patterns.pipeline.bench.gpu_bench", "--child", mode,
               "--plan", json.dumps(cells), "--duration", str(duration),
               "--processes", str(processes)] + (["--quick"] if quick else [])  # fmt: skip
        print(f"[http] {mode} ingress: {[c['label'] for c in cells]} ...", flush=True)
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        got = [json.loads(ln[7:]) for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        for row in got:
            print(f"  {row['label']:<34} c={row['c']:<4} {row['rps']:>8.1f} img/s", flush=True)
        if out.returncode != 0:
            print(out.stdout[-2000:], out.stderr[-4000:], flush=True)
        rows += got
    return rows


# ------------------------------------------------------------------------------ report
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a CPU-only box)")
    parser.add_argument("--sections", default="ceiling,models,http")
    parser.add_argument("--duration", type=float, default=None, help="seconds per cell")
    parser.add_argument("--processes", type=int, default=None, help="client processes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 2
    duration = args.duration or (2.0 if args.quick else 8.0)
    processes = args.processes or (1 if args.quick else min(6, max(1, cores // 3)))
    if args.child:
        return http_child(args.child, json.loads(args.plan), duration, processes, args.quick)

    from patterns.pipeline.bench.loadgen import machine

    sections = set(args.sections.split(","))
    levels = [4, 8] if args.quick else [8, 64, 256]
    batches = [1, 16] if args.quick else [1, 16, 64, 256]
    ceiling_batch = 16 if args.quick else 64
    decoders = 1 if args.quick else max(1, cores - 4)
    print(f"machine: {machine()}", flush=True)
    t_start = time.perf_counter()
    table: list[tuple[str, str, str, str]] = []  # what, img/s, p50 ms, GPU busy
    raw = None
    if "ceiling" in sections:
        raw = ceiling(duration * 1.5, ceiling_batch, decoders)
        table.append((
            f"raw ceiling: three models in one process ({raw['device']}), PNG decode on "
            f"{decoders} processes, batch {ceiling_batch}",
            f"{raw['img_s']:,.0f}", "", raw["gpu"],
        ))  # fmt: skip
        print(f"[ceiling] {raw['img_s']:.0f} img/s", flush=True)
    if "models" in sections:
        only = models_only(duration, batches)
        table.append((
            "models only on device tensors, batch " + " / ".join(map(str, batches)),
            " / ".join(f"{only[b]['img_s']:,.0f}" for b in batches), "",
            " / ".join(only[b]["gpu"] for b in batches),
        ))  # fmt: skip
        print(f"[models] {only}", flush=True)
    rows: list[dict] = []
    if "http" in sections:
        shipped = {"label": "shipped config.yaml", "config": "config.yaml", "levels": levels}
        gpu = {"label": "GPU profile (config.gpu.yaml)", "config": "config.gpu.yaml",
               "levels": levels}  # fmt: skip
        gpu_off = {**gpu, "label": "GPU profile, batching off", "batching": "off",
                   "levels": [levels[len(levels) // 2]]}  # fmt: skip
        plan = {"default": [shipped], "haproxy": [shipped, gpu, gpu_off]}
        rows = http_rows(plan, duration, processes, args.quick)
        for label, mode in (("shipped config.yaml", "default"), ("shipped config.yaml", "haproxy"),
                            ("GPU profile (config.gpu.yaml)", "haproxy"),
                            ("GPU profile, batching off", "haproxy")):  # fmt: skip
            cells = [r for r in rows if r["label"] == label and r["mode"] == mode]
            if cells:
                table.append((
                    f"{label}, {mode} ingress, c=" + " / ".join(str(r["c"]) for r in cells),
                    " / ".join(f"{r['rps']:,.0f}" for r in cells),
                    " / ".join(f"{r['p50_ms']:,.0f}" for r in cells),
                    " / ".join(r["gpu"] for r in cells),
                ))  # fmt: skip
    print()
    print(f"machine: {machine()}; {time.perf_counter() - t_start:.0f} s in all")
    print()
    print("| what | img/s | p50 ms | GPU busy |")
    print("| --- | --- | --- | --- |")
    for what, img_s, p50, busy in table:
        print(f"| {what} | {img_s} | {p50} | {busy} |")
    _goals(rows, raw)
    return 0


def _goals(rows: list[dict], raw: dict[str, Any] | None) -> None:
    gpu = [r for r in rows if r["label"].startswith("GPU profile (")]
    off = [r for r in rows if r["label"] == "GPU profile, batching off"]
    if gpu and raw:
        best = max(gpu, key=lambda r: r["rps"])
        ratio = best["rps"] / raw["img_s"]
        ok = "met" if ratio >= GOALS["ceiling"] else "NOT met"
        print(f"goal: GPU profile through HTTP >= {GOALS['ceiling']:.0%} of the ceiling: "
              f"{best['rps']:.0f} / {raw['img_s']:.0f} = {ratio:.2f} "
              f"(c={best['c']}) {ok}")  # fmt: skip
    if gpu and off:
        on = next((r for r in gpu if r["c"] == off[0]["c"]), None)
        if on:
            ratio, p95 = on["rps"] / off[0]["rps"], on["p95_ms"] / off[0]["p95_ms"]
            ok = "met" if ratio >= GOALS["batching"] and p95 < 1 else "NOT met"
            print(f"goal: batching on >= {GOALS['batching']:g}x off at the same replicas "
                  f"(c={on['c']}), better p95: {ratio:.2f}x, "
                  f"p95 on/off {p95:.2f} {ok}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())

"""One step-load run of Locust against one target, and what it measured.

``step_load`` runs ``locust -f loadtests/stepfile.py`` headless with ``--processes`` workers,
``--csv`` with full history and the HTML report kept in ``out_dir``; meanwhile it samples the
CPU time of the Locust processes and of the target's processes (psutil), so the report can say
whether the generator, not the server, was the limit. Each stage's rps, p50/p95 and failures
come from every request Locust recorded (``LOADTEST_SAMPLES``), failures included in the
latencies and counted, never dropped; Locust's own totals are kept to cross-check the count.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REQUEST = "patterns.pipeline.client:sample_request"


@dataclass
class Step:
    users: int
    requests: int
    failures: int
    rps: float
    p50_ms: float
    p95_ms: float

    @property
    def failure_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


@dataclass
class LoadRun:
    steps: list[Step]
    locust_requests: int  # Locust's own aggregated totals (csv), to cross-check ours
    locust_failures: int
    sampled_requests: int
    generator_cpu_s: float
    server_cpu_s: float
    generator_peak_core: float  # the busiest Locust process, fraction of one core
    wall_s: float
    cut_short: str | None = None
    files: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["steps"] = [asdict(s) for s in self.steps]
        return d


def step_stats(
    samples: np.ndarray, t0: float, users: list[int], step_s: float, settle_s: float
) -> list[Step]:
    """Per stage: the requests that ended in [start + settle, end) of that stage.

    ``samples``: rows of (end time, latency ms, ok 1/0). Failed requests count in the
    failures and in the latencies."""
    out = []
    for k, u in enumerate(users):
        lo, hi = t0 + k * step_s + settle_s, t0 + (k + 1) * step_s
        rows = samples[(samples[:, 0] >= lo) & (samples[:, 0] < hi)] if len(samples) else samples
        n = len(rows)
        lat = rows[:, 1] if n else np.array([np.nan])
        out.append(
            Step(
                users=u,
                requests=n,
                failures=int(n - rows[:, 2].sum()) if n else 0,
                rps=round(n / (hi - lo), 2),
                p50_ms=round(float(np.percentile(lat, 50)), 1) if n else float("nan"),
                p95_ms=round(float(np.percentile(lat, 95)), 1) if n else float("nan"),
            )
        )
    return out


def at_slo(steps: list[Step], slo_ms: float, max_failure_ratio: float = 0.01) -> Step | None:
    """The stage with the highest rps whose p95 holds the SLO (and whose failures stay under
    ``max_failure_ratio``); None when no stage does."""
    good = [
        s
        for s in steps
        if s.requests and s.p95_ms <= slo_ms and s.failure_ratio <= max_failure_ratio
    ]
    return max(good, key=lambda s: s.rps, default=None)


def _read_samples(folder: Path) -> np.ndarray:
    rows = []
    for path in glob.glob(str(folder / "samples-*.csv")):
        with open(path) as f:
            for line in f:
                parts = line.strip().split(",")
                if len(parts) == 3:
                    rows.append((float(parts[0]), float(parts[1]), float(parts[2])))
    return np.array(rows, dtype=float).reshape(-1, 3)


def _locust_totals(prefix: str) -> tuple[int, int]:
    try:
        with open(f"{prefix}_stats.csv") as f:
            total = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
        return int(total["Request Count"]), int(total["Failure Count"])
    except (OSError, StopIteration, KeyError, ValueError):
        return 0, 0


class CpuSampler:
    """CPU seconds of two process trees (the generator, the server), sampled each second;
    processes that come and go are counted while they live."""

    def __init__(self, gen_root: int, server_pids: Any) -> None:
        self.gen_root, self.server_pids = gen_root, server_pids
        self.seen: dict[int, tuple[str, float]] = {}
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _tree(self, root: int) -> list[Any]:
        import psutil

        try:
            p = psutil.Process(root)
            return [p, *p.children(recursive=True)]
        except psutil.Error:
            return []

    def _loop(self) -> None:
        import psutil

        last: dict[int, tuple[float, float]] = {}
        while not self._stop.is_set():
            procs = [("gen", p) for p in self._tree(self.gen_root)]
            for pid in self.server_pids():
                with contextlib.suppress(psutil.Error):
                    procs.append(("server", psutil.Process(pid)))
            now = time.monotonic()
            for kind, p in procs:
                try:
                    c = p.cpu_times()
                except psutil.Error:
                    continue
                cpu = c.user + c.system
                self.seen[p.pid] = (kind, cpu)
                if kind == "gen" and p.pid in last:
                    t_prev, c_prev = last[p.pid]
                    if now - t_prev > 0.5:
                        self.peak = max(self.peak, (cpu - c_prev) / (now - t_prev))
                last[p.pid] = (now, cpu)
            self._stop.wait(1.0)

    def __enter__(self) -> CpuSampler:
        self._start = {k: v for k, v in self._totals().items()}
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _totals(self) -> dict[str, float]:
        out = {"gen": 0.0, "server": 0.0}
        for kind, cpu in self.seen.values():
            out[kind] += cpu
        return out

    def used(self, start_server_cpu: float) -> tuple[float, float]:
        t = self._totals()
        return t["gen"], max(t["server"] - start_server_cpu, 0.0)


def server_cpu_now(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            c = psutil.Process(pid).cpu_times()
            total += c.user + c.system
        except psutil.Error:
            pass
    return total


def step_load(
    host: str,
    out_dir: Path,
    *,
    users: list[int],
    step_s: float,
    processes: int,
    server_pids: Any,
    alive: Any = None,
    request: str = REQUEST,
) -> LoadRun:
    """Run the step load against ``host``; files (csv, html, samples) land in ``out_dir``.

    ``alive()``: False when the target died; the run stops and says it was cut short."""
    out_dir.mkdir(parents=True, exist_ok=True)
    samples_dir = out_dir / "samples"
    samples_dir.mkdir(exist_ok=True)
    for old in samples_dir.glob("*"):
        old.unlink()
    prefix = str(out_dir / "locust")
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(ROOT / "loadtests" / "stepfile.py"),
        "--headless",
        "--host",
        host,
        "--csv",
        prefix,
        "--csv-full-history",
        "--html",
        str(out_dir / "locust.html"),
        "--stop-timeout",
        "5",
        "--loglevel",
        "WARNING",
    ]
    if processes > 1:
        cmd += ["--processes", str(processes)]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "LOADTEST_REQUEST": request,
        "LOADTEST_STEPS": ",".join(map(str, users)),
        "LOADTEST_STEP_S": str(step_s),
        "LOADTEST_SAMPLES": str(samples_dir),
    }
    cut: str | None = None
    server_start = server_cpu_now(server_pids())
    t_start = time.monotonic()
    with open(out_dir / "locust.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        with CpuSampler(proc.pid, server_pids) as cpu:
            try:
                limit = t_start + len(users) * step_s + 90
                while proc.poll() is None:
                    if alive is not None and not alive():
                        cut = "the target stopped during the load"
                        break
                    if time.monotonic() > limit:
                        cut = "Locust did not finish in time"
                        break
                    time.sleep(0.5)
            except KeyboardInterrupt:
                cut = "interrupted (Ctrl-C)"
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(20)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
            gen_cpu, server_cpu = cpu.used(server_start)
    wall = time.monotonic() - t_start
    samples = _read_samples(samples_dir)
    t0_file = samples_dir / "t0"
    t0 = (
        float(t0_file.read_text())
        if t0_file.exists()
        else (samples[:, 0].min() if len(samples) else 0)
    )
    settle = min(2.0, step_s / 4)
    steps = step_stats(samples, t0, users, step_s, settle)
    lreq, lfail = _locust_totals(prefix)
    if cut is None and not len(samples):
        tail = (out_dir / "locust.log").read_text(errors="replace")[-300:].strip()
        cut = f"Locust sent no requests (locust.log ends: {tail!r})"
    return LoadRun(
        steps=steps,
        locust_requests=lreq,
        locust_failures=lfail,
        sampled_requests=len(samples),
        generator_cpu_s=round(gen_cpu, 2),
        server_cpu_s=round(server_cpu, 2),
        generator_peak_core=round(cpu.peak, 2),
        wall_s=round(wall, 1),
        cut_short=cut,
        files={
            "html": str(out_dir / "locust.html"),
            "history_csv": f"{prefix}_stats_history.csv",
            "stats_csv": f"{prefix}_stats.csv",
        },
    )

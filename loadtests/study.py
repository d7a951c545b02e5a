"""One rate ladder of Locust against one arm, and where the box's CPU went meanwhile.

``rate_ladder`` runs ``locust -f loadtests/ratefile.py`` headless, one process pinned to the
last core (``os.sched_setaffinity``: the generator can never take more than one core from the
servers), and prints each step as it ends. Its answer: the steps (offered and achieved rps,
p50/p95 with failures included, failures) and "rps at SLO", the highest offered rate whose
step held the SLO.

``CpuLedger`` samples, once a second for the whole study, the box's busy CPU from /proc/stat
and the CPU time of every process the study started (psutil), by group: each arm's process
tree, the generator, and the rest of the study (this driver, the side services). Over a
window it says what share of the box each group used; what nobody in the study used is the
outsiders' share, and a round where that passes 10% is flagged and run again.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUTSIDERS_LIMIT = 0.10  # a round is rerun once when others used more of the box than this


# ---------------------------------------------------------------------------- CPU
def busy_seconds() -> float:
    """CPU seconds the whole box has been busy since boot (/proc/stat, all cores)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in parts[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class CpuLedger:
    """CPU seconds by group over time; ``groups()`` maps a group name to its root pids (the
    group is their whole process trees). Processes of the study that belong to no group are
    ``study``; every process of the box outside the study is an outsider."""

    def __init__(self, groups: Callable[[], dict[str, list[int]]], period_s: float = 1.0):
        self.groups, self.period_s = groups, period_s
        self.rows: list[tuple[float, float, dict[str, float]]] = []
        self._acc: dict[str, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpu-ledger", daemon=True)
        self.ncpu = os.cpu_count() or 1

    def _tree(self, pid: int) -> list[Any]:
        import psutil

        try:
            p = psutil.Process(pid)
            return [p, *p.children(recursive=True)]
        except psutil.Error:
            return []

    def sample(self) -> None:
        import psutil

        owner: dict[int, str] = {}
        procs: dict[int, Any] = {}
        for p in self._tree(os.getpid()):
            owner[p.pid], procs[p.pid] = "study", p
        for name, roots in self.groups().items():
            for root in roots:
                for p in self._tree(root):
                    owner[p.pid], procs[p.pid] = name, p
        first = not self.rows
        for pid, p in procs.items():
            try:
                c = p.cpu_times()
            except psutil.Error:
                continue
            cpu = c.user + c.system
            before = self._last.get(pid)
            self._last[pid] = cpu
            if first:
                continue  # what ran before the ledger started is nobody's in it
            grown = cpu - before if before is not None else cpu
            self._acc[owner[pid]] = self._acc.get(owner[pid], 0.0) + max(grown, 0.0)
        self.rows.append((time.time(), busy_seconds(), dict(self._acc)))

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            with contextlib.suppress(Exception):  # a process gone mid-read: next second
                self.sample()

    def start(self) -> CpuLedger:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def window(self, t0: float, t1: float) -> dict[str, float]:
        """Each group's share of the box (0..1 of all cores) over [t0, t1], ``outsiders``
        included; empty when the ledger has no two samples in the window."""
        rows = [r for r in self.rows if t0 <= r[0] <= t1]
        if len(rows) < 2:
            return {}
        (ta, ba, ga), (tb, bb, gb) = rows[0], rows[-1]
        cap = (tb - ta) * self.ncpu
        shares = {g: max(gb.get(g, 0.0) - ga.get(g, 0.0), 0.0) / cap for g in gb}
        shares["outsiders"] = max((bb - ba) / cap - sum(shares.values()), 0.0)
        return {g: round(v, 3) for g, v in shares.items()}


# ---------------------------------------------------------------------------- the ladder
def score(rows: list[tuple[float, float, int]], lo: float, hi: float) -> dict[str, float]:
    """rps, p50/p95 (failures included) and failures of the requests that ended in [lo, hi)."""
    lat = sorted(r[1] for r in rows if lo <= r[0] < hi)
    n = len(lat)
    failed = sum(1 for r in rows if lo <= r[0] < hi and not r[2])

    def pct(q: float) -> float:
        return round(lat[min(n - 1, math.ceil(q * n) - 1)], 1) if n else float("nan")

    return {
        "requests": n,
        "failures": failed,
        "achieved_rps": round(n / (hi - lo), 2),
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
    }


class Ladder:
    """The rate ladder's decisions, apart from Locust so they can be tested."""

    def __init__(self, start: float, factor: float, max_steps: int, rate_max: float) -> None:
        self.rate, self.factor = start, factor
        self.max_steps, self.rate_max = max_steps, rate_max
        self.phase = "climb"
        self.held: float | None = None
        self.missed: float | None = None
        self.steps = 0

    def next_rate(self, held: bool) -> float | None:
        """The next step's rate after a step at ``self.rate`` that held (or not); None ends."""
        self.steps += 1
        r = self.rate
        if held:
            self.held = max(self.held or 0.0, r)
        else:
            self.missed = min(self.missed or math.inf, r)
        if self.phase == "climb":
            if held:
                nxt = r * self.factor
            elif self.held is not None:
                self.phase, nxt = "refine", math.sqrt(self.held * r)
            else:
                self.phase, nxt = "descend", r / self.factor
        elif self.phase == "descend":
            if held:  # the first rate that holds: try once halfway back up, as a climb does
                self.phase, nxt = "refine", math.sqrt(r * (self.missed or r))
            else:
                nxt = r / self.factor
        else:
            nxt = None
        if nxt is None or self.steps >= self.max_steps or nxt > self.rate_max or nxt < 0.5:
            return None
        self.rate = round(nxt, 2)
        return self.rate


@dataclass
class LadderRun:
    arm: str
    round: int
    steps: list[dict[str, Any]]
    rps_at_slo: float  # the highest offered rate whose step held the SLO; 0 when none did
    t_start: float
    t_end: float
    generator_cpu_s: float = 0.0
    generator_peak_core: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # shares of the box, by group
    cut_short: str | None = None

    @property
    def requests(self) -> int:
        return sum(s["requests"] for s in self.steps)

    def as_dict(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["requests"] = self.requests
        return d


def held_rate(steps: list[dict[str, Any]]) -> float:
    return max((s["offered_rps"] for s in steps if s["held"]), default=0.0)


def rate_ladder(
    host: str,
    out_dir: Path,
    *,
    arm: str,
    round_no: int,
    request: str,
    route: str = "",
    rate_start: float,
    factor: float,
    step_s: float,
    settle_s: float,
    slo_ms: float,
    max_steps: int = 12,
    alive: Callable[[], bool] | None = None,
    on_locust: Callable[[int | None], None] | None = None,
    say: Callable[[str], None] = print,
) -> LadderRun:
    """One ladder against ``host``; Locust's files and every request land in ``out_dir``.

    ``on_locust(pid)`` is told Locust's pid when it starts (and None when it ends), so the
    caller's CPU ledger can count it as the generator."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*"):
        if old.is_file():
            old.unlink()
    prefix = str(out_dir / "locust")
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(ROOT / "loadtests" / "ratefile.py"),
        "--headless",
        "--host",
        host,
        "--csv",
        prefix,
        "--html",
        str(out_dir / "locust.html"),
        "--stop-timeout",
        "3",
        "--loglevel",
        "WARNING",
        "--only-summary",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "LOADTEST_REQUEST": request,
        "LOADTEST_ROUTE": route,
        "LOADTEST_SAMPLES": str(out_dir),
        "LOADTEST_RATE_START": f"{rate_start:.2f}",
        "LOADTEST_RATE_FACTOR": str(factor),
        "LOADTEST_STEP_S": str(step_s),
        "LOADTEST_SETTLE_S": str(settle_s),
        "LOADTEST_SLO_MS": str(slo_ms),
        "LOADTEST_MAX_STEPS": str(max_steps),
    }
    last_core = {(os.cpu_count() or 1) - 1}
    steps_file = out_dir / "steps.jsonl"
    cut: str | None = None
    seen = 0
    peak = 0.0
    t_start = time.time()
    with open(out_dir / "locust.log", "wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: os.sched_setaffinity(0, last_core),
        )
        if on_locust:
            on_locust(proc.pid)
        limit = time.monotonic() + max_steps * (step_s + 2) + 60
        prev: tuple[float, float] | None = None
        try:
            while proc.poll() is None:
                if alive is not None and not alive():
                    cut = "the target stopped during the load"
                    break
                if time.monotonic() > limit:
                    cut = "Locust did not finish in time"
                    break
                time.sleep(0.5)
                seen = _print_new_steps(steps_file, seen, arm, round_no, say)
                cpu, now = _cpu_of(proc.pid), time.monotonic()
                if not seen or cpu is None:
                    continue  # Locust's start (imports, warm-up) is not its load's cost
                if prev is not None and now - prev[0] > 0.9:
                    peak = max(peak, (cpu - prev[1]) / (now - prev[0]))
                if prev is None or now - prev[0] > 0.9:
                    prev = (now, cpu)
        except KeyboardInterrupt:
            cut = "interrupted (Ctrl-C)"
        finally:
            gen_cpu = _cpu_of(proc.pid) or 0.0
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if on_locust:
                on_locust(None)
    _print_new_steps(steps_file, seen, arm, round_no, say)
    steps = read_steps(steps_file)
    if cut is None and not steps:
        tail = (out_dir / "locust.log").read_text(errors="replace")[-300:].strip()
        cut = f"Locust measured no step (locust.log ends: {tail!r})"
    return LadderRun(
        arm=arm,
        round=round_no,
        steps=steps,
        rps_at_slo=held_rate(steps),
        t_start=t_start,
        t_end=time.time(),
        generator_cpu_s=round(gen_cpu, 2),
        generator_peak_core=round(peak, 2),
        cut_short=cut,
    )


def _cpu_of(pid: int) -> float | None:
    import psutil

    try:
        c = psutil.Process(pid).cpu_times()
        return c.user + c.system
    except psutil.Error:
        return None


def read_steps(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def _print_new_steps(path: Path, seen: int, arm: str, round_no: int, say: Any) -> int:
    steps = read_steps(path)
    for s in steps[seen:]:
        say(
            f"  [{arm} r{round_no}] offered {s['offered_rps']:7.1f} rps -> achieved "
            f"{s['achieved_rps']:7.1f}, p50 {s['p50_ms']:7.1f} ms, p95 {s['p95_ms']:7.1f} ms, "
            f"{s['failures']}/{s['requests']} failed: {'held' if s['held'] else 'MISSED'}"
        )
    return len(steps)


def median_spread(values: list[float]) -> tuple[float, float, float]:
    """Median, min and max (the report's figure and its spread over rounds)."""
    if not values:
        return (0.0, 0.0, 0.0)
    return (statistics.median(values), min(values), max(values))

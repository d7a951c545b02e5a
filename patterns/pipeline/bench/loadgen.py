"""A closed-loop HTTP load generator in several processes, so it is not the bottleneck.

Each client process runs an asyncio loop (uvloop where installed) with its share of the
connections; each connection sends one request, reads the whole answer, and sends the next
(keep-alive, HTTP/1.1, no pipelining). The requests are bytes built once, so a client spends
its CPU on sockets, not on building requests or parsing JSON (a sample of answers is parsed
by the caller, after the run). All processes start together, warm up, then count only the
answers that complete inside the same measured window.

    from patterns.pipeline.bench.loadgen import Request, run_load
    result = run_load("http://127.0.0.1:8000", [Request("GET", "/healthz")], concurrency=32)

Python's httpx in one process tops out near 1,000-1,500 requests/s on one core, which is
below what a no-op route behind plain uvicorn or HAProxy serves; this does several times
that per process. ``client_cpu`` in the result says how many cores the clients themselves
used (on a 2-core box they compete with the server: read ratios measured in one run).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

_CLIENTS: set[int] = set()  # pids of the client processes of the run in progress


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: bytes = b""
    content_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass
class LoadResult:
    """What one run measured: only answers completed inside the measured window count."""

    concurrency: int
    processes: int
    duration_s: float
    latencies_ms: np.ndarray
    statuses: dict[int, int]
    errors: int  # connection errors (no HTTP status)
    client_cpu: float  # cores the client processes used during the window
    samples: list[bytes] = field(default_factory=list)  # some 200 bodies, for the caller

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def rps(self) -> float:
        return self.ok / self.duration_s

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if len(self.latencies_ms) else 0.0

    @property
    def failed(self) -> int:
        return self.errors + sum(n for s, n in self.statuses.items() if s != 200)

    def row(self) -> dict[str, float]:
        return {
            "rps": round(self.rps, 1),
            "p50_ms": round(self.pct(50), 2),
            "p95_ms": round(self.pct(95), 2),
            "ok": self.ok,
            "failed": self.failed,
            "client_cpu": round(self.client_cpu, 2),
        }


def _raw(req: Request, host: str) -> bytes:
    head = [f"{req.method} {req.path} HTTP/1.1", f"Host: {host}", "Connection: keep-alive"]
    if req.content_type:
        head.append(f"Content-Type: {req.content_type}")
    head += [f"{name}: {value}" for name, value in req.headers]
    if req.body or req.method in ("POST", "PUT"):
        head.append(f"Content-Length: {len(req.body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + req.body


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length, chunked = 0, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if not chunked:
        return status, await reader.readexactly(length) if length else b""
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return status, bytes(body)
        body += chunk[:-2]


async def _client(
    url: str,
    requests: list[bytes],
    conns: int,
    offset: int,
    start_at: float,
    window: tuple[float, float],
    stop_at: float,
    want_samples: int,
) -> dict[str, Any]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    samples: list[bytes] = []
    cpu: list[float] = []

    async def one(conn_id: int) -> None:
        nonlocal errors
        i = offset + conn_id * 131  # each connection walks the request list from elsewhere
        reader = writer = None
        while time.time() < stop_at:
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                raw = requests[i % len(requests)]
                i += 1
                t0 = time.time()
                writer.write(raw)
                status, body = await _read_answer(reader)  # type: ignore[arg-type]
                t1 = time.time()
            except (OSError, asyncio.IncompleteReadError, ValueError):
                if window[0] <= time.time() < window[1]:
                    errors += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.01)
                continue
            if window[0] <= t1 < window[1]:
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append((t1 - t0) * 1000)
                    if len(samples) < want_samples and len(latencies) % 7 == 0:
                        samples.append(body)
        if writer is not None:
            writer.close()

    async def cpu_marks() -> None:
        await asyncio.sleep(max(0.0, window[0] - time.time()))
        cpu.append(time.process_time())
        await asyncio.sleep(max(0.0, window[1] - time.time()))
        cpu.append(time.process_time())

    await asyncio.sleep(max(0.0, start_at - time.time()))
    await asyncio.gather(cpu_marks(), *(one(c) for c in range(conns)))
    return {
        "latencies": latencies,
        "statuses": statuses,
        "errors": errors,
        "cpu_s": cpu[1] - cpu[0] if len(cpu) == 2 else 0.0,
        "samples": samples,
    }


def _process_main(args: tuple, out: Any) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    out.put(asyncio.run(_client(*args)))


def run_load(
    url: str,
    requests: list[Request],
    *,
    concurrency: int = 16,
    duration_s: float = 10.0,
    warmup_s: float = 2.0,
    processes: int | None = None,
    samples: int = 0,
    on_window: Callable[[str], None] | None = None,
) -> LoadResult:
    """Drive ``url`` (scheme://host:port) with ``concurrency`` connections spread over
    ``processes`` client processes (default: up to 4, at most one per 8 connections) for
    ``warmup_s`` + ``duration_s``; the answers completed in the last ``duration_s`` count.
    ``samples``: keep up to this many 200 bodies (from all processes) for the caller.
    ``on_window("start")`` / ``on_window("end")`` are called (from a thread) when the
    measured window opens and closes: to read the server's CPU time over the same window."""
    processes = processes or max(1, min(4, concurrency // 8 or 1))
    processes = min(processes, concurrency)
    host = urlsplit(url).netloc
    raw = [_raw(r, host) for r in requests]
    ctx = mp.get_context("spawn")  # never fork a process that may hold Ray's threads
    queue = ctx.Queue()
    start_at = time.time() + 1.5 + 0.3 * processes  # time for every process to start
    window = (start_at + warmup_s, start_at + warmup_s + duration_s)
    procs: list[Any] = []
    for p in range(processes):
        conns = concurrency // processes + (1 if p < concurrency % processes else 0)
        args = (url, raw, conns, p * 7919, start_at, window, window[1], samples // processes + 1)
        proc = ctx.Process(target=_process_main, args=(args, queue), daemon=True)
        proc.start()
        procs.append(proc)
        _CLIENTS.add(proc.pid)
    marks = None
    if on_window is not None:

        def call_marks() -> None:
            for when, name in ((window[0], "start"), (window[1], "end")):
                time.sleep(max(0.0, when - time.time()))
                on_window(name)

        marks = threading.Thread(target=call_marks, daemon=True)
        marks.start()
    results = [queue.get(timeout=warmup_s + duration_s + 120) for _ in procs]
    if marks is not None:
        marks.join(timeout=30)
    for proc in procs:
        proc.join(timeout=30)
        _CLIENTS.discard(proc.pid)
    statuses: dict[int, int] = {}
    for r in results:
        for s, n in r["statuses"].items():
            statuses[s] = statuses.get(s, 0) + n
    return LoadResult(
        concurrency=concurrency,
        processes=processes,
        duration_s=duration_s,
        latencies_ms=np.asarray([x for r in results for x in r["latencies"]], dtype=np.float64),
        statuses=statuses,
        errors=sum(r["errors"] for r in results),
        client_cpu=sum(r["cpu_s"] for r in results) / duration_s,
        samples=[s for r in results for s in r["samples"]][:samples],
    )


class CpuMeter:
    """CPU time (user + system) that a set of processes spends in a measured window.

    On a machine shared with other jobs, req/s moves with everyone else's load, but the CPU
    the server itself spends per answer does not: ``ms_per(n)`` is a like-for-like figure
    (a dedicated box of C cores serves about C * 1000 / ms_per requests per second)."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self.pids = pids
        self._procs: list[Any] = []
        self._start: dict[int, float] = {}
        self.seconds = 0.0

    @staticmethod
    def _cpu(proc: Any) -> float | None:
        try:
            t = proc.cpu_times()
            return float(t.user + t.system)
        except Exception:  # gone, or not ours to read
            return None

    def __call__(self, mark: str) -> None:
        import psutil

        if mark == "start":
            self._procs = []
            for pid in self.pids():
                try:
                    self._procs.append(psutil.Process(pid))
                except psutil.NoSuchProcess:
                    continue
            self._start = {p.pid: c for p in self._procs if (c := self._cpu(p)) is not None}
        else:
            total = 0.0
            for p in self._procs:
                c = self._cpu(p)
                if c is not None and p.pid in self._start:
                    total += c - self._start[p.pid]
            self.seconds = total

    def ms_per(self, n: int) -> float:
        return 1000 * self.seconds / n if n else float("nan")


def process_tree(root: int, exclude: set[int] | None = None) -> list[int]:
    """``root`` and every process below it, less ``exclude`` and their children, and less
    the client processes of a ``run_load`` in progress."""
    import psutil

    try:
        top = psutil.Process(root)
        procs = [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    skip = set(exclude or ()) | _CLIENTS
    for p in procs:
        if p.pid in skip:
            try:
                skip.update(c.pid for c in p.children(recursive=True))
            except psutil.Error:
                continue
    return [p.pid for p in procs if p.pid not in skip]


def machine() -> str:
    """One line naming the machine the figures come from."""
    cores = os.cpu_count()
    try:
        load = "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    except OSError:
        load = "load average n/a"
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            mem = round(int(f.readline().split()[1]) / 2**20)
        memory = f"{mem} GiB"
    except OSError:
        memory = "? GiB"
    return f"{cores} cores, {memory}, {gpu}; {load}"

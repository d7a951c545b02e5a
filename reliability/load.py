"""Background load against a running cluster, counted by outcome.

Each app sends its own ``patterns.<app>.client.sample_request(i)`` from ``concurrency`` threads
in a loop. Every answer is classified: ok (2xx), a 503 with Retry-After (the documented "come
back shortly"), or a failure of any other kind (a 500, a 503 without Retry-After, a 4xx that a
valid sample request must never get, a transport error, or an answer slower than
``slow_s``: a hang). Nothing here asserts time; it counts.

    with Load(base_url, ["ensemble", "pipeline"], concurrency=4) as load:
        ...  # cause a fault
        window = load.window()  # counts since the last window
    print(load.summary())

The counts from a window are what the suite checks: `failed` must be 0 where the README
promises no failure, and every non-ok answer must be a 503 with Retry-After.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

APPS = ("pipeline", "ensemble", "business_logic", "online_learning", "multiplexing")


def sample_requests(app: str) -> Callable[[int], dict[str, Any]]:
    """``patterns.<app>.client.sample_request``: the app's own load-test request."""
    return importlib.import_module(f"patterns.{app}.client").sample_request


@dataclass
class Outcome:
    t: float  # seconds since the load started
    app: str
    status: int  # 0: no HTTP answer (connection error, timeout)
    latency_s: float
    retry_after: str | None
    detail: str  # a short excerpt of the body or the exception

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def retry_later(self) -> bool:
        """A 503 that says when to come back: the only acceptable failure under a fault."""
        return self.status == 503 and bool(self.retry_after)


@dataclass
class Counts:
    total: int = 0
    ok: int = 0
    retry_later: int = 0  # 503 + Retry-After
    other: int = 0  # anything else that was not ok: 500, 503 without Retry-After, 0, ...
    slow: int = 0  # answered, but slower than slow_s
    statuses: Counter = field(default_factory=Counter)
    max_latency_s: float = 0.0
    examples: list[str] = field(default_factory=list)  # a few non-ok answers, for the report

    @property
    def failed(self) -> int:
        return self.retry_later + self.other

    @property
    def success_rate(self) -> float:
        return self.ok / self.total if self.total else 1.0

    def add(self, o: Outcome, slow_s: float) -> None:
        self.total += 1
        self.statuses[o.status] += 1
        self.max_latency_s = max(self.max_latency_s, o.latency_s)
        if o.latency_s > slow_s:
            self.slow += 1
        if o.ok:
            self.ok += 1
            return
        if o.retry_later:
            self.retry_later += 1
        else:
            self.other += 1
        if len(self.examples) < 5:
            self.examples.append(f"{o.status} after {o.latency_s:.1f}s: {o.detail[:160]}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "ok": self.ok,
            "failed": self.failed,
            "retry_later_503": self.retry_later,
            "other_failures": self.other,
            "slow": self.slow,
            "statuses": dict(sorted(self.statuses.items())),
            "max_latency_s": round(self.max_latency_s, 2),
            "examples": list(self.examples),
        }


class Load:
    """``concurrency`` client threads per app against ``base_url`` until ``stop()``."""

    def __init__(
        self,
        base_url: str,
        apps: list[str] | tuple[str, ...] = APPS,
        *,
        concurrency: int = 2,
        timeout_s: float = 60.0,
        slow_s: float = 30.0,
        pause_s: float = 0.0,
        requests: dict[str, Callable[[int], dict[str, Any]]] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.apps = list(apps)
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.slow_s = slow_s
        self.pause_s = pause_s
        self.requests = {a: (requests or {}).get(a) or sample_requests(a) for a in self.apps}
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._window_start = 0
        self._t0 = 0.0

    # -------------------------------------------------------------------- running
    def start(self) -> Load:
        self._t0 = time.monotonic()
        for app in self.apps:
            for k in range(self.concurrency):
                th = threading.Thread(
                    target=self._worker, args=(app, k), name=f"load-{app}-{k}", daemon=True
                )
                th.start()
                self._threads.append(th)
        return self

    def stop(self) -> None:
        self._stop.set()
        for th in self._threads:
            th.join(self.timeout_s + 5)
        self._threads.clear()

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _worker(self, app: str, k: int) -> None:
        import httpx

        make = self.requests[app]
        i = k
        with httpx.Client(base_url=self.base_url, timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                req = make(i)
                i += self.concurrency
                started = time.monotonic()
                try:
                    r = client.request(
                        req.get("method", "POST"),
                        req["path"],
                        json=req.get("json"),
                        content=req.get("data"),
                        headers=req.get("headers"),
                    )
                    status, retry_after, detail = r.status_code, r.headers.get("retry-after"), ""
                    if not 200 <= status < 300:
                        detail = r.text[:300]
                except httpx.HTTPError as exc:
                    status, retry_after, detail = 0, None, f"{type(exc).__name__}: {exc}"
                now = time.monotonic()
                with self._lock:
                    self.outcomes.append(
                        Outcome(started - self._t0, app, status, now - started, retry_after, detail)
                    )
                if self.pause_s:
                    self._stop.wait(self.pause_s)

    # -------------------------------------------------------------------- counting
    def counts(self, outcomes: list[Outcome] | None = None) -> dict[str, Counts]:
        """Counts per app (and ``"all"``) over ``outcomes`` (default: everything so far)."""
        if outcomes is None:
            with self._lock:
                outcomes = list(self.outcomes)
        out = {app: Counts() for app in self.apps}
        out["all"] = Counts()
        for o in outcomes:
            out[o.app].add(o, self.slow_s)
            out["all"].add(o, self.slow_s)
        return out

    def window(self) -> dict[str, Counts]:
        """Counts of the outcomes since the previous ``window()`` call (or the start)."""
        with self._lock:
            outcomes = self.outcomes[self._window_start :]
            self._window_start = len(self.outcomes)
        return self.counts(outcomes)

    def mark(self) -> int:
        """An index into the outcomes, for ``since(mark)``."""
        with self._lock:
            return len(self.outcomes)

    def since(self, mark: int) -> dict[str, Counts]:
        with self._lock:
            outcomes = self.outcomes[mark:]
        return self.counts(outcomes)

    def recovered_after(self, app: str, t: float, streak: int = 5) -> float | None:
        """Seconds from ``t`` (load clock) until ``app`` answered ``streak`` ok in a row and
        nothing but ok afterwards; None if it never settled."""
        with self._lock:
            mine = sorted(
                (o for o in self.outcomes if o.app == app and o.t >= t), key=lambda o: o.t
            )
        last_bad = None
        for o in mine:
            if not o.ok:
                last_bad = o.t + o.latency_s
        good_after = [o for o in mine if o.ok and (last_bad is None or o.t >= last_bad)]
        if len(good_after) < streak:
            return None
        return max(0.0, (last_bad if last_bad is not None else t) - t)

    def now(self) -> float:
        """The load clock (seconds since start), for ``recovered_after``."""
        return time.monotonic() - self._t0

    def wait_ok(self, app: str, n: int = 5, timeout_s: float = 120.0) -> bool:
        """Block until ``app`` has ``n`` more ok answers (the load is flowing)."""
        deadline = time.monotonic() + timeout_s
        mark = self.mark()
        while time.monotonic() < deadline:
            if self.since(mark)[app].ok >= n:
                return True
            time.sleep(0.2)
        return False

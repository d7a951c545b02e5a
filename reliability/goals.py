"""What every fault scenario is judged against and how it reports: the goals, one ``Row`` per
scenario and app, and the measures of a load run (``merged``, ``recovered_after``).

Shared by ``reliability.chaos`` (the harness) and ``reliability.soak`` (one of its scenarios),
which import it and never each other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reliability.load import Counts, Load

KILL_FAIL_RATIO = 0.01  # <= 1% of requests fail after a replica death
RECOVERY_S = 10.0  # the app serves normally again within 10 s
SOAK_SUCCESS = 0.999
REPORT_DIR = Path(__file__).resolve().parent / "report"


@dataclass
class Row:
    fault: str
    app: str
    requests: int
    failed: int
    retry_later: int
    other: int
    recovery_s: float | None
    goal: str
    met: bool
    notes: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_counts(
        cls,
        fault: str,
        app: str,
        c: Counts,
        *,
        goal: str,
        met: bool,
        recovery_s: float | None = None,
        notes: str = "",
        detail: dict[str, Any] | None = None,
    ) -> Row:
        return cls(
            fault,
            app,
            c.total,
            c.failed,
            c.retry_later,
            c.other,
            None if recovery_s is None else round(recovery_s, 1),
            goal,
            met,
            notes,
            {"counts": c.as_dict(), **(detail or {})},
        )


def merged(counts: dict[str, Counts], apps: list[str]) -> Counts:
    """One Counts over several apps."""
    out = Counts()
    for app in apps:
        c = counts.get(app)
        if c is None:
            continue
        out.total += c.total
        out.ok += c.ok
        out.retry_later += c.retry_later
        out.other += c.other
        out.slow += c.slow
        out.statuses.update(c.statuses)
        out.max_latency_s = max(out.max_latency_s, c.max_latency_s)
        out.examples.extend(c.examples[: max(0, 5 - len(out.examples))])
    return out


def first_ok_after(load: Load, app: str, t: float) -> float | None:
    """Seconds from ``t`` (load clock) until the first ok answer to a request of ``app`` sent
    at or after ``t``: the app serves again (the lenient reading of "recovered", robust to a
    stray unrelated failure later on a loaded box)."""
    with load._lock:  # a read of the shared outcome list, under its lock
        done = [o.t + o.latency_s for o in load.outcomes if o.app == app and o.t >= t and o.ok]
    return min(done) - t if done else None


def recovered_after(
    load: Load, app: str, t: float, streak: int = 5, until: float | None = None
) -> float | None:
    """Seconds from ``t`` (load clock) to the end of ``app``'s last non-ok answer that ended
    after ``t`` (0 when none), provided ``streak`` ok answers followed it; None if it never
    settled. Unlike ``Load.recovered_after`` it counts the requests already in flight at ``t``
    (the ones a kill hits first). ``until``: look only at requests sent before it (the next
    fault)."""
    with load._lock:  # a read of the shared outcome list, under its lock
        mine = [
            o
            for o in load.outcomes
            if o.app == app and o.t + o.latency_s >= t and (until is None or o.t < until)
        ]
    bad_ends = [o.t + o.latency_s for o in mine if not o.ok]
    last_bad = max(bad_ends) if bad_ends else None
    good_after = [o for o in mine if o.ok and (last_bad is None or o.t >= last_bad)]
    if len(good_after) < streak:
        return None
    return 0.0 if last_bad is None else max(0.0, last_bad - t)


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def table(rows: list[Row]) -> str:
    lines = [
        "| fault | app | requests | failed | 503+RA | other | recovery s | goal | met |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        rec = "" if r.recovery_s is None else f"{r.recovery_s:g}"
        lines.append(
            f"| {r.fault} | {r.app} | {r.requests} | {r.failed} | {r.retry_later} | {r.other} "
            f"| {rec} | {r.goal} | {'yes' if r.met else '**no**'} |"
        )
    return "\n".join(lines)

"""The soak with chaos: N minutes of load on every app, a random replica of every app SIGKILLed
every 60 s, and each process measured at the start and the end.

Kills are staggered: app i of n is hit at ``i * 60 / n`` s into each minute, so at most one
deployment is restarting at a time on a small box. The victim is a random RUNNING replica of the
app (any deployment, ingress or downstream).

Process figures (``reliability.faults.proc_stats``) are taken under the same load at the start
(after a warm-up) and at the end (once the last killed replica is back): every replica and the
HTTP proxy. How replicas are treated:

- a replica alive at both ends (same pid) is judged: RSS drift <= 50 MB, open fds and open
  connections not above the start by more than a small slack (sockets come and go with the
  load's keep-alive connections and with channels to replaced replicas);
- a replica killed during the soak has no end figure, and its successor no start figure: both
  are printed, the successor's RSS beside its deployment's start RSS. Since a 10-minute soak
  with 10 kills per app restarts most replicas, each deployment is also judged as a whole:
  its largest process at the end against its largest at the start (RSS, fds, connections),
  whatever was restarted in between. That catches a deployment whose replicas grow; a leak
  that a restart resets is caught only in the processes that lived through.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

from reliability.faults import Cluster, ProcStats, proc_stats
from reliability.goals import SOAK_SUCCESS, Row, log, merged, recovered_after
from reliability.load import Load

RSS_DRIFT_MB = 50.0
FD_SLACK = 10
CONN_SLACK = 4


@dataclass
class SoakResult:
    rows: list[Any]
    report: dict[str, Any] = field(default_factory=dict)


def snapshot(cluster: Cluster) -> dict[int, tuple[str, ProcStats]]:
    """{pid: (label, stats)} for every RUNNING replica and the HTTP proxies."""
    out: dict[int, tuple[str, ProcStats]] = {}
    for r in cluster.replicas():
        s = proc_stats(r.pid)
        if s is not None:
            out[r.pid] = (r.label, s)
    try:
        proxies = cluster.proxies()
    except Exception:
        proxies = []
    for pid in proxies:
        s = proc_stats(pid)
        if s is not None:
            out[pid] = ("proxy", s)
    return out


def compare(
    start: dict[int, tuple[str, ProcStats]], end: dict[int, tuple[str, ProcStats]]
) -> dict[str, Any]:
    """Per-process lines and the worst drifts among processes alive at both ends."""
    lines = []
    survivors = []
    start_rss_by_label: dict[str, float] = {}
    for label, s in start.values():
        start_rss_by_label.setdefault(label, s.rss_mb)
    for pid, (label, s) in sorted(start.items(), key=lambda kv: kv[1][0]):
        e = end.get(pid)
        if e is None:
            lines.append(
                {"process": label, "pid": pid, "start": s.as_dict(), "end": None, "judged": False}
            )
            continue
        es = e[1]
        d = {
            "rss_mb": round(es.rss_mb - s.rss_mb, 1),
            "fds": es.fds - s.fds,
            "connections": es.connections - s.connections,
        }
        survivors.append((label, pid, d))
        lines.append(
            {
                "process": label,
                "pid": pid,
                "start": s.as_dict(),
                "end": es.as_dict(),
                "drift": d,
                "judged": True,
            }
        )
    for pid, (label, es) in sorted(end.items(), key=lambda kv: kv[1][0]):
        if pid not in start:
            lines.append(
                {
                    "process": label,
                    "pid": pid,
                    "start": None,
                    "end": es.as_dict(),
                    "deployment_start_rss_mb": start_rss_by_label.get(label),
                    "judged": False,
                }
            )
    worst = {
        "rss_mb": max((d["rss_mb"] for _, _, d in survivors), default=0.0),
        "fds": max((d["fds"] for _, _, d in survivors), default=0),
        "connections": max((d["connections"] for _, _, d in survivors), default=0),
    }
    # Per deployment, whatever its pids: the largest process at the end against the largest at
    # the start (the footprint the deployment needs), so a soak that killed every replica of a
    # deployment still says whether its replicas grow.
    by_label: dict[str, dict[str, Any]] = {}
    for phase, snap in (("start", start), ("end", end)):
        for label, st in snap.values():
            b = by_label.setdefault(label, {})
            cur = b.get(phase)
            b[phase] = {
                "rss_mb": max(st.rss_mb, cur["rss_mb"] if cur else 0.0),
                "fds": max(st.fds, cur["fds"] if cur else 0),
                "connections": max(st.connections, cur["connections"] if cur else 0),
            }
    deployments = {
        label: {
            "rss_mb": round(b["end"]["rss_mb"] - b["start"]["rss_mb"], 1),
            "fds": b["end"]["fds"] - b["start"]["fds"],
            "connections": b["end"]["connections"] - b["start"]["connections"],
        }
        for label, b in sorted(by_label.items())
        if "start" in b and "end" in b
    }
    worst_deployment = {
        key: max((d[key] for d in deployments.values()), default=0)
        for key in ("rss_mb", "fds", "connections")
    }
    return {
        "lines": lines,
        "worst": worst,
        "survivors": len(survivors),
        "deployments": deployments,
        "worst_deployment": worst_deployment,
    }


def text(cmp: dict[str, Any]) -> str:
    """The per-process table printed with the report."""
    out = [
        "RSS per replica, start -> end of the soak (MB; fds; connections):",
        "",
        "| process | pid | start RSS | end RSS | drift | fds | conns | judged |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for ln in cmp["lines"]:
        s, e = ln["start"], ln["end"]
        srss = f"{s['rss_mb']:.0f}" if s else "(new)"
        erss = f"{e['rss_mb']:.0f}" if e else "(killed)"
        drift = f"{ln['drift']['rss_mb']:+.0f}" if ln.get("drift") else ""
        if not s and ln.get("deployment_start_rss_mb") is not None:
            drift = f"(vs {ln['deployment_start_rss_mb']:.0f} at start)"
        fds = f"{s['fds'] if s else '-'} -> {e['fds'] if e else '-'}"
        conns = f"{s['connections'] if s else '-'} -> {e['connections'] if e else '-'}"
        judged = "yes" if ln["judged"] else "no"
        out.append(
            f"| {ln['process']} | {ln['pid']} | {srss} | {erss} | {drift} | {fds} | {conns} "
            f"| {judged} |"
        )
    out += ["", "Per deployment, largest process at the end vs at the start:", ""]
    for label, d in cmp.get("deployments", {}).items():
        out.append(
            f"- {label}: {d['rss_mb']:+.0f} MB, {d['fds']:+d} fds, {d['connections']:+d} conns"
        )
    return "\n".join(out)


def soak(
    cluster: Cluster,
    load: Load,
    apps: list[str],
    *,
    minutes: float = 10.0,
    every_s: float = 60.0,
    warmup_s: float = 15.0,
    seed: int = 0,
) -> SoakResult:
    """The soak; rows per app (success), one for RSS drift and one for fds/connections."""
    rng = random.Random(seed)
    time.sleep(warmup_s)
    start = snapshot(cluster)
    log(f"soak: {minutes:g} min, {len(start)} processes measured at the start")
    mark = load.mark()
    t0 = time.monotonic()
    duration = minutes * 60.0
    schedule = [
        (m * every_s + i * every_s / len(apps), app)
        for m in range(int(duration // every_s) + 1)
        for i, app in enumerate(apps)
        if m * every_s + i * every_s / len(apps) < duration
    ]
    kills: list[dict[str, Any]] = []
    for at, app in schedule:
        wait = t0 + at - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        replicas = cluster.replicas(app)
        if not replicas:
            kills.append({"t_s": round(at), "app": app, "victim": None})
            continue
        victim = rng.choice(replicas)
        t_load = load.now()
        cluster.kill(victim)
        kills.append(
            {
                "t_s": round(at),
                "app": app,
                "victim": victim.label,
                "pid": victim.pid,
                "t_load": t_load,
            }
        )
        log(f"soak t={at:.0f}s: killed {victim.label} pid {victim.pid}")
    rest = t0 + duration - time.monotonic()
    if rest > 0:
        time.sleep(rest)
    healthy = cluster.wait_all_healthy(apps, timeout_s=180)
    time.sleep(5.0)  # the end figures under the same load as the start ones
    end = snapshot(cluster)
    counts = load.since(mark)
    for app in apps:  # each kill's recovery, up to the next kill of the same app
        mine = [k for k in kills if k["app"] == app and k.get("victim")]
        for k, nxt in zip(mine, [*mine[1:], None], strict=True):
            until = nxt["t_load"] if nxt else None
            rec = recovered_after(load, app, k["t_load"], until=until)
            k["recovered_s"] = None if rec is None else round(rec, 1)
    for k in kills:
        k.pop("t_load", None)
    cmp = compare(start, end)
    rows = []
    fault = f"soak {minutes:g} min, a replica of each app killed every {every_s:g} s"
    for app in apps:
        c = counts[app]
        recs = [k.get("recovered_s") for k in kills if k["app"] == app and k.get("victim")]
        worst = max((r for r in recs if r is not None), default=None)
        if any(r is None for r in recs):
            worst = None
        n = len(recs)
        rows.append(
            Row.from_counts(
                fault,
                app,
                c,
                goal=">=99.9% ok",
                met=c.success_rate >= SOAK_SUCCESS,
                recovery_s=worst,
                notes=f"{n} kills; {100 * c.success_rate:.3f}% ok",
            )
        )
    allc = merged(counts, apps)
    w = cmp["worst"]
    wd = cmp["worst_deployment"]
    rows.append(
        Row.from_counts(
            "soak: RSS drift per replica",
            "all",
            allc,
            goal=f"<= {RSS_DRIFT_MB:g} MB",
            met=w["rss_mb"] <= RSS_DRIFT_MB and wd["rss_mb"] <= RSS_DRIFT_MB,
            notes=(
                f"worst {w['rss_mb']:+.1f} MB over {cmp['survivors']} processes alive at both "
                f"ends; per deployment (largest replica at the end vs at the start, whatever "
                f"was restarted) worst {wd['rss_mb']:+.1f} MB; {100 * allc.success_rate:.3f}"
                f"% ok overall"
            ),
        )
    )
    rows.append(
        Row.from_counts(
            "soak: open fds / connections",
            "all",
            allc,
            goal=f"no growth (slack {FD_SLACK} fds, {CONN_SLACK} conns)",
            met=max(w["fds"], wd["fds"]) <= FD_SLACK
            and max(w["connections"], wd["connections"]) <= CONN_SLACK
            and healthy,
            notes=f"worst growth {w['fds']:+d} fds, {w['connections']:+d} connections in a "
            f"process alive at both ends; per deployment {wd['fds']:+d} fds, "
            f"{wd['connections']:+d} connections"
            + ("" if healthy else "; not all apps healthy at the end"),
        )
    )
    report = {"kills": kills, "processes": cmp, "text": text(cmp), "healthy_at_end": healthy}
    return SoakResult(rows, report)

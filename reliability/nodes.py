"""Nodes and the GCS lost under load, on a three-raylet cluster of its own (``make chaos``'s
``nodes`` scenario; ``tests/cluster/test_multinode.py`` runs the same functions).

    python -m reliability.nodes        # prints the rows, writes reliability/report/nodes.png

The cluster is ``scripts.serve_all --nodes 3`` (``cluster.local.start_ray_nodes``: a head and a
second node labelled ``general``, one ``accelerator``) running the multiplexing app from its
own config.yaml, chat off (the LLM would crowd two cores and is not what this checks), with
GCS fault tolerance on a Redis of its own when ``redis-server`` is installed. Four clients
send forecasts throughout; each fault is one row in the chaos table's format:

- ``gcs``: SIGKILL of the head's GCS server. serve_all starts it again 5 s later (a head
  restart) and it reloads the cluster from Redis. Goal: >= 99% of requests ok from the kill
  until it is back, none failed after, and a ``serve deploy`` goes through after it.
- ``node general``: SIGKILL of the general worker node's raylet and every process under it (a
  machine that dies), with one of the two ingress replicas on it. Goal: <= 1% failed, each a
  503 with Retry-After (no 500, no dropped connection), traffic back within 30 s, the replica
  running again on a surviving node.
- ``node accelerator``: the same for the node that runs both forecaster replicas: they start
  again on the general nodes (the placement is a preference with a fallback).
- ``node accelerator back``: serve_all starts a node like the lost one 30 s after the loss (a
  machine that comes back) and moves the forecasters back to it one at a time
  (``cluster.placement``). Goal: both on the accelerator node within 60 s of it joining, no
  500 or dropped connection, <= 1% answered 503 with Retry-After.

The online learner gets a cluster of its own (``online_rows``): the online_learning app from
its config.yaml with its log on Redis Streams (a Redis started for it with ``appendonly yes``,
``appendfsync always``), the trainer preferring the accelerator node (a worker, not the head):

- ``node accelerator SIGKILL (the trainer's)``: the trainer's node lost while clients predict
  and one client sends keyed labels (``reliability.outages``' writer and check). Goal: as for a
  node above, plus the trainer running again on a surviving node, every label answered 202 in
  the log once, and the new trainer caught up to the last offset with learned + held out ==
  labels logged (its counters and offset come back with the version that learned them).

``timeline`` draws the answers over time, one panel per fault, coloured by outcome.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import yaml

from reliability.faults import Cluster
from reliability.goals import REPORT_DIR, Row, first_ok_after, log, table
from reliability.load import Load, Outcome

ROOT = Path(__file__).resolve().parents[1]
APP = "multiplexing"
NODE_FAIL_RATIO = 0.01
NODE_RECOVERY_S = 30.0
RETURN_S = 60.0  # from a node joining until the replicas that prefer it run there
GCS_SUCCESS = 0.99
SETTLE_S = 5.0  # steady load before each fault


def config() -> dict[str, Any]:
    """The multiplexing app's own config, chat off."""
    cfg = yaml.safe_load((ROOT / "patterns" / "multiplexing" / "config.yaml").read_text())
    (app,) = cfg["applications"]
    app["args"]["chat"]["enabled"] = False
    app["deployments"] = [d for d in app["deployments"] if d["name"] != "ChatModel"]
    return dict(cfg)


@contextlib.contextmanager
def node_cluster(*, gcs_redis: bool = True, timeout_s: float = 600) -> Iterator[Any]:
    """``serve_all --nodes 3`` on ``config()``, with ``--gcs-redis`` on a Redis of its own when
    ``gcs_redis`` and ``redis-server`` is installed; yields the running
    ``tests.servers.ServeCluster``."""
    import pytest

    from cluster.ports import wait_http_ok
    from tests.servers import RedisServer, ServeCluster

    extra = ["--nodes", "3"]
    redis = None
    with contextlib.suppress(pytest.skip.Exception):  # no redis-server: no GCS FT
        if gcs_redis:
            redis = RedisServer()  # the GCS's own, as gcsFaultToleranceOptions point to
            redis.start()
            extra += ["--gcs-redis", f"127.0.0.1:{redis.port}"]
    server = ServeCluster(config(), num_cpus=3, timeout_s=timeout_s, extra_args=extra)
    server.start()
    try:
        wait_http_ok(server.http_url + "/multiplex/healthz", 120)
        yield server
    finally:
        server.stop()
        if redis is not None:
            redis.stop()


def gcs_tolerant(server: Any) -> bool:
    return "--gcs-redis" in server.extra_args


def ready_lines(server: Any, app: str = APP) -> tuple[dict[str, int], dict[str, list[str]]]:
    """From serve_all's ready message: the raylet pid of each node (kind -> pid; the head's
    as ``general-head``) and the placement of ``app`` (deployment -> node kind of each
    replica)."""
    text = server.log_file.read_text()
    nodes = {}
    for kind, head, pid in re.findall(r"(\w+)( \(head\))? raylet pid (\d+)", text):
        nodes[f"{kind}{'-head' if head else ''}"] = int(pid)
    placed = {
        m[0]: [k.strip() for k in m[1].split(",")]
        for m in re.findall(rf"^  {app}/(\w+): (.+)$", text, re.MULTILINE)
    }
    return nodes, placed


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def replicas_in(procs: list[psutil.Process]) -> list[str]:
    """The Serve replicas among ``procs`` (Ray titles a replica's process after it)."""
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            title = " ".join(p.cmdline())
            if "ServeReplica:" in title:
                out.append(title.split("ServeReplica:", 1)[1].split()[0])
    return sorted(out)


def running(
    server: Any, deployment: str, gone: frozenset[int] | set[int] = frozenset(), app: str = APP
) -> int:
    """RUNNING replicas of one of ``app``'s deployments (Serve's details, as `serve status`),
    not counting those whose process is in ``gone`` (a killed node's, until Serve notices)."""
    return sum(r.pid not in gone for r in Cluster(server.dashboard_url).replicas(app, deployment))


def lose_node(server: Any, load: Load, kind: str, *, watch_s: float = 30.0, app: str = APP) -> Row:
    """SIGKILL the ``kind`` worker node (``general`` or ``accelerator``) under ``load``; the row
    counts the answers to ``app``'s requests sent in the ``watch_s`` after it (the window of the
    chaos harness's kills: failures are bounded by what was in flight, so the ratio needs a
    fixed window). ``detail``: what ran there, the kill time on the load clock, how long until
    its replicas ran again (None: not within 90 s), the pids killed."""
    nodes, _ = ready_lines(server, app)
    doomed = tree(nodes[kind])
    lost = replicas_in(doomed)
    dead = {p.pid for p in doomed}
    time.sleep(SETTLE_S)  # a steady stretch before the fault (the timeline's baseline)
    load.window()
    t_kill = load.now()
    for p in doomed:  # the machine dies: raylet, object store, workers, at once
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    log(f"SIGKILLed the {kind} node (raylet {nodes[kind]}; replicas {lost})")
    deployments = sorted({r.split(":", 1)[1] for r in lost})
    wanted = {d: len(ready_lines(server, app)[1].get(d, [])) for d in deployments}
    replaced_s: float | None = None
    counts = None
    while True:  # the watch window's counts, and when the lost replicas ran again (<= 90 s)
        elapsed = load.now() - t_kill
        if replaced_s is None:
            with contextlib.suppress(Exception):  # the dashboard may be slow to answer now
                if all(running(server, d, dead, app) >= n for d, n in wanted.items()):
                    replaced_s = round(elapsed, 1)
        if counts is None and elapsed >= watch_s:
            counts = load.window()[app]
        if counts is not None and (replaced_s is not None or elapsed >= 90):
            break
        time.sleep(1)
    # Back: only ok answers after the last failure, and a request sent after the kill answered
    # ok (requests held while a stage restarts fail nothing but answer nothing either).
    settled, first_ok = load.recovered_after(app, t_kill), first_ok_after(load, app, t_kill)
    back = None if settled is None or first_ok is None else max(settled, first_ok)
    met = (
        _at_most_a_few_503s(counts)
        and back is not None
        and back <= NODE_RECOVERY_S
        and replaced_s is not None
    )
    return Row.from_counts(
        f"node {kind} SIGKILL",
        app,
        counts,
        goal="<= 1% failed, all 503+RA; back <= 30 s; replicas running again",
        met=met,
        recovery_s=back,
        notes=f"lost {', '.join(lost) or 'no replica'}; running again after {replaced_s} s",
        detail={"t_kill": t_kill, "lost": lost, "replaced_s": replaced_s, "dead": sorted(dead)},
    )


def _at_most_a_few_503s(counts: Any) -> bool:
    """Enough answers to judge (> 50), none a 500 or a dropped connection, and at most 1%
    (at least one allowed) a 503 with Retry-After: the node rows' shared bar."""
    return bool(
        counts.total > 50
        and counts.other == 0
        and counts.retry_later <= max(1, int(counts.total * NODE_FAIL_RATIO))
    )


def node_returns(
    server: Any,
    load: Load,
    kind: str = "accelerator",
    deployment: str = "ForecastModels",
    *,
    within_s: float = RETURN_S,
    app: str = APP,
) -> Row:
    """After the ``kind`` node was lost (``lose_node``): wait (<= 120 s) until serve_all has
    started one like it, then until every running replica of ``deployment`` is on it again
    (serve_all's placement check moves them, one at a time), under ``load``. The row counts
    the answers from the node joining until ``SETTLE_S`` after the last replica is back;
    ``detail``: the join time on the load clock, seconds until back (None: not within 120 s),
    the moves serve_all printed."""
    pattern = rf"node back: {kind} raylet pid (\d+) \(at ([\d.]+)\)"
    deadline = time.monotonic() + 120
    while not (found := re.findall(pattern, server.log_file.read_text())):
        if time.monotonic() > deadline:
            raise RuntimeError(f"serve_all started no {kind} node in 120 s")
        time.sleep(0.5)
    pid, at = found[-1]
    t_join = load.now() - (time.time() - float(at))  # serve_all's wall clock to the load's
    log(f"a {kind} node joined (raylet {pid}, {load.now() - t_join:.1f} s ago)")
    c = Cluster(server.dashboard_url)
    back_s = None
    placed: list[str | None] = []
    while load.now() - t_join < 120:
        with contextlib.suppress(Exception):  # the dashboard may be slow to answer now
            placed = [node_of(server, r.pid) for r in c.replicas(app, deployment)]
            if len(placed) >= 2 and all(k == kind for k in placed):
                back_s = round(load.now() - t_join, 1)
                break
        time.sleep(1)
    time.sleep(SETTLE_S)  # answers after the last move count too
    t_end = load.now()
    counts = load.counts([o for o in list(load.outcomes) if t_join <= o.t < t_end])[app]
    moves = [
        m
        for m in re.findall(r"\[serve\] (moved a .+)$", server.log_file.read_text(), re.MULTILINE)
        if f"/{deployment} " in m
    ]
    met = _at_most_a_few_503s(counts) and back_s is not None and back_s <= within_s
    return Row.from_counts(
        f"node {kind} back",
        app,
        counts,
        goal=f"{deployment} back on it <= {within_s:g} s; 0 other, <= 1% 503+RA",
        met=met,
        recovery_s=back_s,
        notes=f"{deployment} on {placed} after {back_s} s; {len(moves)} moves",
        detail={"t_kill": t_join, "back_s": back_s, "placed": placed, "moves": moves},
    )


def lose_gcs(server: Any, load: Load, *, after_s: float = 10.0) -> Row:
    """SIGKILL the head's GCS server under ``load``; serve_all starts it again from Redis.
    The row counts from the kill until it is back, ``detail`` the ``after_s`` that follow,
    and whether a config redeploy went through afterwards."""
    (gcs,) = [p for p in tree(server.proc.pid) if p.name() == "gcs_server"]
    time.sleep(SETTLE_S)
    load.window()
    t_kill = load.now()
    gcs.kill()
    log(f"SIGKILLed the GCS server (pid {gcs.pid})")
    deadline = time.monotonic() + 90
    while not (came_back := "GCS back from Redis" in server.log_file.read_text()):
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    t_back = load.now()
    outage = load.window()[APP]
    time.sleep(after_s)
    after = load.window()[APP]
    c = Cluster(server.dashboard_url)
    deployed_s = None
    with contextlib.suppress(Exception):
        change = c.redeploy(APP, "config")
        deployed_s = c.wait_redeployed(APP, change["old_pids"], "config", 180)
    met = (
        came_back
        and outage.total > 20
        and outage.ok >= GCS_SUCCESS * outage.total
        and outage.other == 0
        and after.total > 20
        and after.ok == after.total
        and deployed_s is not None
    )
    down_s = round(t_back - t_kill, 1)
    return Row.from_counts(
        "GCS SIGKILL (FT on Redis)",
        APP,
        outage,
        goal=">= 99% ok while the GCS is down; all ok after; serve deploy works",
        met=met,
        notes=(
            f"GCS {'down' if came_back else 'NOT BACK after'} {down_s} s; {after.ok}/"
            f"{after.total} ok in the {after_s:g} s after; serve deploy after it: "
            f"{'FAILED' if deployed_s is None else f'done in {deployed_s:.0f} s'}"
        ),
        detail={
            "t_kill": t_kill,
            "t_back": t_back,
            "came_back": came_back,
            "after": after.as_dict(),
            "deploy_after_s": deployed_s,
        },
    )


# ------------------------------------------------------------------------------ online learner
ONLINE = "online_learning"
TRAINER = "OnlineTrainer"


def online_config(log_url: str, store_uri: str) -> dict[str, Any]:
    """The online-learning app's own config with its log on ``log_url`` (Redis Streams: any
    node reaches it) and its model store at ``store_uri`` (a directory every raylet of this
    one-machine cluster sees; on real machines ``s3://``). The trainer learns, so here it
    prefers the accelerator node: a worker, not the head, so that the node lost is the
    trainer's and the head (the proxy, the controller) is not."""
    cfg = yaml.safe_load((ROOT / "patterns" / "online_learning" / "config.yaml").read_text())
    (app,) = cfg["applications"]
    app["args"].update(log_url=log_url, model_store_uri=store_uri)
    app["args"]["trainer_resources"] = {
        **app["args"]["trainer_resources"],
        "node_kind": "accelerator",
    }
    return dict(cfg)


@contextlib.contextmanager
def online_cluster(*, timeout_s: float = 600) -> Iterator[tuple[Any, str]]:
    """``serve_all --nodes 3`` on ``online_config``: a durable Redis (``appendonly yes``,
    ``appendfsync always``) and a model store with the baseline, both started for it; yields
    the running ``tests.servers.ServeCluster`` and the log's URL."""
    import shutil
    import tempfile

    from cluster.ports import wait_http_ok
    from core.model_store import ModelStore
    from patterns.online_learning.artifacts import ensure_artifacts
    from reliability.outages import durable_redis
    from tests.servers import ServeCluster

    redis = durable_redis()  # skips (pytest.skip) without redis-server
    redis.start()
    d = Path(tempfile.mkdtemp(prefix="nodes-ol-"))
    server = None
    try:
        store_uri = (d / "models").as_uri()
        ensure_artifacts(ModelStore(store_uri))
        extra = ["--nodes", "3"]
        server = ServeCluster(
            online_config(redis.url, store_uri), num_cpus=3, timeout_s=timeout_s, extra_args=extra
        )
        server.start()
        wait_http_ok(server.http_url + "/online/healthz", 120)
        yield server, redis.url
    finally:
        if server is not None:
            server.stop()
        redis.cleanup()
        shutil.rmtree(d, ignore_errors=True)


def node_of(server: Any, pid: int) -> str | None:
    """The kind of the node (``ready_lines``' names) whose raylet ``pid`` runs under."""
    for kind, raylet in ready_lines(server, ONLINE)[0].items():
        with contextlib.suppress(psutil.Error):
            if pid in {p.pid for p in tree(raylet)}:
                return kind
    return None


def lose_trainer_node(server: Any, log_url: str, *, concurrency: int = 2) -> Row:
    """SIGKILL the node the online trainer runs on while clients predict and one client sends
    keyed labels (``reliability.outages.online_writer``, retrying a 503 as Retry-After says).
    Goals: no 500 or dropped connection, at most 1% answered 503 with Retry-After, the trainer
    running again on a surviving node, every acknowledged label in the Redis log once, and the
    new trainer caught up to the last offset having applied each exactly once (learned +
    held out == logged: none twice after the restart, none skipped)."""
    from reliability.outages import (
        ONLINE_SLOW_S,
        online_requests,
        online_writer,
        online_writes,
        trainer_pid,
        trainer_status,
    )

    base = server.http_url + "/online"
    old_pid = trainer_pid(base)
    kind = node_of(server, old_pid)
    if kind is None or kind.endswith("-head"):
        raise RuntimeError(f"the trainer (pid {old_pid}) is not on a worker node: {kind}")
    load = Load(
        server.http_url,
        [ONLINE],
        concurrency=concurrency,
        slow_s=ONLINE_SLOW_S,
        timeout_s=ONLINE_SLOW_S + 30,
        requests={ONLINE: online_requests("/online")},
    )
    writer = online_writer(base)
    with load:
        if not load.wait_ok(ONLINE, 10, 120):
            raise RuntimeError(f"no load through the cluster: {load.counts()[ONLINE].examples}")
        writer.start()
        row = lose_node(server, load, kind, app=ONLINE)
        time.sleep(SETTLE_S)  # labels after the new trainer runs count too
        writer.stop()
    writes = online_writes(base, log_url)(writer)  # waits (<= 120 s) for the trainer to catch up
    now = trainer_status(base)
    new_pid = int(now.get("pid") or 0)
    moved_to = node_of(server, new_pid) if new_pid else None
    w = writer.as_dict()
    exactly_once = (
        writes["lost"] == writes["duplicated"] == writes["half_written"] == 0
        and writes["trainer_caught_up"]
        and writes["applied"] == writes["logged"]
    )
    met = (
        row.met
        and exactly_once
        and not writer.other
        and not writer.given_up
        and new_pid not in set(row.detail["dead"]) | {0}
        and moved_to is not None
    )
    row.fault = f"node {kind} SIGKILL (the trainer's)"
    row.goal = (
        "<= 1% failed, all 503+RA; trainer running again; every 202 label logged once, applied once"
    )
    row.met = met
    row.notes = (
        f"{row.notes}; trainer pid {old_pid} -> {new_pid} on the {moved_to} node; labels: "
        f"{writes['accepted']} 202, {writes['logged']} logged, {writes['lost']} lost, "
        f"{writes['duplicated']} dup; applied {writes['applied']} of {writes['logged']} "
        f"(caught up: {writes['trainer_caught_up']}); label writes {w['statuses']}"
    )
    row.detail.update(
        writes=w,
        write_check=writes,
        trainer={"old_pid": old_pid, "new_pid": new_pid, "moved_to": moved_to, **now},
    )
    return row


def online_rows() -> list[Row]:
    """``lose_trainer_node`` on an online-learning cluster of its own."""
    with online_cluster() as (server, log_url):
        _, placed = ready_lines(server, ONLINE)
        log(f"three-node online-learning cluster up; placement {placed}")
        return [lose_trainer_node(server, log_url)]


def timeline(
    outcomes: list[Outcome], panels: list[tuple[str, float, float]], path: Path, bin_s: float = 1.0
) -> Path:
    """Answers per second through each fault, stacked by outcome (ok, 503 with Retry-After,
    anything else), a line at the fault. ``panels``: (title, fault time, end) on the load's
    clock; each panel starts 5 s before its fault."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels)), squeeze=False)
    for ax, (title, t_fault, t_end) in zip(axes[:, 0], panels, strict=True):
        start = t_fault - 5.0
        edges = np.arange(start, t_end + bin_s, bin_s)
        kinds = {"ok": [], "503 + Retry-After": [], "other (500, dropped)": []}
        for o in outcomes:
            done = o.t + o.latency_s
            if start <= done < t_end:
                key = (
                    "ok"
                    if o.ok
                    else "503 + Retry-After"
                    if o.retry_later
                    else "other (500, dropped)"
                )
                kinds[key].append(done)
        bottom = np.zeros(len(edges) - 1)
        for (label, times), color in zip(
            kinds.items(), ("#4c9a2a", "#f0a202", "#c0392b"), strict=True
        ):
            counts, _ = np.histogram(times, bins=edges)
            ax.bar(edges[:-1] - t_fault, counts / bin_s, width=bin_s, bottom=bottom, align="edge",
                   color=color, label=f"{label} ({len(times)})")  # fmt: skip
            bottom += counts / bin_s
        ax.axvline(0, color="black", linestyle="--", linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("answers/s")
        ax.legend(loc="lower right", fontsize=8)
    axes[-1, 0].set_xlabel("seconds after the fault (answers counted when they completed)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def node_rows(*, concurrency: int = 4, png: Path | None = None) -> tuple[list[Row], dict[str, Any]]:
    """Every fault above on a cluster of its own, in order (GCS, general node, accelerator
    node, the accelerator node back); the rows, and the placement before the faults.
    ``png``: the timeline's file."""
    rows: list[Row] = []
    with node_cluster() as server:
        _, placed = ready_lines(server)
        log(f"three-node cluster up; placement {placed}")
        with Load(server.http_url, [APP], concurrency=concurrency, timeout_s=30) as load:
            if not load.wait_ok(APP, 10, 60):
                raise RuntimeError(f"no load through the cluster: {load.counts()[APP].examples}")
            titles = []
            if gcs_tolerant(server):
                rows.append(lose_gcs(server, load))
                titles.append("the head's GCS server SIGKILLed (back from Redis 5 s later)")
            for kind in ("general", "accelerator"):
                rows.append(lose_node(server, load, kind))
                what = ", ".join(rows[-1].detail["lost"]) or "no replica"
                titles.append(f"the {kind} node SIGKILLed ({what})")
            rows.append(node_returns(server, load))
            titles.append("an accelerator node back (the forecasters move back to it)")
            time.sleep(SETTLE_S)
            # each panel runs until just before the next fault (or the end of the load)
            kills = [r.detail["t_kill"] for r in rows] + [load.now() + 0.5]
            panels = [(title, kills[i], kills[i + 1] - 0.5) for i, title in enumerate(titles)]
            outcomes = list(load.outcomes)
    if png is not None:
        timeline(outcomes, panels, png)
    return rows, {"placement": placed, "gcs_fault_tolerance": gcs_tolerant(server)}


def main() -> int:
    rows, extra = node_rows(png=REPORT_DIR / "nodes.png")
    rows += online_rows()
    print(table(rows))
    for r in rows:
        print(f"- {r.fault}: {r.notes}")
    print(f"placement before the faults: {extra['placement']}")
    print(f"timeline: {(REPORT_DIR / 'nodes.png').relative_to(ROOT)}")
    return 0 if all(r.met for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

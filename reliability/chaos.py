"""The chaos harness: redeploys, replica deaths and a soak under load on every app at once,
printed as one markdown table (and written as JSON under reliability/report/).

    python -m reliability.chaos                         # own cluster, every app, 10-min soak
    python -m reliability.chaos --minutes 3 --only kill,redeploy
    python -m reliability.chaos --url http://127.0.0.1:8000 --dashboard http://127.0.0.1:8265

Scenarios, each under ``reliability.load.Load`` on ALL apps (2 in flight per app):

- ``redeploy``: each app redeployed through ``serve deploy`` twice, a config-only change and a
  change that replaces every replica. Goal: 0 failed requests on every app, the redeployed one
  included.
- ``kill``: one replica of each deployment of each app SIGKILLed (ingress and downstream).
  Goal: <= 1% of the app's requests in the window after the kill fail, every failure a 503
  with Retry-After (never a 500 or a dropped connection), and the app answers only ok again
  within 10 s of the kill (``recovered_after``: to its last non-ok answer).
- ``soak``: N minutes of load with a random replica of every app SIGKILLed every 60 s
  (staggered). Goals: >= 99.9% ok; RSS drift <= 50 MB for each replica that lived through;
  no growth of open fds or connections (see ``reliability.soak``).
- ``fuzz``: ``reliability.fuzz.run`` (schemathesis from each app's OpenAPI) on the same
  cluster, after the load; ``outages``: ``reliability.outages.SCENARIOS`` (dependencies down
  under load), each on its own local Serve once this cluster is down. Both only when those
  modules exist (they are written separately).
- ``nodes``: ``reliability.nodes``, on a three-raylet cluster of its own: the GCS server, the
  general node and the accelerator node SIGKILLed under load (timeline in
  reliability/report/nodes.png); then, on another, the online trainer's node (labels on
  Redis Streams, exactly once across the kill).

Exit status 1 when any goal is missed. Nothing here times a fast path: it counts failures and
statuses; the only bound in seconds is the issue's "serves normally again within 10 s".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import importlib.util
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from reliability.faults import Cluster
from reliability.goals import (
    KILL_FAIL_RATIO,
    RECOVERY_S,
    REPORT_DIR,
    Row,
    first_ok_after,
    log,
    merged,
    recovered_after,
    table,
)
from reliability.load import Load

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------- scenarios
def redeploy(
    cluster: Cluster, load: Load, app: str, kind: str, *, settle_s: float = 5.0
) -> list[Row]:
    """Redeploy ``app`` (``kind``: config | replace) under load; rows for it and the others."""
    mark = load.mark()
    info = cluster.redeploy(app, kind)
    log(f"redeploy {app} ({kind}): {info['change']}")
    took = cluster.wait_redeployed(app, info["old_pids"], kind)
    # The new replicas' first requests count too: keep the load on them for a while.
    time.sleep(settle_s)
    load.wait_ok(app, n=5, timeout_s=60)
    counts = load.since(mark)
    others = [a for a in load.apps if a != app]
    fault = f"redeploy {app} ({'config change' if kind == 'config' else 'new replicas'})"
    done = "not done after 300 s" if took is None else f"done in {took:.0f} s"
    rows = [
        Row.from_counts(
            fault,
            app,
            counts[app],
            goal="0 failed",
            met=counts[app].failed == 0 and took is not None,
            notes=f"{info['change']}; {done}",
            detail={"redeploy_s": took, "change": info["change"], "old_pids": info["old_pids"]},
        )
    ]
    if others:
        c = merged(counts, others)
        rows.append(
            Row.from_counts(
                fault,
                f"others ({len(others)})",
                c,
                goal="0 failed",
                met=c.failed == 0,
                detail={"per_app": {a: counts[a].as_dict() for a in others}},
            )
        )
    return rows


def kill(
    cluster: Cluster,
    load: Load,
    app: str,
    deployment: str,
    *,
    window_s: float = 30.0,
    rng: random.Random | None = None,
) -> Row:
    """SIGKILL one replica of ``app``'s ``deployment`` under load; the row counts ``app``'s
    requests from the kill to ``window_s`` after it (longer if the deployment is slow to come
    back)."""
    rng = rng or random.Random(0)
    replicas = cluster.replicas(app, deployment)
    fault = f"SIGKILL {app}:{deployment}"
    if not replicas:
        return Row(fault, app, 0, 0, 0, 0, None, "a replica to kill", False, "no replica found")
    victim = rng.choice(replicas)
    mark = load.mark()
    t_kill = load.now()
    cluster.kill(victim)
    log(f"killed {victim.label} pid {victim.pid}")
    back = cluster.wait_replaced(victim, timeout_s=180)
    rest = window_s - (load.now() - t_kill)
    if rest > 0:
        time.sleep(rest)
    load.wait_ok(app, n=5, timeout_s=60)
    counts = load.since(mark)
    c = counts[app]
    recovery = recovered_after(load, app, t_kill)
    first_ok = first_ok_after(load, app, t_kill)
    others = [a for a in load.apps if a != app]
    oc = merged(counts, others)
    met = (
        c.failed <= KILL_FAIL_RATIO * max(c.total, 1)
        and c.other == 0
        and recovery is not None
        and recovery <= RECOVERY_S
    )
    notes = (
        f"{len(replicas)} replica(s); first ok "
        + ("never" if first_ok is None else f"{first_ok:.1f} s")
        + " after the kill; replaced in "
        + ("never (180 s)" if back is None else f"{back:.0f} s")
        + f"; other apps: {oc.failed} failed of {oc.total}"
    )
    log(
        f"{fault}: {c.failed} of {c.total} failed ({c.retry_later} 503+RA, {c.other} other), "
        f"ok again after {recovery if recovery is None else round(recovery, 1)} s; {notes}"
    )
    return Row.from_counts(
        fault,
        app,
        c,
        goal="<=1% failed, all 503+RA, ok again <=10 s",
        met=met,
        recovery_s=recovery,
        notes=notes,
        detail={
            "pid": victim.pid,
            "first_ok_s": first_ok,
            "replaced_s": back,
            "window_s": window_s,
            "others": {a: counts[a].as_dict() for a in others},
        },
    )


def kill_all(
    cluster: Cluster, load: Load, apps: list[str], *, window_s: float = 30.0, seed: int = 0
) -> list[Row]:
    """One kill per deployment of each app, one at a time, each after the cluster is whole."""
    rng = random.Random(seed)
    rows = []
    for app in apps:
        for deployment in cluster.deployments(app):
            cluster.wait_all_healthy(apps, timeout_s=180)
            rows.append(kill(cluster, load, app, deployment, window_s=window_s, rng=rng))
    return rows


# ---------------------------------------------------------------------------------- cluster
def cluster_config(apps: list[str] | None, source: Path = ROOT / "serve_config.yaml") -> dict:
    """serve_config.yaml (generated from every pattern's config.yaml) keeping ``apps``."""
    config = dict(yaml.safe_load(source.read_text()))
    if apps:
        unknown = set(apps) - {a["name"] for a in config["applications"]}
        if unknown:
            raise SystemExit(f"not in {source.name}: {sorted(unknown)}")
        config["applications"] = [a for a in config["applications"] if a["name"] in apps]
    names = {a["name"] for a in config["applications"]}
    if "ensemble" not in names:
        config.pop("grpc_options", None)
    return config


def ensure_artifacts(apps: list[str]) -> None:
    for app in apps:
        module = f"patterns.{app}.artifacts"
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module).ensure_artifacts()


def artifact_env(artifacts: Path) -> dict[str, str]:
    """Point every app at a copy of the artifacts, so the writes of a chaos run (decisions,
    feedback, new online versions) stay out of the checkout."""
    return {
        "COOKBOOK_MODEL_STORE_URI": str(artifacts / "models"),
        "BUSINESS_DATABASE_URL": f"sqlite:///{artifacts}/business_logic/records.db",
        "BUSINESS_FEATURE_STORE_URL": f"sqlite:///{artifacts}/business_logic/features.db",
        "ONLINE_LOG_URL": f"sqlite:///{artifacts}/online_learning/feedback.db",
    }


@contextlib.contextmanager
def own_cluster(
    apps: list[str] | None, num_cpus: int = 4, config: dict | None = None
) -> Iterator[tuple[str, str, list[str]]]:
    """``make serve`` on ``apps`` (or on ``config``) in a subprocess (tests/servers.ServeCluster)
    on a temporary copy of the artifacts; yields (http_url, dashboard_url, app names) and
    takes it all down at the end."""
    import tempfile

    from tests.servers import ServeCluster

    config = config or cluster_config(apps)
    names = [a["name"] for a in config["applications"]]
    ensure_artifacts(names)
    tmp = Path(tempfile.mkdtemp(prefix="chaos-artifacts-"))
    shutil.copytree(ROOT / "artifacts", tmp / "artifacts")
    cluster = ServeCluster(config, num_cpus=num_cpus, env=artifact_env(tmp / "artifacts"))
    log(f"starting a cluster with {', '.join(names)} ({num_cpus} logical CPUs)")
    t = time.monotonic()
    try:
        cluster.start()
        log(f"cluster ready in {time.monotonic() - t:.0f} s: {cluster.http_url}")
        yield cluster.http_url, cluster.dashboard_url, names
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------- report
def machine() -> str:
    import psutil

    gpu = "GPU" if shutil.which("nvidia-smi") else "no GPU"
    mem = psutil.virtual_memory().total / 2**30
    return f"{os.cpu_count()}-core {mem:.0f} GiB {platform.machine()} Linux box, {gpu}"


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def write_report(rows: list[Row], meta: dict[str, Any], extra: dict[str, Any]) -> Path:
    REPORT_DIR.mkdir(exist_ok=True)
    path = REPORT_DIR / "chaos.json"
    path.write_text(
        json.dumps(
            {**meta, "table": table(rows), "rows": [asdict(r) for r in rows], **extra},
            indent=2,
            default=str,
        )
        + "\n"
    )
    return path


# ---------------------------------------------------------------------------------- optional
def row_from_dict(d: dict[str, Any], fault: str) -> Row:
    """A row from another module's dict (outages): the keys Row knows, defaults for the rest."""
    known = {k: d[k] for k in Row.__dataclass_fields__ if k in d}
    known.setdefault("fault", fault)
    known.setdefault("app", "-")
    for k in ("requests", "failed", "retry_later", "other"):
        known.setdefault(k, 0)
    known.setdefault("recovery_s", None)
    known.setdefault("goal", "")
    known["met"] = bool(known.get("met", False))
    return Row(**known)


def outage_rows() -> list[Row]:
    """``reliability.outages.SCENARIOS`` (dependencies down under load), when that module
    exists. Each scenario deploys its own apps on its own local Serve, so this runs with no
    other cluster up."""
    if importlib.util.find_spec("reliability.outages") is None:
        return []
    outages = importlib.import_module("reliability.outages")
    rows = []
    for name, call in getattr(outages, "SCENARIOS", []):
        log(f"outage scenario {name}")
        try:
            rows.append(row_from_dict(call(None), f"outage {name}"))
        except Exception as exc:
            rows.append(
                Row(f"outage {name}", "-", 0, 0, 0, 0, None, "runs", False, repr(exc)[:300])
            )
    return rows


def fuzz_rows(base_url: str, apps: list[str], max_examples: int) -> list[Row]:
    """``reliability.fuzz.run`` (schemathesis from each app's OpenAPI) against the cluster,
    when that module exists."""
    if importlib.util.find_spec("reliability.fuzz") is None:
        return []
    fuzz = importlib.import_module("reliability.fuzz")
    log(f"fuzz: schemathesis -c all, {max_examples} examples per route and phase")
    rows = []
    for app, r in fuzz.run(base_url, apps, max_examples).items():
        failed = int(r.get("failed", 0))
        rows.append(
            Row(
                f"fuzz ({max_examples} per route)",
                app,
                int(r.get("generated", 0)) + int(r.get("mutated_requests", 0)),
                failed,
                0,
                0,
                None,
                "0 schemathesis -c all findings, mutated uploads answered as documented",
                failed == 0,
                "; ".join(str(f) for f in r.get("failures", [])[:2])[:300],
                {"fuzz": {k: v for k, v in r.items() if k != "cli_tail"}},
            )
        )
    return rows


# ---------------------------------------------------------------------------------- main
SCENARIO_NAMES = ("redeploy", "kill", "soak", "outages", "fuzz", "nodes")


def run(
    base_url: str,
    dashboard_url: str,
    apps: list[str],
    *,
    only: set[str],
    minutes: float,
    concurrency: int = 2,
    kill_window_s: float = 30.0,
    seed: int = 0,
    fuzz_examples: int = 50,
) -> tuple[list[Row], dict[str, Any]]:
    """Every scenario in ``only`` against a running cluster; (rows, extra report data)."""
    from reliability import soak as soak_mod

    cluster = Cluster(dashboard_url)
    if not cluster.wait_all_healthy(apps, timeout_s=300):
        raise SystemExit(f"apps not healthy: { {a: cluster.app_status(a) for a in apps} }")
    rows: list[Row] = []
    extra: dict[str, Any] = {}
    load = Load(base_url, apps, concurrency=concurrency)
    with load:
        for app in apps:
            if not load.wait_ok(app, n=3, timeout_s=120):
                log(f"{app} does not answer ok under load: {load.counts()[app].examples}")
        load.window()
        if "redeploy" in only:
            for app in apps:
                for kind in ("config", "replace"):
                    cluster.wait_all_healthy(apps, timeout_s=300)
                    new = redeploy(cluster, load, app, kind)
                    rows.extend(new)
                    log(table(new).splitlines()[-len(new) :][0])
        if "kill" in only:
            rows.extend(kill_all(cluster, load, apps, window_s=kill_window_s, seed=seed))
        if "soak" in only and minutes > 0:
            cluster.wait_all_healthy(apps, timeout_s=300)
            result = soak_mod.soak(cluster, load, apps, minutes=minutes, seed=seed)
            rows.extend(result.rows)
            extra["soak"] = result.report
    if "fuzz" in only:
        rows.extend(fuzz_rows(base_url, apps, fuzz_examples))
    extra["load"] = {
        "concurrency_per_app": concurrency,
        "all": load.counts()["all"].as_dict(),
    }
    return rows, extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="soak length (default 10)")
    parser.add_argument("--apps", nargs="+", help="apps to run (default: every app)")
    parser.add_argument(
        "--only",
        default=",".join(SCENARIO_NAMES),
        help=f"comma-separated scenarios out of {','.join(SCENARIO_NAMES)}",
    )
    parser.add_argument("--url", help="HTTP address of a running `make serve`")
    parser.add_argument("--dashboard", help="its dashboard address (with --url)")
    parser.add_argument("--concurrency", type=int, default=2, help="in flight per app")
    parser.add_argument("--kill-window-s", type=float, default=30.0)
    parser.add_argument("--num-cpus", type=int, default=4, help="own cluster's logical CPUs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fuzz-examples", type=int, default=50, help="per route and kind")
    args = parser.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - set(SCENARIO_NAMES)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {SCENARIO_NAMES}")
    if bool(args.url) != bool(args.dashboard):
        parser.error("--url and --dashboard go together")

    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    meta = {
        "machine": machine(),
        "commit": commit(),
        "started_utc": started.isoformat(timespec="seconds"),
        "command": "python -m reliability.chaos " + " ".join(argv or sys.argv[1:]),
        "minutes": args.minutes,
    }
    options = {
        "only": only,
        "minutes": args.minutes,
        "concurrency": args.concurrency,
        "kill_window_s": args.kill_window_s,
        "seed": args.seed,
        "fuzz_examples": args.fuzz_examples,
    }
    rows: list[Row] = []
    extra: dict[str, Any] = {}
    apps: list[str] = args.apps or []
    if not only & {"redeploy", "kill", "soak", "fuzz"}:
        pass  # only scenarios that start clusters of their own (outages, nodes)
    elif args.url:
        apps = args.apps or list(Cluster(args.dashboard).apps())
        rows, extra = run(args.url, args.dashboard, apps, **options)
    else:
        with own_cluster(args.apps, num_cpus=args.num_cpus) as (url, dashboard, apps):
            rows, extra = run(url, dashboard, apps, **options)
    if "outages" in only:  # after the cluster is down: each scenario deploys its own apps
        rows.extend(outage_rows())
    if "nodes" in only:  # a three-raylet cluster of its own (reliability/nodes.py)
        from reliability import nodes

        node_rows, extra["nodes"] = nodes.node_rows(png=REPORT_DIR / "nodes.png")
        rows.extend(node_rows)
        rows.extend(nodes.online_rows())  # the online trainer's node, on a cluster of its own
    meta["apps"] = apps
    meta["wall_s"] = round(time.monotonic() - t0)
    path = write_report(rows, meta, extra)
    missed = [r for r in rows if not r.met]
    print()
    print(
        f"Chaos suite on {meta['machine']}, commit {meta['commit']}, {meta['started_utc']}, "
        f"{args.concurrency} in flight per app, soak {args.minutes:g} min:"
    )
    print()
    print(table(rows))
    print()
    for r in rows:
        if r.notes:
            print(f"- {r.fault} / {r.app}: {r.notes}")
    if "soak" in extra:
        print()
        print(extra["soak"].get("text", ""))
    print(f"\nwritten to {path.relative_to(ROOT)}; {len(missed)} goal(s) missed")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())

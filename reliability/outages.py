"""Dependencies down under load: each one stopped for a while and brought back, while the app
serves ``reliability.load.Load`` (2 in flight) and a stream of writes with Idempotency-Keys.

    python -m reliability.outages                      # every scenario, own local Serve
    python -m reliability.outages --only business_redis_down,online_trainer_stuck

Scenarios (what goes down, how, and what the pattern's README promises meanwhile):

- ``business_postgres_down``: records DB on PostgreSQL, fast shutdown -> 503 + Retry-After.
- ``business_sqlite_locked``: records DB on SQLite, another process holds the write lock ->
  200 degraded (decision not logged); with an Idempotency-Key 503 + Retry-After.
- ``business_redis_down``: feature store on Redis, SIGKILL, restarted from its AOF -> 200
  degraded (features recomputed from the database).
- ``business_risk_api_down``: the outside risk API, SIGKILL -> 200 degraded (default signal).
- ``online_sqlite_log_locked``: the SQLite feedback log's write lock held past its busy
  timeout -> 503 + Retry-After.
- ``online_redis_log_down``: the Redis Streams feedback log, SIGKILL, restarted from its AOF
  -> 503 + Retry-After.
- ``online_trainer_killed`` / ``online_trainer_stuck``: the trainer replica SIGKILLed (Serve
  restarts it) / SIGSTOPped then resumed -> predict 200 and feedback 202 throughout.

Every scenario returns one row (a dict): requests and how they were answered (ok, degraded,
503 with Retry-After, anything else: must be 0), the slowest answer (a hang shows as ``slow``:
slower than the pattern's own deadline plus a margin), the seconds from the dependency's return
to normal answers (``recovery_s``, measured with probes, no restart of anything), and the
writes: ``writes_accepted`` (answered 2xx), ``writes_lost`` (accepted but not durably there:
must be 0), ``writes_duplicated`` (written twice: must be 0), ``half_written`` (never answered
2xx yet written: must be 0). ``met`` is True when every count that must be 0 is 0 and the app
recovered. Nothing here asserts a duration except the "no hang" bound and the recovery limit,
both generous for a slow machine.

Each scenario takes ``ctx``: a dict with ``deploy`` (``deploy(app, name, route_prefix) ->
base_url``, the test suite's fixture) or without it, in which case the scenario starts its own
local Ray + Serve (``cluster.local.local_serve``) and stops it. Real servers (PostgreSQL, Redis)
come from ``tests/servers.py`` on loopback ports; a missing binary skips the scenario.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sqlite3
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from reliability.load import Load

ROOT = Path(__file__).resolve().parents[1]
Deploy = Callable[[Any, str, str], str]
BUSINESS_KEY = "dev-business-key"
RECOVERY_LIMIT_S = 60.0  # "recovers by itself": normal answers within this after the return


def log(msg: str) -> None:
    print(f"[outages] {msg}", flush=True)


# ------------------------------------------------------------------------------ serving
@contextlib.contextmanager
def serving(ctx: dict[str, Any] | None) -> Iterator[Deploy]:
    """``ctx["deploy"]`` when the caller has a Serve (the tests), else a local one."""
    if ctx and ctx.get("deploy"):
        yield ctx["deploy"]
        return
    from ray import serve

    from cluster.local import local_serve

    with local_serve(num_cpus=4) as base:
        names: list[str] = []

        def deploy(app: Any, name: str, route_prefix: str) -> str:
            serve.run(app, name=name, route_prefix=route_prefix)
            names.append(name)
            return base + route_prefix

        try:
            yield deploy
        finally:
            for name in names:
                with contextlib.suppress(Exception):
                    serve.delete(name)


def _root(base_url: str, prefix: str) -> str:
    return base_url[: -len(prefix)] if base_url.endswith(prefix) else base_url


# ------------------------------------------------------------------------------ dependencies
def _risk_service() -> Any:
    """The business pattern's risk API on a free loopback port (tests.servers)."""
    from tests.servers import RiskService

    return RiskService()


def durable_redis() -> Any:
    """Redis with ``appendonly yes`` and ``appendfsync always`` (tests.servers): a SIGKILL
    loses nothing it acknowledged."""
    from tests.servers import DurableRedisServer

    return DurableRedisServer()


class SqliteWriteLock:
    """Another process holding an SQLite file's write lock (a migration, a bulk import, a
    backup that writes): readers go on (WAL), every writer waits its busy timeout and fails."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.conn: sqlite3.Connection | None = None

    def take(self) -> None:
        self.conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self.conn.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        if self.conn is not None:
            self.conn.execute("ROLLBACK")
            self.conn.close()
            self.conn = None


# ------------------------------------------------------------------------------ writers
@dataclass
class WriteStream:
    """One client thread that writes with an Idempotency-Key per write and, on a 503 with
    Retry-After (or a 429), retries the same write with the same key, as the README asks."""

    name: str
    send: Callable[[httpx.Client, int, str], httpx.Response]  # (client, i, key) -> answer
    attempts: int = 120
    statuses: Counter = field(default_factory=Counter)
    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> 2xx body
    given_up: list[str] = field(default_factory=list)  # keys never answered 2xx
    other: list[str] = field(default_factory=list)  # answers that are neither 2xx nor 503+RA
    degraded: int = 0
    max_latency_s: float = 0.0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.run_id = uuid.uuid4().hex[:8]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"writes-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(300)

    def _loop(self) -> None:
        with httpx.Client(timeout=60) as http:
            i = 0
            while not self._stop.is_set():
                key = f"{self.name}-{self.run_id}-{i}"
                self._one(http, i, key)
                i += 1

    def _one(self, http: httpx.Client, i: int, key: str) -> None:
        for _ in range(self.attempts):
            started = time.monotonic()
            try:
                r = self.send(http, i, key)
                status, retry_after = r.status_code, r.headers.get("retry-after")
            except httpx.HTTPError as exc:
                r, status, retry_after = None, 0, None
                self.other.append(f"{key}: {type(exc).__name__}: {exc}"[:200])
            self.max_latency_s = max(self.max_latency_s, time.monotonic() - started)
            self.statuses[status] += 1
            if r is not None and 200 <= status < 300:
                body = r.json()
                self.accepted[key] = body
                if body.get("degraded"):
                    self.degraded += 1
                return
            if status in (429, 503) and retry_after:
                time.sleep(min(1.0, float(retry_after)))
                continue
            if status != 0:
                self.other.append(f"{key}: {status} {r.text[:160] if r is not None else ''}")
            time.sleep(0.5)
        self.given_up.append(key)

    def as_dict(self) -> dict[str, Any]:
        return {
            "writes": sum(self.statuses.values()),
            "statuses": dict(sorted(self.statuses.items())),
            "accepted": len(self.accepted),
            "degraded": self.degraded,
            "given_up": len(self.given_up),
            "other": self.other[:5],
            "max_latency_s": round(self.max_latency_s, 2),
        }


# ------------------------------------------------------------------------------ one outage
def _wait(check: Callable[[], bool], timeout_s: float, every_s: float = 0.25) -> float | None:
    """Seconds until ``check()`` held 3 times in a row (timed from the first of them)."""
    t0 = time.monotonic()
    streak_from: float | None = None
    streak = 0
    while time.monotonic() - t0 < timeout_s:
        try:
            ok = check()
        except Exception:
            ok = False
        if ok:
            streak_from = time.monotonic() if streak == 0 else streak_from
            streak += 1
            if streak >= 3:
                return round((streak_from or t0) - t0, 2)
        else:
            streak = 0
        time.sleep(every_s)
    return None


def run_outage(
    *,
    app: str,
    dependency: str,
    load: Load,
    writer: WriteStream,
    down: Callable[[], None],
    up: Callable[[], None],
    normal: Callable[[], bool],
    outage_s: float,
    check_writes: Callable[[WriteStream], dict[str, Any]],
    expect: str,
) -> dict[str, Any]:
    """Load and writes flowing -> ``down()`` for ``outage_s`` -> ``up()`` -> wait for
    ``normal()`` -> a few more seconds of load -> stop -> count."""
    with load:
        if not load.wait_ok(app, n=5, timeout_s=120):
            raise RuntimeError(f"{app} does not answer ok before the outage: {load.counts()}")
        writer.start()
        deadline = time.monotonic() + 120
        while not writer.accepted and time.monotonic() < deadline:
            time.sleep(0.2)
        before = load.window()[app]
        log(f"{app}: {dependency} down for {outage_s:g}s ({expect})")
        down()
        time.sleep(outage_s)
        up()
        log(f"{app}: {dependency} back; waiting for normal answers")
        recovery_s = _wait(normal, RECOVERY_LIMIT_S)
        time.sleep(3.0)  # answers after the recovery count too
        during = load.window()[app]
        writer.stop()
    writes = check_writes(writer)
    w = writer.as_dict()
    other = during.other + before.other + len(writer.other)
    slow = during.slow + before.slow + int(writer.max_latency_s > load.slow_s)
    lost = writes.get("lost", 0)
    dup = writes.get("duplicated", 0)
    half = writes.get("half_written", 0)
    met = recovery_s is not None and other == 0 and slow == 0 and lost == dup == half == 0
    return {
        "fault": f"outage {dependency}",
        "app": app,
        "dependency": dependency,
        "outage_s": outage_s,
        "requests": during.total + w["writes"],
        "ok": during.ok + sum(v for k, v in w["statuses"].items() if 200 <= k < 300),
        "degraded": w["degraded"],
        "failed": during.failed + w["writes"] - len(writer.accepted),
        "retry_later": during.retry_later + writer.statuses.get(503, 0),
        "other": other,
        "slow": slow,
        "max_latency_s": round(max(during.max_latency_s, writer.max_latency_s), 2),
        "recovery_s": recovery_s,
        "writes_accepted": len(writer.accepted),
        "writes_lost": lost,
        "writes_duplicated": dup,
        "half_written": half,
        "goal": f"{expect}; 0 other failures, no hang (> {load.slow_s:g}s), 0 writes lost",
        "met": met,
        "notes": "; ".join(during.examples[:2] + writer.other[:2])[:300],
        "detail": {"load": during.as_dict(), "writes": w, "write_check": writes},
    }


# ------------------------------------------------------------------------------ business
# Deadline of one check on this pattern: records 2.5 s + risk 0.6 s + model 2 s + audit 2.5 s.
BUSINESS_SLOW_S = 15.0


def _score_request(prefix: str) -> Callable[[int], dict[str, Any]]:
    from patterns.business_logic.client import sample_request

    def make(i: int) -> dict[str, Any]:
        req = sample_request(i)
        return {**req, "path": prefix + "/score"}

    return make


def _business_writer(base_url: str) -> WriteStream:
    from patterns.business_logic.client import sample_request

    def send(http: httpx.Client, i: int, key: str) -> httpx.Response:
        body = sample_request(10_000 + i)["json"]
        headers = {"X-API-Key": BUSINESS_KEY, "Idempotency-Key": key}
        return http.post(f"{base_url}/score", json=body, headers=headers)

    return WriteStream("score", send)


def _business_normal(base_url: str, *, source: str | None = None) -> Callable[[], bool]:
    """One check answered 200, not degraded (and features from ``source`` if given)."""

    def check() -> bool:
        from patterns.business_logic.client import sample_request

        body = sample_request(7)["json"]
        r = httpx.post(
            f"{base_url}/score", json=body, headers={"X-API-Key": BUSINESS_KEY}, timeout=30
        )
        if r.status_code != 200:
            return False
        out = r.json()
        got = out["features"]["provenance"]["source"]
        return not out["degraded"] and (source is None or got == source)

    return check


def _business_writes(database_url: str) -> Callable[[WriteStream], dict[str, Any]]:
    """Every accepted keyed check has its key row and exactly one decision row; a key never
    answered 2xx has neither."""

    def check(writer: WriteStream) -> dict[str, Any]:
        from patterns.business_logic.audit import written

        ids = [b["request_id"] for b in writer.accepted.values()]
        rows = written(database_url, key_prefix=f"score-{writer.run_id}-", request_ids=ids)
        keyed = rows.keys
        lost = [
            k
            for k, body in writer.accepted.items()
            if keyed.get(k) != body["request_id"] or rows.decisions[body["request_id"]] < 1
        ]
        return {
            "accepted": len(writer.accepted),
            "key_rows": len(keyed),
            "decision_rows": sum(rows.decisions.values()),
            "lost": len(lost),
            "duplicated": sum(n - 1 for n in rows.decisions.values() if n > 1),
            "half_written": len([k for k in writer.given_up if k in keyed]),
        }

    return check


@contextlib.contextmanager
def _business_app(
    ctx: dict[str, Any] | None,
    name: str,
    *,
    database_url: str,
    feature_store_url: str,
    risk_service_url: str,
) -> Iterator[tuple[str, str]]:
    from core.model_store import ModelStore
    from patterns.business_logic.app import BusinessArgs, build_app
    from patterns.business_logic.artifacts import ensure_model

    ensure_model(ModelStore.open())
    args = BusinessArgs(
        database_url=database_url,
        feature_store_url=feature_store_url,
        risk_service_url=risk_service_url,
    )
    prefix = f"/{name}"
    with serving(ctx) as deploy:
        yield deploy(build_app(args), name, prefix), prefix


def _business_scenario(
    ctx: dict[str, Any] | None,
    dependency: str,
    *,
    database_url: str,
    feature_store_url: str,
    risk: Any,  # tests.servers.RiskService
    down: Callable[[], None],
    up: Callable[[], None],
    outage_s: float,
    expect: str,
    normal_source: str | None = None,
) -> dict[str, Any]:
    name = f"outage-bl-{dependency.split()[0].lower()}"
    with _business_app(
        ctx,
        name,
        database_url=database_url,
        feature_store_url=feature_store_url,
        risk_service_url=risk.url,
    ) as (base_url, prefix):
        load = Load(
            _root(base_url, prefix),
            ["business_logic"],
            concurrency=2,
            slow_s=BUSINESS_SLOW_S,
            timeout_s=BUSINESS_SLOW_S + 30,
            requests={"business_logic": _score_request(prefix)},
        )
        return run_outage(
            app="business_logic",
            dependency=dependency,
            load=load,
            writer=_business_writer(base_url),
            down=down,
            up=up,
            normal=_business_normal(base_url, source=normal_source),
            outage_s=outage_s,
            check_writes=_business_writes(database_url),
            expect=expect,
        )


@contextlib.contextmanager
def _seeded_sqlite(features: bool = True) -> Iterator[tuple[Path, str, str]]:
    from patterns.business_logic.seed import seed_database, seed_feature_store

    d = Path(tempfile.mkdtemp(prefix="outage-bl-"))
    db, fs = f"sqlite:///{d / 'records.db'}", f"sqlite:///{d / 'features.db'}"
    seed_database(db)
    if features:
        seed_feature_store(fs, db)
    try:
        yield d, db, fs
    finally:
        import shutil

        shutil.rmtree(d, ignore_errors=True)


def business_redis_down(ctx: dict[str, Any] | None = None, outage_s: float = 8.0) -> dict:
    """Redis (the feature store) SIGKILLed under load and restarted from its AOF: answers are
    200 with features recomputed from the database and ``degraded: true``; normal again once
    the store's breaker lets a trial call through."""
    from patterns.business_logic.seed import seed_feature_store

    redis = durable_redis()
    risk = _risk_service()
    redis.start()
    risk.start()
    try:
        with _seeded_sqlite(features=False) as (_, db, _fs):
            seed_feature_store(redis.url, db)
            return _business_scenario(
                ctx,
                "Redis feature store",
                database_url=db,
                feature_store_url=redis.url,
                risk=risk,
                down=redis.kill,
                up=redis.start,
                outage_s=outage_s,
                expect="200 degraded (features recomputed)",
                normal_source="feature_store",
            )
    finally:
        risk.kill()
        redis.cleanup()


def business_risk_api_down(ctx: dict[str, Any] | None = None, outage_s: float = 8.0) -> dict:
    """The outside risk API SIGKILLed and started again: 200 with the default signal and
    ``degraded: true``; normal once the breaker's trial call succeeds."""
    risk = _risk_service()
    risk.start()
    try:
        with _seeded_sqlite() as (_, db, fs):
            return _business_scenario(
                ctx,
                "risk API",
                database_url=db,
                feature_store_url=fs,
                risk=risk,
                down=risk.kill,
                up=risk.start,
                outage_s=outage_s,
                expect="200 degraded (default risk signal)",
            )
    finally:
        risk.kill()


def business_sqlite_locked(ctx: dict[str, Any] | None = None, outage_s: float = 8.0) -> dict:
    """The records SQLite file's write lock held by another process: lookups go on (WAL), the
    audit write fails after the 2 s busy timeout: 200 ``degraded`` (decision not logged)
    without a key, 503 + Retry-After with one (nothing written; the retry writes once)."""
    risk = _risk_service()
    risk.start()
    try:
        with _seeded_sqlite() as (d, db, fs):
            lock = SqliteWriteLock(d / "records.db")
            return _business_scenario(
                ctx,
                "SQLite records (write lock held)",
                database_url=db,
                feature_store_url=fs,
                risk=risk,
                down=lock.take,
                up=lock.release,
                outage_s=outage_s,
                expect="200 degraded unkeyed, 503+Retry-After keyed",
            )
    finally:
        risk.kill()


def business_postgres_down(ctx: dict[str, Any] | None = None, outage_s: float = 8.0) -> dict:
    """PostgreSQL (the records database) shut down under load and started again: 503 with
    Retry-After (no decision without records), normal again on the pool's next connect."""
    from tests import servers

    pg = servers.PostgresServer()
    pg.start()
    risk = _risk_service()
    risk.start()
    try:
        from patterns.business_logic.seed import seed_database

        seed_database(pg.dsn)
        with _seeded_sqlite(features=False) as (_, _db, fs):
            from patterns.business_logic.seed import seed_feature_store

            seed_feature_store(fs, pg.dsn)
            return _business_scenario(
                ctx,
                "PostgreSQL records",
                database_url=pg.dsn,
                feature_store_url=fs,
                risk=risk,
                down=pg.stop,
                up=pg.start,
                outage_s=outage_s,
                expect="503+Retry-After",
            )
    finally:
        risk.kill()
        pg.cleanup()


# ------------------------------------------------------------------------------ online
# The SQLite log's busy timeout is 10 s, Redis's socket timeout 5 s: a request may wait that
# long for the log before its 503.
ONLINE_SLOW_S = 25.0


# The writer and its check are shared with reliability/nodes.py (the trainer's node lost).
def online_requests(prefix: str) -> Callable[[int], dict[str, Any]]:
    from patterns.online_learning.client import sample_request

    def make(i: int) -> dict[str, Any]:
        return {**sample_request(i), "path": prefix + "/predict"}

    return make


def online_writer(base_url: str) -> WriteStream:
    """Predict one stream event, then send its label with an event id and an Idempotency-Key
    (both retried as they are on a 503)."""
    from patterns.online_learning.stream import DriftingStream

    stream = DriftingStream()
    predictions: dict[int, str] = {}

    def send(http: httpx.Client, i: int, key: str) -> httpx.Response:
        x, y, _ = stream.event(i)
        if i not in predictions:
            r = http.post(f"{base_url}/predict", json={"instances": [x]})
            if r.status_code != 200:
                return r  # retried like the feedback: the same i, the same key
            predictions.clear()
            predictions[i] = r.json()["predictions"][0]["prediction_id"]
        body = {"event_id": key, "prediction_id": predictions[i], "label": int(y)}
        return http.post(
            f"{base_url}/feedback",
            json=body,
            headers={"Idempotency-Key": key, "X-Client-ID": f"user-{i % 8}"},
        )

    return WriteStream("fb", send)


def trainer_status(base_url: str) -> dict[str, Any]:
    r = httpx.get(f"{base_url}/model", timeout=30)
    r.raise_for_status()
    return dict(r.json()["trainer"])


def online_writes(base_url: str, log_url: str) -> Callable[[WriteStream], dict[str, Any]]:
    """Every acknowledged label is in the log once, and the trainer applies every one of
    them: learned + held out = the labels in this (fresh) log."""

    def check(writer: WriteStream) -> dict[str, Any]:
        from patterns.online_learning.label_log import labels, last_offset, offset_key

        entries = labels(log_url)
        ids = Counter(e.event_id for e in entries)
        last = last_offset(entries)
        applied: dict[str, Any] = {}

        def caught_up() -> bool:
            t = trainer_status(base_url)
            applied.update(t)
            return offset_key(str(t.get("consumed", "0"))) >= offset_key(last)

        caught = _wait(caught_up, 120, 0.5) is not None
        learned = int(applied.get("learned", 0)) + int(applied.get("held_out", 0))
        return {
            "accepted": len(writer.accepted),
            "logged": len(entries),
            "lost": len([k for k in writer.accepted if ids[k] == 0]),
            "duplicated": sum(n - 1 for n in ids.values() if n > 1),
            "half_written": len([k for k in writer.given_up if ids[k]]),
            "trainer_caught_up": caught,
            "applied": learned,
            "not_applied": max(0, len(entries) - learned) if caught else len(entries),
            "applied_twice": max(0, learned - len(entries)),
        }

    return check


@contextlib.contextmanager
def _online_app(ctx: dict[str, Any] | None, name: str, log_url: str) -> Iterator[tuple[str, str]]:
    from core.model_store import ModelStore
    from patterns.online_learning.app import OnlineArgs, build_app
    from patterns.online_learning.artifacts import ensure_artifacts

    d = Path(tempfile.mkdtemp(prefix="outage-ol-"))
    store_uri = (d / "models").as_uri()
    ensure_artifacts(ModelStore(store_uri))
    args = OnlineArgs(log_url=log_url, model_store_uri=store_uri, ingress_replicas=1)
    prefix = f"/{name}"
    try:
        with serving(ctx) as deploy:
            yield deploy(build_app(args), name, prefix), prefix
    finally:
        import shutil

        shutil.rmtree(d, ignore_errors=True)


def _online_scenario(
    ctx: dict[str, Any] | None,
    dependency: str,
    *,
    log_url: str,
    down: Callable[[str], None],
    up: Callable[[str], None],
    outage_s: float,
    expect: str,
    normal: Callable[[str], bool] | None = None,
) -> dict[str, Any]:
    name = f"outage-ol-{dependency.split()[0].lower()}"
    with _online_app(ctx, name, log_url) as (base_url, prefix):
        load = Load(
            _root(base_url, prefix),
            ["online_learning"],
            concurrency=2,
            slow_s=ONLINE_SLOW_S,
            timeout_s=ONLINE_SLOW_S + 30,
            requests={"online_learning": online_requests(prefix)},
        )

        def predict_ok() -> bool:
            r = httpx.post(f"{base_url}/predict", json={"instances": [[0.1] * 5]}, timeout=30)
            return r.status_code == 200

        writes = online_writes(base_url, log_url)
        row = run_outage(
            app="online_learning",
            dependency=dependency,
            load=load,
            writer=online_writer(base_url),
            down=lambda: down(base_url),
            up=lambda: up(base_url),
            normal=(lambda: normal(base_url)) if normal else predict_ok,
            outage_s=outage_s,
            check_writes=writes,
            expect=expect,
        )
        check = row["detail"]["write_check"]
        if not check["trainer_caught_up"] or check["not_applied"] or check["applied_twice"]:
            row["met"] = False
            row["notes"] = f"trainer applied {check['applied']} of {check['logged']} labels"
        return row


def online_sqlite_log_locked(ctx: dict[str, Any] | None = None, outage_s: float = 15.0) -> dict:
    """The SQLite feedback log's write lock held by another process for longer than the log's
    10 s busy timeout: writes (prediction records, labels) wait it out, then 503 with
    Retry-After; the held labels are retried with their keys and logged once."""
    d = Path(tempfile.mkdtemp(prefix="outage-ol-log-"))
    log_url = f"sqlite:///{d / 'feedback.db'}"
    lock = SqliteWriteLock(d / "feedback.db")
    try:
        return _online_scenario(
            ctx,
            "SQLite feedback log (write lock held)",
            log_url=log_url,
            down=lambda _: lock.take(),
            up=lambda _: lock.release(),
            outage_s=outage_s,
            expect="200 within the busy timeout, then 503+Retry-After",
        )
    finally:
        lock.release()
        import shutil

        shutil.rmtree(d, ignore_errors=True)


def online_redis_log_down(ctx: dict[str, Any] | None = None, outage_s: float = 8.0) -> dict:
    """Redis (the feedback log, Streams) SIGKILLed and restarted from its AOF: predict and
    feedback answer 503 with Retry-After; afterwards every acknowledged label is in the stream
    once and the trainer applies all of them."""
    redis = durable_redis()
    redis.start()
    try:
        return _online_scenario(
            ctx,
            "Redis feedback log",
            log_url=redis.url,
            down=lambda _: redis.kill(),
            up=lambda _: redis.start(),
            outage_s=outage_s,
            expect="503+Retry-After",
        )
    finally:
        redis.cleanup()


def trainer_pid(base_url: str) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pid = trainer_status(base_url).get("pid")
        if pid:
            return int(pid)
        time.sleep(0.5)
    raise RuntimeError("the trainer does not report its pid")


def _trainer_live(old_pid: int | None = None) -> Callable[[str], bool]:
    def check(base_url: str) -> bool:
        t = trainer_status(base_url)
        return t.get("status") != "unavailable" and (old_pid is None or t.get("pid") != old_pid)

    return check


def online_trainer_killed(ctx: dict[str, Any] | None = None, outage_s: float = 2.0) -> dict:
    """The trainer replica SIGKILLed (Serve restarts it): predictions and labels are served
    and logged as if nothing happened; the new trainer resumes from its saved offset."""
    d = Path(tempfile.mkdtemp(prefix="outage-ol-log-"))
    log_url = f"sqlite:///{d / 'feedback.db'}"
    killed: dict[str, int] = {}

    def down(base_url: str) -> None:
        killed["pid"] = trainer_pid(base_url)
        os.kill(killed["pid"], signal.SIGKILL)

    try:
        return _online_scenario(
            ctx,
            "trainer replica (SIGKILL)",
            log_url=log_url,
            down=down,
            up=lambda _: None,
            outage_s=outage_s,
            expect="200 and 202 throughout",
            normal=lambda url: _trainer_live(killed.get("pid"))(url),
        )
    finally:
        import shutil

        shutil.rmtree(d, ignore_errors=True)


def online_trainer_stuck(ctx: dict[str, Any] | None = None, outage_s: float = 10.0) -> dict:
    """The trainer replica stopped (SIGSTOP: a stuck process, not a dead one) and resumed:
    predictions and labels go on; ``GET /model`` answers 200 with the trainer "unavailable"
    after its 5 s timeout; the trainer catches up once it runs again."""
    d = Path(tempfile.mkdtemp(prefix="outage-ol-log-"))
    log_url = f"sqlite:///{d / 'feedback.db'}"
    stuck: dict[str, int] = {}

    def down(base_url: str) -> None:
        stuck["pid"] = trainer_pid(base_url)
        os.kill(stuck["pid"], signal.SIGSTOP)

    def up(_: str) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stuck["pid"], signal.SIGCONT)

    try:
        return _online_scenario(
            ctx,
            "trainer replica (SIGSTOP)",
            log_url=log_url,
            down=down,
            up=up,
            outage_s=outage_s,
            expect="200 and 202 throughout; /model degraded",
            normal=_trainer_live(),
        )
    finally:
        if "pid" in stuck:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stuck["pid"], signal.SIGCONT)
        import shutil

        shutil.rmtree(d, ignore_errors=True)


SCENARIOS: list[tuple[str, Callable[..., dict[str, Any]]]] = [
    ("business_postgres_down", business_postgres_down),
    ("business_sqlite_locked", business_sqlite_locked),
    ("business_redis_down", business_redis_down),
    ("business_risk_api_down", business_risk_api_down),
    ("online_sqlite_log_locked", online_sqlite_log_locked),
    ("online_redis_log_down", online_redis_log_down),
    ("online_trainer_killed", online_trainer_killed),
    ("online_trainer_stuck", online_trainer_stuck),
]

COLUMNS = (
    ("app", "app"),
    ("dependency", "dependency"),
    ("outage_s", "down s"),
    ("requests", "requests"),
    ("ok", "ok"),
    ("degraded", "degraded"),
    ("retry_later", "503+RA"),
    ("other", "other"),
    ("max_latency_s", "max s"),
    ("recovery_s", "recovery s"),
    ("writes_accepted", "writes 2xx"),
    ("writes_lost", "lost"),
    ("writes_duplicated", "dup"),
    ("met", "met"),
)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |"]
    lines.append("|" + " --- |" * len(COLUMNS))
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, "-")) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="comma-separated scenario names")
    p.add_argument("--json", type=Path, help="write the rows here as JSON")
    a = p.parse_args(argv)
    only = {s for s in a.only.split(",") if s}
    rows = []
    with serving(None) as deploy:
        for name, fn in SCENARIOS:
            if only and name not in only:
                continue
            log(name)
            row = fn({"deploy": deploy})
            rows.append(row)
            log(json.dumps({k: row.get(k) for k, _ in COLUMNS}))
    print(table(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2, default=str))
    return 0 if all(r["met"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

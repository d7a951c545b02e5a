"""The ingress's request flow as a plain class (tested without Serve): predict with the live
champion, record what was predicted, join feedback to it and log it durably before the ack.

Failure policy, written once:
- the trainer is never on this path: with the trainer down, predictions are served by the
  current champion and feedback keeps being logged (the trainer catches up on restart);
- feedback is acknowledged only after the log has it (``202``); a retry with the same event id
  gets the original acknowledgement (``200``, ``duplicate: true``) and is not logged again; the
  same event id with other content is a ``409``;
- bad input is a 422 (features, labels, rewards), an unknown prediction id a 404, an expired
  one a 410: nothing is logged for a refused request;
- backpressure: one client beyond its rate gets ``429``, a replica with too many log writes
  in flight or a trainer too far behind answers ``503``; both say when to retry, and memory
  stays bounded (at most ``max_writes_in_flight`` batches wait per replica);
- the log failing is a 503 too: retrying with the same event ids is always safe;
- the trainer or the bandit policy not answering within ``call_timeout_s`` (or failing) is a
  503 for the routes that need it (rollback, bandit choices and state); ``GET /model`` still
  answers, with the trainer reported unavailable.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from core.errors import (
    Conflict,
    HTTPError,
    ModelNotFound,
    NotFound,
    ServiceUnavailable,
    TooManyRequests,
    Unprocessable,
)
from core.metrics import ModelMetrics
from core.model_store import ModelStore
from core.resilience import describe_error
from core.resources import StageResources
from core.timing import Timings
from patterns.online_learning.bandit import CONTEXT_DIM, BanditParams
from patterns.online_learning.feedback_log import Appended, FeedbackLog, open_log, payload_digest
from patterns.online_learning.learning import LABELS_STREAM, TrainerArgs
from patterns.online_learning.model import (
    BASELINE_VERSION,
    MODEL_NAME,
    is_holdout,
    probability_of_one,
    validate_rows,
)
from patterns.online_learning.settings import OnlineSettings
from patterns.online_learning.stream import CLASSES, N_FEATURES

logger = logging.getLogger("patterns.online_learning")
REWARDS_STREAM = "rewards"
# Idempotency-Key -> the digest of the body it was first used with: one entry per key in the
# log itself (the log's unique event id is the guarantee, shared by every replica and restart).
KEYS_STREAM = "idempotency_keys"
# A call to another deployment: (method name, *args) -> its answer (a DeploymentHandle's
# ``getattr(handle, method).remote(*args)`` in the app; a plain coroutine in the tests).
Remote = Callable[..., Awaitable[Any]]


class Gone(HTTPError):
    """The prediction id existed but is too old to take feedback."""

    status_code = 410


class FeedbackLimits(BaseModel):
    # How long a prediction takes feedback. Records are kept twice as long, so an expired id
    # is told apart from one that never existed (410 vs 404).
    prediction_ttl_s: float = Field(default=3600.0, gt=0)
    # Per client (X-Client-ID or client_id), per ingress replica: a token bucket in events.
    client_rate_per_s: float = Field(default=500.0, gt=0)
    client_burst: int = Field(default=1000, ge=1)
    max_clients_tracked: int = Field(default=10_000, ge=1)  # oldest bucket forgotten beyond
    # Feedback batches waiting on the log in one replica; beyond this: 503 (bounded memory).
    max_writes_in_flight: int = Field(default=32, ge=1)
    # Events logged but not yet learned; beyond this the trainer is too far behind: 503.
    max_backlog: int = Field(default=100_000, ge=1)


class BanditArgs(BaseModel):
    params: BanditParams = BanditParams()
    save_every_s: float = Field(default=1.0, gt=0, le=600)  # posterior saved this often
    resources: StageResources = StageResources(num_cpus=0.05)


class OnlineArgs(BaseModel):
    """The app's args (``build_app`` in app.py; config.yaml's ``args`` block)."""

    # None: ONLINE_LOG_URL, else sqlite:///<repo>/artifacts/online_learning/feedback.db
    log_url: str | None = None
    model_store_uri: str | None = None  # default: COOKBOOK_MODEL_STORE_URI
    trainer: TrainerArgs = TrainerArgs()
    bandit: BanditArgs = BanditArgs()
    limits: FeedbackLimits = FeedbackLimits()
    max_rows: int = Field(default=64, ge=1, le=4096)  # rows per predict request
    # Safety net under the broadcast nudge: each replica re-reads the pointer this often.
    pointer_poll_s: float = Field(default=1.0, gt=0, le=60)
    trainer_timeout_s: float = Field(default=5.0, gt=0)  # GET /model, POST /rollback
    # None: autoscale 2..4 (the deployment's autoscaling_config); a number fixes the count.
    ingress_replicas: int | None = Field(default=None, ge=1)
    ingress_resources: StageResources = StageResources(num_cpus=0.05)
    trainer_resources: StageResources = StageResources(num_cpus=0.1)

    def placed_by_the_log(self) -> OnlineArgs:
        """These args with the placement the feedback log needs. The SQLite log is one file on
        one disk: the trainer (its single writer), the bandit and the ingress replicas that
        append to it run on the head node (``node_kind: head``), where the file is. Redis
        Streams are reached from any node: nothing is pinned. A node kind set in config wins."""
        url = self.log_url or OnlineSettings().log_url
        if not url.startswith("sqlite"):
            return self

        def pin(res: StageResources) -> StageResources:
            return res if res.node_kind else res.model_copy(update={"node_kind": "head"})

        bandit = self.bandit.model_copy(update={"resources": pin(self.bandit.resources)})
        return self.model_copy(
            update={
                "trainer_resources": pin(self.trainer_resources),
                "ingress_resources": pin(self.ingress_resources),
                "bandit": bandit,
            }
        )


class TokenBuckets:
    """Per-client rate limit (replica-local, so the limit is per replica: N replicas allow a
    client up to N times the rate; put it at the gateway for a global one)."""

    def __init__(self, rate: float, burst: int, max_clients: int) -> None:
        self.rate, self.burst, self.max_clients = rate, burst, max_clients
        self._b: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, client: str, n: int, now: float | None = None) -> float:
        """0 when allowed, else the seconds to wait before ``n`` events fit."""
        now = time.monotonic() if now is None else now
        tokens, last = self._b.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        wait = 0.0
        if n > self.burst:
            wait = (n - tokens) / self.rate
        elif tokens >= n:
            tokens -= n
        else:
            wait = (n - tokens) / self.rate
        self._b[client] = (tokens, now)
        while len(self._b) > self.max_clients:
            self._b.popitem(last=False)
        return wait


class LiveModel:
    """The champion this replica answers with: read from the pointer at start, switched when
    nudged (``DeploymentHandle.broadcast`` calls ``reload``) or when the poll sees the pointer
    move. ``current`` is one tuple, swapped in one assignment, so an answer never mixes one
    version's name with another's weights."""

    def __init__(self, store: ModelStore, log: FeedbackLog) -> None:
        self.store, self.log = store, log
        self.current: tuple[str, Any, str] | None = None  # (version, model, trained through)
        self.switches = 0
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Any] = OrderedDict()  # pinned versions (frozen baseline)
        self._stop = threading.Event()

    @property
    def version(self) -> str | None:
        return self.current[0] if self.current else None

    def follow_pointer(self) -> str:
        """Blocking: serve whatever the pointer names (at start, and on every poll). Before the
        trainer has written a pointer, and if the pointer names a version the store does not
        have (a store wiped under a kept log), serve the baseline until the trainer fixes it."""
        pointer = self.log.champion()
        version = pointer["version"] if pointer else BASELINE_VERSION
        try:
            return self.switch(version)
        except ModelNotFound:
            logger.warning("champion %s is not in the model store; serving the baseline", version)
            return self.switch(BASELINE_VERSION) if self.current is None else str(self.version)

    def poll(self, every_s: float) -> None:
        """Re-read the pointer every ``every_s`` in a daemon thread: the safety net under the
        trainer's nudge (a replica that missed a broadcast catches up within one poll)."""
        threading.Thread(
            target=self._poll, args=(every_s,), name="pointer-poll", daemon=True
        ).start()

    def _poll(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.follow_pointer()
            except Exception:  # keep serving the loaded version; try again next poll
                logger.debug("pointer poll failed", exc_info=True)

    def stop(self) -> None:
        self._stop.set()

    def switch(self, version: str) -> str:
        """Blocking: load ``version`` unless it is the one served."""
        with self._lock:
            if self.current is None or self.current[0] != version:
                clf, ref = self.store.load_sklearn(MODEL_NAME, version)
                self.current = (version, clf, str(ref.metadata.get("consumed", "0")))
                self.switches += 1
                logger.info("now serving %s", version)
            return version

    async def pinned(self, version: str) -> Any:
        current = self.current
        if current and version == current[0]:
            return current[1]
        if version not in self._cache:
            try:
                clf, _ = await asyncio.to_thread(self.store.load_sklearn, MODEL_NAME, version)
            except Exception as exc:
                raise NotFound(
                    f"Model version {version!r} is not in the store (old candidates are "
                    "pruned); GET /online/model lists the champion and recent versions."
                ) from exc
            self._cache[version] = clf
            while len(self._cache) > 4:
                self._cache.popitem(last=False)
        return self._cache[version]


class VersionMetrics:
    """Prediction latency and rows per call, one series per version that answered. Versions
    change often, so only the newest ``keep`` series are kept."""

    def __init__(self, app: str, keep: int = 8) -> None:
        self.app, self.keep = app, keep
        self._series: dict[str, ModelMetrics] = {}

    def observe(self, version: str, latency_s: float, rows: int) -> None:
        if version not in self._series:
            if len(self._series) >= self.keep:
                self._series.pop(next(iter(self._series)))
            self._series[version] = ModelMetrics(self.app, MODEL_NAME, version)
        self._series[version].observe(latency_s)
        self._series[version].observe_batch(rows)


class OnlineService:
    """The routes' work. The app passes its args: ``max_rows`` per predict request (None: no
    limit), the bandit's ``context_dim``, and how long the ``trainer`` and ``bandit`` calls may
    take (``call_timeout_s``)."""

    def __init__(
        self,
        log: FeedbackLog,
        live: LiveModel,
        limits: FeedbackLimits,
        *,
        holdout_every: int,
        clock: Callable[[], float] = time.time,
        observe: Callable[[str, float, int], None] | None = None,
        max_rows: int | None = None,
        context_dim: int = CONTEXT_DIM,
        trainer: Remote | None = None,
        bandit: Remote | None = None,
        call_timeout_s: float = 5.0,
    ) -> None:
        self.log, self.live, self.limits = log, live, limits
        self.holdout_every = holdout_every
        self.clock = clock
        self.max_rows, self.context_dim = max_rows, context_dim
        self.trainer, self.bandit, self.call_timeout_s = trainer, bandit, call_timeout_s
        # (version, model latency s, rows) after each predict: the ingress feeds its metrics
        self.observe = observe or (lambda version, latency_s, rows: None)
        self.buckets = TokenBuckets(
            limits.client_rate_per_s, limits.client_burst, limits.max_clients_tracked
        )
        self.writes_in_flight = 0
        self._queued: dict[str, list[tuple[list[Any], asyncio.Future[list[Any]]]]] = {}
        self._writers: dict[str, asyncio.Task[None]] = {}
        self._backlog = (0, 0.0)  # (events, when read)

    @classmethod
    def from_args(cls, args: OnlineArgs, trainer: Remote, bandit: Remote) -> OnlineService:
        """One ingress replica's flow: the log (``log_url``, else ONLINE_LOG_URL), the champion
        the pointer names, re-read every ``pointer_poll_s``, and the trainer and bandit calls."""
        log = open_log(args.log_url or OnlineSettings().log_url)
        live = LiveModel(ModelStore.open(args.model_store_uri), log)
        # The pointer, not the deploy-time config, says what to serve: a replica added by
        # autoscaling an hour from now starts on the champion of that moment.
        live.follow_pointer()
        live.poll(args.pointer_poll_s)
        return cls(
            log,
            live,
            args.limits,
            holdout_every=args.trainer.gate.holdout_every,
            observe=VersionMetrics("online_learning").observe,
            max_rows=args.max_rows,
            context_dim=args.bandit.params.context_dim,
            trainer=trainer,
            bandit=bandit,
            call_timeout_s=args.trainer_timeout_s,
        )

    async def _io(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """A blocking log call off the event loop; the log failing is a 503, not a 500."""
        try:
            return await asyncio.to_thread(fn, *args)
        except HTTPError:
            raise
        except Exception as exc:
            logger.warning("feedback log: could not %s: %s", what, exc)
            raise ServiceUnavailable(
                f"The feedback log is unavailable (could not {what}); retry shortly. Feedback "
                "retries are safe: the same event ids are never logged twice."
            ) from exc

    async def _call(self, remote: Remote | None, what: str, method: str, *args: Any) -> Any:
        """One call to the trainer or the bandit policy; no answer in time, or a failure, is a
        503 that says what happened."""
        timeout = self.call_timeout_s
        try:
            if remote is None:
                raise RuntimeError(f"no {what} is connected")
            return await asyncio.wait_for(remote(method, *args), timeout)
        except TimeoutError as exc:
            raise ServiceUnavailable(
                f"The {what} did not answer within {timeout:g}s (restarting?); retry shortly."
            ) from exc
        except Exception as exc:
            why = describe_error(exc).removeprefix("error: ")
            raise ServiceUnavailable(f"The {what} is unavailable ({why}); retry shortly.") from exc

    # -------------------------------------------------------------------- predict
    async def predict(self, rows: list[list[Any]], version: str | None = None) -> dict[str, Any]:
        if self.max_rows is not None and len(rows) > self.max_rows:
            raise Unprocessable(f"{len(rows)} rows in one request; send at most {self.max_rows}.")
        t = Timings()
        x = validate_rows(rows)
        with t.stage("model"):
            if version is None:
                current = self.live.current
                if current is None:
                    raise ServiceUnavailable("No model is loaded yet; retry shortly.")
                served, clf, through = current
            else:
                clf, served, through = await self.live.pinned(version), version, None
            p1 = probability_of_one(clf, x)
        self.observe(str(served), t.as_dict()["model"] / 1000, len(rows))
        labels = (p1 >= 0.5).astype(int)
        ids = [f"p-{uuid.uuid4().hex}" for _ in rows]
        with t.stage("record"):
            records = [
                (pid, {"x": x[i].tolist(), "version": served, "predicted": int(labels[i])})
                for i, pid in enumerate(ids)
            ]
            await self._io(
                "record the prediction",
                self.log.put_records,
                records,
                2 * self.limits.prediction_ttl_s,
            )
        return {
            "model_version": served,
            "trained_through": through,
            "predictions": [
                {"prediction_id": pid, "label": int(labels[i]), "p_one": round(float(p1[i]), 4)}
                for i, pid in enumerate(ids)
            ],
            "timings_ms": t.as_dict(),
        }

    # -------------------------------------------------------------------- backpressure
    def _admit(self, client: str, n: int) -> None:
        wait = self.buckets.take(client, n)
        if wait > 0:
            raise TooManyRequests(
                f"Client {client!r} sent more than {self.limits.client_rate_per_s:g} events/s "
                f"(burst {self.limits.client_burst}); retry in {max(wait, 0.1):.1f}s.",
                retry_after_s=wait,
            )
        if self.writes_in_flight >= self.limits.max_writes_in_flight:
            raise ServiceUnavailable(
                f"{self.writes_in_flight} feedback requests are already waiting on the log in "
                "this replica; retry shortly."
            )

    async def _check_backlog(self, stream: str) -> None:
        events, when = self._backlog
        now = time.monotonic()
        if now - when > 1.0:  # one count per second per replica, not one per request
            events = await self._io("read the backlog", self.log.backlog, stream)
            self._backlog = (events, now)
        if events > self.limits.max_backlog:
            raise ServiceUnavailable(
                f"The trainer is {events} events behind (limit {self.limits.max_backlog}); "
                "feedback is paused until it catches up. Retry later.",
                retry_after_s=5.0,
            )

    async def _append(self, stream: str, items: list[tuple[str, dict[str, Any]]]) -> list[Any]:
        """Group commit: requests that arrive while a write is under way share the next
        transaction (one fsync for all of them), so one-event requests scale with concurrency
        instead of queueing on the disk one by one."""
        self.writes_in_flight += 1
        try:
            future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
            self._queued.setdefault(stream, []).append((items, future))
            if stream not in self._writers:
                self._writers[stream] = asyncio.create_task(self._write_queued(stream))
            return await future
        finally:
            self.writes_in_flight -= 1

    async def _write_queued(self, stream: str) -> None:
        try:
            while self._queued.get(stream):
                waiting, self._queued[stream] = self._queued[stream], []
                merged = [item for items, _ in waiting for item in items]
                try:
                    results = await self._io("log the feedback", self.log.append, stream, merged)
                except Exception as exc:  # every request of this group gets the error
                    for _, future in waiting:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                at = 0
                for items, future in waiting:
                    if not future.done():
                        future.set_result(results[at : at + len(items)])
                    at += len(items)
        finally:
            del self._writers[stream]

    # -------------------------------------------------------------------- joins
    async def _joined(self, record_id: str, what: str, index: int | None) -> dict[str, Any]:
        where = f"Event {index}: " if index is not None else ""
        found = await self._io("look the prediction up", self.log.get_record, record_id)
        ttl = self.limits.prediction_ttl_s
        if found is None:
            raise NotFound(
                f"{where}unknown {what} {record_id!r}: it was never issued, or it expired "
                f"more than {2 * ttl:g}s ago. Send feedback within {ttl:g}s of the answer."
            )
        record, created = found
        age = self.clock() - created
        if age > ttl:
            raise Gone(
                f"{where}{what} {record_id!r} is {age:.0f}s old; feedback is accepted for "
                f"{ttl:g}s after the answer."
            )
        return record

    # -------------------------------------------------------------------- feedback
    async def _claim_key(self, route: str, key: str | None, body: dict[str, Any]) -> float | None:
        """Bind an Idempotency-Key to this body, once. Returns when the key was first used
        (None without a key); the key with another body is a 409. Claiming writes no event:
        a request that fails after the claim is retried with the same key and logs then."""
        if key is None:
            return None
        (claim,) = await self._io(
            "record the idempotency key",
            self.log.append,
            KEYS_STREAM,
            [(f"{route}:{key}", {"route": route, "body": payload_digest(body)})],
        )
        if claim.duplicate and not claim.same_payload:
            raise Conflict(
                f"Idempotency-Key {key!r} was already used for a different {route} request "
                f"(at {claim.acked_at:.3f}); use a new key for a new request."
            )
        return float(claim.acked_at)

    async def feedback(
        self, events: list[Any], client: str | None, idempotency_key: str | None = None
    ) -> tuple[int, list[dict[str, Any]]]:
        """Log labels for earlier predictions. Returns (HTTP status, one ack per event).
        With an ``idempotency_key`` a repeat of the request gets the first answer. ``client``
        (rate limits, the log): the body's ``client_id`` or X-Client-ID; None is "anonymous"."""
        client = client or "anonymous"
        for i, ev in enumerate(events):
            if ev.label not in CLASSES:
                raise Unprocessable(
                    f"Event {i}: label {ev.label!r} is out of range; labels are "
                    f"{', '.join(map(str, CLASSES))}."
                )
        self._admit(client, len(events))
        await self._check_backlog(LABELS_STREAM)
        body = {
            "events": [
                {"event_id": ev.event_id, "prediction_id": ev.prediction_id, "label": ev.label}
                for ev in events
            ]
        }
        since = await self._claim_key("feedback", idempotency_key, body)
        items = []
        for i, ev in enumerate(events):
            rec = await self._joined(
                ev.prediction_id, "prediction id", i if len(events) > 1 else None
            )
            items.append(
                (
                    ev.event_id,
                    {
                        "event_id": ev.event_id,
                        "prediction_id": ev.prediction_id,
                        "x": rec["x"],
                        "label": int(ev.label),
                        "served_version": rec["version"],
                        "predicted": rec["predicted"],
                        "client": client,
                    },
                )
            )
        return self._acks(await self._append(LABELS_STREAM, items), len(events) == 1, since)

    def _acks(
        self, appended: list[Appended], single: bool, since: float | None = None
    ) -> tuple[int, list[dict[str, Any]]]:
        """One ack per event. ``since``: when this request's Idempotency-Key was first used;
        an event logged since then was logged by this request (its first try, or a retry of
        it after a 503), so it is acknowledged as the first answer did: "logged"."""
        if since is not None:
            appended = [
                Appended(a.event_id, a.offset, a.acked_at, False)
                if a.duplicate and a.same_payload and a.acked_at >= since
                else a
                for a in appended
            ]
        acks = []
        for a in appended:
            if a.duplicate and not a.same_payload:
                msg = (
                    f"Event id {a.event_id!r} was already used for different feedback "
                    f"(logged at offset {a.offset}); use a new event id for new feedback."
                )
                if single:
                    raise Conflict(msg)
                acks.append({"event_id": a.event_id, "status": "conflict", "message": msg})
                continue
            acks.append(
                {
                    "event_id": a.event_id,
                    "status": "duplicate" if a.duplicate else "logged",
                    "offset": a.offset,
                    "acked_at": round(a.acked_at, 6),
                    "use": "holdout" if is_holdout(a.event_id, self.holdout_every) else "train",
                    "duplicate": a.duplicate,
                }
            )
        new = any(not a.duplicate for a in appended)
        return (202 if new else 200), acks

    # -------------------------------------------------------------------- bandit rewards
    async def reward(
        self,
        event_id: str,
        choice_id: str,
        reward: float,
        client: str | None,
        idempotency_key: str | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Log the reward a bandit choice earned, as ``feedback`` logs a label."""
        client = client or "anonymous"
        if not (0.0 <= reward <= 1.0) or not np.isfinite(reward):
            raise Unprocessable(f"reward {reward!r} is out of range; rewards are in [0, 1].")
        self._admit(client, 1)
        await self._check_backlog(REWARDS_STREAM)
        body = {"event_id": event_id, "choice_id": choice_id, "reward": float(reward)}
        since = await self._claim_key("reward", idempotency_key, body)
        rec = await self._joined(choice_id, "choice id", None)
        payload = {
            "event_id": event_id,
            "choice_id": choice_id,
            "x": rec["x"],
            "action": rec["action"],
            "reward": float(reward),
            "client": client,
        }
        appended = await self._append(REWARDS_STREAM, [(event_id, payload)])
        status, acks = self._acks(appended, True, since)
        ack = acks[0]
        ack.pop("use", None)
        return status, ack

    async def choose(self, context: list[Any]) -> dict[str, Any]:
        """The bandit's action for one context of ``context_dim`` finite numbers."""
        if len(context) != self.context_dim:
            raise Unprocessable(
                f"context has {len(context)} numbers; the bandit takes {self.context_dim}."
            )
        row = validate_rows([context], self.context_dim)[0].tolist()
        return await self._call(self.bandit, "bandit policy", "choose", row)

    async def bandit_state(self) -> dict[str, Any]:
        return await self._call(self.bandit, "bandit policy", "state")

    # -------------------------------------------------------------------- model and rollback
    async def model_status(self) -> dict[str, Any]:
        """The served version with what it learned (its manifest), the pointer's history and
        the trainer's status; a trainer that does not answer is reported, the rest still is."""
        version = self.live.version
        store = self.live.store
        manifest, _ = await asyncio.to_thread(store.read_manifest, MODEL_NAME, str(version))
        meta = manifest.get("metadata", {})
        history = await asyncio.to_thread(self.log.champion_history, 20)
        try:
            trainer = await self._call(self.trainer, "trainer", "status")
        except ServiceUnavailable as exc:
            trainer = {"status": "unavailable", "message": exc.message}
        return {
            "model": MODEL_NAME,
            "version": version,
            "baseline_version": BASELINE_VERSION,
            "features": [f"x{i}" for i in range(N_FEATURES)],
            "classes": list(CLASSES),
            "consumed_offsets": {"labels": meta.get("consumed", "0")},
            "learned_events": meta.get("learned", 0),
            "held_out_events": meta.get("held_out", 0),
            "gate": meta.get("gate"),
            "metrics_history": trainer.get("history") or meta.get("history", []),
            "pointer_history": history,
            "trainer": {k: v for k, v in trainer.items() if k != "history"},
        }

    async def rollback(self, to_version: str | None, reason: str) -> dict[str, Any]:
        """The trainer moves the pointer back (to ``to_version``, or the previous champion);
        this replica switches at once, the others on the trainer's nudge or their next poll."""
        out = await self._call(self.trainer, "trainer", "rollback", to_version, reason)
        if "error" in out:
            raise (NotFound if to_version else Conflict)(out["error"])
        await asyncio.to_thread(self.live.switch, out["champion"])
        return out

    def health(self) -> dict[str, Any]:
        return {"model_version": self.live.version, "writes_in_flight": self.writes_in_flight}

"""The trainer's loop, as a plain class with its log and model store injected (tested without
Serve; ``deployments.OnlineTrainer`` runs it in a thread of one Serve replica).

One round:

    read <= batch_size events after the consumed offset
      -> held-out events (1 in k, by event-id hash) join the gate's window, never trained on
      -> labelled live answers are scored for the rollback check (served vs anchor)
      -> partial_fit the head model on the rest
      -> save it as the next version, consumed offset inside its manifest   (exactly once)
      -> commit the offset to the log (only lets the log forget / XACK)
      -> gate: candidate vs champion on the recent window -> promote (pointer + nudge) or not
      -> rollback check: once the live window is full, if the answers served since the anchor
         scored worse than the anchor would have on the same events, roll back to the anchor;
         otherwise the newest version that served them becomes the new anchor

Failure policy, written once:
- a crash anywhere before the save loses only in-memory work: the restart reloads the newest
  saved version and reads again after its offset (nothing lost, nothing applied twice); a
  round that fails without a crash (a write refused) rebuilds the same way before retrying;
- a crash between the save and the pointer update is finished on restart (the saved version
  says it passed the gate);
- the gate looks at held-out events with each client's share capped, so one client flooding
  flipped labels can neither train a bad model into production nor skew the comparison;
- a rejected candidate stays the training head (it keeps learning and is compared again next
  round); a rollback resets the head to the version rolled back to.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from core.errors import ModelStoreError
from core.model_store import ModelStore
from patterns.online_learning.feedback_log import START, Entry, FeedbackLog
from patterns.online_learning.model import (
    BASELINE_VERSION,
    MODEL_NAME,
    LearnerParams,
    drop_versions,
    is_holdout,
    partial_fit,
    version_name,
    version_number,
)

logger = logging.getLogger("patterns.online_learning")
LABELS_STREAM = "labels"


class GatePolicy(BaseModel):
    """When may a candidate go live? It is compared with the champion on the newest held-out
    events (which it never trained on)."""

    holdout_every: int = Field(default=5, ge=2, le=100)  # 1 event in k goes to the window
    window: int = Field(default=100, ge=10, le=10_000)  # newest held-out events compared
    min_window: int = Field(default=30, ge=1)  # fewer than this: no promotion yet
    # No client may fill more than this share of the window, so a flood from one client
    # cannot decide the comparison. It protects when honest labels come from several clients
    # (users, shops, labelling jobs: send a distinct X-Client-ID for each); against a single
    # honest source, a flood is one voice against one (see README).
    max_client_share: float = Field(default=0.25, gt=0, le=1)
    # The candidate may trail the champion by this much and still go live (it is fresher);
    # 1.0 switches the gate off (the rollback test does that on purpose).
    margin: float = Field(default=0.02, ge=0, le=1)


class RollbackPolicy(BaseModel):
    """When is a promotion undone? Live labels for answers served since the anchor (the last
    champion live data confirmed) are scored for the served version and for the anchor."""

    window: int = Field(default=100, ge=10)  # labelled live answers per verdict
    margin: float = Field(default=0.05, ge=0, le=1)  # served may trail the anchor this much


class TrainerArgs(BaseModel):
    batch_size: int = Field(default=64, ge=1, le=4096)  # events per round at most
    # How long an idle read waits for events. Short enough for freshness, long enough that
    # an idle trainer costs nothing (all apps share two cores under `make serve`).
    poll_s: float = Field(default=0.2, gt=0, le=5)
    learner: LearnerParams = LearnerParams()
    gate: GatePolicy = GatePolicy()
    rollback: RollbackPolicy = RollbackPolicy()
    keep_versions: int = Field(default=200, ge=10)  # newest candidates kept in the store
    # Chaos knob, off by default: sleep between training and saving, so a test (or a game
    # day) can SIGKILL the trainer in the middle of a batch.
    pause_before_save_s: float = Field(default=0.0, ge=0, le=60)


def _rows(entries: list[Entry]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray([e.payload["x"] for e in entries], dtype=np.float64)
    y = np.asarray([int(e.payload["label"]) for e in entries], dtype=np.int64)
    return x, y


class Trainer:
    def __init__(
        self,
        log: FeedbackLog,
        store: ModelStore,
        args: TrainerArgs,
        *,
        storage_options: Mapping[str, Any] | None = None,
        on_champion: Callable[[str], None] | None = None,
        stream: str = LABELS_STREAM,
    ) -> None:
        self.log, self.store, self.args, self.stream = log, store, args, stream
        self.storage_options = dict(storage_options or {})
        self.on_champion = on_champion or (lambda version: None)
        self.lock = threading.Lock()  # one round or one rollback at a time
        self.rounds = 0
        self.in_batch: dict[str, Any] | None = None  # what a round is doing right now
        self.history: deque[dict[str, Any]] = deque(maxlen=50)
        self._restore()

    # -------------------------------------------------------------------- start / restart
    def _load(self, version: str) -> tuple[Any, dict[str, Any]]:
        clf, ref = self.store.load_sklearn(MODEL_NAME, version)
        return clf, dict(ref.metadata)

    def _restore(self) -> None:
        versions = self.store.versions(MODEL_NAME)
        if not versions:
            raise RuntimeError(
                f"no {MODEL_NAME} versions in {self.store.root_uri}; build the initial "
                "champion first: python -m patterns.online_learning.artifacts"
            )
        head = versions[-1]
        self.head_model, meta = self._load(head)
        self.head_version = head
        # The offset and the counters of the events it covers come from the same version:
        # learned + held_out counts this log's events up to ``consumed``, exactly once.
        self.consumed = str(meta.get("consumed", START))
        self.learned = int(meta.get("learned", 0))
        self.held_out = int(meta.get("held_out", 0))
        if meta.get("log_id") not in (None, self.log.log_id()):
            # This version learned from another log (a fresh database, another Redis): none
            # of the current log is inside it yet, so its offset and counts mean nothing here.
            logger.warning(
                "head %s learned from log %s; reading %s from the start",
                head,
                meta.get("log_id"),
                self.log.log_id(),
            )
            self.consumed, self.learned, self.held_out = START, 0, 0
        self.history.extend(meta.get("history", []))
        pointer = self.log.champion()
        champion = pointer["version"] if pointer else BASELINE_VERSION
        if pointer is None:
            self.log.set_champion(champion, "initial champion (no pointer yet)")
        if not self.store.exists(MODEL_NAME, champion):
            logger.warning(
                "the pointer names %s, which the store lacks; champion = %s", champion, head
            )
            champion = head
            self.log.set_champion(
                head,
                f"pointer named {pointer and pointer['version']}, missing from the model store",
            )
        if meta.get("decision") == "promote" and version_number(head) > version_number(champion):
            # Saved and passed the gate, then the process died before moving the pointer.
            champion = head
            self.log.set_champion(head, "promotion finished after a trainer restart")
        self.champion_version = champion
        self.champion_model = self._load(champion)[0]
        self.anchor_version = str(meta.get("anchor") or champion)
        if not self.store.exists(MODEL_NAME, self.anchor_version):
            self.anchor_version = champion
        self.anchor_model = self._load(self.anchor_version)[0]
        # (served answer right, anchor right, version that served it, client), next verdict
        self.live: list[tuple[bool, bool, str, str]] = []
        # The gate's window, rebuilt from the log's tail (held-out events are never trained
        # on, so reading them again changes nothing).
        gate = self.args.gate
        self.window: deque[tuple[str, list[float], int]] = deque(maxlen=gate.window * 10)
        if self.consumed != START:
            for e in self.log.tail(
                self.stream, self.consumed, gate.window * gate.holdout_every * 4
            ):
                if is_holdout(e.event_id, gate.holdout_every):
                    self.window.append(
                        (str(e.payload.get("client", "")), e.payload["x"], int(e.payload["label"]))
                    )
        logger.info(
            "trainer restored head %s (consumed %s), champion %s, anchor %s, window %d",
            head,
            self.consumed,
            champion,
            self.anchor_version,
            len(self.window),
        )

    # -------------------------------------------------------------------- one round
    def step(self, block_s: float | None = None) -> dict[str, Any] | None:
        """Read, learn, save, gate. None when no event came within ``block_s``."""
        block = self.args.poll_s if block_s is None else block_s
        try:
            entries = self.log.read(self.stream, self.consumed, self.args.batch_size, block)
        except Exception:
            self.log.rewind(self.stream)  # the log may have delivered what we never got
            raise
        if not entries:
            return None
        with self.lock:
            try:
                return self._round(entries)
            except Exception:
                # A failed round (the store or the log refused a write) may have trained the
                # head in memory: forget it all and rebuild from what is durable, exactly as a
                # restart would, so the retry does not learn the batch twice, and have the
                # log deliver this batch again (on Redis it is pending, not new).
                self.in_batch = None
                self.log.rewind(self.stream)
                self._restore()
                raise

    def _round(self, entries: list[Entry]) -> dict[str, Any]:
        gate = self.args.gate
        first, last = entries[0].offset, entries[-1].offset
        self.in_batch = {"from": first, "to": last, "events": len(entries), "since": time.time()}
        held = [e for e in entries if is_holdout(e.event_id, gate.holdout_every)]
        train = [e for e in entries if not is_holdout(e.event_id, gate.holdout_every)]
        self._score_live(entries)
        if train:
            x, y = _rows(train)
            partial_fit(self.head_model, x, y, self.args.learner.epochs)
        for e in held:
            self.window.append(
                (str(e.payload.get("client", "")), e.payload["x"], int(e.payload["label"]))
            )
        candidate = version_name(version_number(self.head_version) + 1)
        decision, metrics = self._gate()
        if self.args.pause_before_save_s:
            time.sleep(self.args.pause_before_save_s)
        record = {
            "version": candidate,
            "at": round(time.time(), 3),
            "offsets": [first, last],
            "trained": len(train),
            "held_out": len(held),
            "decision": decision,
            **metrics,
        }
        self.history.append(record)
        meta = {
            "kind": "candidate",
            "log_id": self.log.log_id(),
            "parent": self.head_version,
            "consumed": last,
            "consumed_from": self.consumed,
            "learned": self.learned + len(train),
            "held_out": self.held_out + len(held),
            "decision": decision,
            "gate": metrics,
            "anchor": self.anchor_version,
            "history": list(self.history)[-20:],
        }
        self.store.save_sklearn(MODEL_NAME, candidate, self.head_model, meta)
        # The version is durable: from here on these events are inside it. The counters move
        # before the offset: ``status`` (read without the lock) reads the offset first, so
        # whoever sees the new offset sees the counts that go with it.
        self.learned, self.held_out = meta["learned"], meta["held_out"]
        self.head_version, self.consumed = candidate, last
        self.log.commit(self.stream, last)
        if decision == "promote":
            self._promote(candidate, metrics)
        verdict = self._rollback_check()
        if verdict:
            record["rollback"] = verdict
        self.rounds += 1
        if self.rounds % 25 == 0:
            self._prune()
        self.in_batch = None
        return record

    # -------------------------------------------------------------------- gate
    def _gate_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The newest held-out events, at most ``max_client_share`` of the window from any one
        client (the window is smaller rather than dominated). A lone client is not capped:
        there is nobody else to protect."""
        gate = self.args.gate
        events = list(self.window)
        lone = len({client for client, _, _ in events}) <= 1
        cap = gate.window if lone else max(1, int(gate.max_client_share * gate.window))
        per_client: Counter[str] = Counter()
        xs, ys = [], []
        for client, x, y in reversed(events):
            if per_client[client] >= cap:
                continue
            per_client[client] += 1
            xs.append(x)
            ys.append(y)
            if len(xs) >= gate.window:
                break
        return np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.int64)

    def _gate(self) -> tuple[str, dict[str, Any]]:
        gate = self.args.gate
        x, y = self._gate_rows()
        if len(y) < gate.min_window:
            return "wait", {
                "window": len(y),
                "reason": f"{len(y)} held-out events (need {gate.min_window})",
            }
        cand = float((self.head_model.predict(x) == y).mean())
        champ = float((self.champion_model.predict(x) == y).mean())
        metrics = {
            "window": len(y),
            "candidate_accuracy": round(cand, 4),
            "champion_accuracy": round(champ, 4),
        }
        if cand >= champ - gate.margin:
            return "promote", metrics
        metrics["reason"] = f"candidate {cand:.3f} < champion {champ:.3f} - margin {gate.margin}"
        return "reject", metrics

    def _promote(self, version: str, metrics: dict[str, Any]) -> None:
        reason = (
            f"gate: candidate {metrics['candidate_accuracy']:.3f} vs champion "
            f"{metrics['champion_accuracy']:.3f} on {metrics['window']} held-out events"
        )
        self.log.set_champion(version, reason)
        self.champion_version = version
        self.champion_model = copy.deepcopy(self.head_model)  # the head keeps training
        self._notify(version)

    def _notify(self, version: str) -> None:
        try:
            self.on_champion(version)
        except Exception:  # replicas also poll the pointer; a lost nudge only costs latency
            logger.warning("could not nudge replicas to %s", version, exc_info=True)

    # -------------------------------------------------------------------- live rollback
    def _score_live(self, entries: list[Entry]) -> None:
        anchor_n = version_number(self.anchor_version)
        served = [
            e
            for e in entries
            if e.payload.get("served_version")
            and version_number(str(e.payload["served_version"])) >= anchor_n
        ]
        if not served:
            return
        x, y = _rows(served)
        anchor_right = self.anchor_model.predict(x) == y
        for e, a in zip(served, anchor_right, strict=True):
            right = int(e.payload["predicted"]) == int(e.payload["label"])
            client = str(e.payload.get("client", ""))
            self.live.append((right, bool(a), str(e.payload["served_version"]), client))

    def _verdict_pairs(self) -> list[tuple[bool, bool, str, str]] | None:
        """``window`` labelled answers with no client above the gate's share (a lone client
        excepted), or None while there are not enough: a flood of labels from one client can
        neither trigger a rollback nor confirm a model on its own."""
        window = self.args.rollback.window
        # Lone means one client across the recent held-out events too, not just these pairs:
        # a flood right after a verdict must not count as "the only client there is".
        lone = len({c for *_, c in self.live} | {c for c, _, _ in self.window}) <= 1
        cap = window if lone else max(1, int(self.args.gate.max_client_share * window))
        per_client: Counter[str] = Counter()
        chosen = []
        for pair in self.live:
            if per_client[pair[3]] < cap:
                per_client[pair[3]] += 1
                chosen.append(pair)
                if len(chosen) == window:
                    return chosen
        self.live = self.live[-window * 10 :]  # bounded while a flood waits for company
        return None

    def _rollback_check(self) -> dict[str, Any] | None:
        pol = self.args.rollback
        pairs = self._verdict_pairs()
        if pairs is None:
            return None
        self.live = []
        served = sum(s for s, *_ in pairs) / len(pairs)
        anchor = sum(a for _, a, *_ in pairs) / len(pairs)
        verdict = {
            "served_accuracy": round(served, 4),
            "anchor_accuracy": round(anchor, 4),
            "anchor": self.anchor_version,
            "events": len(pairs),
        }
        if served < anchor - pol.margin and self.champion_version != self.anchor_version:
            reason = (
                f"auto-rollback: live accuracy {served:.3f} < anchor {anchor:.3f} - "
                f"{pol.margin} on {len(pairs)} labelled answers"
            )
            self._rollback_to(self.anchor_version, reason)
            verdict["action"] = "rollback"
        else:
            # Live data confirms the versions that served these answers: the newest of them
            # becomes the reference. (Not the current champion: nothing has judged it yet, and
            # a flood of wrong labels can make a bad one look no worse than the anchor.)
            newest = max((v for _, _, v, _ in pairs), key=version_number)
            if version_number(newest) > version_number(self.anchor_version):
                try:
                    self.anchor_model = self._load(newest)[0]
                    self.anchor_version = newest
                except ModelStoreError:  # pruned meanwhile: keep the older reference
                    logger.info(
                        "anchor candidate %s is gone; keeping %s", newest, self.anchor_version
                    )
            verdict["action"] = "confirm"
        return verdict

    def rollback(self, to: str | None = None, reason: str = "manual rollback") -> dict[str, Any]:
        """Put ``to`` (default: the champion before the current one) live again."""
        with self.lock:
            if to is None:
                earlier = [
                    h["version"]
                    for h in self.log.champion_history(200)
                    if h["version"] != self.champion_version
                ]
                if not earlier:
                    raise LookupError("there is no earlier champion to roll back to")
                to = earlier[0]
            if not self.store.exists(MODEL_NAME, to):
                raise LookupError(f"version {to} is not in the model store")
            previous = self.champion_version
            self._rollback_to(to, reason)
            return {
                "champion": to,
                "previous": previous,
                "reason": reason,
                "head": self.head_version,
            }

    def _rollback_to(self, version: str, reason: str) -> None:
        model = self._load(version)[0]
        self.log.set_champion(version, reason)
        self.champion_version, self.champion_model = version, model
        self.anchor_version, self.anchor_model = version, copy.deepcopy(model)
        self.live = []
        # The head restarts from the restored weights: what was learned since is dropped
        # (the events stay in the log). Saved as a new version so a restart resumes here.
        self.head_model = copy.deepcopy(model)
        head = version_name(version_number(self.head_version) + 1)
        meta = {
            "kind": "rollback",
            "log_id": self.log.log_id(),
            "restored_from": version,
            "parent": self.head_version,
            "consumed": self.consumed,
            "consumed_from": self.consumed,
            "learned": self.learned,
            "held_out": self.held_out,
            "decision": "rollback",
            "reason": reason,
            "anchor": version,
            "history": list(self.history)[-20:],
        }
        self.store.save_sklearn(MODEL_NAME, head, self.head_model, meta)
        self.head_version = head
        self.history.append(
            {
                "version": head,
                "at": round(time.time(), 3),
                "decision": "rollback",
                "restored": version,
                "reason": reason,
            }
        )
        self._notify(version)

    # -------------------------------------------------------------------- housekeeping
    def _prune(self) -> None:
        """Drop old candidates from the store (manifest first, so none is half-visible)."""
        versions = self.store.versions(MODEL_NAME)
        keep = set(versions[-self.args.keep_versions :])
        keep |= {BASELINE_VERSION, self.champion_version, self.anchor_version, self.head_version}
        keep |= {h["version"] for h in self.log.champion_history(50)}
        drop_versions(
            self.store, MODEL_NAME, [v for v in versions if v not in keep], self.storage_options
        )

    def status(self) -> dict[str, Any]:
        consumed = self.consumed  # before the counters (see ``_round``)
        return {
            "head": self.head_version,
            "champion": self.champion_version,
            "anchor": self.anchor_version,
            "consumed": consumed,
            "learned": self.learned,
            "held_out": self.held_out,
            "window": len(self.window),
            "live_pairs": len(self.live),
            "rounds": self.rounds,
            "in_batch": self.in_batch,
            "history": list(self.history)[-20:],
        }

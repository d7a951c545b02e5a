"""The two stateful deployments, one replica each: the trainer and the bandit policy.

Both run their consumer loop in a thread of the replica (the loop blocks on the log for at
most ``poll_s`` at a time, so an idle app costs next to nothing) and keep their state in the
core model store together with the log offset it covers. Serve restarts a replica that dies
(``check_health`` reports a dead loop), and the new one resumes from the newest saved state.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from typing import Any

import numpy as np
from ray import serve

from core.apps import SURGE
from core.model_store import ModelStore
from core.settings import get_settings
from patterns.online_learning.bandit import BANDIT_NAME, BanditParams, LinearThompsonSampler
from patterns.online_learning.feedback_log import START, open_log
from patterns.online_learning.flow import REWARDS_STREAM
from patterns.online_learning.learning import Trainer, TrainerArgs
from patterns.online_learning.model import drop_versions
from patterns.online_learning.settings import OnlineSettings

logger = logging.getLogger("patterns.online_learning")
INGRESS_DEPLOYMENT = "OnlineIngress"


def _storage_options(store_uri: str | None) -> dict[str, Any]:
    return {} if store_uri else dict(get_settings().model_store_options)


# Each of the two is the only replica of its deployment: while a dead one goes unnoticed
# nobody trains (or updates the posterior). Serve notices a dead replica at its next health
# check; a short period (Serve's default is 10 s) costs a cheap call and shortens that gap.
SOLE_REPLICA_HEALTH_CHECK_S = 2.0


@serve.deployment(
    num_replicas=1, max_ongoing_requests=16, health_check_period_s=SOLE_REPLICA_HEALTH_CHECK_S
)
class OnlineTrainer:
    """Consumes the labels stream, saves a version per round, gates and promotes it."""

    def __init__(self, args: dict[str, Any], log_url: str | None, store_uri: str | None) -> None:
        self.args = TrainerArgs(**args)
        self.log = open_log(log_url or OnlineSettings().log_url)
        self.store = ModelStore.open(store_uri)
        self.app_name = serve.get_replica_context().app_name
        self._ingress: Any = None
        self._nudge_to: str | None = None
        self._nudge_wanted = threading.Event()
        self.trainer = Trainer(
            self.log,
            self.store,
            self.args,
            storage_options=_storage_options(store_uri),
            on_champion=self._nudge,
        )
        self.started_at = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="online-trainer", daemon=True)
        self._thread.start()
        threading.Thread(target=self._nudger, name="online-nudger", daemon=True).start()

    def _nudge(self, version: str) -> None:
        """Ask for every ingress replica to load ``version``; the training loop does not wait
        (the nudger thread sends only the newest version if several queue up)."""
        self._nudge_to = version
        self._nudge_wanted.set()

    def _nudger(self) -> None:
        while not self._stop.is_set():
            if not self._nudge_wanted.wait(1.0):
                continue
            self._nudge_wanted.clear()
            version = self._nudge_to
            try:
                if self._ingress is None:
                    self._ingress = serve.get_deployment_handle(INGRESS_DEPLOYMENT, self.app_name)
                # Every running replica, in parallel. Replicas also poll the pointer, so one
                # that misses this (starting, restarting) converges within pointer_poll_s.
                self._ingress.broadcast("reload", version).results(
                    timeout_s=10.0, return_exceptions=True
                )
            except Exception:
                logger.warning("could not nudge the ingress replicas to %s", version, exc_info=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.trainer.step()
            except Exception:  # a bad round must not kill the loop; it retries after a pause
                logger.exception("trainer round failed; retrying in 1s")
                self._stop.wait(1.0)

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the training loop stopped")

    def status(self) -> dict[str, Any]:
        return {**self.trainer.status(), "pid": os.getpid(), "started_at": self.started_at}

    async def rollback(self, to: str | None, reason: str) -> dict[str, Any]:
        try:
            return await asyncio.to_thread(self.trainer.rollback, to, reason)
        except LookupError as exc:  # no such version / nothing earlier: the caller's 4xx
            return {"error": str(exc).strip("'\"")}

    def __del__(self) -> None:
        self._stop.set()


@serve.deployment(
    max_surge_percent=SURGE,
    num_replicas=1,
    max_ongoing_requests=64,
    health_check_period_s=SOLE_REPLICA_HEALTH_CHECK_S,
)
class BanditPolicy:
    """Chooses an action per context; learns from the rewards stream; saved as safetensors."""

    def __init__(
        self,
        params: dict[str, Any],
        log_url: str | None,
        store_uri: str | None,
        save_every_s: float = 1.0,
        record_keep_s: float = 7200.0,
        poll_s: float = 0.2,
        keep_versions: int = 20,
    ) -> None:
        self.params = BanditParams(**params)
        self.log = open_log(log_url or OnlineSettings().log_url)
        self.store = ModelStore.open(store_uri)
        self.storage_options = _storage_options(store_uri)
        self.save_every_s, self.record_keep_s = save_every_s, record_keep_s
        self.poll_s, self.keep_versions = poll_s, keep_versions
        self.lock = threading.Lock()
        self.bandit, self.version, self.consumed = self._restore()
        self.saved_through = self.consumed
        self.dirty_since: float | None = None
        self.rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="online-bandit", daemon=True)
        self._thread.start()

    def _restore(self) -> tuple[LinearThompsonSampler, str | None, str]:
        from safetensors.numpy import load

        versions = self.store.versions(BANDIT_NAME)
        if not versions:
            return LinearThompsonSampler(self.params), None, START
        files, ref = self.store.read_verified(BANDIT_NAME, versions[-1])
        bandit = LinearThompsonSampler.from_arrays(self.params, load(files["bandit.safetensors"]))
        consumed = str(ref.metadata.get("consumed", START))
        if ref.metadata.get("log_id") != self.log.log_id():
            logger.warning("bandit %s learned from another log; starting fresh", ref.version)
            return LinearThompsonSampler(self.params), None, START
        return bandit, ref.version, consumed

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:
                logger.exception("bandit round failed; retrying in 1s")
                self._stop.wait(1.0)

    def _step(self) -> None:
        try:
            entries = self.log.read(REWARDS_STREAM, self.consumed, 256, self.poll_s)
        except Exception:
            self.log.rewind(REWARDS_STREAM)  # delivered but never received: read it again
            raise
        with self.lock:
            for e in entries:
                p = e.payload
                self.bandit.update(p["x"], self.params.actions.index(p["action"]), p["reward"])
            if entries:
                self.consumed = entries[-1].offset
                self.dirty_since = self.dirty_since or time.monotonic()
            due = self.dirty_since and time.monotonic() - self.dirty_since >= self.save_every_s
            if due:
                self._save()

    def _save(self) -> None:
        """Posterior and offset in one version: a restart replays only what came after."""
        from safetensors.numpy import save

        n = int(self.version.lstrip("b")) + 1 if self.version else 1
        version = f"b{n:06d}"
        data = save({k: np.ascontiguousarray(v) for k, v in self.bandit.to_arrays().items()})
        meta = {
            "consumed": self.consumed,
            "log_id": self.log.log_id(),
            "actions": self.params.actions,
            "context_dim": self.params.context_dim,
            "updates": int(self.bandit.counts.sum()),
        }
        self.store.save_files(
            BANDIT_NAME, version, {"bandit.safetensors": data}, "safetensors", meta
        )
        self.version, self.dirty_since, self.saved_through = version, None, self.consumed
        self.log.commit(REWARDS_STREAM, self.consumed)
        if n % 10 == 0:
            versions = self.store.versions(BANDIT_NAME)
            drop_versions(
                self.store, BANDIT_NAME, versions[: -self.keep_versions], self.storage_options
            )

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the bandit loop stopped")

    async def choose(self, context: list[float]) -> dict[str, Any]:
        with self.lock:
            action, scores = self.bandit.choose(context, self.rng)
            expected = self.bandit.expected(context)
        name = self.params.actions[action]
        choice_id = f"c-{uuid.uuid4().hex}"
        record = {"x": list(context), "action": name, "policy_version": self.version}
        await asyncio.to_thread(self.log.put_records, [(choice_id, record)], self.record_keep_s)
        return {
            "choice_id": choice_id,
            "action": name,
            "sampled_scores": {
                a: round(s, 4) for a, s in zip(self.params.actions, scores, strict=True)
            },
            "expected_reward": {
                a: round(s, 4) for a, s in zip(self.params.actions, expected, strict=True)
            },
            "policy_version": self.version,
        }

    def state(self) -> dict[str, Any]:
        """Plays and rewards per action, the saved version and the offset it covers."""
        with self.lock:
            return {
                "version": self.version,
                "consumed": self.consumed,
                "saved_through": self.saved_through,
                "actions": self.bandit.summary(),
                "updates": int(self.bandit.counts.sum()),
                "pid": os.getpid(),
            }

    def __del__(self) -> None:
        self._stop.set()

"""One ensemble request, end to end: validate, cascade gate, fan-out with a deadline and a
quorum, vote, answer; then a shadow copy to the challenger, off the request path.

``VotingEnsemble`` is plain asyncio with its handles passed in: Serve's DeploymentHandles in
the app (app.py), in-process objects with the same ``handle.method.remote(...)`` shape in the
tests. It never imports Ray.

Failure policy, in one place:
- bad rows: 413 (too many) or 422 naming the row, column and feature; nothing is called;
- the gate member late, failing or answering unusable numbers: every row goes to the vote,
  and the gate is listed as late or failed;
- a member late, failing or answering anything but one finite probability per row: left out
  of the vote, listed under ``late`` or ``failed``, answer ``degraded``; fewer than ``quorum``
  members counted: 503 naming each failure (one check, in ``gather_with_deadline``);
- the challenger slow or failing: never seen by the caller (counted in the recorder);
- the recorder not answering: promotion state keeps its last value; feedback fails (500).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import Conflict, NotFound, PayloadTooLarge, Unprocessable
from core.resilience import gather_with_deadline, transient_failure
from core.timing import Timings
from patterns.ensemble.data import CLASS_NAMES, N_FEATURES, feature_names
from patterns.ensemble.voting import SelectionSpec, VotingMode, cascade, uncertain_rows

logger = logging.getLogger("patterns.ensemble.flow")

PROMOTION_REFRESH_S = 1.0  # how often each ingress replica re-reads the promotion state
PROMOTION_READ_TIMEOUT_S = 2.0  # one read of it; on timeout or error the last value stays
PROMOTION_WARN_EVERY_S = 60.0  # at most one warning per replica this often when reads fail


def usable_proba(out: Any, n_rows: int) -> tuple[np.ndarray | None, str | None]:
    """A member's answer as P(benign) per row, or why it cannot be counted in the vote.

    It must be one finite probability per row: a NaN or an infinity would otherwise reach the
    vote and the JSON answer (which cannot encode it). An unusable answer counts as a failed
    member, exactly like an error.
    """
    try:
        proba = np.asarray(out["proba"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        return None, "error: malformed answer"
    if proba.shape != (n_rows,):
        return None, f"error: {proba.size} probabilities for {n_rows} rows"
    if not np.isfinite(proba).all():
        return None, "error: non-finite probabilities"
    return proba, None


@dataclass(frozen=True)
class _Settled:
    """The gate's outcome, carried into the fan-out so that the quorum counts it once."""

    answer: dict[str, Any] | None = None
    failure: str | None = None


async def _settled(outcome: _Settled) -> _Settled:
    return outcome


class VotingEnsemble:
    """The request flow of the ensemble app. ``members`` and ``challenger`` are handles to
    ``EnsembleMember`` (``predict``, ``info``); ``recorder`` is a handle to ``ShadowRecorder``."""

    def __init__(
        self,
        *,
        members: Mapping[str, Any],
        weights: Mapping[str, float],
        recorder: Any,
        voting: VotingMode,
        deadline_ms: float,
        quorum: int,
        selection: SelectionSpec,
        max_instances: int,
        max_abs_feature: float,
        challenger: Any | None = None,
        challenger_name: str | None = None,
        shadow_timeout_s: float = 5.0,
        max_shadow_in_flight: int = 64,
        held_out: dict[str, Any] | None = None,
        late_retries: int = 2,
    ) -> None:
        if challenger is not None and challenger_name is None:
            raise ValueError("a challenger needs its name")
        self.members = dict(members)
        self.weights = dict(weights)
        self.recorder = recorder
        self.voting = voting
        self.deadline_ms = deadline_ms
        self.late_retries = late_retries
        self.quorum = quorum
        self.selection = selection
        self.max_instances = max_instances
        self.max_abs_feature = max_abs_feature
        self.challenger = challenger
        self.challenger_name = challenger_name if challenger is not None else None
        self.shadow_timeout_s = shadow_timeout_s
        self.max_shadow_in_flight = max_shadow_in_flight
        self.held_out = held_out
        self._promoted = False
        self._promotion_epoch = 0  # bumped by promote/rollback here: older reads are stale
        self._promotion_task: asyncio.Task | None = None
        self._promotion_warned_at = -math.inf
        self._shadow_tasks: set[asyncio.Task] = set()
        self.shadow_dropped = 0

    # -- roster ------------------------------------------------------------------------
    def _challenger_promoted(self) -> bool:
        """Whether the challenger votes: the last state a background task read from the
        ShadowRecorder (shared by every ingress replica). Never awaited on the request path."""
        if self.challenger is None:
            return False
        if self._promotion_task is None or self._promotion_task.done():
            # Started on first use (a request runs on the replica's event loop) and restarted
            # should it ever stop; it re-reads the state every PROMOTION_REFRESH_S.
            loop = asyncio.get_running_loop()
            self._promotion_task = loop.create_task(self._refresh_promotion())
        return self._promoted

    async def _refresh_promotion(self) -> None:
        while True:
            epoch = self._promotion_epoch
            try:
                state = await asyncio.wait_for(
                    self.recorder.state.remote(), PROMOTION_READ_TIMEOUT_S
                )
                if epoch == self._promotion_epoch:  # no promote/rollback here meanwhile
                    self._promoted = bool(state["promoted"])
            except Exception as exc:  # keep the last known value; try again next round
                now = time.monotonic()
                if now - self._promotion_warned_at >= PROMOTION_WARN_EVERY_S:
                    self._promotion_warned_at = now
                    logger.warning(
                        "could not read the promotion state (%s); keeping promoted=%s",
                        type(exc).__name__,
                        self._promoted,
                    )
                else:
                    logger.debug("promotion state read failed", exc_info=True)
            await asyncio.sleep(PROMOTION_REFRESH_S)

    def _set_promoted(self, promoted: bool) -> None:
        """This replica applies its own promote/rollback at once; others within a refresh."""
        self._promotion_epoch += 1
        self._promoted = promoted

    def voters(self) -> dict[str, Any]:
        """The members that vote on this request: the roster, plus the promoted challenger."""
        voters = dict(self.members)
        if self.challenger is not None and self._challenger_promoted():
            assert self.challenger_name is not None
            voters[self.challenger_name] = self.challenger
        return voters

    # -- one prediction ------------------------------------------------------------------
    def validated_rows(self, instances: list[list[float]]) -> np.ndarray:
        """The rows as the float32 array every member receives, or a 413/422 saying why."""
        n = len(instances)
        if n > self.max_instances:
            raise PayloadTooLarge(
                f"{n} rows in one request; send at most {self.max_instances} per request."
            )
        for i, row in enumerate(instances):
            if len(row) != N_FEATURES:
                raise Unprocessable(
                    f"Row {i} has {len(row)} features; every row needs {N_FEATURES} "
                    "(see GET /ensemble/schema for their order)."
                )
        x = np.asarray(instances, dtype=np.float64)
        bound = self.max_abs_feature  # at most float32's largest, so the cast is finite
        bad = np.argwhere(~(np.abs(x) <= bound))
        if len(bad):
            i, j = (int(v) for v in bad[0])
            raise Unprocessable(
                f"Row {i}, column {j} ({feature_names()[j]}) is {x[i, j]:g}; every feature "
                f"must be a finite number between {-bound:g} and {bound:g}."
            )
        return x.astype(np.float32)

    async def predict(self, instances: list[list[float]], prediction_id: str) -> dict[str, Any]:
        timings = Timings()
        x = self.validated_rows(instances)
        n = len(x)
        voters = self.voters()
        sel = self.selection
        gate = sel.gate_member if sel.mode == "cascade" and sel.gate_member in voters else None
        gate_proba: np.ndarray | None = None
        uncertain = np.arange(n)
        settled: dict[str, _Settled] = {}  # the gate's outcome, counted in the fan-out
        elapsed: dict[str, float] = {}
        votes: dict[str, np.ndarray] = {}  # member -> P(benign) on the uncertain rows
        versions: dict[str, str] = {}
        failed: dict[str, str] = {}

        def usable(rows: int) -> Any:
            def check(name: str, out: Any) -> str | None:
                if isinstance(out, _Settled):
                    return out.failure
                return usable_proba(out, rows)[1]

            return check

        if gate is not None:
            with timings.stage("gate"):
                first = await gather_with_deadline(
                    {gate: voters[gate].predict.remote(x)},
                    deadline_s=sel.gate_deadline_ms / 1000,
                    quorum=1,
                    validate=usable(n),
                )
            elapsed.update(first.elapsed_ms)
            if gate in first.results:
                out = first.results[gate]
                gate_proba = np.asarray(out["proba"], dtype=np.float64)
                uncertain = uncertain_rows(gate_proba, sel.low, sel.high)
                versions[gate] = str(out["version"])
                settled[gate] = _Settled(
                    {"proba": gate_proba[uncertain], "version": out["version"]}
                )
            else:  # late or unusable: every row goes to the vote, the gate counted as failed
                settled[gate] = _Settled(failure=first.failed[gate])

        if len(uncertain):
            rows = x[uncertain]
            for attempt in range(self.late_retries + 1):
                calls = {
                    k: _settled(settled[k]) if k in settled else h.predict.remote(rows)
                    for k, h in voters.items()
                }
                with timings.stage("fan_out" if attempt == 0 else f"fan_out_{attempt + 1}"):
                    res = await gather_with_deadline(
                        calls,
                        # each try waits twice as long as the one before: 250, 500, 1000 ms
                        deadline_s=self.deadline_ms * 2**attempt / 1000,
                        quorum=self.quorum,  # build_app checks it is at most the roster size
                        validate=usable(len(uncertain)),
                    )
                # Missed only by lateness or a lost replica (members answering slowly while a
                # replica starts on the same cores; one being replaced): again. A member that
                # raised or answered garbage is not asked twice.
                transient = all(transient_failure(v) for v in res.failed.values())
                if res.quorum_met or not transient:
                    break
            failed.update(res.failed)
            res.require_quorum("ensemble members")
            for k in (k for k in voters if k in res.results):  # in roster order
                out = res.results[k]
                got = out.answer if isinstance(out, _Settled) else out
                assert got is not None  # a settled failure never reaches the results
                votes[k] = np.asarray(got["proba"], dtype=np.float64)
                versions[k] = str(got["version"])
            elapsed.update(
                {k: res.elapsed_ms[k] for k in voters if k not in settled and k in res.elapsed_ms}
            )
        counted = sorted(votes) if len(uncertain) else [str(gate)]

        vote = cascade(
            n,
            gate=gate,
            gate_proba=gate_proba,
            uncertain=uncertain,
            votes=votes,
            mode=self.voting,
            weights=self.weights,
        )
        promoted = self.challenger_name in voters if self.challenger_name else False
        answer = {
            "prediction_id": prediction_id,
            "predictions": [
                {
                    "label": int(vote.labels[i]),
                    "class": CLASS_NAMES[int(vote.labels[i])],
                    "p_benign": round(float(vote.p_benign[i]), 4),
                    "decided_by": vote.decided_by[i],
                    "votes": {k: round(v, 4) for k, v in vote.votes[i].items()},
                }
                for i in range(n)
            ],
            "voting": self.voting,
            "members": {
                "counted": counted,
                "late": sorted(k for k, v in failed.items() if v == "timeout"),
                "failed": {k: v for k, v in failed.items() if v != "timeout"},
                "elapsed_ms": elapsed,
            },
            "degraded": bool(failed),
            "model_versions": versions,
            "challenger": {
                "name": self.challenger_name,
                "status": "none"
                if not self.challenger_name
                else ("voting" if promoted else "shadow"),
            },
            "timings_ms": timings.as_dict(),
        }
        if self.challenger is not None and not promoted:
            self._start_shadow(x, vote.labels.tolist(), prediction_id)
        return answer

    # -- the shadow copy -----------------------------------------------------------------
    def _start_shadow(self, x: np.ndarray, labels: list[int], pid: str) -> None:
        """Copy the request to the challenger without awaiting it: the answer is already
        decided and goes out now; the comparison is recorded whenever the challenger replies."""
        if len(self._shadow_tasks) >= self.max_shadow_in_flight:
            self.shadow_dropped += 1
            return
        task = asyncio.get_running_loop().create_task(self._shadow(x, labels, pid))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def shadows_settled(self) -> None:
        """Wait for the shadow copies in flight (a graceful shutdown; tests)."""
        await asyncio.gather(*self._shadow_tasks, return_exceptions=True)

    async def _shadow(self, x: np.ndarray, labels: list[int], pid: str) -> None:
        assert self.challenger is not None
        t0 = time.perf_counter()
        try:
            out = await asyncio.wait_for(self.challenger.predict.remote(x), self.shadow_timeout_s)
            proba, problem = usable_proba(out, len(labels))
            if proba is None:
                raise ValueError(f"challenger answer unusable ({problem})")
            ch_labels = [int(p >= 0.5) for p in proba]
            latency = (time.perf_counter() - t0) * 1000
            await self.recorder.record.remote(pid, labels, ch_labels, latency)
        except Exception as exc:  # the shadow never affects the live answer
            logger.warning("shadow call failed: %s", exc)
            try:
                await self.recorder.record.remote(pid, labels, None, -1.0)
            except Exception:
                logger.warning("could not record shadow failure", exc_info=True)

    # -- feedback and promotion ----------------------------------------------------------
    async def feedback(self, prediction_id: str, labels: list[int]) -> dict[str, Any]:
        """The recorder's answer (``status``: ``recorded`` or ``held``), or the 4xx that
        says why the labels cannot be scored."""
        if self.challenger is None:
            raise NotFound("No challenger is configured, so feedback is not collected.")
        too_many = (
            f"{len(labels)} labels, but a prediction has at most "
            f"{self.max_instances} rows; send one label per row of the prediction."
        )
        if len(labels) > self.max_instances:
            raise Unprocessable(too_many)
        out = await self.recorder.feedback.remote(prediction_id, labels)
        if out["status"] == "too_many":  # the recorder's own bound (the same number)
            raise Unprocessable(too_many)
        if out["status"] == "held":
            return {"status": "held", "prediction_id": prediction_id}
        if out["status"] == "promoted":
            raise Conflict(
                f"The challenger {self.challenger_name} is promoted and votes, so it is no "
                f"longer shadowed and prediction {prediction_id} has no shadow record to "
                "score labels against; POST /ensemble/challenger/rollback to gather evidence "
                "again."
            )
        if out["status"] == "count_mismatch":
            raise Unprocessable(
                f"Prediction {prediction_id} had {out['expected']} rows; got {len(labels)} labels."
            )
        return dict(out)

    async def challenger_stats(self) -> dict[str, Any]:
        return dict(await self.recorder.stats.remote())

    async def promote(self) -> dict[str, Any]:
        if self.challenger is None:
            raise NotFound("No challenger is configured (challenger.member in config.yaml).")
        out = await self.recorder.promote.remote()
        if not out["gate_passes"]:
            raise Conflict(
                "Promotion refused by the gate: " + "; ".join(out["gate_failures"]) + "."
            )
        self._set_promoted(bool(out["promoted"]))
        return dict(out)

    async def rollback(self) -> dict[str, Any]:
        out = await self.recorder.rollback.remote()
        self._set_promoted(bool(out["promoted"]))
        return dict(out)

    # -- what is deployed ----------------------------------------------------------------
    async def model(self) -> dict[str, Any]:
        """Roster with versions, devices and held-out accuracy; voting setup; challenger."""
        infos = await asyncio.gather(*(h.info.remote() for h in self.members.values()))
        challenger = None
        if self.challenger is not None:
            challenger = {
                **(await self.challenger.info.remote()),
                "weight": self.weights.get(str(self.challenger_name)),
            }
        return {
            "voting": self.voting,
            "deadline_ms": self.deadline_ms,
            "late_retries": self.late_retries,
            "quorum": self.quorum,
            "selection": self.selection.model_dump(),
            "members": {i["member"]: {**i, "weight": self.weights[i["member"]]} for i in infos},
            "challenger_model": challenger,
            "challenger": await self.challenger_stats(),
            "held_out": self.held_out,
            "shadow_dropped_here": self.shadow_dropped,
        }

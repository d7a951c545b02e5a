"""One ensemble request, end to end: validate, cascade gate, fan-out with a deadline and a
quorum, vote, answer; then a shadow copy to the challenger, off the request path.

``VotingEnsemble`` is plain asyncio with its handles passed in: Serve's DeploymentHandles in
the app (app.py), in-process objects with the same ``handle.method.remote(...)`` shape in the
tests. ``EnsembleArgs`` (the app's args: roster, voting, deadline, quorum, challenger and its
promotion gate) and the HTTP request bodies are declared here too, so the flow, the training
report (artifacts.py) and the tests read them without importing Ray; this module never does.

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
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, Field, Strict

from core.errors import Conflict, NotFound, PayloadTooLarge, Unprocessable
from core.openapi import json_int
from core.resilience import gather_with_deadline, transient_failure
from core.resources import StageResources
from core.timing import Timings
from patterns.ensemble.data import CLASS_NAMES, N_FEATURES, feature_names
from patterns.ensemble.members import MemberSpec
from patterns.ensemble.voting import SelectionSpec, VotingMode, cascade, uncertain_rows

logger = logging.getLogger("patterns.ensemble.flow")

PROMOTION_REFRESH_S = 1.0  # how often each ingress replica re-reads the promotion state
PROMOTION_READ_TIMEOUT_S = 2.0  # one read of it; on timeout or error the last value stays
PROMOTION_WARN_EVERY_S = 60.0  # at most one warning per replica this often when reads fail
FLOAT32_MAX = float(np.finfo(np.float32).max)


# ------------------------------------------------------------------------------ args
class PromotionGate(BaseModel):
    """When may the challenger vote? All conditions must hold."""

    min_samples: int = Field(default=50, ge=1)  # shadowed predictions seen
    min_agreement: float = Field(default=0.9, ge=0, le=1)  # share agreeing with the ensemble
    min_labeled: int = Field(default=20, ge=0)  # predictions with feedback labels
    # challenger accuracy may trail the ensemble's by at most this much on labelled rows
    max_accuracy_drop: float = Field(default=0.0, ge=0, le=1)
    max_p95_latency_ms: float = Field(default=200.0, gt=0)


class ChallengerSpec(BaseModel):
    member: MemberSpec | None = None
    gate: PromotionGate = PromotionGate()
    shadow_timeout_s: float = Field(default=5.0, gt=0)
    # Shadow copies in flight per ingress replica; beyond this they are dropped (and counted),
    # so a slow challenger can never pile up work behind live traffic.
    max_in_flight: int = Field(default=64, ge=1)


def _default_members() -> list[MemberSpec]:
    return [
        MemberSpec(name="logreg", family="sklearn", model="ensemble-logreg", version="v1"),
        MemberSpec(name="xgb", family="xgboost", model="ensemble-xgb", version="v1", weight=1.5),
        # a quarter GPU where there is one; placed on CPU (with a log line) where there is not
        MemberSpec(
            name="mlp",
            family="torch",
            model="ensemble-mlp",
            version="v1",
            resources=StageResources(num_cpus=0.1, num_gpus=0.25),
        ),
    ]


def _default_challenger() -> ChallengerSpec:
    member = MemberSpec(
        name="xgb_v2",
        family="xgboost",
        model="ensemble-xgb",
        version="v2",
        resources=StageResources(num_cpus=0.05),
    )
    return ChallengerSpec(member=member)


class EnsembleArgs(BaseModel):
    members: list[MemberSpec] = Field(default_factory=_default_members, min_length=1)
    voting: VotingMode = "soft"
    deadline_ms: float = Field(default=250, gt=0)  # per request, for the whole fan-out
    # a fan-out that missed its quorum only because members were late is sent again, each
    # time with twice the deadline (250, 500, 1000 ms): a starved core, not a dead member
    late_retries: int = Field(default=2, ge=0, le=3)
    quorum: int = Field(default=2, ge=1)  # members that must answer for a vote
    selection: SelectionSpec = SelectionSpec()
    challenger: ChallengerSpec = Field(default_factory=_default_challenger)
    max_instances: int = Field(default=64, ge=1)  # rows per request
    # Largest |feature| accepted (422 beyond). Members compute in float32; near its limit
    # (-3e38 in the tests) these models' standardisation overflows: logreg raises for its whole
    # batch (shared with other requests) and the MLP answers NaN.
    max_abs_feature: float = Field(default=1e30, gt=0, le=FLOAT32_MAX)
    ingress_resources: StageResources = StageResources(num_cpus=0.1)
    model_store_uri: str | None = None  # default: COOKBOOK_MODEL_STORE_URI

    def check_roster(self) -> None:
        """ValueError for a roster the app cannot run: names shared, a quorum larger than the
        roster, a cascade gate that is not a member (``build_app`` calls it)."""
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"member names must be unique, got {names}")
        if self.quorum > len(names):
            raise ValueError(f"quorum {self.quorum} is larger than the roster ({len(names)})")
        if self.selection.mode == "cascade" and self.selection.gate_member not in names:
            raise ValueError(f"cascade gate {self.selection.gate_member!r} is not a member")
        ch = self.challenger.member
        if ch is not None and ch.name in names:
            raise ValueError(f"the challenger's name {ch.name!r} is also a member's")


# ------------------------------------------------------------------------------ request bodies
Feature = Annotated[float, Strict(), Field(allow_inf_nan=False)]


# A row's length is checked by the flow (gRPC callers too), with a sentence naming the row; the
# schema states the same number. How many rows, and how large a value, come from the args:
# app.py's ``_document`` writes them into the served schema.
Row = Annotated[
    list[Feature], Field(json_schema_extra={"minItems": N_FEATURES, "maxItems": N_FEATURES})
]


class PredictRequest(BaseModel):
    instances: list[Row] = Field(
        min_length=1,
        description=f"Rows of {N_FEATURES} numbers in the order of GET /schema. More rows "
        "than maxItems: 413.",
        examples=[[[17.99, 10.38, 122.8, 1001.0] + [0.1] * 26]],
    )


class FeedbackRequest(BaseModel):
    prediction_id: str = Field(min_length=1, max_length=128)
    # At most max_instances labels (checked by the flow, where the args are known).
    labels: list[json_int(ge=0, le=1)] = Field(  # type: ignore[valid-type]
        min_length=1,
        description="1 = benign, 0 = malignant; one label per row of the prediction (a "
        "recorded prediction with another number of rows: 422).",
    )


# ------------------------------------------------------------------------------ the flow


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

    @classmethod
    def from_args(
        cls,
        args: EnsembleArgs,
        members: Mapping[str, Any],
        challenger: Any | None,
        recorder: Any,
        held_out: dict[str, Any] | None = None,
    ) -> VotingEnsemble:
        """The request flow for ``args``, over handles (or in-process stand-ins in tests)."""
        ch = args.challenger.member if challenger is not None else None
        return cls(
            members=members,
            weights={m.name: m.weight for m in [*args.members, *([ch] if ch else [])]},
            recorder=recorder,
            voting=args.voting,
            deadline_ms=args.deadline_ms,
            late_retries=args.late_retries,
            quorum=args.quorum,
            selection=args.selection,
            max_instances=args.max_instances,
            max_abs_feature=args.max_abs_feature,
            challenger=challenger,
            challenger_name=ch.name if ch else None,
            shadow_timeout_s=args.challenger.shadow_timeout_s,
            max_shadow_in_flight=args.challenger.max_in_flight,
            held_out=held_out,
        )

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

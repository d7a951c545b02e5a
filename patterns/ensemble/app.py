"""Voting ensemble on Ray Serve: each member its own deployment, the ingress fans out and votes.

    client -> EnsembleIngress (FastAPI) --+--> member_logreg (scikit-learn)  -+
                 |   cascade gate ------'                                      |
                 |   fan-out, deadline + quorum --> member_xgb (XGBoost)   ---+--> vote
                 |                              --> member_mlp (PyTorch)   ---+
                 +--(copy, not awaited)--> challenger_xgb_v2 --> ShadowRecorder

Run: ``serve run patterns.ensemble.app:app`` (after ``make setup``). Knobs: config.yaml.
"""

# No `from __future__ import annotations` here: Serve's class-based FastAPI views need real
# annotations (with string annotations `self` becomes a required query parameter).
import asyncio
import hashlib
import logging
import math
import random
import time
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Request, Response
from pydantic import BaseModel, Field, Strict
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from core.errors import NotFound, PayloadTooLarge, ServiceUnavailable, Unprocessable
from core.ingress import install_ingress, request_id_of
from core.metrics import ModelMetrics
from core.model_store import ModelStore
from core.resilience import gather_with_deadline
from core.resources import StageResources, resolve_actor_options, wants_gpu
from patterns.ensemble.data import CLASS_NAMES, N_FEATURES, feature_names
from patterns.ensemble.members import Family, load_member
from patterns.ensemble.shadow import PromotionGate, ShadowRecorder
from patterns.ensemble.voting import VotingMode, aggregate, confident_mask

logger = logging.getLogger("patterns.ensemble")
NAME_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
FLOAT32_MAX = float(np.finfo(np.float32).max)
PROMOTION_REFRESH_S = 1.0  # how often each ingress replica re-reads the promotion state
PROMOTION_READ_TIMEOUT_S = 2.0  # one read of it; on timeout or error the last value stays
PROMOTION_WARN_EVERY_S = 60.0  # at most one warning per replica this often when reads fail


# ------------------------------------------------------------------------------ config
class FaultInjection(BaseModel):
    """Chaos knob, off by default: make a member slow or failing to see the ensemble degrade
    instead of hang (the tests and benchmark use it; so can a game day)."""

    delay_s: float = Field(default=0.0, ge=0, le=60)
    error_rate: float = Field(default=0.0, ge=0, le=1)


class MemberSpec(BaseModel):
    name: str = Field(pattern=NAME_PATTERN)
    family: Family  # a new family: add it to Family and to load_member in members.py
    model: str  # model id in the store
    version: str = "latest"
    weight: float = Field(default=1.0, gt=0)  # used by voting: weighted
    resources: StageResources = StageResources(num_cpus=0.1)
    fault: FaultInjection = FaultInjection()


class SelectionSpec(BaseModel):
    """Dynamic selection. ``cascade``: the gate member answers alone when it is confident
    (P(benign) <= low or >= high); only the uncertain rows go to the whole ensemble."""

    mode: Literal["all", "cascade"] = "cascade"
    gate_member: str = "logreg"
    low: float = Field(default=0.02, ge=0, le=0.5)
    high: float = Field(default=0.98, ge=0.5, le=1)
    gate_deadline_ms: float = Field(default=150, gt=0)


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
        MemberSpec(name="mlp", family="torch", model="ensemble-mlp", version="v1"),
    ]


class EnsembleArgs(BaseModel):
    members: list[MemberSpec] = Field(default_factory=_default_members, min_length=1)
    voting: VotingMode = "soft"
    deadline_ms: float = Field(default=250, gt=0)  # per request, for the whole fan-out
    quorum: int = Field(default=2, ge=1)  # members that must answer for a vote
    selection: SelectionSpec = SelectionSpec()
    challenger: ChallengerSpec = ChallengerSpec(
        member=MemberSpec(name="xgb_v2", family="xgboost", model="ensemble-xgb", version="v2")
    )
    max_instances: int = Field(default=64, ge=1)  # rows per request
    # Largest |feature| accepted (422 beyond). Members compute in float32; near its limit
    # (-3e38 in the tests) these models' standardisation overflows: logreg raises for its whole
    # batch (shared with other requests) and the MLP answers NaN.
    max_abs_feature: float = Field(default=1e30, gt=0, le=FLOAT32_MAX)
    ingress_resources: StageResources = StageResources(num_cpus=0.1)
    model_store_uri: str | None = None  # default: COOKBOOK_MODEL_STORE_URI


# ------------------------------------------------------------------------------ members
@serve.deployment(
    max_ongoing_requests=32,
    user_config={"max_batch_size": 32, "batch_wait_timeout_s": 0.005},
)
class EnsembleMember:
    """One model of any family. Requests from all ingress replicas are batched together."""

    def __init__(self, spec: dict[str, Any], store_uri: str | None, on_gpu: bool) -> None:
        self.spec = MemberSpec(**spec)
        store = ModelStore(store_uri) if store_uri else ModelStore.from_settings()
        device = "cuda" if on_gpu and self.spec.family == "torch" else "cpu"
        self.model, self.ref = load_member(
            store, self.spec.family, self.spec.model, self.spec.version, device
        )
        # One throwaway call so the first live request does not pay for lazy initialisation
        # (torch kernels, XGBoost's DMatrix path) and blow the ensemble's deadline.
        self.model.predict_proba(np.zeros((1, N_FEATURES), dtype=np.float32))
        self.metrics = ModelMetrics("ensemble", self.spec.name, self.ref.version)
        seed = hashlib.sha256(f"fault/{self.spec.name}".encode()).digest()
        self._rng = random.Random(int.from_bytes(seed[:8], "little"))

    def reconfigure(self, config: dict[str, Any]) -> None:
        # how many requests may share one model call, and how long may a batch wait to fill?
        self._batched.set_max_batch_size(int(config.get("max_batch_size", 32)))
        self._batched.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.005)))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batched(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        t0 = time.perf_counter()
        x = np.concatenate(arrays)
        try:
            p = self.model.predict_proba(x)
        except Exception:
            self.metrics.observe(time.perf_counter() - t0, ok=False)
            raise
        self.metrics.observe(time.perf_counter() - t0)
        self.metrics.observe_batch(len(arrays))
        return np.split(p, np.cumsum([len(a) for a in arrays])[:-1])

    async def predict(self, rows: np.ndarray | list[list[float]]) -> dict[str, Any]:
        fault = self.spec.fault
        if fault.delay_s:
            await asyncio.sleep(fault.delay_s)
        if fault.error_rate and self._rng.random() < fault.error_rate:
            raise RuntimeError(f"injected fault in member {self.spec.name}")
        proba = await self._batched(np.asarray(rows, dtype=np.float32))
        return {"proba": proba.tolist(), "version": self.ref.version}

    def info(self) -> dict[str, Any]:
        ref = self.ref.public()
        return {
            "member": self.spec.name,
            "model": ref["name"],
            "version": ref["version"],
            "sha256": ref["sha256"],
            "family": self.spec.family,
        }


# ------------------------------------------------------------------------------ ingress
Feature = Annotated[float, Strict(), Field(allow_inf_nan=False)]


class PredictRequest(BaseModel):
    instances: list[list[Feature]] = Field(
        min_length=1,
        description=f"Rows of {N_FEATURES} numbers in the order of GET /schema.",
        examples=[[[17.99, 10.38, 122.8, 1001.0] + [0.1] * 26]],
    )


class FeedbackRequest(BaseModel):
    prediction_id: str = Field(min_length=1, max_length=128)
    # At most max_instances labels (checked in the handler, where the args are known).
    labels: list[Literal[0, 1]] = Field(min_length=1, description="1 = benign, 0 = malignant")


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


api = FastAPI(
    title="Ensemble",
    description="Voting ensemble over scikit-learn, XGBoost and PyTorch members, with a "
    "deadline and quorum, a confidence cascade and a shadow challenger.",
)
install_ingress(api, app_name="ensemble", max_body_bytes=256_000)


@serve.deployment(max_ongoing_requests=200)
@serve.ingress(api)
class EnsembleIngress:
    def __init__(
        self,
        members: dict[str, DeploymentHandle],
        challenger: DeploymentHandle | None,
        recorder: DeploymentHandle,
        args: dict[str, Any],
    ) -> None:
        self.args = EnsembleArgs(**args)
        self.members = members
        self.challenger = challenger
        self.recorder = recorder
        self.specs = {m.name: m for m in self.args.members}
        ch = self.args.challenger.member
        self.challenger_name = ch.name if ch else None
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

    def _voters(self) -> dict[str, tuple[DeploymentHandle, float]]:
        voters = {n: (h, self.specs[n].weight) for n, h in self.members.items()}
        if self.challenger is not None and self._challenger_promoted():
            ch = self.args.challenger.member
            assert ch is not None
            voters[ch.name] = (self.challenger, ch.weight)
        return voters

    # -- routes --------------------------------------------------------------------------
    @api.post("/predict", summary="Vote on one or more rows")
    async def predict(self, body: PredictRequest, request: Request) -> dict[str, Any]:
        return await self._predict(body, request_id_of(request))

    @api.get("/schema", summary="The feature order a row must follow")
    async def schema(self) -> dict[str, Any]:
        return {
            "n_features": N_FEATURES,
            "features": list(feature_names()),
            "classes": CLASS_NAMES,
            "max_abs_feature": self.args.max_abs_feature,
        }

    @api.get("/model", summary="Roster, versions, voting mode and challenger status")
    async def model(self) -> dict[str, Any]:
        infos = await asyncio.gather(*(h.info.remote() for h in self.members.values()))
        return {
            "voting": self.args.voting,
            "deadline_ms": self.args.deadline_ms,
            "quorum": self.args.quorum,
            "selection": self.args.selection.model_dump(),
            "members": {
                i["member"]: {**i, "weight": self.specs[i["member"]].weight} for i in infos
            },
            "challenger": await self.recorder.stats.remote(),
            "shadow_dropped_here": self.shadow_dropped,
        }

    @api.post("/feedback", summary="Ground-truth labels for an earlier prediction")
    async def feedback(self, body: FeedbackRequest, response: Response) -> dict[str, Any]:
        """200 when the labels were scored against a recorded prediction; 202 when the
        prediction is not recorded yet (its shadow copy is still in flight, or the id is
        unknown): the labels are held and scored when it arrives (the last 1,000 such ids are
        kept). 409 while the challenger is promoted: it is no longer shadowed, so there is
        nothing to score new labels against."""
        if self.challenger is None:
            raise NotFound("No challenger is configured, so feedback is not collected.")
        too_many = (
            f"{len(body.labels)} labels, but a prediction has at most "
            f"{self.args.max_instances} rows; send one label per row of the prediction."
        )
        if len(body.labels) > self.args.max_instances:
            raise Unprocessable(too_many)
        out = await self.recorder.feedback.remote(body.prediction_id, body.labels)
        if out["status"] == "too_many":  # the recorder's own bound (the same number)
            raise Unprocessable(too_many)
        if out["status"] == "held":
            response.status_code = 202
            return {"status": "held", "prediction_id": body.prediction_id}
        if out["status"] == "promoted":
            raise HTTPException(
                409,
                f"The challenger {self.challenger_name} is promoted and votes, so it is no "
                f"longer shadowed and prediction {body.prediction_id} has no shadow record to "
                "score labels against; POST /ensemble/challenger/rollback to gather evidence "
                "again.",
            )
        if out["status"] == "count_mismatch":
            raise Unprocessable(
                f"Prediction {body.prediction_id} had {out['expected']} rows; "
                f"got {len(body.labels)} labels."
            )
        return out

    @api.get("/challenger", summary="Shadow evidence and the promotion gate")
    async def challenger_stats(self) -> dict[str, Any]:
        return await self.recorder.stats.remote()

    @api.post("/challenger/promote", summary="Make the challenger a voter if the gate passes")
    async def promote(self) -> dict[str, Any]:
        if self.challenger is None:
            raise NotFound("No challenger is configured (challenger.member in config.yaml).")
        out = await self.recorder.promote.remote()
        if not out["gate_passes"]:
            raise HTTPException(
                409, "Promotion refused by the gate: " + "; ".join(out["gate_failures"]) + "."
            )
        self._set_promoted(bool(out["promoted"]))
        return out

    @api.post("/challenger/rollback", summary="Take the challenger back out of the vote")
    async def rollback(self) -> dict[str, Any]:
        out = await self.recorder.rollback.remote()
        self._set_promoted(bool(out["promoted"]))
        return out

    # -- the work ----------------------------------------------------------------------
    def _validated_rows(self, instances: list[list[float]]) -> np.ndarray:
        """The rows as the float32 array every member receives, or a 422 naming the cell."""
        for i, row in enumerate(instances):
            if len(row) != N_FEATURES:
                raise Unprocessable(
                    f"Row {i} has {len(row)} features; every row needs {N_FEATURES} "
                    "(see GET /ensemble/schema for their order)."
                )
        x = np.asarray(instances, dtype=np.float64)
        bound = self.args.max_abs_feature  # at most float32's largest, so the cast is finite
        bad = np.argwhere(~(np.abs(x) <= bound))
        if len(bad):
            i, j = (int(v) for v in bad[0])
            raise Unprocessable(
                f"Row {i}, column {j} ({feature_names()[j]}) is {x[i, j]:g}; every feature "
                f"must be a finite number between {-bound:g} and {bound:g}."
            )
        return x.astype(np.float32)

    async def _predict(self, body: PredictRequest, prediction_id: str) -> dict[str, Any]:
        t_start = time.perf_counter()
        n = len(body.instances)
        if n > self.args.max_instances:
            raise PayloadTooLarge(
                f"{n} rows in one request; send at most {self.args.max_instances} per request."
            )
        x = self._validated_rows(body.instances)
        voters = self._voters()
        sel = self.args.selection
        quorum = self.args.quorum  # build_app checks it is at most the roster size
        votes: dict[str, np.ndarray] = {}  # member -> P(benign) for the uncertain rows
        versions: dict[str, str] = {}
        failed: dict[str, str] = {}
        decided_by = ["ensemble"] * n
        uncertain = np.arange(n)
        gate_proba: np.ndarray | None = None

        if sel.mode == "cascade" and sel.gate_member in voters:
            gate = sel.gate_member
            res = await gather_with_deadline(
                {gate: voters[gate][0].predict.remote(x)},
                deadline_s=sel.gate_deadline_ms / 1000,
                quorum=1,
            )
            failed.update(res.failed)
            if gate in res.results:
                proba, problem = usable_proba(res.results[gate], n)
                if proba is None:
                    failed[gate] = str(problem)
                else:
                    gate_proba = proba
                    versions[gate] = res.results[gate]["version"]
                    confident = confident_mask(gate_proba, sel.low, sel.high)
                    uncertain = np.flatnonzero(~confident)
                    for i in np.flatnonzero(confident):
                        decided_by[i] = f"gate:{gate}"
                    votes[gate] = gate_proba[uncertain]

        if len(uncertain):
            others = {k: h for k, (h, _) in voters.items() if k not in votes and k not in failed}
            if others:
                sub = x[uncertain]
                # gather's own quorum flag is not used: answers are checked for usable numbers
                # first, and the quorum is then checked once, below, on the votes that count.
                res = await gather_with_deadline(
                    {k: h.predict.remote(sub) for k, h in others.items()},
                    deadline_s=self.args.deadline_ms / 1000,
                    quorum=1,
                )
                failed.update(res.failed)
                for k, out in res.results.items():
                    proba, problem = usable_proba(out, len(uncertain))
                    if proba is None:
                        failed[k] = str(problem)
                    else:
                        votes[k] = proba
                        versions[k] = out["version"]
            if len(votes) < quorum:
                raise ServiceUnavailable(
                    f"Only {len(votes)} of {len(voters)} ensemble members answered within "
                    f"{self.args.deadline_ms:.0f} ms (quorum is {quorum}); "
                    + ", ".join(f"{k}: {v}" for k, v in sorted(failed.items()))
                    + ". Retry shortly."
                )

        labels = np.zeros(n, dtype=np.int64)
        p_benign = np.zeros(n)
        if gate_proba is not None:
            labels[:] = (gate_proba >= 0.5).astype(np.int64)
            p_benign[:] = gate_proba
        if len(uncertain):
            weights = {k: voters[k][1] for k in votes}
            cls, proba = aggregate(votes, self.args.voting, weights)
            labels[uncertain] = cls
            p_benign[uncertain] = proba

        position = {int(i): j for j, i in enumerate(uncertain)}  # row -> index in votes
        predictions = []
        for i in range(n):
            row_votes = {}
            if i in position:
                row_votes = {k: round(float(v[position[i]]), 4) for k, v in votes.items()}
            elif gate_proba is not None:
                row_votes = {sel.gate_member: round(float(gate_proba[i]), 4)}
            predictions.append(
                {
                    "label": int(labels[i]),
                    "class": CLASS_NAMES[int(labels[i])],
                    "p_benign": round(float(p_benign[i]), 4),
                    "decided_by": decided_by[i],
                    "votes": row_votes,
                }
            )
        promoted = self.challenger_name in voters if self.challenger_name else False
        answer = {
            "prediction_id": prediction_id,
            "predictions": predictions,
            "voting": self.args.voting,
            "members": {
                "counted": sorted(votes),
                "late": sorted(k for k, v in failed.items() if v == "timeout"),
                "failed": {k: v for k, v in failed.items() if v != "timeout"},
            },
            "degraded": bool(failed),
            "model_versions": versions,
            "challenger": {
                "name": self.challenger_name,
                "status": "none"
                if not self.challenger_name
                else ("voting" if promoted else "shadow"),
            },
            "latency_ms": round((time.perf_counter() - t_start) * 1000, 2),
        }
        if self.challenger is not None and not promoted:
            self._start_shadow(x, labels.tolist(), prediction_id)
        return answer

    def _start_shadow(self, x: np.ndarray, labels: list[int], pid: str) -> None:
        """Copy the request to the challenger without awaiting it: the answer is already
        decided and goes out now; the comparison is recorded whenever the challenger replies."""
        if len(self._shadow_tasks) >= self.args.challenger.max_in_flight:
            self.shadow_dropped += 1
            return
        task = asyncio.get_running_loop().create_task(self._shadow(x, labels, pid))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(self, x: np.ndarray, labels: list[int], pid: str) -> None:
        assert self.challenger is not None
        t0 = time.perf_counter()
        try:
            out = await asyncio.wait_for(
                self.challenger.predict.remote(x), self.args.challenger.shadow_timeout_s
            )
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


# ------------------------------------------------------------------------------ builder
def _member_app(spec: MemberSpec, store_uri: str | None, prefix: str) -> Application:
    options = resolve_actor_options(spec.resources, f"ensemble/{spec.name}")
    return EnsembleMember.options(name=f"{prefix}_{spec.name}", ray_actor_options=options).bind(
        spec.model_dump(), store_uri, wants_gpu(options)
    )


def build_app(args: EnsembleArgs) -> Application:
    if isinstance(args, dict):  # `serve run ... key=value` or a config's args block
        args = EnsembleArgs(**args)
    names = [m.name for m in args.members]
    if len(set(names)) != len(names):
        raise ValueError(f"member names must be unique, got {names}")
    if args.quorum > len(names):
        raise ValueError(f"quorum {args.quorum} is larger than the roster ({len(names)})")
    if args.selection.mode == "cascade" and args.selection.gate_member not in names:
        raise ValueError(f"cascade gate {args.selection.gate_member!r} is not a member")
    store_uri = args.model_store_uri
    members = {m.name: _member_app(m, store_uri, "member") for m in args.members}
    ch = args.challenger.member
    challenger = _member_app(ch, store_uri, "challenger") if ch else None
    recorder = ShadowRecorder.bind(
        args.challenger.gate.model_dump(), ch.name if ch else None, args.max_instances
    )
    ingress = EnsembleIngress.options(
        ray_actor_options=resolve_actor_options(args.ingress_resources, "ensemble/ingress")
    )
    return ingress.bind(members, challenger, recorder, args.model_dump())


def __getattr__(name: str) -> Any:
    """``serve run patterns.ensemble.app:app`` builds the default app here, on first access.

    Not at import: building resolves placements against the cluster and logs, and importing
    this module (for its args model, say) should do neither.
    """
    if name == "app":
        return build_app(EnsembleArgs())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

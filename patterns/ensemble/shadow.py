"""Shadow-challenger bookkeeping, shared by every ingress replica (one small replica).

Holds what the promotion gate needs: for each prediction the ensemble's and the challenger's
labels, how often they agree, the challenger's latency and failures, and, once labels arrive
through ``POST /feedback``, both accuracies. Also holds the promoted/rolled-back state.

State lives in this replica's memory on purpose: the config's roster is the source of truth,
and a promotion you want to keep is written back to config (the README says how). If this
replica restarts, the app returns to the configured roster and the gathered evidence restarts.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Any

from ray import serve

from core.apps import SURGE
from patterns.ensemble.flow import PromotionGate


@serve.deployment(
    max_surge_percent=SURGE,
    num_replicas=1,
    ray_actor_options={"num_cpus": 0.02},
    max_ongoing_requests=256,
)
class ShadowRecorder:
    def __init__(
        self,
        gate: dict[str, Any],
        challenger: str | None,
        max_rows: int = 64,
        keep: int = 10_000,
        keep_early: int = 1_000,
    ) -> None:
        self.gate = PromotionGate(**gate)
        self.challenger = challenger
        self.max_rows = max_rows  # rows per prediction (the app's max_instances)
        self.keep = keep
        self.keep_early = keep_early
        self.promoted = False
        self.promoted_at: float | None = None
        self._pending: OrderedDict[str, tuple[list[int], list[int] | None]] = OrderedDict()
        # Labels that arrived before their prediction was recorded (the shadow copy is
        # recorded asynchronously, so a fast client can beat it): applied on record. Also
        # where labels for unknown ids land, so it is small: keep_early ids of <= max_rows.
        self._early: OrderedDict[str, list[int]] = OrderedDict()
        self._latency_ms: deque[float] = deque(maxlen=2000)
        self.samples = self.agreeing_rows = self.rows = self.failures = 0
        self.labeled_rows = self.ensemble_correct = self.challenger_correct = 0

    def state(self) -> dict[str, Any]:
        return {"challenger": self.challenger, "promoted": self.promoted}

    def record(
        self,
        prediction_id: str,
        ensemble: list[int],
        challenger: list[int] | None,
        latency_ms: float | None,
    ) -> None:
        self._pending[prediction_id] = (ensemble, challenger)
        while len(self._pending) > self.keep:
            self._pending.popitem(last=False)
        early = self._early.pop(prediction_id, None)
        if challenger is None:
            if latency_ms is not None:  # shadow call failed
                self.failures += 1
            return
        self.samples += 1
        self.rows += len(ensemble)
        self.agreeing_rows += sum(int(a == b) for a, b in zip(ensemble, challenger, strict=True))
        if latency_ms is not None:
            self._latency_ms.append(latency_ms)
        if early is not None:
            self.feedback(prediction_id, early)

    def feedback(self, prediction_id: str, labels: list[int]) -> dict[str, Any]:
        if len(labels) > self.max_rows:  # the ingress refuses these first
            return {"status": "too_many", "max_rows": self.max_rows}
        entry = self._pending.pop(prediction_id, None)
        if entry is None:
            if self.promoted:  # the challenger votes now, so no shadow copy will arrive
                return {"status": "promoted"}
            self._early[prediction_id] = labels
            while len(self._early) > self.keep_early:
                self._early.popitem(last=False)
            return {"status": "held"}
        ensemble, challenger = entry
        if len(labels) != len(ensemble):
            self._pending[prediction_id] = entry  # keep it; the caller can resend
            return {"status": "count_mismatch", "expected": len(ensemble)}
        self.labeled_rows += len(labels)
        self.ensemble_correct += sum(int(a == b) for a, b in zip(ensemble, labels, strict=True))
        if challenger is not None:
            self.challenger_correct += sum(
                int(a == b) for a, b in zip(challenger, labels, strict=True)
            )
        return {"status": "recorded", "rows": len(labels)}

    def stats(self) -> dict[str, Any]:
        lat = sorted(self._latency_ms)
        p95 = lat[int(0.95 * (len(lat) - 1))] if lat else None
        agreement = self.agreeing_rows / self.rows if self.rows else None
        ens_acc = self.ensemble_correct / self.labeled_rows if self.labeled_rows else None
        ch_acc = self.challenger_correct / self.labeled_rows if self.labeled_rows else None
        reasons = []
        g = self.gate
        if self.samples < g.min_samples:
            reasons.append(f"only {self.samples} shadowed predictions (need {g.min_samples})")
        if agreement is not None and agreement < g.min_agreement:
            reasons.append(f"agreement {agreement:.3f} < {g.min_agreement}")
        if self.labeled_rows < g.min_labeled:
            reasons.append(f"only {self.labeled_rows} labelled rows (need {g.min_labeled})")
        if ens_acc is not None and ch_acc is not None and ch_acc < ens_acc - g.max_accuracy_drop:
            reasons.append(f"challenger accuracy {ch_acc:.3f} < ensemble {ens_acc:.3f}")
        if p95 is not None and p95 > g.max_p95_latency_ms:
            reasons.append(f"challenger p95 {p95:.0f} ms > {g.max_p95_latency_ms:.0f} ms")
        return {
            "challenger": self.challenger,
            "promoted": self.promoted,
            "promoted_at": self.promoted_at,
            "shadowed_predictions": self.samples,
            "shadow_failures": self.failures,
            "agreement": agreement,
            "labeled_rows": self.labeled_rows,
            "ensemble_accuracy": ens_acc,
            "challenger_accuracy": ch_acc,
            "challenger_p95_latency_ms": p95,
            "gate": g.model_dump(),
            "gate_passes": not reasons,
            "gate_failures": reasons,
        }

    def promote(self) -> dict[str, Any]:
        stats = self.stats()
        if self.challenger is None:
            return {**stats, "changed": False}
        if stats["gate_passes"] and not self.promoted:
            self.promoted, self.promoted_at = True, time.time()
            return {**self.stats(), "changed": True}
        return {**stats, "changed": False}

    def rollback(self) -> dict[str, Any]:
        changed = self.promoted
        self.promoted, self.promoted_at = False, None
        return {**self.stats(), "changed": changed}

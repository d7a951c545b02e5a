"""The ensemble's model deployment: one member of any family, batched across ingress replicas.

(The other deployments: ``ShadowRecorder`` in shadow.py, the ingress in app.py.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from ray import serve

from core.apps import SURGE
from core.batching import BatchedDeployment, timed_batch
from core.metrics import ModelMetrics
from core.model_store import ModelStore
from core.resources import torch_device
from patterns.ensemble.members import FaultInjection, Member, MemberSpec


# how many requests may share one model call, and how long may a batch wait to fill?
# (config.yaml's user_config sets both per member, live: BatchedDeployment.reconfigure;
# a `fault` key there switches the member's chaos knob live too: reconfigure below)
@serve.deployment(
    max_surge_percent=SURGE,
    max_ongoing_requests=32,
    user_config={"max_batch_size": 32, "batch_wait_timeout_s": 0.005},
)
class EnsembleMember(BatchedDeployment):
    """One model of any family. Requests from all ingress replicas are batched together."""

    def __init__(self, spec: dict[str, Any], store_uri: str | None, on_gpu: bool) -> None:
        parsed = MemberSpec(**spec)
        device = torch_device(on_gpu) if parsed.family == "torch" else "cpu"
        self.member = Member(parsed, ModelStore.open(store_uri), device)
        self.metrics = ModelMetrics("ensemble", parsed.name, self.member.ref.version)

    def reconfigure(self, config: Mapping[str, Any]) -> None:
        """The batching knobs, and ``fault`` (``FaultInjection``: ``{delay_s, error_rate}``)
        when the user_config names it: a game day makes a running member slow or failing with
        a ``serve deploy`` that changes only this, and turns it off the same way. Without the
        key the member keeps the fault it has (its roster entry's, at first)."""
        fault = FaultInjection.model_validate(config["fault"] or {}) if "fault" in config else None
        super().reconfigure(config)  # (a bad fault was refused above, before any change)
        if fault is not None:
            self.member.set_fault(fault)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batched(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        with timed_batch(self.metrics, len(arrays)):
            p = self.member.predict_proba(np.concatenate(arrays))
        return np.split(p, np.cumsum([len(a) for a in arrays])[:-1])

    async def predict(self, rows: np.ndarray | list[list[float]]) -> dict[str, Any]:
        await self.member.inject_fault()
        return self.member.answer(await self._batched(np.asarray(rows, dtype=np.float32)))

    def info(self) -> dict[str, Any]:
        return self.member.info()

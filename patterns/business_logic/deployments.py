"""The compute-bound half: the fraud model in its own deployment, batched across ingress
replicas so requests from all of them share one ``predict_proba`` call.

(The I/O-bound half, the ingress, is in app.py.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ray import serve

from core.apps import SURGE
from core.batching import BatchedDeployment, timed_batch
from core.metrics import ModelMetrics
from core.model_store import ModelStore
from patterns.business_logic.model import MODEL_NAME, MODEL_VERSION


# Compute-bound: a replica is busy with one batch at a time, so few requests in flight (enough
# to fill a batch) and it scales early, on a low in-flight target.
@serve.deployment(
    max_surge_percent=SURGE,
    max_ongoing_requests=32,
    autoscaling_config={
        "min_replicas": 2,  # a lost replica's calls go to the other (reliability/)
        "max_replicas": 3,
        "target_ongoing_requests": 8,
        "upscale_delay_s": 2,
        "downscale_delay_s": 120,
    },
    # how many requests may share one predict_proba call, and how long may a batch wait to fill?
    user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.005},
)
class FraudModel(BatchedDeployment):
    """Loads the model from the store once per replica; scores batches of input rows."""

    def __init__(self, version: str = MODEL_VERSION, store_uri: str | None = None) -> None:
        self.model, self.ref = ModelStore.open(store_uri).load_sklearn(MODEL_NAME, version)
        self.metrics = ModelMetrics("business_logic", MODEL_NAME, self.ref.version)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _batched(self, rows: list[list[float]]) -> list[float]:
        with timed_batch(self.metrics, len(rows)):
            proba = self.model.predict_proba(np.asarray(rows, dtype=np.float64))[:, 1]
        return [float(p) for p in proba]

    async def score(self, row: list[float]) -> dict[str, Any]:
        return {"score": await self._batched(row), "version": self.ref.version}

    def info(self) -> dict[str, Any]:
        """Version, device and held-out quality of the loaded model."""
        meta = self.ref.metadata
        return {
            **self.ref.public(),
            "device": "cpu",  # a scikit-learn tree ensemble
            "held_out": {"auc": meta.get("holdout_auc"), "fraud_rate": meta.get("fraud_rate")},
        }

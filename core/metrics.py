"""Per-model metrics over ``ray.serve.metrics``, tagged with app, model and model version.

Create ``ModelMetrics`` in a replica's ``__init__`` (metrics register with the Ray metrics
agent of the process that creates them), never at import time. They add what Serve's own
metrics cannot know: which model version answered, batch sizes, the model's own failures.
"""

from __future__ import annotations

from typing import Any, cast

_LATENCY_BOUNDARIES_MS = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1e3, 2e3, 5e3]
_BATCH_BOUNDARIES = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]


class ModelMetrics:
    def __init__(self, app: str, model: str, version: str) -> None:
        from ray.serve import metrics

        self.tags = {"app": app, "model": model, "model_version": version}
        # Ray annotates tag_keys as tuple[str] (one element); any tuple of names works.
        keys: Any = cast(Any, tuple(self.tags))
        self._requests = metrics.Counter(
            "cookbook_model_requests",
            description="Model calls, by outcome.",
            tag_keys=(*keys, "outcome"),
        )
        self._latency = metrics.Histogram(
            "cookbook_model_latency_ms",
            description="Model call latency in milliseconds.",
            boundaries=_LATENCY_BOUNDARIES_MS,
            tag_keys=keys,
        )
        self._batch = metrics.Histogram(
            "cookbook_model_batch_size",
            description="Items per model batch.",
            boundaries=_BATCH_BOUNDARIES,
            tag_keys=keys,
        )
        for m in (self._requests, self._latency, self._batch):
            # Serve adds its own deployment/replica tags to the dict it is given: pass a copy.
            m.set_default_tags(dict(self.tags))

    def observe(self, latency_s: float, ok: bool = True) -> None:
        self._requests.inc(tags={"outcome": "ok" if ok else "error"})
        self._latency.observe(latency_s * 1000.0)

    def observe_batch(self, size: int) -> None:
        self._batch.observe(float(size))

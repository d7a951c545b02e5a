"""Dynamic batching knobs from config, and one way to time and count a batch.

Serve's ``@serve.batch`` takes its knobs at decoration time; a deployment that inherits
``BatchedDeployment`` gets them from its ``user_config`` instead, applied live by
``reconfigure`` (``serve deploy`` with a new ``user_config`` changes them without a restart):

    @serve.deployment(user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.005})
    class Scorer(BatchedDeployment):
        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
        async def _batched(self, rows):
            with timed_batch(self.metrics, len(rows)):
                return self.model.predict(rows)

``timed_batch`` records each batch's latency, outcome (ok or error) and size in the model's
metrics, so a failing model shows up in the error count as well as in the logs.
https://docs.ray.io/en/latest/serve/advanced-guides/dyn-req-batch.html
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.metrics import ModelMetrics


class BatchKnobs(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # how many requests may share one model call?
    max_batch_size: int = Field(default=16, ge=1, le=1024)
    # how long may a batch wait to fill? (the latency every request pays at low traffic)
    batch_wait_timeout_s: float = Field(default=0.005, ge=0, le=1)


class BatchedDeployment:
    """Mixin for a deployment whose ``_batched`` method carries ``@serve.batch``.

    ``reconfigure(user_config)`` validates the batching keys (others are left to the subclass,
    which may override ``reconfigure`` and call ``super().reconfigure(config)``); a key left out
    keeps its current value.
    """

    batching: BatchKnobs = BatchKnobs()

    def reconfigure(self, config: Mapping[str, Any]) -> None:
        knobs = BatchKnobs(**{**self.batching.model_dump(), **dict(config)})
        batched = self._batched  # type: ignore[attr-defined]
        batched.set_max_batch_size(knobs.max_batch_size)
        batched.set_batch_wait_timeout_s(knobs.batch_wait_timeout_s)
        self.batching = knobs


@dataclass
class BatchTiming:
    size: int
    ms: float = 0.0
    ok: bool = True


@contextmanager
def timed_batch(metrics: ModelMetrics | None, size: int) -> Iterator[BatchTiming]:
    """Time one batch of ``size`` requests; record latency, outcome and size in ``metrics``."""
    timing = BatchTiming(size)
    t0 = time.perf_counter()
    try:
        yield timing
    except BaseException:
        timing.ok = False
        raise
    finally:
        timing.ms = (time.perf_counter() - t0) * 1000
        if metrics is not None:
            metrics.observe(timing.ms / 1000, ok=timing.ok)
            metrics.observe_batch(size)

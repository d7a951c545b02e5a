"""One timings shape for every answer: ``timings_ms: {<stage>: ms, ..., "total": ms}``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Timings:
    """Per-stage milliseconds of one request, plus the total since the object was made."""

    def __init__(self) -> None:
        self._t0 = time.perf_counter()
        self._ms: dict[str, float] = {}

    def add(self, stage: str, ms: float) -> None:
        """Record ``ms`` for ``stage`` (added up if the stage runs more than once)."""
        self._ms[stage] = self._ms.get(stage, 0.0) + ms

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, (time.perf_counter() - t0) * 1000)

    def as_dict(self) -> dict[str, float]:
        total = (time.perf_counter() - self._t0) * 1000
        return {**{k: round(v, 2) for k, v in self._ms.items()}, "total": round(total, 2)}

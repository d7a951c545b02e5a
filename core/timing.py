"""One timings shape for every answer: ``timings_ms: {<stage>: ms, ..., "total": ms}``; and
``heartbeat``, a line every few seconds while a long build step (training on a CPU) runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
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


@contextmanager
def heartbeat(say: Callable[[str], None], what: str, every_s: float = 5.0) -> Iterator[None]:
    """While the block runs, ``say("  ... <what>: <n>s")`` every ``every_s`` seconds, so a
    step that takes a minute on a small CPU never looks hung (the house rule: a line at least
    every 10 s)."""
    stop = threading.Event()
    t0 = time.perf_counter()

    def beat() -> None:
        while not stop.wait(every_s):
            say(f"  ... {what}: {time.perf_counter() - t0:.0f}s")

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()

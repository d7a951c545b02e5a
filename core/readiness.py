"""Readiness that means ready: a replica reports healthy only once it has answered for real.

Serve marks a replica ready when its constructor returns and its first health check passes. An
ingress whose handles have never been used is not ready by then: the first calls through a new
handle wait for the router to learn the replicas, and a request with a 250 ms fan-out deadline
fails in that wait (the ensemble answered 503 for about 30 s after each start). So each ingress
gives ``Readiness`` one real call through its handles (its ``GET /model``, a sample request)
and makes its ``check_health`` wait for it:

    self.readiness = Readiness("ensemble", self.model)

    async def check_health(self) -> None:
        await self.readiness.wait()

The first health check (the one Serve runs before it sends the replica any traffic) waits until
the call has succeeded once, retrying while downstream replicas start; later checks return at
once. A warm-up that keeps failing for ``timeout_s`` fails the health check, and Serve replaces
the replica. Once warm, a replica never turns unhealthy because a dependency is down: that is a
503 on the request, not a restart (no restart storms).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger("core.readiness")


class Readiness:
    def __init__(
        self,
        name: str,
        warm: Callable[[], Awaitable[Any]],
        *,
        timeout_s: float = 300.0,
        retry_s: float = 0.5,
    ) -> None:
        self.name = name
        self._warm = warm
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.ready = False
        self.warm_ms: float | None = None
        self.attempts = 0
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    async def wait(self) -> None:
        """Return once warm; raise (failing the health check) if warm-up timed out."""
        if self.ready:
            return
        if self._task is None or (self._task.done() and self._task.exception() is not None):
            self._task = asyncio.ensure_future(self._run())
        await asyncio.shield(self._task)

    async def _run(self) -> None:
        started = time.monotonic()
        deadline = started + self.timeout_s
        while True:
            self.attempts += 1
            try:
                await self._warm()
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
                if time.monotonic() + self.retry_s > deadline:
                    raise RuntimeError(
                        f"{self.name} not warm after {self.timeout_s:g}s and {self.attempts} "
                        f"attempts; last error: {self.last_error}"
                    ) from exc
                await asyncio.sleep(self.retry_s)
                continue
            self.warm_ms = round((time.monotonic() - started) * 1000, 1)
            self.ready = True
            logger.info("%s warm in %.0f ms (%d attempts)", self.name, self.warm_ms, self.attempts)
            return

    def as_dict(self) -> dict[str, Any]:
        return {"ready": self.ready, "warm_ms": self.warm_ms, "attempts": self.attempts}

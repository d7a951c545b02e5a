"""Readiness that means ready: a replica reports healthy only once it has answered for real.

Serve marks a replica ready when its constructor returns and its first health check passes. An
ingress whose handles have never been used is not ready by then: the first calls through a new
handle wait for the router to learn the replicas, and a fan-out with a short deadline fails in
that wait. So each ingress gives ``Readiness`` one real call through its handles and makes its
``check_health`` wait for it:

    self.readiness = Readiness("ensemble", self.model)

    async def check_health(self) -> None:
        await self.readiness.wait()

The first health check (run before the replica gets traffic) waits until the call has
succeeded once, retrying while downstream replicas start. A warm-up still failing after
``timeout_s`` (a dependency down, not starting) is logged and the replica reports ready anyway:
it answers its route's 503, where a failed check would only have Serve restart it in a loop.
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
        timeout_s: float = 120.0,
        retry_s: float = 0.5,
    ) -> None:
        self.name = name
        self._warm = warm
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.ready = False
        self.warm = False  # ready after a successful call (False: gave up waiting)
        self.warm_ms: float | None = None
        self.attempts = 0
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    async def wait(self) -> None:
        """Return once warm, or once ``timeout_s`` has passed without a successful call."""
        if self.ready:
            return
        if self._task is None:
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
                    logger.warning(
                        "%s not warm after %gs and %d attempts (last error: %s); serving anyway",
                        self.name,
                        self.timeout_s,
                        self.attempts,
                        self.last_error,
                    )
                    self.ready = True
                    return
                await asyncio.sleep(self.retry_s)
                continue
            self.warm_ms = round((time.monotonic() - started) * 1000, 1)
            self.ready = self.warm = True
            logger.info("%s warm in %.0f ms (%d attempts)", self.name, self.warm_ms, self.attempts)
            return

    def as_dict(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "warm": self.warm,
            "warm_ms": self.warm_ms,
            "attempts": self.attempts,
            "last_error": self.last_error,
        }

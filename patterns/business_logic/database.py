"""Synchronous database drivers called from the event loop: a thread pool, a deadline, and
one rule for which errors are an outage.

The records database and the SQLite feature store both use a synchronous driver through
SQLAlchemy, so both run their calls in a small pool of their own threads with a deadline around
each call. Only operational failures (refused, dropped, locked, timed out, pool exhausted,
missing file) become the caller's "unavailable" exception, which the scorer turns into a 503 or
a degraded answer. Anything else (a bad query, a value the database refuses) is a bug: it is not
dressed up as an outage, so it surfaces as a 500 and in the logs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import exc as sa_exc

from core.resilience import describe_error

logger = logging.getLogger("patterns.business_logic.blocking")

# What "the database did not answer" means. sqlalchemy.exc.TimeoutError is the pool's
# "no free connection in pool_timeout"; the builtin TimeoutError is our own deadline.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,
    OSError,
    TimeoutError,
)


def is_outage(exc: BaseException) -> bool:
    """True for a failure of the database or the way to it, not of the query itself."""
    if isinstance(exc, OUTAGE_ERRORS):
        return True
    # a driver error the dialect recognised as a dropped connection
    return isinstance(exc, sa_exc.DBAPIError) and bool(exc.connection_invalidated)


class BlockingCalls:
    """Runs blocking calls in ``workers`` threads, each with a deadline of ``deadline_s``.

    An outage (``is_outage``) is logged in one line and raised as ``unavailable(kind)``, where
    kind is short enough to quote in an answer ("timed out after 2.5s", "OperationalError").
    A call past its deadline keeps its thread until the driver's own timeout ends it; the
    caller does not wait for that.
    """

    def __init__(
        self,
        *,
        name: str,
        workers: int,
        deadline_s: float,
        unavailable: Callable[[str], Exception],
    ) -> None:
        self.name = name
        self.deadline_s = deadline_s
        self._unavailable = unavailable
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)

    async def run(self, fn: Callable[..., Any], *args: Any, deadline_s: float | None = None) -> Any:
        deadline = self.deadline_s if deadline_s is None else deadline_s
        future = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        try:
            return await asyncio.wait_for(future, deadline)
        except Exception as exc:
            if not is_outage(exc):
                raise
            # our deadline cancelled the call (that TimeoutError has no message at all)
            kind = f"timed out after {deadline:.1f}s" if future.cancelled() else type(exc).__name__
            logger.warning("%s unavailable (%s): %s", self.name, kind, describe_error(exc))
            raise self._unavailable(kind) from exc

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

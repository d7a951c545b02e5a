"""Synchronous database drivers from the event loop: engines with short timeouts, a thread
pool with a deadline around each call, and one rule for which errors are an outage.

The records database (records.py) and the SQLite feature store (features.py) both use a
synchronous driver through SQLAlchemy: ``make_engine`` gives them small pools and short
timeouts, and ``BlockingCalls`` runs their calls in a small pool of their own threads with a
deadline around each call. Only operational failures (refused, dropped, locked, timed out, pool
exhausted, missing file) become the caller's "unavailable" exception, which the scorer turns
into a 503 or a degraded answer. Anything else (a bad query, a value the database refuses) is a
bug: it is not dressed up as an outage, so it surfaces as a 500 and in the logs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.pool import QueuePool

from core.resilience import describe_error

logger = logging.getLogger("patterns.business_logic.database")


# ------------------------------------------------------------------------------ engines
def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def sqlite_path(url: str) -> Path:
    database = make_url(url).database
    if not database or database == ":memory:":
        raise ValueError(f"{url!r}: the embedded database must be a file (sqlite:///path.db)")
    return Path(database)


def make_engine(
    url: str, *, timeout_s: float = 2.0, pool_size: int = 4, create: bool = False
) -> Engine:
    """An engine with a small pool and short timeouts, so a dead database is a fast error.

    SQLite opens read-write without create (``mode=rw``): a missing file is an outage to
    report, not an empty database to invent. ``create=True`` is for the seed script.
    PostgreSQL gets a connect timeout and a server-side statement timeout (libpq options);
    other backends get the pool timeout and the caller's deadline only.

    No overflow connections: the callers run in a pool of ``pool_size`` threads, so at most
    ``pool_size`` connections are ever checked out at once.
    """
    if is_sqlite(url):
        path = sqlite_path(url)
        mode = "rwc" if create else "rw"

        def connect() -> sqlite3.Connection:
            # timeout: how long to wait for another writer's lock before failing.
            return sqlite3.connect(
                f"file:{path}?mode={mode}", uri=True, timeout=timeout_s, check_same_thread=False
            )

        return create_engine(
            "sqlite://",
            creator=connect,
            poolclass=QueuePool,
            pool_size=pool_size,
            max_overflow=0,
            pool_timeout=timeout_s,
        )
    connect_args: dict[str, Any] = {}
    if make_url(url).get_backend_name() == "postgresql":
        connect_args = {
            "connect_timeout": max(1, math.ceil(timeout_s)),
            "options": f"-c statement_timeout={int(timeout_s * 1000)}",
        }
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=timeout_s,  # wait for a free pooled connection at most this long
        pool_pre_ping=True,  # a server restart costs one reconnect, not a failed request
        connect_args=connect_args,
    )


# ------------------------------------------------------------------------------ calls
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

"""Resilience for calls between deployments: deadlines with a quorum, lost replicas.

- ``gather_with_deadline``: wait for several calls (DeploymentResponses or any awaitables) until
  all answered or the deadline passed, whichever comes first; late calls are cancelled, so a
  request never waits on the slowest member beyond the deadline.
- ``call_surviving_replica``: a call whose repeat is harmless, made again when the replica
  serving it was lost.
- ``describe_error``: one line for an answer or a log, never Ray's wrapper around the error.

Retry budgets and circuit breakers for calls out of the cluster (an external API) live with
the one pattern that makes such calls: ``patterns/business_logic/breaker.py``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

logger = logging.getLogger("core.resilience")
T = TypeVar("T")


@dataclass
class QuorumResult:
    results: dict[str, Any] = field(default_factory=dict)
    # name -> "timeout" | "error: ..." | the validator's sentence
    failed: dict[str, str] = field(default_factory=dict)
    quorum: int = 1
    quorum_met: bool = False
    degraded: bool = False  # True when any call was late or failed
    elapsed_s: float = 0.0
    # per call: ms until it answered (or failed); abandoned calls report the deadline
    elapsed_ms: dict[str, float] = field(default_factory=dict)
    deadline_s: float = 0.0

    def require_quorum(self, what: str = "calls") -> QuorumResult:
        """Self when the quorum was met, else ``ServiceUnavailable`` naming each failure."""
        if not self.quorum_met:
            from core.errors import ServiceUnavailable

            total = len(self.results) + len(self.failed)
            raise ServiceUnavailable(
                f"Only {len(self.results)} of {total} {what} answered within "
                f"{self.deadline_s * 1000:.0f} ms (quorum is {self.quorum}); "
                + ", ".join(f"{k}: {v}" for k, v in sorted(self.failed.items()))
                + ". Retry shortly."
            )
        return self


async def _await(aw: Awaitable[Any]) -> Any:
    return await aw


def describe_error(exc: BaseException) -> str:
    """One line for an answer or a log: the user's exception, not Ray's wrapper around it
    (a RayTaskError carries pids, IPs and a remote traceback that a client must not see)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"error: {type(exc).__name__}: {first_line[:160]}".rstrip(": ")


LOST_REPLICA_ERRORS = ("ActorDiedError", "ActorUnavailableError", "RayActorError")


def transient_failure(failure: str) -> bool:
    """A ``QuorumResult.failed`` entry that a second try may not meet: late (``"timeout"``)
    or a replica that was lost (its replacement is starting). An exception the member raised
    or a bad answer is not transient."""
    if failure == "timeout":
        return True
    return any(failure.startswith(f"error: {name}") for name in LOST_REPLICA_ERRORS)


def _retrieve(task: asyncio.Future) -> None:
    """Done callback for a task nobody awaits any more: read its outcome, so that a call that
    answers its cancellation with an error (Ray's RequestCancelledError) is not logged as
    "Task exception was never retrieved"."""
    if not task.cancelled():
        task.exception()


def _cancel(aw: Any) -> None:
    cancel = getattr(aw, "cancel", None)
    if callable(cancel):
        try:
            cancel()
        except Exception:  # cancelling is best effort; the answer is already decided
            logger.debug("cancel failed", exc_info=True)


async def gather_with_deadline(
    calls: Mapping[str, Awaitable[Any]],
    *,
    deadline_s: float,
    quorum: int,
    validate: Callable[[str, Any], str | None] | None = None,
) -> QuorumResult:
    """Results of the calls that answered within ``deadline_s``; the rest are cancelled.

    ``validate(name, result)`` may return a sentence saying why an answer is unusable (NaN
    scores, wrong shape): that call then counts as failed, so the quorum is checked once, here,
    on the answers that count. ``QuorumResult.require_quorum`` turns a missed quorum into 503.
    """
    if quorum < 1 or quorum > len(calls):
        for aw in calls.values():  # never started: close them so nothing dangles
            if inspect.iscoroutine(aw):
                aw.close()
            else:
                _cancel(aw)
        raise ValueError(f"quorum must be between 1 and {len(calls)}, got {quorum}")
    start = time.perf_counter()
    out = QuorumResult(quorum=quorum, deadline_s=deadline_s)

    def _stamp(name: str) -> Callable[[asyncio.Future], None]:
        def done(_: asyncio.Future) -> None:
            out.elapsed_ms[name] = round((time.perf_counter() - start) * 1000, 2)

        return done

    tasks = {asyncio.ensure_future(_await(aw)): name for name, aw in calls.items()}
    stamps = {task: _stamp(name) for task, name in tasks.items()}
    for task, stamp in stamps.items():
        task.add_done_callback(stamp)
    done, pending = await asyncio.wait(tasks, timeout=deadline_s)
    for task in done:
        name = tasks[task]
        exc = task.exception()
        if exc is not None:
            out.failed[name] = describe_error(exc)
            continue
        problem = validate(name, task.result()) if validate is not None else None
        if problem:
            out.failed[name] = problem
        else:
            out.results[name] = task.result()
    for task in pending:
        name = tasks[task]
        out.failed[name] = "timeout"
        task.remove_done_callback(stamps[task])  # abandoned: it reports the deadline
        task.add_done_callback(_retrieve)
        _cancel(calls[name])
        task.cancel()
        out.elapsed_ms[name] = round(deadline_s * 1000, 2)
    out.quorum_met = len(out.results) >= quorum
    out.degraded = bool(out.failed)
    out.elapsed_s = time.perf_counter() - start
    return out


def replica_lost(exc: BaseException) -> bool:
    """True for Ray's errors that mean "the replica (actor) serving a call is gone or
    unreachable", directly or as the cause of a failed chained call."""
    from ray.exceptions import RayActorError, RayTaskError

    if isinstance(exc, RayActorError):
        return True
    return isinstance(exc, RayTaskError) and isinstance(getattr(exc, "cause", None), RayActorError)


async def call_surviving_replica(
    call: Callable[[], Awaitable[T]], *, attempts: int = 3, backoff_s: float = 0.1
) -> T:
    """Await ``call()`` (a handle call whose repeat is harmless: a model's predict), making it
    again when the replica serving it was lost; Serve's router picks a live replica (or waits
    for the replacement). Any other error, and the last loss, propagate."""
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except Exception as exc:
            if attempt == attempts or not replica_lost(exc):
                raise
            logger.warning("replica lost (%s); calling again (%d/%d)", exc, attempt, attempts)
            await asyncio.sleep(backoff_s * attempt)
    raise AssertionError("unreachable")

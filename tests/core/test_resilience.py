"""Deadline + quorum fan-out and error descriptions, including their failure paths."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from core.resilience import gather_with_deadline


async def _answer(value, delay: float = 0.0):
    await asyncio.sleep(delay)
    return value


async def _boom():
    raise RuntimeError("member exploded")


def test_quorum_returns_at_deadline_without_waiting_for_slow_member() -> None:
    async def main():
        slow = asyncio.ensure_future(_answer("late", delay=5.0))
        t0 = time.perf_counter()
        res = await gather_with_deadline(
            {"a": _answer(1), "b": _answer(2, 0.01), "slow": slow}, deadline_s=0.2, quorum=2
        )
        return res, time.perf_counter() - t0, slow

    res, elapsed, slow = asyncio.run(main())
    assert res.results == {"a": 1, "b": 2}
    assert res.failed == {"slow": "timeout"}
    assert res.quorum_met and res.degraded
    assert elapsed < 1.0  # bounded by the 0.2 s deadline, not the 5 s member
    assert slow.cancelled()


class _CancelledWithError:
    """Awaitable like a Ray DeploymentResponse: cancel() makes the await raise an error
    of its own (RequestCancelledError), not CancelledError."""

    def __init__(self) -> None:
        self._cancelled = asyncio.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    def __await__(self):
        return self._wait().__await__()

    async def _wait(self):
        with contextlib.suppress(asyncio.CancelledError):
            await self._cancelled.wait()
        raise RuntimeError("request was cancelled")


def test_late_call_that_errors_on_cancel_is_not_logged_as_unretrieved() -> None:
    import gc

    unretrieved: list[dict] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: unretrieved.append(ctx))
        res = await gather_with_deadline(
            {"fast": _answer(1), "late": _CancelledWithError()}, deadline_s=0.05, quorum=1
        )
        assert res.failed == {"late": "timeout"} and res.results == {"fast": 1}
        await asyncio.sleep(0.05)  # let the cancelled call finish with its error
        gc.collect()

    asyncio.run(main())
    gc.collect()
    assert [c.get("message") for c in unretrieved] == []


def test_all_fast_is_not_degraded_and_returns_early() -> None:
    async def main():
        t0 = time.perf_counter()
        res = await gather_with_deadline({"a": _answer(1), "b": _answer(2)}, deadline_s=5, quorum=2)
        return res, time.perf_counter() - t0

    res, elapsed = asyncio.run(main())
    assert res.results == {"a": 1, "b": 2} and not res.degraded and res.quorum_met
    assert elapsed < 1.0


def test_failed_member_counts_against_quorum() -> None:
    res = asyncio.run(
        gather_with_deadline({"a": _answer(1), "bad": _boom()}, deadline_s=1, quorum=2)
    )
    assert not res.quorum_met and res.degraded
    assert res.failed["bad"].startswith("error: RuntimeError: member exploded")


def test_quorum_must_be_possible() -> None:
    with pytest.raises(ValueError):
        asyncio.run(gather_with_deadline({"a": _answer(1)}, deadline_s=1, quorum=2))


def test_error_description_unwraps_ray_task_errors() -> None:
    from core.resilience import describe_error

    class RayTaskErrorLike(Exception):
        def __init__(self) -> None:
            super().__init__("ray::Replica (pid=1, ip=10.0.0.1)\nTraceback ...")
            self.cause = ValueError("bad row 3\nmore detail")

    assert describe_error(RayTaskErrorLike()) == "error: ValueError: bad row 3"
    assert describe_error(TimeoutError()) == "error: TimeoutError"

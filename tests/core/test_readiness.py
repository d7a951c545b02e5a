"""core.readiness: the first health check waits for one real call; a dead dependency does not
keep a replica unready (or restarting) forever."""

from __future__ import annotations

import asyncio

from core.readiness import Readiness


def test_waits_through_failures_until_one_call_succeeds() -> None:
    calls = []

    async def warm() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("downstream replica not up yet")

    async def go() -> Readiness:
        r = Readiness("demo", warm, retry_s=0.01)
        await asyncio.gather(r.wait(), r.wait())  # two checks at once share one warm-up
        await r.wait()  # and a later one returns at once
        return r

    r = asyncio.run(go())
    assert len(calls) == 3
    assert r.as_dict()["ready"] and r.as_dict()["warm"] and r.as_dict()["attempts"] == 3


def test_gives_up_waiting_after_the_timeout_and_says_so() -> None:
    async def warm() -> None:
        raise ConnectionError("dependency down")

    async def go() -> Readiness:
        r = Readiness("demo", warm, timeout_s=0.05, retry_s=0.01)
        await r.wait()
        return r

    state = asyncio.run(go()).as_dict()
    assert state["ready"] and not state["warm"]
    assert state["last_error"].startswith("ConnectionError: dependency down")

"""core.batching, core.timing, core.apps and the gather_with_deadline additions."""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import BaseModel, ValidationError
from ray import serve

from core.apps import coerce_args, default_app
from core.batching import BatchedDeployment, timed_batch
from core.errors import ServiceUnavailable
from core.resilience import gather_with_deadline
from core.timing import Timings


@serve.deployment(ray_actor_options={"num_cpus": 0.05}, max_ongoing_requests=32)
class _Doubler(BatchedDeployment):
    """A real @serve.batch deployment whose knobs come from user_config."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=0.5)
    async def _batched(self, xs: list[int]) -> list[int]:
        with timed_batch(None, len(xs)) as timing:
            self.sizes.append(len(xs))
        assert timing.ms > 0 and timing.ok  # measured (0.0 until the block ends)
        return [2 * x for x in xs]

    async def double(self, x: int) -> int:
        return await self._batched(x)

    def state(self) -> dict:
        return {"sizes": self.sizes, "knobs": self.batching.model_dump()}

    def try_reconfigure(self, config: dict) -> str:
        try:
            self.reconfigure(config)
        except ValidationError as exc:
            return str(exc)
        return "ok"


def test_reconfigure_sets_the_batch_knobs_from_user_config(serve_http: str) -> None:
    app = _Doubler.options(
        user_config={"max_batch_size": 8, "batch_wait_timeout_s": 0.5, "other_key": 1}
    ).bind()
    handle = serve.run(app, name="core-batching", route_prefix="/core-batching")
    try:
        out = [handle.double.remote(i) for i in range(8)]
        assert [r.result() for r in out] == [2 * i for i in range(8)]
        state = handle.state.remote().result()
        # one batch of 8 (the decorator said 2), filled well before the 0.5 s wait
        assert state["sizes"] == [8]
        assert state["knobs"] == {"max_batch_size": 8, "batch_wait_timeout_s": 0.5}
        # a key left out keeps its value; a bad value is refused with the field's name
        assert handle.try_reconfigure.remote({"batch_wait_timeout_s": 0.01}).result() == "ok"
        assert handle.state.remote().result()["knobs"]["max_batch_size"] == 8
        assert "max_batch_size" in handle.try_reconfigure.remote({"max_batch_size": 0}).result()
    finally:
        serve.delete("core-batching")


def test_timed_batch_marks_a_failed_batch() -> None:
    with pytest.raises(RuntimeError), timed_batch(None, 3) as timing:
        raise RuntimeError("model exploded")
    assert not timing.ok and timing.size == 3


def test_timings_shape() -> None:
    t = Timings()
    with t.stage("decode"):
        time.sleep(0.01)
    t.add("model", 2.0)
    t.add("model", 1.5)
    d = t.as_dict()
    assert list(d) == ["decode", "model", "total"]
    assert d["model"] == 3.5 and d["decode"] >= 10 and d["total"] >= d["decode"]


def test_default_app_builds_on_access_only() -> None:
    class Args(BaseModel):
        n: int = 1

    built: list[Args] = []

    def build_app(args: Args | dict) -> str:
        built.append(coerce_args(args, Args))
        return "app"

    hook = default_app(lambda: build_app(Args()))
    assert built == []
    assert hook("app") == "app" and built == [Args()]
    with pytest.raises(AttributeError):
        hook("other")
    assert coerce_args({"n": 3}, Args) == Args(n=3)
    with pytest.raises(ValidationError):
        coerce_args({"n": "x"}, Args)


async def _answer(value, delay: float = 0.0):
    await asyncio.sleep(delay)
    return value


def test_gather_reports_each_calls_time_and_validates_once() -> None:
    async def main():
        return await gather_with_deadline(
            {"fast": _answer(1), "nan": _answer(float("nan"), 0.05), "slow": _answer(3, 5)},
            deadline_s=0.3,
            quorum=2,
            validate=lambda name, v: "not a number" if v != v else None,
        )

    res = asyncio.run(main())
    assert res.results == {"fast": 1}
    assert res.failed == {"nan": "not a number", "slow": "timeout"}
    assert not res.quorum_met
    assert res.elapsed_ms["fast"] < res.elapsed_ms["nan"] < res.elapsed_ms["slow"] == 300.0
    with pytest.raises(ServiceUnavailable, match=r"Only 1 of 3 members .*quorum is 2.*nan"):
        res.require_quorum("members")


def test_require_quorum_passes_through_when_met() -> None:
    res = asyncio.run(gather_with_deadline({"a": _answer(1)}, deadline_s=1, quorum=1))
    assert res.require_quorum() is res and res.elapsed_ms["a"] < 1000

"""Locust with an open-loop, rate-driven load: a ladder of offered rates, found as it runs.

Offered load is fixed by the clock, not by the server: ``PacedUser`` sends one request every
``pace`` seconds whatever the answers do (``constant_pacing``), each user starting at a random
phase, so ``users / pace`` requests per second arrive spread over time. A slow server gets the
same arrivals and shows it in its latency and failures (no coordinated omission), up to one
pace per request (``pace`` is twice the SLO, ``network_timeout`` four times; a request slower
than that is a failure).

``RateShape`` runs a ladder of steps of ``LOADTEST_STEP_S`` seconds. At the end of each step it
scores the step from every request that ended in it (the first ``LOADTEST_SETTLE_S`` seconds
not counted): the step holds the SLO when its p95, failures included, is at most
``LOADTEST_SLO_MS`` and under 1% failed. Then:
- climbing: a step that holds multiplies the rate by ``LOADTEST_RATE_FACTOR``; the first that
  does not is tried once more halfway (geometric mean) between it and the last that held, and
  the ladder ends;
- a first step that does not hold walks down by the same factor until one holds, then tries
  once halfway back up.
After a step that missed, ``LOADTEST_COOL_S`` seconds without load let its backlog drain, so
the next step starts from an empty queue. ``LOADTEST_RATE_START`` is the first rate;
``LOADTEST_MAX_STEPS`` and ``LOADTEST_RATE_MAX`` bound the ladder.
``LOADTEST_SCHEDULE=20:8,60:40,60:8`` (seconds:rate, ...) replaces the ladder by fixed
segments (the study's autoscaling run: a step up and back down).
Each step is one JSON line in ``$LOADTEST_SAMPLES/steps.jsonl`` (offered and achieved rps,
p50/p95, failures) and every request one line in ``samples-<pid>.csv``.

    LOADTEST_REQUEST=patterns.pipeline.client:sample_request LOADTEST_RATE_START=10 \\
      locust -f loadtests/ratefile.py --headless --host http://127.0.0.1:8101

One Locust process (no ``--processes``): the shape reads the answers in this process, and one
process drives a few hundred requests per second at a fraction of a core.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import time

import gevent
from locust import LoadTestShape, events

# Only PacedUser may be a user class in this module's namespace (Locust runs every one).
from loadtests import locustfile
from loadtests.study import Ladder, score

__all__ = ["PacedUser", "RateShape"]

_answers: list[tuple[float, float, int]] = []  # (end time, latency ms, ok) of every request


def _env(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


@events.request.add_listener
def _keep(response_time: float, exception: object = None, **_: object) -> None:
    _answers.append((time.time(), response_time, 0 if exception else 1))


class _Pace:
    """The current pace (seconds between one user's requests); the shape sets it per step."""

    seconds = 1.0


class PacedUser(locustfile.PatternUser):
    network_timeout = 4 * _env("LOADTEST_SLO_MS", 500) / 1000
    connection_timeout = network_timeout

    def wait_time(self) -> float:
        # constant pacing: the next request leaves ``pace`` after this one left
        return max(0.0, self.started + _Pace.seconds - time.monotonic())

    def on_start(self) -> None:
        self.sample = locustfile._load_sampler()
        self.counter = itertools.count(random.randrange(1 << 16))
        gevent.sleep(random.uniform(0, _Pace.seconds))  # a random phase: arrivals spread out


class RateShape(LoadTestShape):
    def __init__(self) -> None:
        super().__init__()
        self.step_s = _env("LOADTEST_STEP_S", 8)
        self.settle_s = _env("LOADTEST_SETTLE_S", 2)
        self.slo_ms = _env("LOADTEST_SLO_MS", 500)
        self.ladder = Ladder(
            _env("LOADTEST_RATE_START", 10),
            _env("LOADTEST_RATE_FACTOR", 1.5),
            int(_env("LOADTEST_MAX_STEPS", 12)),
            _env("LOADTEST_RATE_MAX", 2000),
        )
        schedule = os.environ.get("LOADTEST_SCHEDULE", "")
        self.schedule = [
            (float(d), float(r)) for d, _, r in (x.partition(":") for x in schedule.split(",") if x)
        ]
        if self.schedule:
            self.step_s, self.ladder.rate = self.schedule[0]
        self.folder = os.environ.get("LOADTEST_SAMPLES", "")
        self.step_started: float | None = None
        self.cool_s = _env("LOADTEST_COOL_S", 2)
        self.cool_until = 0.0
        self.done = False

    def _users(self) -> int:
        # twice the SLO between one user's requests: answers up to that late keep the rate
        base = 2 * self.slo_ms / 1000
        users = max(1, math.ceil(self.ladder.rate * base))
        _Pace.seconds = users / self.ladder.rate
        return users

    def _end_step(self, now: float) -> bool:
        """Score the step that ends now and choose the next; True when it missed the SLO."""
        lo, hi = self.step_started + self.settle_s, now  # type: ignore[operator]
        row = {"offered_rps": self.ladder.rate, "users": self._users(), **score(_answers, lo, hi)}
        row["held"] = bool(
            row["requests"]
            and row["p95_ms"] <= self.slo_ms
            and row["failures"] <= 0.01 * row["requests"]
        )
        row.update(t_start=round(self.step_started, 3), t_end=round(now, 3))  # type: ignore[arg-type]
        if self.folder:
            with open(os.path.join(self.folder, "steps.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
        _answers[:] = [r for r in _answers if r[0] >= hi]
        if self.schedule:
            self.schedule.pop(0)
            if self.schedule:
                self.step_s, self.ladder.rate = self.schedule[0]
            else:
                self.done = True
        elif self.ladder.next_rate(row["held"]) is None:
            self.done = True
        return not row["held"]

    def tick(self) -> tuple[int, float] | None:
        now = time.time()
        if self.step_started is None:
            self.step_started = now
        elif self.cool_until:
            if now < self.cool_until:
                return 0, 1000.0  # no load: the backlog of a missed step drains
            self.cool_until, self.step_started = 0.0, now
            _answers.clear()
        elif now - self.step_started >= self.step_s:
            missed = self._end_step(now)
            self.step_started = now
            if missed and not self.done:
                self.cool_until = now + self.cool_s
                return 0, 1000.0
        if self.done:
            return None
        # every user started (or stopped) at once; a new one waits a random phase first
        return self._users(), 10000.0

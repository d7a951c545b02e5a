"""One Locust user for any pattern: it replays the pattern's own example requests.

The request comes from ``LOADTEST_REQUEST=patterns.<name>.client:sample_request``, a function
``sample_request(i: int) -> dict`` returning ``{"method", "path", ...}`` plus any of ``json``,
``data``, ``files``, ``headers`` (the same shape the pattern's client sends), so a load test
never drifts from what the README shows.

    locust -f loadtests/locustfile.py --headless -u 16 -r 16 -t 30s --host http://127.0.0.1:8000
(or ``python -m loadtests.run``, which also prints the figures and the cost.)

``LOADTEST_ROUTE=/pipeline=/pipeline-split`` sends the pattern's requests to the same app
deployed under another route prefix (the study runs two topologies of one app side by side).
"""

import importlib
import itertools
import os
import time

from locust import FastHttpUser, constant, events, task

from loadtests.targets import reroute

# LOADTEST_SAMPLES=DIR: every request (ok or failed) also goes to DIR/samples-<pid>.csv as
# "end time, latency ms, ok" (one file per Locust process), so loadtests.study can compute
# each load step's rps, p95 and failures exactly, not from Locust's 10 s rolling window.
_samples: dict[int, object] = {}


@events.request.add_listener
def _record(response_time: float, exception: object = None, **_: object) -> None:
    folder = os.environ.get("LOADTEST_SAMPLES")
    if not folder:
        return
    pid = os.getpid()
    f = _samples.get(pid)
    if f is None:
        f = _samples[pid] = open(os.path.join(folder, f"samples-{pid}.csv"), "a", buffering=1)  # noqa: SIM115
    f.write(f"{time.time():.4f},{response_time:.2f},{0 if exception else 1}\n")


def _load_sampler():
    spec = os.environ.get("LOADTEST_REQUEST", "")
    module, _, func = spec.partition(":")
    if not module or not func:
        raise SystemExit("set LOADTEST_REQUEST=patterns.<name>.client:sample_request")
    return getattr(importlib.import_module(module), func)


@events.init.add_listener
def _warm_up(**_: object) -> None:
    """Load the sampler and make its first requests before the test starts: a pattern's
    sampler may draw and cache its bodies on first use, seconds of CPU that would otherwise
    block a worker's event loop (and its heartbeats to the master) at the start."""
    if os.environ.get("LOADTEST_REQUEST"):
        sample = _load_sampler()
        for i in range(int(os.environ.get("LOADTEST_WARM", "64"))):
            sample(i)


class PatternUser(FastHttpUser):
    wait_time = constant(0)  # closed loop: each user sends its next request at once

    def on_start(self) -> None:
        self.sample = _load_sampler()
        self.counter = itertools.count()

    @task
    def call(self) -> None:
        self.started = time.monotonic()  # for pacing (ratefile.PacedUser)
        req = dict(self.sample(next(self.counter)))
        method = req.pop("method", "POST")
        path = req.pop("path")
        path = reroute(path, os.environ.get("LOADTEST_ROUTE", ""))
        expect = req.pop("expect_status", (200,))
        with self.client.request(method, path, name=path, catch_response=True, **req) as resp:
            if resp.status_code not in expect:
                detail = resp.error or (resp.text or "")[:200]
                resp.failure(f"status {resp.status_code}: {detail}")

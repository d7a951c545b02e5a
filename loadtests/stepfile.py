"""Locust with a step load: ``PatternUser`` (locustfile.py) and users ramped in stages.

``LOADTEST_STEPS=2,4,8,16`` (users in each stage) and ``LOADTEST_STEP_S=20`` (seconds per
stage); the test ends after the last stage. The shape runs on Locust's master (or the only
process) and writes the time the first stage started to ``$LOADTEST_SAMPLES/t0``.

    LOADTEST_REQUEST=patterns.pipeline.client:sample_request LOADTEST_STEPS=2,8 \\
      locust -f loadtests/stepfile.py --headless --processes 2 --host http://127.0.0.1:8101 \\
      --csv out/stats --csv-full-history --html out/report.html
"""

import os
import time

import locust.runners
from locust import LoadTestShape

from loadtests.locustfile import PatternUser

# With --processes, the master drops a worker that misses 3 heartbeats (1 s apart); on a small
# box shared with the servers under test a worker can lag that long without being lost.
locust.runners.HEARTBEAT_LIVENESS = max(locust.runners.HEARTBEAT_LIVENESS, 15)

__all__ = ["PatternUser", "StepShape"]


def steps_from_env() -> list[int]:
    text = os.environ.get("LOADTEST_STEPS", "2,4,8,16")
    return [int(u) for u in text.split(",") if u.strip()]


class StepShape(LoadTestShape):
    def tick(self) -> tuple[int, float] | None:
        steps = steps_from_env()
        step_s = float(os.environ.get("LOADTEST_STEP_S", "20"))
        folder = os.environ.get("LOADTEST_SAMPLES")
        if folder and not getattr(self, "_t0_written", False):
            with open(os.path.join(folder, "t0"), "w") as f:
                f.write(f"{time.time():.4f}\n")
            self._t0_written = True
        k = int(self.get_run_time() // step_s)
        if k >= len(steps):
            return None
        return steps[k], float(max(steps))  # spawn fast: each stage starts at once

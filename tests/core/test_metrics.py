"""ModelMetrics inside a real replica: the series reach Ray's Prometheus endpoint, tagged."""

from __future__ import annotations

import os
import time

import httpx
from ray import serve

from core.metrics import ModelMetrics


@serve.deployment(ray_actor_options={"num_cpus": 0.05})
class TaggedModel:
    def __init__(self) -> None:
        self.metrics = ModelMetrics(app="core-test", model="doubler", version="v7")

    def __call__(self, x: float) -> float:
        t0 = time.perf_counter()
        self.metrics.observe_batch(1)
        self.metrics.observe(time.perf_counter() - t0, ok=True)
        return 2 * x


def test_metrics_are_exported_with_app_model_and_version_tags(serve_http: str) -> None:
    handle = serve.run(TaggedModel.bind(), name="core-metrics-test", route_prefix=None)
    try:
        assert [handle.remote(i).result() for i in range(5)] == [0, 2, 4, 6, 8]
        url = f"http://127.0.0.1:{os.environ['COOKBOOK_TEST_METRICS_PORT']}/metrics"
        deadline = time.monotonic() + 60  # Ray flushes metrics every few seconds
        lines: list[str] = []
        while time.monotonic() < deadline:
            try:
                text = httpx.get(url, timeout=5).text
            except httpx.HTTPError:
                text = ""
            lines = [ln for ln in text.splitlines() if "cookbook_model_requests" in ln]
            if any('model_version="v7"' in ln for ln in lines):
                break
            time.sleep(2)
        sample = next(ln for ln in lines if 'model_version="v7"' in ln and not ln.startswith("#"))
        assert 'app="core-test"' in sample and 'model="doubler"' in sample
        assert 'outcome="ok"' in sample
        assert float(sample.rsplit(" ", 1)[1]) >= 5
    finally:
        serve.delete("core-metrics-test")

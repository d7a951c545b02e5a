"""The load study end to end (a tiny run of ``loadtests.compare``) and its pure parts."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import numpy as np
import psutil
import pytest

from loadtests import compare
from loadtests.cost import cost_per_million, gpu_counts, load_prices
from loadtests.run import require_up
from loadtests.study import Step, at_slo, step_stats
from loadtests.targets import free_port


def test_step_stats_count_failures_and_keep_them_in_latency() -> None:
    t0 = 1000.0
    # stage 1 (users 2): 4 ok at 10 ms; stage 2 (users 8): 5 ok at 20 ms + 1 failed at 900 ms
    rows = [(t0 + 1.5 + i * 0.1, 10.0, 1) for i in range(4)]
    rows += [(t0 + 2.5 + i * 0.1, 20.0, 1) for i in range(5)] + [(t0 + 3.9, 900.0, 0)]
    steps = step_stats(np.array(rows), t0, [2, 8], step_s=2.0, settle_s=0.5)
    assert [s.requests for s in steps] == [4, 6]
    assert [s.failures for s in steps] == [0, 1]
    assert steps[1].p95_ms > 500  # the failure's latency counts
    assert at_slo(steps, slo_ms=500) == steps[0]  # stage 2 breaks the SLO and fails 1 in 6
    assert at_slo(steps, slo_ms=1000, max_failure_ratio=0.5) == steps[1]
    assert at_slo([Step(1, 0, 0, 0.0, float("nan"), float("nan"))], 500) is None


def test_cost_model() -> None:
    prices = load_prices()
    assert "list prices" in prices["source"] and prices["measured_node"] in prices["nodes"]
    assert cost_per_million(100.0, 0.36) == pytest.approx(1.0)
    share = {"detector": 0.5, "scene": 0.25, "digits": 0.25}
    # Below one GPU's capacity: a whole GPU per model service against one shared GPU.
    assert gpu_counts(100, 900, share) == {"microservices": 3, "serve": 1}
    big = gpu_counts(90_000, 900, share)
    assert big["serve"] == 100 and big["microservices"] - big["serve"] <= 3


def test_a_service_that_is_down_stops_with_a_sentence() -> None:
    with pytest.raises(SystemExit, match="No service answers at"):
        require_up(f"http://127.0.0.1:{free_port()}", timeout_s=2)


def test_a_cut_short_run_leaves_a_partial_report(tmp_path) -> None:
    a = compare.parse(["--quick", "--out", str(tmp_path)])
    meta = {"command": "x", "machine": "m", "load_before": "1", "started": "now"}
    results = {"monolith": {"arch": "monolith", "cut_short": "The monolith target exited."}}
    path = compare.write_report(tmp_path, a, results, meta, load_prices(), partial="Ctrl-C")
    text = path.read_text()
    assert "PARTIAL REPORT" in text and "Ctrl-C" in text
    assert "not measured (The monolith target exited.)" in text


def _our_processes() -> set[int]:
    out = set()
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "loadtests.targets" in cmd or "loadtests.apps:" in cmd or "stepfile.py" in cmd:
            out.add(p.pid)
    return out


@pytest.mark.slow
def test_quick_study_gives_three_rows_plots_and_counted_failures(tmp_path) -> None:
    before = _our_processes()
    t0 = time.monotonic()
    rc = compare.main(["--quick", "--step-s", "3", "--out", str(tmp_path)])
    report = (tmp_path / "report.md").read_text()
    assert rc == 0, report
    assert "PARTIAL" not in report
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    for arch in ("monolith", "microservices", "serve"):
        assert any(r.startswith(f"| {arch} | ") for r in rows), arch
    assert "Same answer from every architecture: **yes**" in report
    for png in ("rps_p95.png", "cost.png", "replicas.png", "gpu_model.png"):
        assert (tmp_path / png).stat().st_size > 1000, png
    data = json.loads((tmp_path / "results.json").read_text())
    for arch, s in data["summary"].items():
        # every request Locust counted is in our samples (Locust's csv may miss a worker's
        # last report at shutdown; ours is written per request), failures counted, not dropped
        assert s["requests"] >= s["locust_requests"] > 0, arch
        # failures are the counted steps' own, each step's within its requests, and the
        # report's row shows ours beside Locust's
        steps = data["results"][arch]["load"]["steps"]
        assert all(0 <= st["failures"] <= st["requests"] for st in steps), steps
        assert s["failures"] == sum(st["failures"] for st in steps), (s, steps)
        row = next(r for r in rows if r.startswith(f"| {arch} | "))
        assert f"| {s['failures']} / {s['failures_all']} |" in row, row
        assert (tmp_path / arch / "locust.html").exists()
        assert (tmp_path / arch / "locust_stats_history.csv").exists()
    assert data["results"]["serve"]["replicas"], "no replica counts read while the load ran"
    # every target stopped: no process of ours left behind
    time.sleep(1)
    assert _our_processes() - before == set()
    print(f"quick study took {time.monotonic() - t0:.0f} s")


def test_parse_gpu_variant() -> None:
    a = compare.parse(["--gpu"])
    assert a.topology == "split" and a.users == [1, 2, 4, 8, 16, 32]
    assert isinstance(SimpleNamespace(**vars(a)).slo_ms, float)

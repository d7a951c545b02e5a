"""The load study: its open-loop generator, its ladder, its CPU ledger, and a quick run end to
end (``loadtests.compare --quick``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cluster.ports import free_port, wait_http_ok
from loadtests import compare
from loadtests.cost import cost_per_million, gpu_counts
from loadtests.run import require_up
from loadtests.study import CpuLedger, Ladder, LadderRun, rate_ladder, score

ROOT = Path(__file__).resolve().parents[2]


def test_a_step_counts_failures_in_its_latencies() -> None:
    rows = [(10.0 + i / 10, 100.0, 1) for i in range(19)] + [(11.95, 5000.0, 0)]
    s = score(rows, 10.0, 12.0)
    assert s["requests"] == 20 and s["failures"] == 1
    assert s["achieved_rps"] == 10.0
    assert s["p50_ms"] == 100.0 and s["p95_ms"] == 100.0  # 19 of 20 fast: p95 is the 19th
    rows.append((11.96, 4000.0, 0))
    assert score(rows, 10.0, 12.0)["p95_ms"] == 4000.0  # two slow failures reach the p95
    assert score(rows, 20.0, 21.0)["requests"] == 0


def test_the_ladder_climbs_refines_once_and_stops() -> None:
    lad = Ladder(start=10, factor=2, max_steps=12, rate_max=1000)
    assert lad.next_rate(True) == 20
    assert lad.next_rate(True) == 40
    assert lad.next_rate(False) == pytest.approx(28.28, abs=0.01)  # halfway, geometric
    assert lad.next_rate(True) is None
    assert (lad.held, lad.missed) == (pytest.approx(28.28, abs=0.01), 40)


def test_the_ladder_walks_down_from_a_first_miss_and_is_bounded() -> None:
    lad = Ladder(start=40, factor=2, max_steps=12, rate_max=1000)
    assert lad.next_rate(False) == 20
    assert lad.next_rate(False) == 10
    assert lad.next_rate(True) == pytest.approx(14.14, abs=0.01)  # halfway back up
    assert lad.next_rate(False) is None and (lad.held, lad.missed) == (10, pytest.approx(14.14))
    lad = Ladder(start=10, factor=2, max_steps=3, rate_max=1000)
    assert lad.next_rate(True) == 20 and lad.next_rate(True) == 40
    assert lad.next_rate(True) is None  # max_steps
    lad = Ladder(start=10, factor=2, max_steps=12, rate_max=15)
    assert lad.next_rate(True) is None  # the next rate would pass rate_max


def test_the_ledger_splits_the_box_between_groups_and_outsiders() -> None:
    led = CpuLedger(lambda: {})
    led.ncpu = 2
    led.rows = [
        (100.0, 1000.0, {"serve": 50.0, "generator": 5.0}),
        (110.0, 1016.0, {"serve": 60.0, "generator": 7.0}),  # 16 of 20 core-seconds busy
    ]
    shares = led.window(99, 111)
    assert shares["serve"] == 0.5 and shares["generator"] == 0.1
    assert shares["outsiders"] == pytest.approx(0.2)  # busy, but not by the study
    assert led.window(200, 300) == {}


def test_cost_model() -> None:
    assert cost_per_million(100.0, 0.36) == pytest.approx(1.0)
    share = {"detector": 0.5, "scene": 0.25, "digits": 0.25}
    assert gpu_counts(100, 900, share) == {"microservices": 3, "serve": 1}
    big = gpu_counts(90_000, 900, share)
    assert big["serve"] == 100 and big["microservices"] - big["serve"] <= 3


def test_a_service_that_is_down_stops_with_a_sentence() -> None:
    with pytest.raises(SystemExit, match="No service answers at"):
        require_up(f"http://127.0.0.1:{free_port()}", timeout_s=2)


def test_bad_arguments_are_refused_with_the_choices() -> None:
    with pytest.raises(SystemExit):
        compare.parse(["--arms", "monolith,nonsense"])
    with pytest.raises(SystemExit):
        compare.parse(["--workloads", "video"])
    a = compare.parse(["--quick"])
    assert a.rounds == 1 and a.raw.endswith("raw")


@pytest.fixture
def slow_server():
    """A server that answers every request after 300 ms, whatever the load (async sleep)."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "tests.loadtests.slow_app:create_app",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{url}/slow", timeout_s=30)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.slow
def test_the_offered_rate_does_not_wait_for_slow_answers(tmp_path, slow_server) -> None:
    """Open loop: 20 req/s offered to a server that takes 300 ms per answer arrive at 20 req/s
    (a closed loop of a few users would send fewer, and hide the latency)."""
    lad = rate_ladder(
        slow_server,
        tmp_path,
        arm="slow",
        round_no=1,
        request="tests.loadtests.slow_app:sample_request",
        rate_start=20,
        factor=1.5,
        step_s=4,
        settle_s=1.5,
        slo_ms=250,  # 300 ms answers miss it: the ladder walks down, every step at its rate
        max_steps=2,
    )
    assert lad.cut_short is None, lad.cut_short
    first = lad.steps[0]
    assert first["offered_rps"] == 20 and not first["held"]
    assert first["achieved_rps"] == pytest.approx(20, rel=0.2), first
    assert first["p50_ms"] >= 300
    assert lad.rps_at_slo == 0.0  # nothing held a 250 ms p95
    assert len(lad.steps) == 2 and lad.steps[1]["offered_rps"] == pytest.approx(13.33, abs=0.01)


@pytest.mark.slow
def test_a_schedule_offers_its_rates_in_order(tmp_path, slow_server, monkeypatch) -> None:
    """The autoscaling run's load: LOADTEST_SCHEDULE replaces the ladder by fixed segments
    (seconds:rate), each offered whatever the answers do, and each scored as a step."""
    monkeypatch.setenv("LOADTEST_SCHEDULE", "3:5,4:20,3:5")
    lad = rate_ladder(
        slow_server,
        tmp_path,
        arm="slow schedule",
        round_no=0,
        request="tests.loadtests.slow_app:sample_request",
        rate_start=5,
        factor=1.0,
        step_s=4,
        settle_s=0,
        slo_ms=500,
        max_steps=3,
    )
    assert lad.cut_short is None, lad.cut_short
    # each step is offered whether or not the one before held its SLO
    assert [s["offered_rps"] for s in lad.steps] == [5, 20, 5]
    for step, seconds in zip(lad.steps, (3, 4, 3), strict=True):  # Locust ticks once a second
        assert abs(step["t_end"] - step["t_start"] - seconds) <= 1.1, lad.steps
    assert lad.steps[1]["achieved_rps"] == pytest.approx(20, rel=0.3), lad.steps[1]
    assert lad.steps[1]["achieved_rps"] > 2 * lad.steps[2]["achieved_rps"], lad.steps


def test_the_autoscaling_summary_reads_reaction_peak_and_way_back(tmp_path) -> None:
    """Replicas logged once a second against the schedule's three steps: the reaction time is
    from the step up to the first second with more replicas than before it."""
    rlog = tmp_path / "replicas.jsonl"
    rows = []
    for t in range(100, 140):
        n = 2 if t < 117 else 3 if t < 119 else 4 if t < 131 else 2
        rows.append({"t": float(t), "replicas": {"FraudModel": n - 1, "BusinessIngress": 1}})
    rows.insert(5, {"t": 104.5, "replicas": {"error": "serve status timed out"}})
    rlog.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    steps = [
        {"t_start": 100.0, "offered_rps": 2.0},
        {"t_start": 110.0, "offered_rps": 16.0},
        {"t_start": 125.0, "offered_rps": 2.0},
    ]
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "samples-1.csv").write_text("100.2,12.0,1\n100.7,11.0,1\n111.1,40.0,1\nbad\n")
    ladder = LadderRun("business/serve autoscaling", 0, steps, 0.0, 100.0, 140.0)
    out = compare.autoscale_summary(rlog, ladder, samples)
    assert (out["replicas_before"], out["replicas_peak"], out["replicas_after"]) == (2, 4, 2)
    assert out["reaction_s"] == 7.0 and out["scaled_down_s"] == 6.0
    assert out["offsets"] == {"up": 10.0, "down": 25.0}
    assert out["achieved_per_s"] == [(0, 2), (11, 1)]
    assert len(out["series"]) == 40  # the error row is left out, not counted as 0 replicas
    short = compare.autoscale_summary(
        rlog, LadderRun("short", 0, steps[:2], 0.0, 100.0, 140.0), samples
    )
    assert short["replicas_peak"] is None and short["reaction_s"] is None


def _our_processes() -> set[int]:
    out = set()
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(k in cmd for k in ("loadtests.targets", "loadtests.apps:", "ratefile.py")):
            out.add(p.pid)
        if "risk_service" in cmd or "business_logic.bench" in cmd:
            out.add(p.pid)
    return out


@pytest.mark.slow
def test_quick_study_on_both_workloads(tmp_path) -> None:
    before = _our_processes()
    t0 = time.monotonic()
    out = tmp_path / "report"
    # The autoscaling run is left out here (a second Serve start): its load and its summary
    # have tests of their own above; `make loadtest ARGS=--quick` runs it whole. Two steps of
    # 2 s per arm: the ladder's climb has a test of its own above.
    argv = ["--quick", "--no-autoscale", "--max-steps", "2", "--step-s", "2"]
    rc = compare.main([*argv, "--arms", "monolith,serve-fused,serve", "--out", str(out)])
    report = (out / "report.md").read_text()
    assert rc == 0, report
    assert "PARTIAL" not in report
    data = json.loads((out / "results.json").read_text())
    assert set(data["summary"]) == {
        "pipeline/monolith",
        "pipeline/serve-fused",
        "business/monolith",
        "business/serve",
    }
    for key, s in data["summary"].items():
        assert s["rps_at_slo"] > 0, key
        assert s["answer"], key
    # the same answer from every arm of a workload, and the report says so
    assert report.count("Same answer to the same request from every arm: **yes**") == 2
    for turn in data["turns"]:
        # the CPU of the box was accounted for, every step was measured at its offered rate
        assert 0 < turn["cpu_arm"] <= 1 and 0 <= turn["cpu_outsiders"] <= 1, turn
        assert turn["steps"] and all(s["offered_rps"] > 0 for s in turn["steps"]), turn
        # while one arm is loaded the others are frozen: they take (almost) nothing
        assert turn["cpu_idle_arms"] < 0.05, turn
    for png in ("pipeline_offered.png", "business_offered.png", "rps_at_slo.png"):
        assert (out / png).stat().st_size > 1000, png
    # Locust's files and every request go to the raw folder, not beside the report
    assert list((out / "raw").rglob("samples-*.csv"))
    assert not list(out.glob("*.csv")) and not list(out.glob("*.html"))
    time.sleep(1)
    assert _our_processes() - before == set(), "a process of the study outlived it"
    print(f"quick study took {time.monotonic() - t0:.0f} s")

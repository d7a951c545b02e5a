"""The tools the README's figures come from: the load generator counts real answers from a
real server (and that server's CPU), and the GPU benchmark's in-process rows run on a CPU
box in their quick size."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from patterns.pipeline.bench.loadgen import CpuMeter, Request, process_tree, run_load
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def uvicorn_server() -> tuple[str, int]:
    """The core test ingress app under plain uvicorn, in its own process."""
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "tests.core.ingress_app:api", "--host",
           "127.0.0.1", "--port", str(port), "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    try:
        yield url, proc.pid
    finally:
        # still up after the test (it served the load, not crashed halfway), and stops on
        # SIGTERM (uvicorn shuts down, then re-raises the signal: -SIGTERM)
        assert proc.poll() is None, f"the server exited during the test ({proc.returncode})"
        proc.terminate()
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM), proc.returncode


def test_load_generator_counts_answers_statuses_and_server_cpu(
    uvicorn_server: tuple[str, int],
) -> None:
    url, pid = uvicorn_server
    assert process_tree(pid) == [pid]
    meter = CpuMeter(lambda: process_tree(pid))
    ok = Request("GET", "/healthz")
    missing = Request("GET", "/no-such-route")
    result = run_load(url, [ok, ok, ok, missing], concurrency=4, duration_s=1.5,
                      warmup_s=0.5, processes=2, samples=5, on_window=meter)  # fmt: skip
    assert result.processes == 2 and result.errors == 0
    assert result.ok > 50 and result.statuses.get(404, 0) > 10, result.statuses
    assert result.failed == result.statuses[404]
    assert 0 < result.pct(50) <= result.pct(95) and len(result.latencies_ms) == result.ok
    assert result.samples and all(b'"status"' in s for s in result.samples)
    assert meter.seconds > 0 and meter.ms_per(result.ok) < 100  # the server did the work


def test_gpu_bench_in_process_rows_run_quick_on_cpu() -> None:
    """The ceiling (decode on another process feeding the models) and the models-only rows
    of ``gpu_bench`` in their quick size: a table with a number in each row."""
    out = subprocess.run(
        [sys.executable, "-m", "patterns.pipeline.bench.gpu_bench", "--quick",
         "--sections", "ceiling,models", "--duration", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith("| raw ceiling") or
            ln.startswith("| models only")]  # fmt: skip
    assert len(rows) == 2, out.stdout[-2000:]
    for row in rows:
        figures = row.split("|")[2].replace(",", "").split(" / ")
        assert all(float(f) > 0 for f in figures), row


def test_gpu_check_script_keeps_to_its_budget(tmp_path: Path) -> None:
    """``scripts/pipeline_gpu_check.sh`` refuses an unknown part, and a step that would not
    fit in what is left of ``GPU_CHECK_BUDGET_S`` is skipped and said so, not started (a call
    on the lent GPU machine is cut at 600 s and must come back with its output)."""
    script = ROOT / "scripts" / "pipeline_gpu_check.sh"
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "PYTHON": sys.executable,
           "GPU_CHECK_WHEELS": str(tmp_path / "no-wheels")}  # fmt: skip
    wrong = subprocess.run(["bash", str(script), "everything"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=30)  # fmt: skip
    assert wrong.returncode == 2 and "usage" in wrong.stderr
    out = subprocess.run(["bash", str(script), "bench"], cwd=ROOT,
                         env={**env, "GPU_CHECK_BUDGET_S": "35"},
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    # "gpu_bench, no HTTP" where Ray Serve does not import
    assert re.search(r"gpu_bench[^:\n]*: skipped, the 35 s budget is spent", out.stdout), out.stdout
    assert "skipped" in (tmp_path / "bench.txt").read_text()
    assert "budget 35 s" in (tmp_path / "plan.txt").read_text()

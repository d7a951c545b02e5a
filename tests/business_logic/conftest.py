"""Fixtures for the business-logic tests: seeded data in a temp dir, the risk service as a
real subprocess, and real PostgreSQL and Redis servers on loopback ports.

The servers are started by the tests themselves (no Docker, no earlier setup); when the
binaries are absent the tests that need them are skipped with a reason (``.ci/run`` installs
``postgresql`` and ``redis-server``). PostgreSQL refuses to run as root, so as root the data
directory is handed to the ``postgres`` user and the server runs under ``runuser``.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from patterns.business_logic.artifacts import ensure_model
from patterns.business_logic.seed import seed_database, seed_feature_store
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def model_ready() -> None:
    from core.model_store import ModelStore

    ensure_model(ModelStore.from_settings())


@pytest.fixture(scope="module")
def sqlite_urls(tmp_path_factory, model_ready) -> dict[str, str]:
    """Fresh seeded records + feature store for one test module (tests write to them)."""
    d = tmp_path_factory.mktemp("business")
    urls = {
        "database": f"sqlite:///{d / 'records.db'}",
        "features": f"sqlite:///{d / 'features.db'}",
    }
    seed_database(urls["database"])
    seed_feature_store(urls["features"], urls["database"])
    return urls


# ------------------------------------------------------------------------------ risk service
class RiskService:
    """The risk-signal service as a subprocess on a fixed port: up, slow, failing or down."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, *, delay_ms: float = 0, fail_rate: float = 0) -> None:
        self.stop()
        cmd = [
            sys.executable,
            "-m",
            "patterns.business_logic.risk_service",
            "--port",
            str(self.port),
            "--delay-ms",
            str(delay_ms),
            "--fail-rate",
            str(fail_rate),
        ]
        self.proc = subprocess.Popen(cmd, cwd=ROOT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError("risk service did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def calls(self) -> int:
        """Scoring calls the running service has received since it (re)started."""
        return int(httpx.get(f"{self.url}/healthz", timeout=5).json()["calls"])


@pytest.fixture(scope="module")
def risk_service() -> Iterator[RiskService]:
    service = RiskService()
    service.start()
    yield service
    service.stop()


# ------------------------------------------------------------------------------ a stalled server
@pytest.fixture(scope="module")
def stalled_port() -> Iterator[int]:
    """A loopback port that completes TCP handshakes (the kernel's backlog) and then never
    says a word: a database server that hangs, as seen by its clients."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)  # never accept(): connections sit in the backlog, unanswered
        yield int(s.getsockname()[1])

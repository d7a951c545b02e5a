"""Fixtures for the business-logic tests: seeded data in a temp dir, the risk service as a
real subprocess, and real PostgreSQL and Redis servers on loopback ports.

The servers are started by the tests themselves (no Docker, no earlier setup); when the
binaries are absent the tests that need them are skipped with a reason (``.ci/run`` installs
``postgresql`` and ``redis-server``). PostgreSQL refuses to run as root, so as root the data
directory is handed to the ``postgres`` user and the server runs under ``runuser``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from patterns.business_logic.artifacts import ensure_model
from patterns.business_logic.seed import seed_database, seed_feature_store
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def wait_for_port(port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s}s")


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


# ------------------------------------------------------------------------------ PostgreSQL
def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


class PostgresServer:
    def __init__(self) -> None:
        initdb, postgres = _pg_bin("initdb"), _pg_bin("postgres")
        if not initdb or not postgres:
            pytest.skip(
                "PostgreSQL binaries (initdb, postgres) not found; apt-get install postgresql"
            )
        self.postgres = postgres
        self.as_user: list[str] = []
        self.dir = Path(tempfile.mkdtemp(prefix="bl-pg-"))
        if os.geteuid() == 0:  # postgres refuses root: run it as the postgres user
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no 'postgres' user to run the server")
            runuser = shutil.which("runuser")
            if not runuser:
                pytest.skip("running as root and runuser is missing")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.as_user = [runuser, "-u", "postgres", "--"]
        self.data = self.dir / "data"
        subprocess.run(
            [
                *self.as_user,
                initdb,
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            check=True,
            capture_output=True,
        )
        self.port = free_port()
        self.dsn = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [
            *self.as_user,
            self.postgres,
            "-D",
            str(self.data),
            "-p",
            str(self.port),
            "-h",
            "127.0.0.1",
            "-k",
            str(self.dir),
            "-c",
            "fsync=off",
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)
        import psycopg

        deadline = time.monotonic() + 20
        while True:  # the port opens before the server accepts queries
            try:
                with psycopg.connect(
                    f"host=127.0.0.1 port={self.port} user=postgres", connect_timeout=2
                ):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None:
            # SIGINT = "fast" shutdown: disconnect clients now (SIGTERM waits for them).
            # Signal the postmaster itself (its pid file), not runuser in front of it.
            pid_file = self.data / "postmaster.pid"
            try:
                os.kill(int(pid_file.read_text().splitlines()[0]), signal.SIGINT)
            except (OSError, ValueError, IndexError):
                self.proc.send_signal(signal.SIGINT)
            self.proc.wait(20)
            self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    yield server
    server.cleanup()


# ------------------------------------------------------------------------------ Redis
class RedisServer:
    def __init__(self) -> None:
        self.binary = shutil.which("redis-server")
        if not self.binary:
            pytest.skip("redis-server not found; apt-get install redis-server")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()

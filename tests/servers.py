"""Real servers for tests, started on loopback ports: PostgreSQL and Redis.

No Docker, no earlier setup: each server runs from the Debian binaries in a temp dir; when the
binaries are absent the tests that need them are skipped with a reason (``.ci/run`` installs
``postgresql`` and ``redis-server``). PostgreSQL refuses to run as root, so as root the data
directory is handed to the ``postgres`` user and the server runs under ``runuser``.
The session fixtures ``postgres_server`` and ``redis_server`` live in ``tests/conftest.py``.
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
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import free_port


def wait_for_port(port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s}s")


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

"""Real servers for tests, started on loopback ports: PostgreSQL, Redis (plain, or durable with
an append-only file), Prometheus, the business pattern's risk API, and ``make serve`` itself.

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
import weakref
from pathlib import Path

import pytest

from cluster.ports import free_port


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


class _ChildProcess:
    """A server run as a child process (``self.proc``): stopped politely, or killed."""

    proc: subprocess.Popen | None = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL: the outage, with no chance to flush or say goodbye."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


# ------------------------------------------------------------------------------ Redis
class RedisServer(_ChildProcess):
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

    def cleanup(self) -> None:
        self.stop()


class DurableRedisServer(RedisServer):
    """Redis run the way the patterns' READMEs ask for a log (``appendonly yes``,
    ``appendfsync always``) in a temp dir of its own, so a SIGKILL loses nothing it
    acknowledged and a restart (``start()`` again) reads it all back."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="redis-aof-")

    def start(self) -> None:
        import redis

        cmd = [self.binary or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        cmd += ["--dir", self.dir, "--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        try:
            while True:  # the port opens before the append-only file is loaded
                try:
                    client.ping()
                    return
                except redis.exceptions.BusyLoadingError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        finally:
            client.close()

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------------ risk API
class RiskService(_ChildProcess):
    """The business pattern's outside risk-signal API (``patterns.business_logic.risk_service``)
    as a subprocess on a free loopback port: up, slow (``delay_ms``), failing (``fail_rate``),
    stopped or killed. Its log goes to a file, quoted when it does not start."""

    ROOT = Path(__file__).resolve().parents[1]

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log_dir = tempfile.mkdtemp(prefix="risk-")
        self.log_file = Path(log_dir) / "risk.log"
        self.proc: subprocess.Popen | None = None
        # Kept across stops and restarts (an outage test starts it again), gone with the object.
        weakref.finalize(self, shutil.rmtree, log_dir, ignore_errors=True)

    def start(self, *, delay_ms: float = 0, fail_rate: float = 0) -> None:
        import sys

        import httpx

        self.stop()
        cmd = [sys.executable, "-m", "patterns.business_logic.risk_service"]
        cmd += ["--port", str(self.port), "--delay-ms", str(delay_ms)]
        cmd += ["--fail-rate", str(fail_rate)]
        with self.log_file.open("a") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.ROOT, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        tail = self.log_file.read_text()[-2000:]
        self.kill()
        raise TimeoutError(f"the risk service did not start on {self.url}:\n{tail}")

    def calls(self) -> int:
        """Scoring calls the running service has received since it (re)started."""
        import httpx

        return int(httpx.get(f"{self.url}/healthz", timeout=5).json()["calls"])


# ------------------------------------------------------------------------------ Prometheus
class PrometheusServer:
    """The Debian ``prometheus`` binary on a loopback port, storage in a temp dir.

    ``config`` is a prometheus.yml as a dict (the test writes it); ``query(expr)`` runs an
    instant PromQL query through the HTTP API and returns its JSON (``status``, ``data``).
    """

    def __init__(self, config: dict) -> None:
        import yaml

        self.binary = shutil.which("prometheus") or (
            "/usr/bin/prometheus" if os.path.exists("/usr/bin/prometheus") else None
        )
        if not self.binary:
            pytest.skip("prometheus not found; apt-get install prometheus")
        self.dir = Path(tempfile.mkdtemp(prefix="prom-"))
        self.config_file = self.dir / "prometheus.yml"
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        import httpx

        cmd = [
            self.binary,
            f"--config.file={self.config_file}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self.log = (self.dir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_port(self.port)
        deadline = time.monotonic() + 30
        while httpx.get(f"{self.url}/-/ready", timeout=5).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus not ready: {self.log_tail()}")
            time.sleep(0.2)

    def query(self, expr: str) -> dict:
        import httpx

        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=30)
        return dict(r.json())

    def targets(self) -> list[dict]:
        import httpx

        r = httpx.get(f"{self.url}/api/v1/targets", timeout=30)
        return list(r.json()["data"]["activeTargets"])

    def log_tail(self) -> str:
        path = self.dir / "prometheus.log"
        return path.read_text()[-2000:] if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------------ make serve
class ServeCluster:
    """``make serve`` (``python -m scripts.serve_all``) on a config of the test's own, in a
    subprocess: its own Ray cluster with the dashboard, every port on loopback or free, and
    ``RAY_TMPDIR`` in a short temp dir, so Ray's Prometheus service-discovery file
    (``sd_file``) lists this cluster's metrics endpoint and no other's.

    ``config`` is a serve config as a dict; its HTTP port (and gRPC port, when it has
    ``grpc_options``) are replaced by free ones: ``http_url``, ``grpc_target``. ``env``: more
    environment for the cluster (``RAY_PROMETHEUS_HOST``, say); may be set until ``start()``.
    """

    ROOT = Path(__file__).resolve().parents[1]

    def __init__(
        self,
        config: dict,
        num_cpus: int = 4,
        timeout_s: float = 420.0,
        env: dict[str, str] | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        import yaml

        # Short on purpose: Ray puts unix sockets under it (paths are limited to 107 bytes).
        self.dir = Path(tempfile.mkdtemp(prefix="sc-", dir="/tmp"))
        self.http_port, self.dashboard_port = free_port(), free_port()
        config = {**config, "http_options": {"host": "127.0.0.1", "port": self.http_port}}
        self.grpc_port: int | None = None
        if "grpc_options" in config:
            self.grpc_port = free_port()
            config["grpc_options"] = {**config["grpc_options"], "port": self.grpc_port}
        self.config = config
        self.config_file = self.dir / "serve_config.yaml"
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self.num_cpus = num_cpus
        self.timeout_s = timeout_s
        self.env = dict(env or {})
        self.extra_args = list(extra_args or [])  # more serve_all flags (--nodes 3, say)
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.sd_file = self.dir / "ray" / "prom_metrics_service_discovery.json"
        self.log_file = self.dir / "serve.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        import sys

        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "COOKBOOK_TEST"))},
            "RAY_TMPDIR": str(self.dir),
            "RAY_USAGE_STATS_ENABLED": "0",
            # the risk API make serve starts (business_logic/services.py) on a port of its
            # own, not 8701, so two clusters on one machine don't share one
            "BUSINESS_RISK_SERVICE_URL": f"http://127.0.0.1:{free_port()}",
            **self.env,
        }
        cmd = [
            sys.executable,
            "-m",
            "scripts.serve_all",
            "--config",
            str(self.config_file),
            "--dashboard-port",
            str(self.dashboard_port),
            "--num-cpus",
            str(self.num_cpus),
            "--timeout-s",
            str(self.timeout_s),
            *self.extra_args,
        ]
        self._log = self.log_file.open("w")
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() takes Ray down with it
        )
        deadline = time.monotonic() + self.timeout_s + 60
        while "[serve] Ctrl-C to stop" not in self.log_file.read_text():  # all printed
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"make serve did not get ready:\n{tail}")
            time.sleep(1)

    def log_tail(self, n: int = 4000) -> str:
        return self.log_file.read_text()[-n:] if self.log_file.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)  # serve_all shuts Serve and Ray down
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(90)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left of the group
            self.proc.wait(10)
            self.proc = None
            self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

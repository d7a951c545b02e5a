"""Faults against a running cluster: find replicas, SIGKILL one, redeploy an app, measure a
replica's process (RSS, open fds, open connections).

Everything goes through the cluster's dashboard address (``http://127.0.0.1:8265`` for
``make serve``; ``ServeCluster.dashboard_url`` in tests): Serve's REST API
(``/api/serve/applications/``) for applications, deployments and replica pids, Ray's state API
for the proxy actors, and ``serve deploy <config> --address <dashboard>`` for redeploys, the way
an operator does it. Killing and measuring act on local pids: the suite runs on the head node.

    cluster = Cluster("http://127.0.0.1:8265")
    victim = cluster.replicas("ensemble", "EnsembleIngress")[0]
    cluster.kill(victim)
    cluster.wait_replaced(victim)  # seconds until the deployment is back
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# A runtime_env variable whose change forces Serve to start new replicas of every deployment of
# an application (a code-level change, like a new image or a new model version in an env var),
# while nothing in the app reads it.
REVISION_ENV = "COOKBOOK_CHAOS_REVISION"


@dataclass(frozen=True)
class Replica:
    app: str
    deployment: str
    replica_id: str
    pid: int
    state: str
    actor_name: str = ""

    @property
    def label(self) -> str:
        return f"{self.app}:{self.deployment}"


@dataclass
class ProcStats:
    pid: int
    rss_mb: float
    fds: int
    connections: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "rss_mb": round(self.rss_mb, 1),
            "fds": self.fds,
            "connections": self.connections,
        }


def proc_stats(pid: int) -> ProcStats | None:
    """RSS (MB), open file descriptors (``/proc/<pid>/fd``) and open inet connections of one
    process; None when it is gone."""
    import psutil

    try:
        p = psutil.Process(pid)
        rss = p.memory_info().rss / 2**20
        try:
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            fds = p.num_fds()
        conns = len(p.net_connections(kind="inet"))
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return None
    return ProcStats(pid, rss, fds, conns)


def auth_headers() -> dict[str, str]:
    """Ray 2.60 guards the dashboard with a token (``~/.ray/auth_token``, or ``RAY_AUTH_TOKEN``
    / ``RAY_AUTH_TOKEN_PATH``): the dashboard answers 401 without it."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        with contextlib.suppress(OSError):
            token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


class Cluster:
    """A running Serve cluster, reached through its dashboard."""

    def __init__(self, dashboard_url: str, *, timeout_s: float = 30.0) -> None:
        self.dashboard_url = dashboard_url.rstrip("/")
        self.timeout_s = timeout_s

    # ------------------------------------------------------------------ reading state
    def details(self) -> dict[str, Any]:
        """Serve's instance details (what ``serve status`` reads): apps, deployments,
        replicas with their pids, http/grpc options."""
        import httpx

        r = httpx.get(
            f"{self.dashboard_url}/api/serve/applications/",
            headers=auth_headers(),
            timeout=self.timeout_s,
        )
        r.raise_for_status()
        return dict(r.json())

    def apps(self) -> dict[str, Any]:
        return dict(self.details().get("applications") or {})

    def app_status(self, app: str) -> str:
        return str((self.apps().get(app) or {}).get("status", "MISSING"))

    def deployments(self, app: str) -> list[str]:
        return list(((self.apps().get(app) or {}).get("deployments") or {}).keys())

    def replicas(
        self, app: str | None = None, deployment: str | None = None, *, running: bool = True
    ) -> list[Replica]:
        """Replicas (RUNNING ones unless ``running=False``) of every app, or of one app or
        deployment."""
        out: list[Replica] = []
        for name, detail in self.apps().items():
            if app is not None and name != app:
                continue
            for dname, dep in (detail.get("deployments") or {}).items():
                if deployment is not None and dname != deployment:
                    continue
                for r in dep.get("replicas") or []:
                    if r.get("pid") is None or (running and r.get("state") != "RUNNING"):
                        continue
                    out.append(
                        Replica(
                            name,
                            dname,
                            str(r.get("replica_id")),
                            int(r["pid"]),
                            str(r.get("state")),
                            str(r.get("actor_name") or ""),
                        )
                    )
        return out

    def proxies(self) -> list[int]:
        """Pids of the Serve HTTP proxy actors (Ray's state API over the dashboard, the REST form
        of ``ray.util.state.list_actors``: class ``ProxyActor``)."""
        import httpx

        r = httpx.get(
            f"{self.dashboard_url}/api/v0/actors",
            params={
                "filter_keys": ["class_name", "state"],
                "filter_predicates": ["=", "="],
                "filter_values": ["ProxyActor", "ALIVE"],
            },
            headers=auth_headers(),
            timeout=self.timeout_s,
        )
        r.raise_for_status()
        actors = r.json()["data"]["result"]["result"]
        return [int(a["pid"]) for a in actors if a.get("pid")]

    def healthy(self, app: str) -> bool:
        """The app is RUNNING and each of its deployments HEALTHY with its target count of
        RUNNING replicas."""
        detail = self.apps().get(app) or {}
        if detail.get("status") != "RUNNING":
            return False
        for dep in (detail.get("deployments") or {}).values():
            if dep.get("status") != "HEALTHY":
                return False
            running = sum(1 for r in dep.get("replicas") or [] if r.get("state") == "RUNNING")
            if running < int(dep.get("target_num_replicas") or 1):
                return False
        return True

    # ------------------------------------------------------------------ replica death
    def kill(self, replica: Replica) -> float:
        """SIGKILL the replica's process; returns the monotonic time of the kill."""
        t = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.kill(replica.pid, signal.SIGKILL)
        return t

    def wait_replaced(self, replica: Replica, timeout_s: float = 120.0) -> float | None:
        """Block until ``replica``'s deployment has its target count of RUNNING replicas again,
        none of them the killed pid; seconds waited, or None after ``timeout_s``."""
        start = time.monotonic()
        deadline = start + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                detail = self.apps().get(replica.app) or {}
                dep = (detail.get("deployments") or {}).get(replica.deployment) or {}
                pids = [
                    r.get("pid") for r in dep.get("replicas") or [] if r.get("state") == "RUNNING"
                ]
                target = int(dep.get("target_num_replicas") or 1)
                if replica.pid not in pids and len(pids) >= target and self.healthy(replica.app):
                    return time.monotonic() - start
            time.sleep(0.5)
        return None

    def wait_all_healthy(self, apps: list[str], timeout_s: float = 300.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if all(self.healthy(a) for a in apps):
                    return True
            time.sleep(1.0)
        return False

    # ------------------------------------------------------------------ redeploys
    def current_config(self) -> dict[str, Any]:
        """The multi-app config the cluster runs now, rebuilt from Serve's own record of it
        (what ``serve config`` prints), with the HTTP/gRPC options it was started with."""
        d = self.details()
        config: dict[str, Any] = {}
        if d.get("proxy_location"):
            config["proxy_location"] = d["proxy_location"]
        http = d.get("http_options") or {}
        config["http_options"] = {k: http[k] for k in ("host", "port") if k in http}
        grpc = d.get("grpc_options") or {}
        if grpc.get("grpc_servicer_functions"):
            config["grpc_options"] = {
                "port": grpc.get("port"),
                "grpc_servicer_functions": grpc["grpc_servicer_functions"],
            }
        apps = d.get("applications") or {}
        config["applications"] = [
            copy.deepcopy(a["deployed_app_config"])
            for a in apps.values()
            if a.get("deployed_app_config")
        ]
        return config

    def deploy(self, config: dict[str, Any]) -> None:
        """``serve deploy <config> --address <dashboard>`` (the operator's command)."""
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="chaos-", delete=False) as f:
            yaml.safe_dump(config, f, sort_keys=False)
            path = f.name
        try:
            serve_cli = str(Path(sys.executable).parent / "serve")
            proc = subprocess.run(
                [serve_cli, "deploy", path, "--address", self.dashboard_url],
                capture_output=True,
                text=True,
                timeout=120,
                env={**os.environ, "RAY_AUTH_MODE": "token"} if auth_headers() else None,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"serve deploy failed: {proc.stderr[-2000:]}")
        finally:
            os.unlink(path)

    def redeploy(self, app: str, kind: str) -> dict[str, Any]:
        """Redeploy ``app`` through ``serve deploy`` with the rest of the config unchanged.

        ``kind="config"``: a config-only change (a ``user_config`` value: the batch wait of a
        batched deployment, nudged by 1 ms, or ``max_ongoing_requests`` where no deployment has
        a user_config): Serve reconfigures the running replicas in place.
        ``kind="replace"``: a runtime_env variable (``COOKBOOK_CHAOS_REVISION``) changes, the
        way a new image or model version does: Serve starts new replicas of every deployment
        and stops the old ones.

        Returns what changed: ``{"kind", "change", "old_pids"}``.
        """
        config = self.current_config()
        (target,) = [a for a in config["applications"] if a["name"] == app]
        old_pids = sorted(r.pid for r in self.replicas(app, running=False))
        if kind == "config":
            change = nudge_user_config(target)
        elif kind == "replace":
            env = target.setdefault("runtime_env", {}).setdefault("env_vars", {})
            rev = str(int(env.get(REVISION_ENV, "0")) + 1)
            env[REVISION_ENV] = rev
            change = f"runtime_env {REVISION_ENV}={rev} (new replicas)"
        else:
            raise ValueError(f"unknown redeploy kind {kind!r}: use 'config' or 'replace'")
        self.deploy(config)
        return {"kind": kind, "change": change, "old_pids": old_pids}

    def wait_redeployed(
        self, app: str, old_pids: list[int], kind: str, timeout_s: float = 300.0
    ) -> float | None:
        """Block until the redeploy is done: the app RUNNING and healthy again, and (for
        ``replace``) none of the old replicas left. Seconds waited, or None."""
        start = time.monotonic()
        deadline = start + timeout_s
        time.sleep(1.0)  # let the controller pick up the new config
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if self.healthy(app):
                    pids = {r.pid for r in self.replicas(app, running=False)}
                    if kind != "replace" or not pids & set(old_pids):
                        return time.monotonic() - start
            time.sleep(0.5)
        return None


def nudge_user_config(app_config: dict[str, Any]) -> str:
    """Change one config-only value of ``app_config`` in place; a sentence saying what."""
    deployments = app_config.setdefault("deployments", [])
    for dep in deployments:
        uc = dep.get("user_config")
        if isinstance(uc, dict) and "batch_wait_timeout_s" in uc:
            old = float(uc["batch_wait_timeout_s"])
            # 1 ms up, or back down when it was nudged before: stays near the configured value
            new = round(old + 0.001 if round(old * 1000) % 2 == 0 else old - 0.001, 4)
            uc["batch_wait_timeout_s"] = new
            return f"{dep['name']}.user_config.batch_wait_timeout_s {old} -> {new}"
    for dep in deployments:
        if "max_ongoing_requests" in dep:
            old = int(dep["max_ongoing_requests"])
            new = old + 1 if old % 2 == 0 else old - 1
            dep["max_ongoing_requests"] = new
            return f"{dep['name']}.max_ongoing_requests {old} -> {new}"
    raise ValueError(f"{app_config.get('name')}: no config-only value to change")


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)

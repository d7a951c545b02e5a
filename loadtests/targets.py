"""Start one architecture of the pipeline on a port; Ctrl-C (or SIGTERM) stops all of it.

    python -m loadtests.targets monolith --port 8101               # uvicorn --workers 2
    python -m loadtests.targets microservices --port 8102          # 5 services, HTTP between
    python -m loadtests.targets serve --port 8103 [--topology split] [--replicas-log r.jsonl]

Same models, same answers (``POST /pipeline/read`` with a PNG body), same budget: the box's
cores (``--cpus``, default 2). The monolith runs ``--cpus`` uvicorn workers, each with every
model; microservices run one uvicorn process per stage (``--sizes gateway=1,preprocess=1,...``
workers each) and a gateway calling them over HTTP; serve deploys the one application of
``patterns/pipeline/config.yaml`` (as shipped; ``--topology`` overrides that one knob) on a
local Ray with ``num_cpus=--cpus``, and writes the replicas of each deployment once a second
(``serve.status()``) to ``--replicas-log``.

``Target`` (used by ``loadtests.compare`` and the tests) starts the same command in its own
process group, waits until it answers, and stops every process of it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cluster.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("monolith", "microservices", "serve")
PIPELINE_CONFIG = ROOT / "patterns" / "pipeline" / "config.yaml"
DEFAULT_SIZES = {"gateway": 1, "preprocess": 1, "detector": 1, "scene": 1, "digits": 1}


def _env() -> dict[str, str]:
    # One thread per process for torch: the budget is counted in processes.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _uvicorn(factory: str, port: int, workers: int, env: dict[str, str]) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        f"loadtests.apps:{factory}",
        "--workers",
        str(workers),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    return subprocess.Popen(cmd, cwd=ROOT, env=env)


def _wait_children(children: list[subprocess.Popen]) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    rc = 0
    while not stop.is_set():
        dead = [c for c in children if c.poll() is not None]
        if dead:
            print(f"a service exited (rc {dead[0].returncode}); stopping the rest", flush=True)
            rc = 1
            break
        stop.wait(0.5)
    for c in children:
        if c.poll() is None:
            c.terminate()
    for c in children:
        try:
            c.wait(15)
        except subprocess.TimeoutExpired:
            c.kill()
    return rc


def run_monolith(port: int, cpus: int) -> int:
    return _wait_children([_uvicorn("monolith_app", port, cpus, _env())])


def parse_sizes(text: str) -> dict[str, int]:
    sizes = dict(DEFAULT_SIZES)
    for part in filter(None, text.split(",")):
        name, _, n = part.partition("=")
        if name not in sizes or not n.isdigit() or int(n) < 1:
            raise SystemExit(f"--sizes: {part!r} is not NAME=N with NAME in {sorted(sizes)}")
        sizes[name] = int(n)
    return sizes


def run_microservices(port: int, sizes: dict[str, int]) -> int:
    ports = {name: free_port() for name in DEFAULT_SIZES if name != "gateway"}
    children = []
    for name, p in ports.items():
        children.append(_uvicorn("stage_app", p, sizes[name], {**_env(), "LOADTEST_STAGE": name}))
    upstreams = {name: f"http://127.0.0.1:{p}" for name, p in ports.items()}
    env = {**_env(), "LOADTEST_UPSTREAMS": json.dumps(upstreams)}
    children.append(_uvicorn("gateway_app", port, sizes["gateway"], env))
    return _wait_children(children)


def serve_config(port: int, topology: str | None) -> dict[str, Any]:
    """The pipeline's one-application config, as shipped, on ``port`` (loopback)."""
    import yaml

    config = yaml.safe_load(PIPELINE_CONFIG.read_text())
    (app,) = config["applications"]
    if topology:
        app.setdefault("args", {})["topology"] = topology
    return {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [app],
    }


def replica_counts() -> dict[str, int]:
    """Running replicas per deployment, as the controller reports them (serve.status())."""
    from ray import serve

    out: dict[str, int] = {}
    for app in serve.status().applications.values():
        for name, dep in app.deployments.items():
            out[name] = int(dep.replica_states.get("RUNNING", 0))
    return out


def run_serve(port: int, cpus: int, topology: str | None, replicas_log: str | None) -> int:
    from cluster.ingress_mode import apply_ingress_mode

    raw = serve_config(port, topology)
    # COOKBOOK_INGRESS_MODE and the edge, as `make serve` ships them (core/ingress_mode.py);
    # Serve reads its switches when it is imported.
    apply_ingress_mode(applications=raw["applications"])
    import ray
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(raw)
    ray.init(
        address="local",  # a cluster of its own, whatever /tmp/ray names
        num_cpus=cpus,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        client = serve_api.serve_start(http_options=config.http_options.model_dump())
        client.deploy_apps(config, _blocking=False)
        log = open(replicas_log, "a") if replicas_log else None  # noqa: SIM115
        while not stop.is_set():
            if log is not None:
                try:
                    counts = replica_counts()
                except Exception as exc:  # the controller busy: a gap, not a crash
                    counts = {"error": repr(exc)[:200]}
                log.write(json.dumps({"t": time.time(), "replicas": counts}) + "\n")
                log.flush()
            stop.wait(1.0)
        if log is not None:
            log.close()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


# ---------------------------------------------------------------------------- for callers
class TargetDown(RuntimeError):
    """A target that did not start or stopped answering: the message is a sentence."""


class Target:
    """One architecture started in its own process group; ``stop()`` ends all of it."""

    def __init__(
        self,
        arch: str,
        *,
        port: int | None = None,
        cpus: int = 2,
        topology: str | None = None,
        replicas_log: str | None = None,
        sizes: str = "",
        log_path: str | None = None,
    ) -> None:
        if arch not in ARCHS:
            raise ValueError(f"unknown architecture {arch!r}; one of {ARCHS}")
        self.arch = arch
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "loadtests.targets",
            arch,
            "--port",
            str(self.port),
            "--cpus",
            str(cpus),
        ]
        if topology:
            cmd += ["--topology", topology]
        if replicas_log:
            cmd += ["--replicas-log", replicas_log]
        if sizes:
            cmd += ["--sizes", sizes]
        self.cmd = cmd
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, png: bytes, timeout_s: float = 300.0) -> Target:
        import httpx

        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.cmd, cwd=ROOT, env=_env(), start_new_session=True, stdout=out, stderr=out
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TargetDown(
                    f"The {self.arch} target exited (rc {self.proc.returncode}) before it "
                    f"answered; see {self.log_path or 'its output'}."
                )
            try:
                r = httpx.post(
                    f"{self.url}/pipeline/read",
                    content=png,
                    timeout=10,
                    headers={"Content-Type": "image/png"},
                )
                if r.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise TargetDown(f"The {self.arch} target did not answer within {timeout_s:g} s.")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> list[int]:
        """This target's processes (the leader and every descendant)."""
        import psutil

        if not self.alive():
            return []
        try:
            lead = psutil.Process(self.proc.pid)  # type: ignore[union-attr]
            return [lead.pid, *(c.pid for c in lead.children(recursive=True))]
        except psutil.Error:
            return []

    def stop(self, timeout_s: float = 60.0) -> None:
        import psutil

        if self.proc is None:
            return
        pids = self.pids()
        pgid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout_s)
        for sig_pids in (pids,):
            for pid in sig_pids:  # anything that outlived its leader (Ray's workers)
                with contextlib.suppress(psutil.Error):
                    psutil.Process(pid).kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        self.proc.wait()

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("arch", choices=ARCHS)
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--cpus", type=int, default=2, help="the hardware budget, in cores")
    p.add_argument("--sizes", default="", help="microservices: gateway=1,detector=2,...")
    p.add_argument(
        "--topology",
        choices=("fused", "split"),
        default=None,
        help="serve: override the shipped topology",
    )
    p.add_argument("--replicas-log", default=None, help="serve: JSON lines of replicas/s")
    a = p.parse_args(argv)
    print(f"{a.arch} on http://127.0.0.1:{a.port}/pipeline/read (Ctrl-C stops it)", flush=True)
    if a.arch == "monolith":
        return run_monolith(a.port, a.cpus)
    if a.arch == "microservices":
        return run_microservices(a.port, parse_sizes(a.sizes))
    return run_serve(a.port, a.cpus, a.topology, a.replicas_log)


if __name__ == "__main__":
    sys.exit(main())

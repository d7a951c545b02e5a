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

from cluster.local import uvicorn_command
from cluster.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (
    "monolith",
    "monolith-batched",
    "microservices",
    "serve",
    "business-monolith",
    "business-microservices",
)
PIPELINE_CONFIG = ROOT / "patterns" / "pipeline" / "config.yaml"
DEFAULT_SIZES = {"gateway": 1, "preprocess": 1, "detector": 1, "scene": 1, "digits": 1}


def _env() -> dict[str, str]:
    # One thread per process for torch: the budget is counted in processes.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _uvicorn(factory: str, port: int, workers: int, env: dict[str, str]) -> subprocess.Popen:
    cmd = uvicorn_command(f"loadtests.apps:{factory}", port, workers)
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


def run_monolith(port: int, cpus: int, batched: bool = False) -> int:
    factory = "batched_monolith_app" if batched else "monolith_app"
    return _wait_children([_uvicorn(factory, port, cpus, _env())])


def run_business(arch: str, port: int, cpus: int) -> int:
    """The fraud check without Ray (``patterns.business_logic.bench.arms``)."""
    from patterns.business_logic.bench import arms

    children = [
        subprocess.Popen(cmd, cwd=ROOT, env={**_env(), **env})
        for cmd, env in arms.commands(port=port, cpus=cpus, arch=arch, env={})
    ]
    return _wait_children(children)


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


SERVE_APPS = ("pipeline", "pipeline-split", "business", "business-1copy")


def _pattern_app(pattern: str) -> dict[str, Any]:
    import yaml

    config = yaml.safe_load((ROOT / "patterns" / pattern / "config.yaml").read_text())
    (app,) = config["applications"]
    return app


def serve_config(
    port: int, topology: str | None = None, apps: tuple[str, ...] = ("pipeline",)
) -> dict[str, Any]:
    """The shipped one-application configs of ``apps`` on ``port`` (loopback), in one cluster.

    ``pipeline`` is the pipeline as shipped (``topology`` overrides that one knob);
    ``pipeline-split`` is the same app in its composed topology under ``/pipeline-split``;
    ``business`` is the fraud check as shipped; ``business-1copy`` the same under
    ``/business-1copy`` with one model replica (the budget of one model copy)."""
    import copy

    out = []
    for name in apps:
        if name in ("pipeline", "pipeline-split"):
            app = copy.deepcopy(_pattern_app("pipeline"))
            topo = topology if name == "pipeline" else "split"
            if topo:
                app.setdefault("args", {})["topology"] = topo
            if name == "pipeline-split":
                app.update(name="pipeline_split", route_prefix="/pipeline-split")
                app.pop("deployments", None)  # fused's one-ingress options do not apply
        elif name == "business":
            app = _pattern_app("business_logic")
        elif name == "business-1copy":
            app = copy.deepcopy(_pattern_app("business_logic"))
            app.update(name="business_1copy", route_prefix="/business-1copy")
            for dep in app["deployments"]:
                if dep["name"] == "FraudModel":
                    dep.pop("autoscaling_config", None)
                    dep["num_replicas"] = 1
        else:
            raise ValueError(f"unknown app {name!r}; one of {SERVE_APPS}")
        out.append(app)
    return {"http_options": {"host": "127.0.0.1", "port": port}, "applications": out}


def replica_counts() -> dict[str, int]:
    """Running replicas per deployment, as the controller reports them (serve.status())."""
    from ray import serve

    out: dict[str, int] = {}
    for app_name, app in serve.status().applications.items():
        for name, dep in app.deployments.items():
            out[f"{app_name}/{name}"] = int(dep.replica_states.get("RUNNING", 0))
    return out


def run_serve(
    port: int,
    cpus: int,
    topology: str | None,
    replicas_log: str | None,
    apps: tuple[str, ...] = ("pipeline",),
    overrides: str = "",
) -> int:
    from cluster.ingress_mode import apply_ingress_mode

    raw = serve_config(port, topology, apps)
    if overrides:  # JSON: {"app name": {"deployment": {option: value}}}
        for app in raw["applications"]:
            for dep, opts in json.loads(overrides).get(app["name"], {}).items():
                found = [d for d in app.setdefault("deployments", []) if d["name"] == dep]
                target = found[0] if found else {"name": dep}
                if not found:
                    app["deployments"].append(target)
                target.update(opts)
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


def reroute(path: str, route: str) -> str:
    """``path`` under another route prefix when ``route`` is ``OLD=NEW`` (the same app deployed
    twice in one cluster, e.g. ``/pipeline=/pipeline-split``)."""
    old, _, new = route.partition("=")
    return new + path[len(old) :] if old and path.startswith(old) else path


def probe(url: str, request: dict[str, Any], route: str = "") -> int | None:
    """The status of one sample request (a pattern's ``sample_request(i)``) sent to ``url``,
    under another route prefix when ``route`` is ``OLD=NEW``; None when nothing answers."""
    import httpx

    req = dict(request)
    method, path = req.pop("method", "POST"), req.pop("path")
    req.pop("expect_status", None)
    path = reroute(path, route)
    try:
        return httpx.request(method, url + path, timeout=10, **req).status_code
    except httpx.HTTPError:
        return None


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
        apps: tuple[str, ...] = (),
        overrides: str = "",
        log_path: str | None = None,
        env: dict[str, str] | None = None,
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
        if apps:
            cmd += ["--apps", ",".join(apps)]
        if overrides:
            cmd += ["--overrides", overrides]
        self.cmd = cmd
        self.env = {**_env(), **(env or {})}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, checks: list[tuple[dict[str, Any], str]], timeout_s: float = 300.0) -> Target:
        """Start it and wait until every ``(sample request, route)`` in ``checks`` gets 200."""
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.cmd, cwd=ROOT, env=self.env, start_new_session=True, stdout=out, stderr=out
        )
        deadline = time.monotonic() + timeout_s
        waiting = list(checks)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TargetDown(
                    f"The {self.arch} target exited (rc {self.proc.returncode}) before it "
                    f"answered; see {self.log_path or 'its output'}."
                )
            waiting = [c for c in waiting if probe(self.url, *c) != 200]
            if not waiting:
                return self
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

    def freeze(self, frozen: bool) -> None:
        """SIGSTOP (or SIGCONT) every process of this target: an idle arm then takes no CPU
        from the arm under load (Serve's controller and proxies are never idle)."""
        import psutil

        for pid in self.pids():
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                p.suspend() if frozen else p.resume()

    def stop(self, timeout_s: float = 60.0) -> None:
        import psutil

        if self.proc is None:
            return
        self.freeze(False)
        pids = self.pids()
        pgid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout_s)
        for pid in pids:  # anything that outlived its leader (Ray's workers)
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
        help="serve: override the shipped topology of the pipeline app",
    )
    p.add_argument("--apps", default="pipeline", help=f"serve: some of {','.join(SERVE_APPS)}")
    p.add_argument("--overrides", default="", help='serve: JSON {"app": {"Deployment": {...}}}')
    p.add_argument("--replicas-log", default=None, help="serve: JSON lines of replicas/s")
    a = p.parse_args(argv)
    print(f"{a.arch} on http://127.0.0.1:{a.port} (Ctrl-C stops it)", flush=True)
    if a.arch == "monolith":
        return run_monolith(a.port, a.cpus)
    if a.arch == "monolith-batched":
        return run_monolith(a.port, a.cpus, batched=True)
    if a.arch == "microservices":
        return run_microservices(a.port, parse_sizes(a.sizes))
    if a.arch.startswith("business-"):
        return run_business(a.arch.removeprefix("business-"), a.port, a.cpus)
    apps = tuple(x for x in a.apps.split(",") if x)
    return run_serve(a.port, a.cpus, a.topology, a.replicas_log, apps, a.overrides)


if __name__ == "__main__":
    sys.exit(main())

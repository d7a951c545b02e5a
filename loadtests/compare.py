"""Monolith vs microservices vs Serve, on two workloads, in alternated rounds: one report.

    python -m loadtests.compare                  # both workloads, 3 rounds (make loadtest)
    python -m loadtests.compare --quick --out /tmp/lt    # one short round: a smoke test
    python -m loadtests.compare --gpu            # every arm on the GPU (a GPU machine)

Workloads and arms (``ARMS``): the vision pipeline (monolith, the monolith with batching,
microservices, Serve fused, Serve composed) and the fraud check of business_logic (monolith,
microservices, Serve), each built the way its own users would build it (loadtests/README.md).
Every arm is started once and stays up; the study then runs rounds, each arm once per round in
the same order (A B C, A B C, ...). One arm's turn is an open-loop rate ladder
(``loadtests.ratefile``): offered rates in steps until the p95 SLO breaks; its figure is the
highest offered rate that held the SLO. Round 1 climbs from 20 req/s by x1.5; later rounds
climb by x1.15 from just under the arm's earlier result, for resolution.

Meanwhile a CPU ledger (``study.CpuLedger``) says where the box's CPU went: the arm under load,
the idle arms, the generator (one Locust process pinned to the last core) and the outsiders.
A turn where outsiders used more than 10% of the box is flagged and run once more. After the
rounds, an autoscaling run steps the offered rate up and down on Serve alone and logs its
replicas. Then the cost per 1M requests at the SLO (``prices.yaml``), PNGs and ``report.md``
in ``--out``; Locust's files and every request in ``--raw`` (git-ignored). The report is
rewritten after each turn, marked PARTIAL until the run ends.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests.cost import load_prices
from loadtests.study import OUTSIDERS_LIMIT, CpuLedger, LadderRun, rate_ladder
from loadtests.targets import Target, TargetDown, reroute

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_REQUEST = "patterns.pipeline.client:sample_request"
BUSINESS_REQUEST = "patterns.business_logic.client:sample_request"
SPLIT_ROUTE = "/pipeline=/pipeline-split"
ONE_COPY_ROUTE = "/business=/business-1copy"
SERVE_APP = {  # a Serve arm -> the app it is (loadtests.targets.serve_config)
    "serve-fused": "pipeline",
    "serve-composed": "pipeline-split",
    "serve": "business",
    "serve-1copy": "business-1copy",
}


@dataclass(frozen=True)
class Arm:
    workload: str
    name: str
    target: str  # the Target (process) that serves it; Serve's arms share one cluster
    request: str
    route: str = ""
    what: str = ""
    arch: str = ""  # the Target's architecture, when the target is a variant of one
    cpus: int | None = None  # the target's worker budget, when not the study's

    @property
    def key(self) -> str:
        return f"{self.workload}/{self.name}"


ARMS = (
    Arm("pipeline", "monolith", "monolith", PIPELINE_REQUEST, what="uvicorn x2, models in-process"),
    Arm(
        "pipeline",
        "monolith-batched",
        "monolith-batched",
        PIPELINE_REQUEST,
        what="uvicorn x2, models batched across requests in each worker",
    ),
    Arm(
        "pipeline",
        "microservices",
        "microservices",
        PIPELINE_REQUEST,
        what="gateway + preprocess + 3 model services, HTTP between",
    ),
    Arm("pipeline", "serve-fused", "serve", PIPELINE_REQUEST, what="Serve, shipped (fused)"),
    Arm(
        "pipeline",
        "serve-composed",
        "serve",
        PIPELINE_REQUEST,
        SPLIT_ROUTE,
        what="Serve, one deployment per stage (split)",
    ),
    Arm(
        "business",
        "monolith",
        "business-monolith",
        BUSINESS_REQUEST,
        what="uvicorn x2, model in-process (threadpool)",
    ),
    Arm(
        "business",
        "microservices",
        "business-microservices",
        BUSINESS_REQUEST,
        what="gateway + model service, HTTP between",
    ),
    Arm(
        "business",
        "serve",
        "serve",
        BUSINESS_REQUEST,
        what="Serve, shipped (ingress + batched model deployment)",
    ),
    # The condition where composition should pay on CPU: memory for one copy of the model
    # only. The monolith then runs one worker; Serve runs one model replica and the shipped
    # ingress replicas (no model in them).
    Arm(
        "business",
        "monolith-1copy",
        "business-monolith-1copy",
        BUSINESS_REQUEST,
        what="one model copy fits: uvicorn x1",
        arch="business-monolith",
        cpus=1,
    ),
    Arm(
        "business",
        "serve-1copy",
        "serve",
        BUSINESS_REQUEST,
        ONE_COPY_ROUTE,
        what="one model copy fits: 1 model replica, 2 ingress replicas",
    ),
)
WORKLOADS = ("pipeline", "business")
# The study's own autoscaling settings for its step run (the shipped targets are sized for a
# real cluster and a 2-core box never reaches them): scale on 2 requests in flight per replica,
# up after 2 s, down after 10 s.
AUTOSCALE = {
    "business_logic": {
        name: {
            "num_replicas": "auto",
            "autoscaling_config": {
                "min_replicas": 1,
                "max_replicas": top,
                "target_ongoing_requests": 2,
                "upscale_delay_s": 2,
                "downscale_delay_s": 10,
            },
        }
        for name, top in (("BusinessIngress", 3), ("FraudModel", 2))
    }
}


def machine(cpus: int) -> str:
    import psutil

    gib = psutil.virtual_memory().total / 2**30
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return (
        f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"{gib:.0f} GiB, {gpu}; budget {cpus} cores"
    )


def load_avg() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def sampler(spec: str) -> Any:
    import importlib

    module, _, func = spec.partition(":")
    return getattr(importlib.import_module(module), func)


def answer_of(url: str, arm: Arm) -> str:
    """The answer's gist for one fixed request (the same from every arm of a workload)."""
    import httpx

    req = dict(sampler(arm.request)(12))
    method, path = req.pop("method", "POST"), req.pop("path")
    req.pop("expect_status", None)
    path = reroute(path, arm.route)
    if arm.workload == "business":
        # a key of its own per arm: the arms share one database, so a shared key would replay
        # the first arm's stored answer to the others
        req["headers"] = {**req.get("headers", {}), "Idempotency-Key": f"study-{arm.name}"}
    r = httpx.request(method, url + path, timeout=30, **req)
    r.raise_for_status()
    a = r.json()
    if arm.workload == "pipeline":
        return f"{a['decision'].get('code')} ({a['decision']['action']})"
    return f"{a['decision']} (score {a['score']}, degraded: {a['degraded']})"


# ---------------------------------------------------------------------------- side services
class RiskService:
    """The outside risk API the fraud check calls, with its latency injected."""

    def __init__(self, delay_ms: float, log: Path) -> None:
        from cluster.ports import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "patterns.business_logic.risk_service",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--delay-ms",
                f"{delay_ms:g}",
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=self.log,
            stderr=self.log,
        )

    def wait(self, timeout_s: float = 60) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise TargetDown("The risk service did not answer.")

    def stop(self) -> None:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self.proc.poll() is None:
            self.proc.kill()
        self.log.close()


def business_env(raw: Path, risk: RiskService) -> dict[str, str]:
    """Fresh copies of the embedded SQLite files (the study writes decisions), the risk API."""
    from patterns.business_logic.artifacts import data_dir

    data = raw / "business-data"
    data.mkdir(parents=True, exist_ok=True)
    for name in ("records.db", "features.db"):
        shutil.copyfile(data_dir() / name, data / name)
    return {
        "BUSINESS_DATABASE_URL": f"sqlite:///{data / 'records.db'}",
        "BUSINESS_FEATURE_STORE_URL": f"sqlite:///{data / 'features.db'}",
        "BUSINESS_RISK_SERVICE_URL": risk.url,
    }


# ---------------------------------------------------------------------------- the run
class Study:
    def __init__(self, a: Any, prices: dict[str, Any], meta: dict[str, Any]) -> None:
        self.a, self.prices, self.meta = a, prices, meta
        self.out, self.raw = Path(a.out), Path(a.raw)
        self.arms = [x for x in ARMS if x.workload in a.workloads and x.name in a.arm_names]
        self.targets: dict[str, Target] = {}
        self.turns: list[dict[str, Any]] = []
        self.answers: dict[str, str] = {}
        self.start_s: dict[str, float] = {}
        self.autoscale: dict[str, Any] = {}
        self.locust: int | None = None
        self.last_target: str | None = None
        self.ledger = CpuLedger(self._groups)

    def _groups(self) -> dict[str, list[int]]:
        g = {name: [t.proc.pid] for name, t in self.targets.items() if t.alive()}  # type: ignore[union-attr]
        if self.locust:
            g["generator"] = [self.locust]
        return g

    def _set_locust(self, pid: int | None) -> None:
        self.locust = pid

    def start_targets(self, env: dict[str, str]) -> None:
        needed: dict[str, list[Arm]] = {}
        for arm in self.arms:
            needed.setdefault(arm.target, []).append(arm)
        for name, arms in needed.items():
            apps = tuple(SERVE_APP[x.name] for x in arms) if name == "serve" else ()
            t = Target(
                arms[0].arch or name,
                cpus=arms[0].cpus or self.a.cpus,
                apps=apps,
                topology="fused" if "pipeline" in apps else None,
                log_path=str(self.raw / f"{name}.log"),
                env=env,
            )
            t0 = time.monotonic()
            say(f"starting {name} ...")
            checks = [(sampler(x.request)(0), x.route) for x in arms]
            self.targets[name] = t.start(checks, timeout_s=self.a.start_timeout)
            self.start_s[name] = round(time.monotonic() - t0, 1)
            for x in arms:
                self.answers[x.key] = answer_of(t.url, x)
            say(f"{name} up in {self.start_s[name]} s")

    def turn(self, arm: Arm, round_no: int, attempt: int) -> dict[str, Any]:
        t = self.targets[arm.target]
        earlier = [x["rps_at_slo"] for x in self.turns if x["arm"] == arm.key and x["kept"]]
        if earlier and statistics.median(earlier) > 0:
            start, factor = 0.85 * statistics.median(earlier), 1.15
        else:
            start, factor = self.a.rate_start, 1.5
        others = [x for name, x in self.targets.items() if name != arm.target]
        for x in others:
            x.freeze(True)
        if self.last_target != arm.target:
            time.sleep(2.0)  # a thawed cluster catches up on its timers first
        self.last_target = arm.target
        ladder: LadderRun = rate_ladder(
            t.url,
            self.raw / arm.workload / arm.name / f"round{round_no}-{attempt}",
            arm=arm.key,
            round_no=round_no,
            request=arm.request,
            route=arm.route,
            rate_start=start,
            factor=factor,
            step_s=self.a.step_s,
            settle_s=self.a.settle_s,
            slo_ms=self.a.slo_ms,
            max_steps=self.a.max_steps,
            alive=t.alive,
            on_locust=self._set_locust,
            say=say,
        )
        time.sleep(1.2)  # one more ledger sample after the ladder
        cpu = self.ledger.window(ladder.t_start, ladder.t_end + 1.2)
        for x in others:
            x.freeze(False)
        idle = sum(v for k, v in cpu.items() if k in self.targets and k != arm.target)
        row = {
            **ladder.as_dict(),
            "arm": arm.key,
            "attempt": attempt,
            "cpu_arm": cpu.get(arm.target, 0.0),
            "cpu_idle_arms": round(idle, 3),
            "cpu_generator": cpu.get("generator", 0.0),
            "cpu_study": cpu.get("study", 0.0),
            "cpu_outsiders": cpu.get("outsiders", 0.0),
        }
        row["flagged"] = row["cpu_outsiders"] > OUTSIDERS_LIMIT
        return row

    def rounds(self) -> None:
        for r in range(1, self.a.rounds + 1):
            for arm in self.arms:
                row = self.turn(arm, r, 1)
                if row["flagged"] and not row["cut_short"]:
                    say(
                        f"  [{arm.key} r{r}] outsiders used {row['cpu_outsiders']:.0%} of the "
                        "box: flagged, run once more"
                    )
                    row["kept"] = False
                    self.turns.append(row)
                    row = self.turn(arm, r, 2)
                row["kept"] = True
                self.turns.append(row)
                say(
                    f"[{arm.key} round {r}] rps at SLO {row['rps_at_slo']:.1f}; CPU: arm "
                    f"{row['cpu_arm']:.0%}, idle arms {row['cpu_idle_arms']:.0%}, generator "
                    f"{row['cpu_generator']:.0%}, outsiders {row['cpu_outsiders']:.0%}"
                    + (" (FLAGGED)" if row["flagged"] else "")
                )
                if row["cut_short"]:
                    raise TargetDown(f"{arm.key}: {row['cut_short']}")
                self.write(partial="still running")

    def autoscale_run(self, env: dict[str, str]) -> None:
        """Serve alone (the other arms stopped), the study's autoscaling settings, a step of
        offered load up and back down; replicas logged once a second."""
        held = [x["rps_at_slo"] for x in self.turns if x["arm"] == "business/serve" and x["kept"]]
        high = round(max(4.0, 0.6 * statistics.median(held)), 1) if held else 20.0
        low = max(1.0, round(high / 8, 1))
        d = self.a.autoscale_s
        schedule = [(d[0], low), (d[1], high), (d[2], low)]
        rlog = self.raw / "autoscale-replicas.jsonl"
        rlog.unlink(missing_ok=True)
        t = Target(
            "serve",
            cpus=self.a.cpus,
            apps=("business",),
            overrides=json.dumps(AUTOSCALE),
            replicas_log=str(rlog),
            log_path=str(self.raw / "autoscale-serve.log"),
            env=env,
        )
        say(f"autoscaling run: starting Serve alone; offered {schedule} (seconds, rps)")
        t.start([(sampler(BUSINESS_REQUEST)(0), "")], timeout_s=self.a.start_timeout)
        try:
            time.sleep(d[0] / 2)  # settle at min_replicas before the step
            os.environ["LOADTEST_SCHEDULE"] = ",".join(f"{s:g}:{r:g}" for s, r in schedule)
            try:
                ladder = rate_ladder(
                    t.url,
                    self.raw / "autoscale",
                    arm="business/serve autoscaling",
                    round_no=0,
                    request=BUSINESS_REQUEST,
                    rate_start=low,
                    factor=1.0,
                    step_s=max(d),
                    settle_s=0,
                    slo_ms=self.a.slo_ms,
                    max_steps=3,
                    alive=t.alive,
                    say=say,
                )
            finally:
                os.environ.pop("LOADTEST_SCHEDULE", None)
            time.sleep(2)
        finally:
            t.stop()
        self.autoscale = autoscale_summary(rlog, ladder, self.raw / "autoscale")
        say(
            f"autoscaling: replicas {self.autoscale['replicas_before']} -> "
            f"{self.autoscale['replicas_peak']} -> {self.autoscale['replicas_after']}; first new "
            f"replica running {self.autoscale['reaction_s']} s after the step up"
        )

    def write(self, partial: str | None) -> Path:
        from loadtests.writeup import write_report

        return write_report(self, partial)

    def stop(self) -> None:
        for t in self.targets.values():
            t.stop(timeout_s=15)  # the measuring is over: no graceful drain to wait for
        self.targets.clear()


def autoscale_summary(rlog: Path, ladder: LadderRun, samples: Path) -> dict[str, Any]:
    """Replicas per second against the offered rate, and the reaction time: from the step up
    to the first new replica RUNNING."""
    rows = []
    for line in rlog.read_text().splitlines() if rlog.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            row = json.loads(line)
            if "error" not in row["replicas"]:
                rows.append((row["t"], sum(row["replicas"].values()), row["replicas"]))
    steps = ladder.steps
    out: dict[str, Any] = {"steps": steps, "series": [], "reaction_s": None}
    if len(steps) < 3 or not rows:
        out.update(replicas_before=None, replicas_peak=None, replicas_after=None)
        return out
    t0, up, down = steps[0]["t_start"], steps[1]["t_start"], steps[2]["t_start"]
    before = [n for t, n, _ in rows if t0 <= t < up]
    base = before[-1] if before else rows[0][1]
    grew = next((t for t, n, _ in rows if t >= up and n > base), None)
    out["series"] = [{"t": round(t - t0, 1), "replicas": r} for t, _, r in rows if t >= t0 - 5]
    out["reaction_s"] = round(grew - up, 1) if grew else None
    out["replicas_before"] = base
    out["replicas_peak"] = max((n for t, n, _ in rows if up <= t), default=base)
    out["replicas_after"] = rows[-1][1]
    back = next((t for t, n, _ in rows if t >= down and n <= base), None)
    out["scaled_down_s"] = round(back - down, 1) if back else None
    out["offsets"] = {"up": round(up - t0, 1), "down": round(down - t0, 1)}
    per_s: dict[int, int] = {}
    for f in samples.glob("samples-*.csv"):
        for line in f.read_text().splitlines():
            with contextlib.suppress(ValueError, IndexError):
                sec = int(float(line.split(",")[0]) - t0)
                per_s[sec] = per_s.get(sec, 0) + 1
    out["achieved_per_s"] = sorted(per_s.items())
    return out


_T0 = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - _T0:6.0f} s] {text}", flush=True)


def parse(argv: list[str] | None) -> Any:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one short round: a smoke test")
    p.add_argument("--out", default=str(ROOT / "loadtests" / "report"))
    p.add_argument("--raw", default=None, help="Locust's files (default OUT/raw, git-ignored)")
    p.add_argument("--slo-ms", type=float, default=500.0, help="p95 SLO (default 500 ms)")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 3)")
    p.add_argument("--step-s", type=float, default=None, help="seconds per offered rate")
    p.add_argument("--rate-start", type=float, default=20.0, help="round 1's first rate")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--arms", default="", help="e.g. monolith,serve-fused,serve (default all)")
    p.add_argument("--risk-delay-ms", type=float, default=30.0, help="the risk API's latency")
    p.add_argument("--no-autoscale", action="store_true", help="skip the autoscaling run")
    p.add_argument("--cpus", type=int, default=2, help="the hardware budget, in cores")
    p.add_argument("--gpu", action="store_true", help="every arm on the GPU (a GPU machine)")
    p.add_argument("--prices", default=None, help="a prices YAML (default loadtests/prices.yaml)")
    p.add_argument("--start-timeout", type=float, default=300.0)
    a = p.parse_args(argv)
    a.raw = a.raw or str(Path(a.out) / "raw")
    a.rounds = a.rounds or (1 if a.quick else 3)
    a.step_s = a.step_s or (3.0 if a.quick else 6.0)
    a.settle_s = 1.0 if a.quick else 1.5
    a.max_steps = a.max_steps or (3 if a.quick else 12)
    a.autoscale_s = (6, 12, 14) if a.quick else (12, 40, 36)
    a.workloads = [w for w in a.workloads.split(",") if w]
    if set(a.workloads) - set(WORKLOADS):
        p.error(f"--workloads: choose from {WORKLOADS}")
    names = {x for x in a.arms.split(",") if x}
    known = {x.name for x in ARMS}
    if names - known:
        p.error(f"--arms: unknown {sorted(names - known)}; choose from {sorted(known)}")
    a.arm_names = names or known
    if a.gpu:
        a.cpus = os.cpu_count() or a.cpus
    return a


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the study as Ctrl-C does: every target stopped


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    out, raw = Path(a.out), Path(a.raw)
    out.mkdir(parents=True, exist_ok=True)
    raw.mkdir(parents=True, exist_ok=True)
    if a.gpu:
        os.environ["LOADTEST_DEVICE"] = "cuda"
    meta = {
        "command": "python -m loadtests.compare "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(a.cpus),
        "load_before": load_avg(),
        "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
    }
    study = Study(a, load_prices(a.prices), meta)
    t0 = time.time()
    cut: str | None = None
    risk = RiskService(a.risk_delay_ms, raw / "risk-service.log")
    try:
        risk.wait()
        env = business_env(raw, risk)
        study.ledger.start()
        study.start_targets(env)
        study.rounds()
        study.stop()
        if not a.no_autoscale and "business" in a.workloads:
            study.autoscale_run(env)
    except TargetDown as exc:
        cut = str(exc)
    except KeyboardInterrupt:
        cut = "interrupted (Ctrl-C)"
    finally:
        study.stop()
        study.ledger.stop()
        risk.stop()
    meta["load_after"] = load_avg()
    meta["took_s"] = round(time.time() - t0)
    path = study.write(partial=cut)
    if cut:
        print(f"The run was cut short ({cut}); a partial report is in {path}.", file=sys.stderr)
        return 1
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

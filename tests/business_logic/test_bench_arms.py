"""The load study's monolith and microservices arms of the fraud check (bench/arms.py), run as
real uvicorn processes from ``arms.commands``: the Serve app's contract on ``POST
/business/score`` (answers, 4xx sentences, failure policy) and the same decisions as the
pattern's ``Scorer`` with the model in-process."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cluster.ports import free_port, wait_http_ok
from patterns.business_logic.bench import arms
from patterns.business_logic.client import sample_request
from patterns.business_logic.flow import ScoreRequest
from tests.servers import RiskService

ROOT = Path(__file__).resolve().parents[2]
N = 6  # requests compared per arm
GOOD = sample_request(0)["json"]


class Arm:
    """One architecture's processes, started from ``arms.commands`` (as the load study does)."""

    def __init__(self, arch: str, env: dict[str, str], log_dir: Path) -> None:
        self.arch = arch
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # one core's budget: one process per service (the multi-worker case is uvicorn's)
        self.commands = arms.commands(self.port, 1, arch, env)
        self.log = log_dir / f"{arch}.log"
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        with self.log.open("ab") as log:
            for cmd, env in self.commands:
                self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log))

    def wait(self) -> None:
        try:
            for cmd, _ in self.commands:
                wait_http_ok(f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}/healthz", 90)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.log.read_text()[-3000:]}") from None

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def score(self, body: dict | None = None, **kw) -> httpx.Response:
        return httpx.post(f"{self.url}/business/score", json=body or GOOD, timeout=30, **kw)


@pytest.fixture(scope="module")
def slow_risk() -> Iterator[RiskService]:
    service = RiskService()
    service.start(delay_ms=30)
    yield service
    service.stop()


@pytest.fixture(scope="module")
def env(sqlite_urls, slow_risk) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "BUSINESS_DATABASE_URL": sqlite_urls["database"],
        "BUSINESS_FEATURE_STORE_URL": sqlite_urls["features"],
        "BUSINESS_RISK_SERVICE_URL": slow_risk.url,
        # a busy 2-core box must not turn a 30 ms risk call into a degraded answer here
        arms.ARGS_ENV: json.dumps({"risk": {"timeout_s": 2.0}}),
    }


@pytest.fixture(scope="module")
def started(env, tmp_path_factory) -> Iterator[dict[str, Arm]]:
    log_dir = tmp_path_factory.mktemp("arms")
    out = {arch: Arm(arch, env, log_dir) for arch in arms.ARCHS}
    try:
        for arm in out.values():  # both start at once: the imports overlap
            arm.start()
        for arm in out.values():
            arm.wait()
        yield out
    finally:
        for arm in out.values():
            arm.stop()


@pytest.fixture(params=arms.ARCHS)
def arm(request, started) -> Arm:
    return started[request.param]


@pytest.fixture(scope="module")
def in_process(env) -> list[dict]:
    """The answers of the pattern's Scorer, model in-process, to the same requests."""
    saved = {k: os.environ.get(k) for k in env if k.startswith("BUSINESS_")}
    os.environ.update({k: v for k, v in env.items() if k.startswith("BUSINESS_")})

    async def run() -> list[dict]:
        async with arms.in_process_model(arms.business_args()) as call_model:
            scorer = arms.build_scorer(arms.business_args(), call_model)
            try:
                reqs = [ScoreRequest(**sample_request(i)["json"]) for i in range(N)]
                return [await scorer.score(r, f"in-process-{i}") for i, r in enumerate(reqs)]
            finally:
                await scorer.risk.close()
                await scorer.features.close()
                scorer.records.close()

    try:
        return asyncio.run(run())
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _stable(answer: dict) -> dict:
    return {
        "decision": answer["decision"],
        "reasons": answer["reasons"],
        "score": answer["score"],
        "model": answer["model"],
        "model_input": answer["features"]["model_input"],
        "risk_signal": answer["risk_signal"],
        "degraded": answer["degraded"],
    }


def test_commands_size_each_arm_to_the_budget() -> None:
    (mono,) = arms.commands(8000, 4, "monolith", {})
    assert mono[0][mono[0].index("--workers") + 1] == "4"
    assert mono[1]["OMP_NUM_THREADS"] == "1"
    model, gateway = arms.commands(8000, 4, "microservices", {"X": "y"}, model_port=8001)
    workers = [int(c[c.index("--workers") + 1]) for c, _ in (model, gateway)]
    assert sum(workers) == 4 and min(workers) >= 1
    assert gateway[1][arms.MODEL_SERVICE_URL_ENV] == "http://127.0.0.1:8001"
    assert gateway[1]["X"] == "y" and "--port" in gateway[0] and "8000" in gateway[0]
    with pytest.raises(ValueError, match="unknown architecture"):
        arms.commands(8000, 2, "serve", {})


def test_same_decisions_as_the_in_process_scorer(arm, in_process) -> None:
    for i in range(N):
        req = sample_request(i)
        r = arm.score(req["json"], headers=req["headers"])
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["decision"] in ("approve", "review", "decline") and body["reasons"]
        assert body["degraded"] is False, body["degraded_reasons"]
        assert _stable(body) == _stable(in_process[i]), i
        assert r.headers["x-request-id"] == body["request_id"]


def test_idempotency_key_repeat_gets_the_first_answer(arm) -> None:
    req = sample_request(7)
    first = arm.score(req["json"], headers=req["headers"])
    again = arm.score(req["json"], headers=req["headers"])
    assert first.status_code == again.status_code == 200, again.text
    assert again.json()["request_id"] == first.json()["request_id"]
    other = arm.score({**req["json"], "amount": 1.5}, headers=req["headers"])
    assert other.status_code == 409


@pytest.mark.parametrize(
    ("change", "status", "part"),
    [
        ({"customer_id": "C09999"}, 404, "Customer C09999 is not on file"),
        ({"currency": "XYZ"}, 422, "Currency XYZ is not supported"),
        ({"amount": -5}, 422, "amount"),
        ({"unexpected": 1}, 422, "unexpected"),
        ({"memo": "x" * 20_000}, 413, "at most"),
    ],
)
def test_bad_bodies_get_the_serve_apps_4xx(arm, change, status, part) -> None:
    r = arm.score({**GOOD, **change})
    assert r.status_code == status, r.text
    assert part in r.json()["error"]["message"]


def test_model_service_refuses_malformed_rows(started) -> None:
    cmd, _ = started["microservices"].commands[0]
    url = f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}/predict"
    ok = httpx.post(url, json={"rows": [[0.0] * 12, [1.0] * 12]}, timeout=10)
    assert ok.status_code == 200 and len(ok.json()["scores"]) == 2
    short = httpx.post(url, json={"rows": [[0.0] * 11]}, timeout=10)
    assert short.status_code == 422 and "rows" in short.json()["error"]["message"]


def test_risk_service_down_gives_a_degraded_answer(started, slow_risk) -> None:
    slow_risk.stop()
    try:
        for arm in started.values():
            r = arm.score({**GOOD, "amount": 400.0, "currency": "EUR"})
            assert r.status_code == 200, (arm.arch, r.text)
            body = r.json()
            assert body["degraded"] is True
            assert body["risk_signal"]["source"] != "risk_service"
            assert any("risk service" in why for why in body["degraded_reasons"])
    finally:
        slow_risk.start(delay_ms=30)


def test_model_service_down_is_a_503(started) -> None:
    """Last: it stops the microservices arm's model service."""
    micro = started["microservices"]
    micro.procs[0].terminate()
    micro.procs[0].wait(15)
    r = micro.score()
    assert r.status_code == 503, r.text
    assert "fraud model could not score" in r.json()["error"]["message"]
    assert "Retry-After" in r.headers
    # the monolith has no such dependency
    assert started["monolith"].score().status_code == 200

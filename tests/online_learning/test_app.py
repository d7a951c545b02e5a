"""The online-learning app under Serve: real requests, real training, assertions on answers.

One deployment for the module (two ingress replicas, embedded SQLite log): it learns across a
drift, every replica converges to the champion, a replica that restarts comes back on the
current champion, a rollback needs the admin key, floods are pushed back, the bandit learns
and keeps what it learned across a restart of its replica.
"""

from __future__ import annotations

import os
import signal
import uuid

import httpx
import pytest

from patterns.online_learning.app import OnlineArgs, build_app
from patterns.online_learning.bandit import ACTIONS, OfferSimulator
from patterns.online_learning.stream import DriftingStream
from tests.online_learning.helpers import play, wait_for, wait_trained_on, wait_trainer_done

APP, PREFIX = "online-test", "/online-test"
STREAM = DriftingStream()
ROW = [0.5, -1.2, 0.3, 0.0, 1.1]


@pytest.fixture(scope="module")
def url(deploy, online_dirs) -> str:
    args = OnlineArgs(
        log_url=online_dirs["log_url"],
        model_store_uri=online_dirs["store_uri"],
        ingress_replicas=2,
    )
    return deploy(build_app(args), name=APP, route_prefix=PREFIX)


def replicas() -> list[dict]:
    from ray import serve

    handle = serve.get_deployment_handle("OnlineIngress", APP)
    answers = handle.broadcast("served_version").results(timeout_s=10, return_exceptions=True)
    return [a for a in answers if isinstance(a, dict)]  # a killed replica answers an error


def pointer(url: str) -> str:
    history = httpx.get(f"{url}/model", timeout=30).json()["pointer_history"]
    return history[0]["version"]


def test_answers_carry_a_prediction_id_and_the_model_version(url) -> None:
    r = httpx.post(f"{url}/predict", json={"instances": [ROW, ROW]}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"].startswith("v") and body["trained_through"] is not None
    ids = [p["prediction_id"] for p in body["predictions"]]
    assert len(set(ids)) == 2 and all(i.startswith("p-") for i in ids)
    assert body["timings_ms"]["total"] > 0
    frozen = httpx.post(
        f"{url}/predict", json={"instances": [ROW], "version": "v000001"}, timeout=30
    ).json()
    assert frozen["model_version"] == "v000001"
    health = httpx.get(f"{url}/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["model_version"].startswith("v")


@pytest.mark.parametrize(
    ("route", "body", "status", "needle"),
    [
        ("/predict", '{"instances": [[1, 2, 3]]}', 422, "exactly 5"),
        ("/predict", '{"instances": [[NaN, 0, 0, 0, 0]]}', 422, "finite number"),
        ("/predict", '{"instances": [[Infinity, 0, 0, 0, 0]]}', 422, "finite number"),
        ("/predict", '{"instances": []}', 422, "instances"),
        ("/feedback", '{"event_id": "x1", "prediction_id": "p-nope", "label": 1}', 404, "unknown"),
        ("/feedback", '{"event_id": "x1", "prediction_id": "p-1", "label": "1"}', 422, "label"),
        ("/feedback", '{"event_id": "../x", "prediction_id": "p-1", "label": 1}', 422, "event_id"),
        ("/bandit/choose", '{"context": [1, 2]}', 422, "takes 3"),
        ("/bandit/reward", '{"event_id": "r", "choice_id": "c-1", "reward": 2}', 422, "[0, 1]"),
    ],
)
def test_bad_input_is_a_4xx_with_a_sentence(url, route, body, status, needle) -> None:
    r = httpx.post(
        f"{url}{route}", content=body, headers={"content-type": "application/json"}, timeout=30
    )
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_feedback_is_idempotent_by_event_id(url) -> None:
    pid = httpx.post(f"{url}/predict", json={"instances": [ROW]}, timeout=30).json()["predictions"][
        0
    ]["prediction_id"]
    event = {"event_id": f"idem-{uuid.uuid4().hex[:8]}", "prediction_id": pid, "label": 1}
    first = httpx.post(f"{url}/feedback", json=event, timeout=30)
    assert first.status_code == 202, first.text
    again = httpx.post(f"{url}/feedback", json=event, timeout=30)
    assert again.status_code == 200 and again.json()["duplicate"]
    assert again.json()["offset"] == first.json()["offset"]
    clash = httpx.post(f"{url}/feedback", json={**event, "label": 0}, timeout=30)
    assert clash.status_code == 409 and "different feedback" in clash.json()["error"]["message"]
    bad = httpx.post(f"{url}/feedback", json={**event, "event_id": "e-2", "label": 3}, timeout=30)
    assert bad.status_code == 422 and "out of range" in bad.json()["error"]["message"]


def test_an_idempotency_key_repeat_gets_the_first_answer(url) -> None:
    pid = httpx.post(f"{url}/predict", json={"instances": [ROW]}, timeout=30).json()
    pid = pid["predictions"][0]["prediction_id"]
    tag = uuid.uuid4().hex[:8]
    event = {"event_id": f"key-{tag}", "prediction_id": pid, "label": 1}
    headers = {"Idempotency-Key": f"k-{tag}"}
    first = httpx.post(f"{url}/feedback", json=event, headers=headers, timeout=30)
    again = httpx.post(f"{url}/feedback", json=event, headers=headers, timeout=30)
    assert first.status_code == again.status_code == 202, again.text
    assert again.json() == first.json() and first.json()["status"] == "logged"
    other = {**event, "event_id": f"key2-{tag}"}
    clash = httpx.post(f"{url}/feedback", json=other, headers=headers, timeout=30)
    assert clash.status_code == 409 and "Idempotency-Key" in clash.json()["error"]["message"]


def test_it_learns_across_a_drift_and_every_replica_converges(url) -> None:
    d = STREAM.drift_every
    before = play(url, STREAM, d, 200)  # concept 1: the baseline (concept 0) fails here
    wait_trained_on(url, play(url, STREAM, d + 200, 700))  # the next answers come after it
    after = play(url, STREAM, d + 900, 300)
    assert before["accuracy"] < 0.7, before["accuracy"]
    assert after["accuracy"] > 0.85, after["accuracy"]
    model = wait_trainer_done(url, after["acks"][-1]["offset"])
    assert model["metrics_history"] and model["metrics_history"][-1]["decision"] in (
        "promote",
        "reject",
        "wait",
    )
    champion = pointer(url)
    assert champion != "v000001"
    wait_for(lambda: {r["version"] for r in replicas()} == {champion}, 10, what="convergence")
    assert len(replicas()) == 2
    served = httpx.post(f"{url}/predict", json={"instances": [ROW]}, timeout=30).json()
    assert served["model_version"] == champion


def test_the_client_streams_and_its_sample_request_is_served(url, serve_http) -> None:
    from patterns.online_learning.client import sample_request, stream_and_learn

    steps = list(stream_and_learn(url, STREAM, 9000, 100, batch=50))
    assert [s.n for s in steps] == [50, 50] and all(s.acked == 50 for s in steps)
    assert all(s.version.startswith("v") and s.last_offset for s in steps)
    req = sample_request(3)
    r = httpx.request(
        req["method"], serve_http + req["path"].replace("/online", PREFIX, 1), json=req["json"]
    )
    assert r.status_code == 200 and r.json()["predictions"][0]["prediction_id"]


def test_a_poisoned_burst_is_rejected_by_the_gate_and_live_quality_holds(url) -> None:
    """One client floods flipped labels; the gate (each client capped at a quarter of its
    window) refuses every candidate that learned them, and honest users keep getting good
    answers from the champion."""
    # Concept 3 (60 degrees): the live model follows the drift first.
    start = 3 * STREAM.drift_every
    wait_trained_on(url, play(url, STREAM, start, 600))
    before = pointer(url)
    seq_before = _history(url)[0]["seq"]
    flood = play(url, STREAM, start + 600, 600, client="mallory", flip=True)
    wait_trained_on(url, flood)  # every candidate that learned the flood met the gate first
    honest = play(url, STREAM, start + 1200, 300)
    assert flood["accuracy"] > 0.8  # answers to mallory were still right (against the truth)
    # The champion answers honest users as before (0.85-0.9 here, depending on which
    # version each replica had when); a model that learned the flipped labels would answer
    # about the complement (~0.15).
    assert honest["accuracy"] > 0.8, honest["accuracy"]
    history = httpx.get(f"{url}/model", timeout=30).json()["metrics_history"]
    assert any(h["decision"] == "reject" for h in history), history
    r = httpx.post(f"{url}/predict", json={"instances": [ROW]}, timeout=30).json()
    promoted = [h for h in _history(url) if h["seq"] > seq_before]  # read after the answer
    # New versions only go live through the gate (as good on the held-out window). The flood
    # can also make live labels look bad and trigger an auto-rollback: that only ever goes
    # back to a version that was live before, never forward to an untested one.
    newest_allowed = int(before[1:])
    for h in sorted(promoted, key=lambda h: h["seq"]):
        if h["reason"].startswith("gate"):
            newest_allowed = max(newest_allowed, int(h["version"][1:]))
        else:
            assert h["reason"].startswith("auto-rollback"), h
            assert int(h["version"][1:]) <= newest_allowed, h
    assert r["model_version"] in {before} | {h["version"] for h in promoted}


def _history(url: str) -> list[dict]:
    return httpx.get(f"{url}/model", timeout=30).json()["pointer_history"]


def test_a_restarted_replica_comes_back_on_the_current_champion(url) -> None:
    champion = pointer(url)
    assert champion != "v000001"
    victim = replicas()[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    fresh = wait_for(
        lambda: (
            [r for r in replicas() if r["pid"] != victim]
            if len(replicas()) == 2 and all(r["pid"] != victim for r in replicas())
            else None
        ),
        60,
        0.5,
        what="Serve to replace the killed replica",
    )
    assert {r["version"] for r in fresh} == {champion}


def test_rollback_moves_every_replica_and_is_open_in_development(url) -> None:
    """The one key policy: development leaves rollback open (production needs the admin key,
    401/403 otherwise: core's api_key_auth, tests/ops for a keyed app through Serve), and the
    served document declares no key."""
    doc = httpx.get(f"{url}/openapi.json", timeout=30).json()
    assert "security" not in doc["paths"]["/rollback"]["post"]
    champion = pointer(url)
    r = httpx.post(f"{url}/rollback", json={"reason": "test: undo the last promotion"}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["previous"] == champion and body["champion"] != champion
    assert pointer(url) == body["champion"]
    wait_for(lambda: {x["version"] for x in replicas()} == {body["champion"]}, 10)
    missing = httpx.post(
        f"{url}/rollback",
        json={"to_version": "v999999"},
        headers={"X-API-Key": "dev-online-admin-key"},
        timeout=30,
    )
    assert missing.status_code == 404 and "not in the model store" in missing.text


def test_a_feedback_flood_from_one_client_is_told_to_back_off(url) -> None:
    out = httpx.post(f"{url}/predict", json={"instances": [ROW] * 64}, timeout=30).json()
    pids = [p["prediction_id"] for p in out["predictions"]]
    tag = uuid.uuid4().hex[:8]
    statuses, retry_after = [], None
    with httpx.Client(timeout=30) as http:
        # The default burst is 1,000 events per client per replica, refilled at 500/s.
        for k in range(6):
            events = [
                {"event_id": f"flood-{tag}-{k}-{i}", "prediction_id": pids[i % 64], "label": 1}
                for i in range(512)
            ]
            r = http.post(
                f"{url}/feedback/batch", json={"events": events}, headers={"X-Client-ID": "flood"}
            )
            statuses.append(r.status_code)
            if r.status_code == 429:
                retry_after = r.headers.get("Retry-After")
                assert "retry in" in r.json()["error"]["message"]
    assert 429 in statuses and retry_after is not None and int(retry_after) >= 1
    other = httpx.post(
        f"{url}/feedback",
        json={"event_id": f"calm-{tag}", "prediction_id": pids[0], "label": 1},
        headers={"X-Client-ID": "calm"},
        timeout=30,
    )
    assert other.status_code == 202


def test_the_bandit_learns_and_keeps_it_across_a_replica_restart(url) -> None:
    from ray import serve

    world = OfferSimulator()
    tag = uuid.uuid4().hex[:8]
    with httpx.Client(timeout=30) as http:
        for i in range(300):
            ctx = world.context(i)
            choice = http.post(f"{url}/bandit/choose", json={"context": ctx}).json()
            reward = world.reward(i, ACTIONS.index(choice["action"]))
            r = http.post(
                f"{url}/bandit/reward",
                json={
                    "event_id": f"r-{tag}-{i}",
                    "choice_id": choice["choice_id"],
                    "reward": reward,
                },
            )
            assert r.status_code == 202, r.text
    saved = wait_for(
        lambda: (
            (s := _bandit_state(url))
            and s["updates"] >= 300
            and s["saved_through"] == s["consumed"]
            and s
        ),
        20,
        what="the bandit to learn 300 rewards and save them",
    )
    handle = serve.get_deployment_handle("BanditPolicy", APP)
    pid = handle.state.remote().result()["pid"]
    os.kill(pid, signal.SIGKILL)
    restored = wait_for(
        lambda: (s := _bandit_state(url)) and s["pid"] != pid and s,
        60,
        0.5,
        what="Serve to restart the bandit replica",
    )
    assert restored["updates"] == saved["updates"] >= 300
    assert restored["actions"] == saved["actions"]
    picks = [
        httpx.post(f"{url}/bandit/choose", json={"context": [2.5, -1.0, 0.0]}, timeout=30).json()
        for _ in range(10)
    ]
    assert sum(p["action"] == "discount" for p in picks) >= 7, picks


def _bandit_state(url: str) -> dict | None:
    r = httpx.get(f"{url}/bandit", timeout=30)
    return r.json() if r.status_code == 200 else None

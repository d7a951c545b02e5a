"""Faults under Serve, on each log backend: the trainer SIGKILLed mid-batch, and a bad model
that gets past a disabled gate.

The app runs with two knobs a game day would use: the trainer's ``pause_before_save_s``
(each round sleeps between ``partial_fit`` and the save, so a kill lands while a batch is
learned but not saved) and ``gate.margin: 1.0`` (the gate lets every candidate through, so
only the live rollback check stands between a poisoned model and users).
"""

from __future__ import annotations

import itertools
import os
import signal

import httpx
import pytest

from core.model_store import ModelStore
from patterns.online_learning.app import OnlineArgs, build_app
from patterns.online_learning.learning import GatePolicy, TrainerArgs
from patterns.online_learning.model import MODEL_NAME, is_holdout
from patterns.online_learning.stream import DriftingStream
from tests.online_learning.helpers import baseline_store_in, play, wait_for, wait_until_served

STREAM = DriftingStream()


@pytest.fixture(
    scope="module",
    params=["sqlite", pytest.param("redis", marks=[pytest.mark.redis, pytest.mark.slow])],
)
def app(request, deploy, tmp_path_factory, online_baseline_models):
    d = tmp_path_factory.mktemp(f"faults-{request.param}")
    store_uri = baseline_store_in(d, online_baseline_models)  # trained once for both backends
    log_url = f"sqlite:///{d / 'feedback.db'}"
    if request.param == "redis":
        log_url = request.getfixturevalue("redis_server").url
    name = f"online-faults-{request.param}"
    args = OnlineArgs(
        log_url=log_url,
        model_store_uri=store_uri,
        trainer=TrainerArgs(batch_size=64, pause_before_save_s=1.0, gate=GatePolicy(margin=1.0)),
    )
    url = deploy(build_app(args), name=name, route_prefix=f"/{name}")
    return {"url": url, "name": name, "store_uri": store_uri}


def trainer_status(app_name: str) -> dict | None:
    from ray import serve

    try:
        handle = serve.get_deployment_handle("OnlineTrainer", app_name)
        return handle.status.remote().result(timeout_s=3)
    except Exception:  # dead or restarting
        return None


def test_sigkill_mid_batch_loses_nothing_and_applies_nothing_twice(app) -> None:
    url, name = app["url"], app["name"]
    tag = f"k{name[-5:]}"
    sent = play(url, STREAM, 0, 320, tag=tag)["acks"]
    status = wait_for(
        lambda: (s := trainer_status(name)) and s["in_batch"] and s["rounds"] >= 1 and s,
        30,
        0.05,
        what="the trainer to be in the middle of a batch",
    )
    os.kill(status["pid"], signal.SIGKILL)
    # Trainer down: the champion still answers and feedback is still logged.
    down = play(url, STREAM, 320, 64, tag=tag)
    assert len(down["acks"]) == 64 and all(a["status"] == "logged" for a in down["acks"])
    sent += down["acks"]
    last = sent[-1]["offset"]
    wait_for(
        lambda: (s := trainer_status(name)) and s["pid"] != status["pid"] and s["consumed"] == last,
        90,
        0.1,
        what="the restarted trainer to consume every acknowledged event",
    )
    store = ModelStore(app["store_uri"])
    metas = [store.read_manifest(MODEL_NAME, v)[0]["metadata"] for v in store.versions(MODEL_NAME)]
    rounds = [m for m in metas if m.get("kind") == "candidate"]
    # Offsets: from the start of this log to its last event, no gap, no overlap.
    assert rounds[0]["consumed_from"] == "0" and rounds[-1]["consumed"] == last
    for a, b in itertools.pairwise(rounds):
        assert b["consumed_from"] == a["consumed"]
    # Counts: each of the 384 events learned or held out exactly once.
    ids = [a["event_id"] for a in sent]
    assert len(set(ids)) == 384
    held = sum(is_holdout(i, GatePolicy().holdout_every) for i in ids)
    assert (rounds[-1]["learned"], rounds[-1]["held_out"]) == (384 - held, held)
    r = httpx.post(f"{url}/predict", json={"instances": [[0.1] * 5]}, timeout=30)
    assert r.status_code == 200


def _consumed(app_name: str, offset: str) -> bool:
    """The round that consumed ``offset`` has finished, its promotion included."""
    s = trainer_status(app_name)
    return bool(s) and s["consumed"] == offset and s["in_batch"] is None


def test_a_poisoned_model_that_got_live_is_rolled_back_by_live_labels(app) -> None:
    url, name = app["url"], app["name"]
    start = 16_000  # concept 0 again, events no other test sent
    honest = play(url, STREAM, start, 320, tag="rb")
    wait_for(lambda: _consumed(name, honest["acks"][-1]["offset"]), 90, 0.1)
    flood = play(url, STREAM, start + 320, 320, client="mallory", flip=True, tag="rb")
    wait_for(lambda: _consumed(name, flood["acks"][-1]["offset"]), 90, 0.1)
    poisoned = httpx.get(f"{url}/model", timeout=30).json()["pointer_history"][0]
    assert poisoned["reason"].startswith("gate")  # the disabled gate let it through...
    after = play(url, STREAM, start + 640, 400, tag="rb")
    assert after["accuracy"] < 0.6  # ...and users got its answers
    history = wait_for(
        lambda: [
            h
            for h in httpx.get(f"{url}/model", timeout=30).json()["pointer_history"]
            if h["reason"].startswith("auto-rollback") and h["seq"] > poisoned["seq"]
        ],
        90,
        0.1,
        what="the live labels to trigger an automatic rollback",
    )
    assert int(history[-1]["version"].lstrip("v")) < int(poisoned["version"].lstrip("v"))
    # The pointer moves before the replicas do: wait until none answers with a version that
    # was champion from the poisoned one up to the rollback (later ones are retrained on it).
    pointers = httpx.get(f"{url}/model", timeout=30).json()["pointer_history"]
    bad = {h["version"] for h in pointers if poisoned["seq"] <= h["seq"] < history[-1]["seq"]}
    wait_until_served(url, lambda v: v not in bad, what=f"no replica to answer with {bad}")
    recovered = play(url, STREAM, start + 1040, 200, tag="rb")
    assert recovered["accuracy"] > 0.8, recovered["accuracy"]

"""The trainer without Serve: learning across drift, exactly-once restarts, gate, rollback."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from core.model_store import ModelStore
from patterns.online_learning.artifacts import ensure_artifacts
from patterns.online_learning.feedback_log import SqliteLog
from patterns.online_learning.learning import LABELS_STREAM, GatePolicy, Trainer, TrainerArgs
from patterns.online_learning.model import BASELINE_VERSION, MODEL_NAME, is_holdout
from patterns.online_learning.stream import DriftingStream

STREAM = DriftingStream()


@pytest.fixture(scope="module")
def baseline_store(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("baseline")
    ensure_artifacts(ModelStore((d / "models").as_uri()))
    return d / "models"


def fresh_world(baseline_store: Path, where: Path) -> tuple[ModelStore, SqliteLog]:
    """A fresh log and a store holding only the baseline (copied, so tests do not share)."""
    import shutil

    shutil.copytree(baseline_store, where / "models")
    return ModelStore((where / "models").as_uri()), SqliteLog(where / "log.db")


@pytest.fixture
def world(tmp_path, baseline_store):
    store, log = fresh_world(baseline_store, tmp_path)
    yield store, log
    log.close()


def feed(
    log,
    start: int,
    n: int,
    *,
    client: str = "user",
    flip: bool = False,
    tag: str = "e",
    served: str | None = None,
    predicted=None,
) -> None:
    """Events start..start+n-1 into the log; honest traffic comes from 8 users, like a shop's
    customers, a flood from one client id."""
    items = []
    for i in range(start, start + n):
        x, y, _ = STREAM.event(i)
        label = 1 - y if flip else y
        who = f"{client}-{i % 8}" if client == "user" else client
        payload = {
            "event_id": f"{tag}{i}",
            "x": x,
            "label": label,
            "client": who,
            "served_version": served,
            "predicted": predicted(x) if predicted else 0,
        }
        items.append((f"{tag}{i}", payload))
    log.append(LABELS_STREAM, items)


def drain(trainer: Trainer) -> list[dict]:
    rounds = []
    while (r := trainer.step(block_s=0)) is not None:
        rounds.append(r)
    return rounds


def accuracy(clf, start: int, n: int) -> float:
    x, y, _ = STREAM.batch(start, n)
    return float((clf.predict(x) == y).mean())


def test_live_model_recovers_after_a_drift_and_the_frozen_one_does_not(world) -> None:
    store, log = world
    trainer = Trainer(log, store, TrainerArgs())
    d = STREAM.drift_every
    feed(log, d, 1500)  # concept 1 (120 degrees away from the baseline's)
    rounds = drain(trainer)
    assert {r["decision"] for r in rounds} >= {"promote"}
    frozen, _ = store.load_sklearn(MODEL_NAME, BASELINE_VERSION)
    champion, _ = store.load_sklearn(MODEL_NAME, trainer.champion_version)
    # Fresh concept-1 events neither model trained on.
    assert accuracy(frozen, d + 1500, 500) < 0.5
    assert accuracy(champion, d + 1500, 500) > 0.85


def test_each_event_is_learned_once_across_crashes(
    world, monkeypatch, baseline_store, tmp_path
) -> None:
    """A crash before the save loses only memory; the restart re-reads after the saved offset.
    Versions then cover contiguous, non-overlapping offset ranges, and every event is counted
    exactly once (trained on or held out)."""
    store, log = world
    feed(log, 0, 640)
    trainer = Trainer(log, store, TrainerArgs(batch_size=64))
    for _ in range(3):
        trainer.step(block_s=0)
    real_save = store.save_sklearn

    def crash(*a, **k):
        raise KeyboardInterrupt("simulated SIGKILL between partial_fit and the save")

    monkeypatch.setattr(store, "save_sklearn", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.step(block_s=0)  # trained on events 193..256 in memory, never saved
    monkeypatch.setattr(store, "save_sklearn", real_save)
    restarted = Trainer(log, store, TrainerArgs(batch_size=64))
    assert restarted.consumed == "192"

    def refuse(*a, **k):
        raise OSError("store unavailable")  # a failure the loop survives and retries

    monkeypatch.setattr(store, "save_sklearn", refuse)
    with pytest.raises(OSError):
        restarted.step(block_s=0)  # trained in memory, save refused: state rebuilt
    monkeypatch.setattr(store, "save_sklearn", real_save)
    drain(restarted)
    # A second restart with everything consumed reads nothing.
    again = Trainer(log, store, TrainerArgs(batch_size=64))
    assert again.step(block_s=0) is None
    metas = [store.read_manifest(MODEL_NAME, v)[0]["metadata"] for v in store.versions(MODEL_NAME)]
    chain = [(m["consumed_from"], m["consumed"]) for m in metas if m.get("kind") == "candidate"]
    assert chain[0][0] == "0" and chain[-1][1] == "640"
    for (_, end), (start, _) in itertools.pairwise(chain):
        assert start == end  # no gap, no overlap
    assert metas[-1]["learned"] + metas[-1]["held_out"] == 640
    holdout = sum(is_holdout(f"e{i}", GatePolicy().holdout_every) for i in range(640))
    assert metas[-1]["held_out"] == holdout
    # The weights too: the same as a trainer that never failed, fed the same batches (a batch
    # learned twice in memory would show here, not in the counts).
    (tmp_path / "ref").mkdir()
    ref_store, ref_log = fresh_world(baseline_store, tmp_path / "ref")
    feed(ref_log, 0, 640)
    reference = Trainer(ref_log, ref_store, TrainerArgs(batch_size=64))
    drain(reference)
    np.testing.assert_allclose(restarted.head_model.coef_, reference.head_model.coef_)
    ref_log.close()


def test_a_save_that_crashed_before_the_pointer_moved_is_finished_on_restart(world) -> None:
    store, log = world
    feed(log, 0, 400)  # concept 0: the candidate matches the champion, so it is promoted
    trainer = Trainer(log, store, TrainerArgs(batch_size=400))
    trainer._promote = lambda version, metrics: None  # the process dies right after the save
    record = trainer.step(block_s=0)
    assert record["decision"] == "promote"
    assert log.champion()["version"] == BASELINE_VERSION
    restarted = Trainer(log, store, TrainerArgs())
    assert restarted.champion_version == record["version"] == log.champion()["version"]


def test_the_gate_rejects_a_flipped_label_flood_from_one_client(world) -> None:
    store, log = world
    trainer = Trainer(log, store, TrainerArgs())
    feed(log, 0, 800, client="user")  # concept 0, like the champion
    drain(trainer)
    champion_before = trainer.champion_version
    feed(log, 800, 1200, client="mallory", flip=True, tag="m")
    rounds = drain(trainer)
    assert rounds and all(r["decision"] == "reject" for r in rounds[3:]), rounds
    champion, _ = store.load_sklearn(MODEL_NAME, trainer.champion_version)
    # Events 8000.. are concept 0 again (the stream cycles through 4 concepts of 2000).
    assert accuracy(trainer.head_model, 8000, 400) < 0.5  # the head did learn the poison...
    assert accuracy(champion, 8000, 400) > 0.85  # ...the live model did not
    assert trainer.champion_version in {champion_before} | {r["version"] for r in rounds[:3]}


def test_a_regression_seen_live_is_rolled_back_automatically(world) -> None:
    """With the gate switched off the poisoned candidate goes live; the labels for the answers
    it served show it is worse than the anchor, and the trainer rolls back."""
    store, log = world
    args = TrainerArgs(gate=GatePolicy(margin=1.0))
    trainer = Trainer(log, store, args)
    feed(log, 0, 400, client="user")
    drain(trainer)
    anchor_version = trainer.anchor_version
    feed(log, 400, 300, client="mallory", flip=True, tag="m")
    drain(trainer)
    poisoned = trainer.champion_version
    live, _ = store.load_sklearn(MODEL_NAME, poisoned)
    # Honest labels arrive for answers the poisoned champion served.
    feed(
        log,
        700,
        200,
        client="user",
        tag="h",
        served=poisoned,
        predicted=lambda x: int(live.predict(np.asarray([x]))[0]),
    )
    rounds = drain(trainer)
    verdicts = [r["rollback"] for r in rounds if "rollback" in r]
    assert verdicts and verdicts[0]["action"] == "rollback", rounds
    assert verdicts[0]["served_accuracy"] < verdicts[0]["anchor_accuracy"]
    reasons = [h["reason"] for h in log.champion_history(50)]
    assert any(r.startswith("auto-rollback") for r in reasons)
    restored = next(h for h in log.champion_history(50) if h["reason"].startswith("auto-rollback"))
    assert restored["version"] == anchor_version != poisoned


def test_manual_rollback_restores_the_previous_champion_and_resets_the_head(world) -> None:
    store, log = world
    trainer = Trainer(log, store, TrainerArgs(batch_size=400))
    feed(log, 0, 400)
    trainer.step(block_s=0)
    promoted = trainer.champion_version
    assert promoted != BASELINE_VERSION
    out = trainer.rollback()
    assert out["champion"] == BASELINE_VERSION and out["previous"] == promoted
    assert log.champion()["version"] == BASELINE_VERSION
    meta = store.read_manifest(MODEL_NAME, trainer.head_version)[0]["metadata"]
    assert meta["kind"] == "rollback" and meta["restored_from"] == BASELINE_VERSION
    with pytest.raises(LookupError):
        trainer.rollback(to="v999999")


def test_a_fresh_log_is_read_from_the_start_even_if_the_store_has_learned(world, tmp_path) -> None:
    store, log = world
    feed(log, 0, 200)
    drain(Trainer(log, store, TrainerArgs()))
    other = SqliteLog(tmp_path / "other.db")
    feed(other, 0, 50)
    trainer = Trainer(other, store, TrainerArgs())
    assert trainer.consumed == "0"
    # The counts start over with the offset: they count this log's events, each once.
    assert trainer.learned == trainer.held_out == 0
    assert trainer.step(block_s=0)["offsets"] == ["1", "50"]
    assert trainer.learned + trainer.held_out == 50
    restarted = Trainer(other, store, TrainerArgs())  # the counts come back with the offset
    assert (restarted.consumed, restarted.learned + restarted.held_out) == ("50", 50)


def test_a_pointer_to_a_version_the_store_lacks_falls_back_to_what_exists(world) -> None:
    """A wiped model store under a kept log: replicas serve the baseline instead of crashing
    at start, and the trainer moves the pointer to a version that exists."""
    from patterns.online_learning.flow import LiveModel

    store, log = world
    log.set_champion("v000050", "from a store that was wiped")
    live = LiveModel(store, log)
    assert live.follow_pointer() == BASELINE_VERSION
    trainer = Trainer(log, store, TrainerArgs())
    assert trainer.champion_version == BASELINE_VERSION == log.champion()["version"]
    assert "missing from the model store" in log.champion()["reason"]


def test_a_flooder_agreeing_with_its_own_poisoned_model_cannot_make_it_the_anchor(world) -> None:
    store, log = world
    trainer = Trainer(log, store, TrainerArgs(gate=GatePolicy(margin=1.0)))
    feed(log, 0, 300, client="user")
    drain(trainer)
    anchor = trainer.anchor_version
    feed(log, 300, 400, client="mallory", flip=True, tag="m")
    drain(trainer)  # the disabled gate promotes what mallory taught
    poisoned = trainer.champion_version
    live, _ = store.load_sklearn(MODEL_NAME, poisoned)
    # Mallory labels the poisoned model's own answers, agreeing with every one of them.
    feed(
        log,
        700,
        400,
        client="mallory",
        flip=True,
        tag="m2",
        served=poisoned,
        predicted=lambda x: int(live.predict(np.asarray([x]))[0]),
    )
    rounds = drain(trainer)
    assert not any("rollback" in r for r in rounds)  # no verdict from one client alone
    assert trainer.anchor_version == anchor

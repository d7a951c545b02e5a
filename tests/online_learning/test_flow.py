"""The ingress's request flow without Serve: bad input, joins, idempotency, backpressure, and
the calls to the trainer and the bandit policy (fakes here, deployment handles in the app)."""

from __future__ import annotations

import asyncio
import math
import shutil
import time
from types import SimpleNamespace

import pytest

from core.errors import (
    Conflict,
    NotFound,
    ServiceUnavailable,
    TooManyRequests,
    Unprocessable,
)
from core.model_store import ModelStore
from patterns.online_learning.artifacts import ensure_artifacts
from patterns.online_learning.feedback_log import SqliteLog
from patterns.online_learning.flow import (
    FeedbackLimits,
    Gone,
    LiveModel,
    OnlineService,
    TokenBuckets,
)
from patterns.online_learning.learning import LABELS_STREAM
from patterns.online_learning.model import MODEL_NAME
from patterns.online_learning.stream import DriftingStream

ROW = [0.5, -1.2, 0.3, 0.0, 1.1]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    d = tmp_path_factory.mktemp("svc-baseline")
    ensure_artifacts(ModelStore((d / "models").as_uri()))
    return d / "models"


@pytest.fixture
def make_service(tmp_path, baseline):
    shutil.copytree(baseline, tmp_path / "models")
    store = ModelStore((tmp_path / "models").as_uri())
    log = SqliteLog(tmp_path / "log.db")
    now = [time.time()]  # the log stamps records with the real clock; tests move this one

    def make(flow_args: dict | None = None, **limits) -> OnlineService:
        live = LiveModel(store, log)
        live.follow_pointer()
        return OnlineService(
            log,
            live,
            FeedbackLimits(**limits),
            holdout_every=5,
            clock=lambda: now[0],
            **(flow_args or {}),
        )

    make.log, make.now, make.store = log, now, store
    yield make
    log.close()


def fb(event_id: str, prediction_id: str, label=1):
    return SimpleNamespace(event_id=event_id, prediction_id=prediction_id, label=label)


def run(coro):
    return asyncio.run(coro)


def test_predict_names_the_version_and_records_each_row(make_service) -> None:
    svc = make_service()
    x, _, _ = DriftingStream().event(0)
    out = run(svc.predict([x, ROW]))
    assert out["model_version"] == "v000001" and out["trained_through"] == "0"
    assert len({p["prediction_id"] for p in out["predictions"]}) == 2
    assert set(out["timings_ms"]) >= {"model", "record", "total"}
    record, _ = make_service.log.get_record(out["predictions"][0]["prediction_id"])
    assert record == {"x": x, "version": "v000001", "predicted": out["predictions"][0]["label"]}


@pytest.mark.parametrize(
    ("rows", "needle"),
    [
        ([[1.0, 2.0]], "has 2 features; this model takes exactly 5"),
        ([[*ROW[:4], math.nan]], "finite number"),
        ([[*ROW[:4], math.inf]], "finite number"),
        ([[*ROW[:4], "7"]], "finite number"),
        ([[*ROW[:4], True]], "finite number"),
        ([[*ROW[:4], 1e300]], "beyond +/-1,000,000"),
    ],
)
def test_bad_rows_are_a_422_with_a_sentence(make_service, rows, needle) -> None:
    with pytest.raises(Unprocessable, match=None) as exc:
        run(make_service().predict(rows))
    assert needle in exc.value.message


def test_feedback_is_logged_once_and_retries_get_the_original_ack(make_service) -> None:
    svc = make_service()
    pid = run(svc.predict([ROW]))["predictions"][0]["prediction_id"]
    status, (ack,) = run(svc.feedback([fb("ev-1", pid)], "shop-1"))
    assert status == 202 and ack["status"] == "logged" and not ack["duplicate"]
    assert ack["use"] in ("train", "holdout")
    status, (again,) = run(svc.feedback([fb("ev-1", pid)], "shop-1"))
    assert status == 200 and again["duplicate"]
    assert (again["offset"], again["acked_at"]) == (ack["offset"], ack["acked_at"])
    with pytest.raises(Conflict, match="already used for different feedback"):
        run(svc.feedback([fb("ev-1", pid, label=0)], "shop-1"))
    entries = make_service.log.read(LABELS_STREAM, "0", 10)
    assert len(entries) == 1
    assert entries[0].payload["served_version"] == "v000001"
    assert entries[0].payload["x"] == ROW and entries[0].payload["client"] == "shop-1"


def test_unknown_expired_and_out_of_range_feedback_is_refused_and_not_logged(
    make_service,
) -> None:
    svc = make_service(prediction_ttl_s=60)
    pid = run(svc.predict([ROW]))["predictions"][0]["prediction_id"]
    with pytest.raises(NotFound, match="unknown prediction id"):
        run(svc.feedback([fb("ev-1", "p-nope")], "c"))
    with pytest.raises(Unprocessable, match="label 2 is out of range"):
        run(svc.feedback([fb("ev-2", pid, label=2)], "c"))
    make_service.now[0] += 61
    with pytest.raises(Gone, match="feedback is accepted for 60s"):
        run(svc.feedback([fb("ev-3", pid)], "c"))
    # One bad event refuses the whole batch: nothing of it is logged.
    make_service.now[0] -= 61
    pid2 = run(svc.predict([ROW]))["predictions"][0]["prediction_id"]
    with pytest.raises(NotFound, match="Event 1: unknown"):
        run(svc.feedback([fb("ev-4", pid2), fb("ev-5", "p-nope")], "c"))
    assert make_service.log.read(LABELS_STREAM, "0", 10) == []


def test_a_flooding_client_gets_429_and_others_are_served(make_service) -> None:
    svc = make_service(client_rate_per_s=0.1, client_burst=20)  # a token every 10 s
    pids = [p["prediction_id"] for p in run(svc.predict([ROW] * 30))["predictions"]]
    run(svc.feedback([fb(f"a{i}", pids[i]) for i in range(20)], "flood"))
    with pytest.raises(TooManyRequests) as exc:
        run(svc.feedback([fb("a20", pids[20])], "flood"))
    assert exc.value.retry_after_s > 0 and "retry in" in exc.value.message
    status, _ = run(svc.feedback([fb("b0", pids[21])], "someone-else"))
    assert status == 202


def test_a_trainer_far_behind_or_writes_piling_up_is_a_503(make_service) -> None:
    svc = make_service(max_backlog=3, max_writes_in_flight=1)
    pids = [p["prediction_id"] for p in run(svc.predict([ROW] * 6))["predictions"]]
    run(svc.feedback([fb(f"e{i}", pids[i]) for i in range(4)], "c"))
    svc._backlog = (0, 0.0)  # forget the cached count (it is re-read once a second)
    with pytest.raises(ServiceUnavailable, match="events behind") as exc:
        run(svc.feedback([fb("e4", pids[4])], "c"))
    assert exc.value.retry_after_s >= 1
    make_service.log.commit(LABELS_STREAM, "4")  # the trainer caught up
    svc._backlog = (0, 0.0)
    svc.writes_in_flight = 1  # another batch is still waiting on the log
    with pytest.raises(ServiceUnavailable, match="requests are already waiting"):
        run(svc.feedback([fb("e5", pids[5])], "c"))


def test_concurrent_feedback_shares_one_transaction_and_each_gets_its_own_ack(
    make_service, monkeypatch
) -> None:
    svc = make_service()
    pids = [p["prediction_id"] for p in run(svc.predict([ROW] * 8))["predictions"]]
    calls = []
    real_append = make_service.log.append

    def counting_append(stream, items):
        calls.append(len(items))
        return real_append(stream, items)

    monkeypatch.setattr(make_service.log, "append", counting_append)

    async def burst():
        return await asyncio.gather(
            *(svc.feedback([fb(f"g{i}", pids[i])], f"c{i}") for i in range(8))
        )

    answers = run(burst())
    assert sorted(calls, reverse=True)[0] > 1 and sum(calls) == 8  # grouped, none lost
    offsets = [acks[0]["offset"] for _, acks in answers]
    assert len(set(offsets)) == 8
    assert [acks[0]["event_id"] for _, acks in answers] == [f"g{i}" for i in range(8)]


def test_token_bucket_refills_at_its_rate() -> None:
    buckets = TokenBuckets(rate=10, burst=5, max_clients=2)
    assert buckets.take("a", 5, now=0.0) == 0
    assert buckets.take("a", 1, now=0.0) == pytest.approx(0.1)
    assert buckets.take("a", 1, now=0.2) == 0
    assert buckets.take("a", 6, now=10.0) > 0  # more than the burst never fits at once
    for c in "bcd":
        buckets.take(c, 1, now=0.0)
    assert len(buckets._b) == 2  # bounded: the oldest clients are forgotten


def test_rewards_need_a_known_choice_and_a_value_in_range(make_service) -> None:
    svc = make_service()
    make_service.log.put_records([("c-1", {"x": [0.1, 0.2, 0.3], "action": "bundle"})], 60)
    with pytest.raises(Unprocessable, match="rewards are in"):
        run(svc.reward("r1", "c-1", 1.5, "c"))
    with pytest.raises(NotFound, match="unknown choice id"):
        run(svc.reward("r1", "c-nope", 1.0, "c"))
    status, ack = run(svc.reward("r1", "c-1", 1.0, "c"))
    assert status == 202 and ack["status"] == "logged"
    status, ack = run(svc.reward("r1", "c-1", 1.0, "c"))
    assert status == 200 and ack["duplicate"]


def test_the_log_failing_is_a_503_that_says_retries_are_safe(make_service, monkeypatch) -> None:
    import sqlite3

    svc = make_service()
    pid = run(svc.predict([ROW]))["predictions"][0]["prediction_id"]

    def locked(*a, **k):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(make_service.log, "append", locked)
    with pytest.raises(ServiceUnavailable, match="retries are safe"):
        run(svc.feedback([fb("ev-1", pid)], "c"))
    monkeypatch.setattr(make_service.log, "put_records", locked)
    with pytest.raises(ServiceUnavailable, match="could not record the prediction"):
        run(svc.predict([ROW]))


def test_an_idempotency_key_answers_a_repeat_with_the_first_answer(make_service) -> None:
    """The key is an entry in the log (unique there, like event ids): a repeat gets the first
    answer (202, "logged", same offset) and logs nothing; the key on another body is a 409;
    a request that failed after its key was claimed logs on its retry with the key."""
    svc = make_service()
    pids = [p["prediction_id"] for p in run(svc.predict([ROW, ROW, ROW]))["predictions"]]
    first = run(svc.feedback([fb("k-1", pids[0])], "c", "key-1"))
    again = run(svc.feedback([fb("k-1", pids[0])], "c", "key-1"))
    assert first == again and first[0] == 202 and first[1][0]["status"] == "logged"
    assert make_service.log.backlog(LABELS_STREAM) == 1
    with pytest.raises(Conflict, match="Idempotency-Key 'key-1' was already used"):
        run(svc.feedback([fb("k-1", pids[0], label=0)], "c", "key-1"))
    with pytest.raises(Conflict, match="Idempotency-Key 'key-1' was already used"):
        run(svc.feedback([fb("k-2", pids[1])], "c", "key-1"))
    # Without the key the same repeat is still logged once, and says it is a duplicate.
    assert run(svc.feedback([fb("k-1", pids[0])], "c"))[1][0]["status"] == "duplicate"
    # The log fails after the key is claimed: 503, nothing logged; the retry logs it once.
    real_append, calls = make_service.log.append, []

    def failing_append(stream, items):
        calls.append(stream)
        if stream == LABELS_STREAM and len(calls) == 2:
            raise OSError("disk I/O error")
        return real_append(stream, items)

    svc.log.append = failing_append
    with pytest.raises(ServiceUnavailable):
        run(svc.feedback([fb("k-3", pids[2])], "c", "key-3"))
    assert make_service.log.backlog(LABELS_STREAM) == 1
    retry = run(svc.feedback([fb("k-3", pids[2])], "c", "key-3"))
    assert retry[0] == 202 and retry[1][0]["status"] == "logged"
    assert run(svc.feedback([fb("k-3", pids[2])], "c", "key-3")) == retry
    assert make_service.log.backlog(LABELS_STREAM) == 2


class FakeDeployment:
    """A trainer or bandit policy as the flow sees it: ``(method, *args)`` -> an answer."""

    def __init__(self, answers: dict, delay_s: float = 0.0) -> None:
        self.answers, self.delay_s, self.calls = answers, delay_s, []

    async def __call__(self, method: str, *args):
        self.calls.append((method, *args))
        await asyncio.sleep(self.delay_s)
        answer = self.answers[method]
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_more_rows_than_max_rows_is_a_422(make_service) -> None:
    svc = make_service({"max_rows": 2})
    with pytest.raises(Unprocessable, match="3 rows in one request; send at most 2"):
        run(svc.predict([ROW, ROW, ROW]))
    assert len(run(svc.predict([ROW, ROW]))["predictions"]) == 2


def test_a_bandit_choice_checks_the_context_then_asks_the_policy(make_service) -> None:
    bandit = FakeDeployment({"choose": {"action": "bundle"}, "state": {"plays": 0}})
    svc = make_service({"bandit": bandit, "context_dim": 3})
    with pytest.raises(Unprocessable, match="context has 2 numbers; the bandit takes 3"):
        run(svc.choose([1.0, 2.0]))
    with pytest.raises(Unprocessable):
        run(svc.choose([1.0, math.inf, 0.0]))
    assert bandit.calls == []  # refused before the policy is asked
    assert run(svc.choose([1, -0.5, 0.25])) == {"action": "bundle"}
    assert run(svc.bandit_state()) == {"plays": 0}
    assert bandit.calls == [("choose", [1.0, -0.5, 0.25]), ("state",)]


def test_a_trainer_or_policy_that_does_not_answer_is_a_503_and_the_model_still_reports(
    make_service,
) -> None:
    slow = FakeDeployment({"status": {}, "state": {}}, delay_s=5)
    broken = FakeDeployment({"status": RuntimeError("replica died"), "choose": OSError("gone")})
    svc = make_service({"trainer": slow, "bandit": slow, "call_timeout_s": 0.05})
    with pytest.raises(ServiceUnavailable, match=r"bandit policy did not answer within 0\.05s"):
        run(svc.bandit_state())
    status = run(svc.model_status())  # served on: the trainer reported, not a 503
    assert status["version"] == "v000001" and status["trainer"]["status"] == "unavailable"
    assert "did not answer" in status["trainer"]["message"]
    svc = make_service({"trainer": broken, "bandit": broken})
    with pytest.raises(ServiceUnavailable, match="The bandit policy is unavailable"):
        run(svc.choose([0.0, 0.0, 0.0]))
    assert "replica died" in run(svc.model_status())["trainer"]["message"]
    with pytest.raises(ServiceUnavailable, match="The trainer is unavailable"):
        run(make_service().rollback(None, "no trainer connected"))


def test_model_status_is_the_served_version_and_the_trainers_history(make_service) -> None:
    trainer = FakeDeployment({"status": {"status": "ok", "history": [{"round": 1}]}})
    status = run(make_service({"trainer": trainer}).model_status())
    assert (status["version"], status["baseline_version"]) == ("v000001", "v000001")
    assert status["consumed_offsets"] == {"labels": "0"}
    assert status["metrics_history"] == [{"round": 1}]
    assert status["trainer"] == {"status": "ok"}


def test_rollback_refusals_name_the_case_and_a_rollback_switches_this_replica(
    make_service,
) -> None:
    refused = FakeDeployment({"rollback": {"error": "nothing to roll back to"}})
    svc = make_service({"trainer": refused})
    with pytest.raises(NotFound, match="nothing to roll back to"):
        run(svc.rollback("v000009", "pinned"))
    with pytest.raises(Conflict, match="nothing to roll back to"):
        run(svc.rollback(None, "previous"))
    assert refused.calls == [("rollback", "v000009", "pinned"), ("rollback", None, "previous")]
    clf, _ = make_service.store.load_sklearn(MODEL_NAME, "v000001")
    make_service.store.save_sklearn(MODEL_NAME, "v000002", clf, {"consumed": "7"})
    done = FakeDeployment({"rollback": {"champion": "v000002", "from": "v000001"}})
    svc = make_service({"trainer": done})
    assert run(svc.rollback("v000002", "back")) == {"champion": "v000002", "from": "v000001"}
    assert svc.live.version == "v000002" and svc.live.current[2] == "7"


def test_the_pointer_poll_follows_a_move_without_a_nudge(make_service) -> None:
    svc = make_service()
    clf, _ = make_service.store.load_sklearn(MODEL_NAME, "v000001")
    make_service.store.save_sklearn(MODEL_NAME, "v000002", clf, {"consumed": "3"})
    svc.live.poll(0.02)
    try:
        make_service.log.set_champion("v000002", "promoted")
        deadline = time.monotonic() + 5
        while svc.live.version != "v000002" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert svc.live.version == "v000002"
    finally:
        svc.live.stop()

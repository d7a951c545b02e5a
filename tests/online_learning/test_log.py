"""The feedback log's contract, on SQLite and on a real Redis server started on loopback."""

from __future__ import annotations

import uuid

import pytest

from patterns.online_learning.feedback_log import START, RedisLog, SqliteLog, offset_key


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def make_log(request, tmp_path):
    """A factory: calling it again opens the same log anew, like a restarted process."""
    opened = []
    if request.param == "sqlite":

        def make():
            opened.append(SqliteLog(tmp_path / "log.db"))
            return opened[-1]
    else:
        server = request.getfixturevalue("redis_server")
        prefix = f"t-{uuid.uuid4().hex[:8]}"  # one namespace per test on the shared server

        def make():
            opened.append(RedisLog(server.url, prefix=prefix))
            return opened[-1]

    yield make
    for log in opened:
        log.close()


def ev(i: int, label: int = 1) -> tuple[str, dict]:
    return f"e{i}", {"event_id": f"e{i}", "x": [float(i)], "label": label}


def test_append_is_idempotent_by_event_id(make_log) -> None:
    log = make_log()
    first = log.append("labels", [ev(1), ev(2)])
    assert [a.duplicate for a in first] == [False, False]
    again = log.append("labels", [ev(2), ev(3)])
    assert again[0].duplicate and again[0].same_payload
    assert again[0].offset == first[1].offset and again[0].acked_at == first[1].acked_at
    assert not again[1].duplicate
    changed = log.append("labels", [ev(1, label=0)])[0]
    assert changed.duplicate and not changed.same_payload
    entries = log.read("labels", START, 10)
    assert [e.event_id for e in entries] == ["e1", "e2", "e3"]  # nothing logged twice


def test_read_after_an_offset_tail_and_backlog(make_log) -> None:
    log = make_log()
    acks = log.append("labels", [ev(i) for i in range(10)])
    assert log.backlog("labels") == 10
    batch = log.read("labels", START, 4)
    assert [e.event_id for e in batch] == ["e0", "e1", "e2", "e3"]
    log.commit("labels", batch[-1].offset)
    assert log.backlog("labels") == 6
    rest = log.read("labels", batch[-1].offset, 100)
    assert [e.event_id for e in rest] == [f"e{i}" for i in range(4, 10)]
    assert [e.event_id for e in log.tail("labels", acks[5].offset, 3)] == ["e3", "e4", "e5"]
    assert offset_key(acks[9].offset) > offset_key(acks[8].offset)
    assert log.read("labels", acks[9].offset, 10, block_s=0.1) == []


def test_a_restarted_consumer_gets_unacknowledged_entries_again_and_skips_saved_ones(
    make_log,
) -> None:
    """The exactly-once contract: what a crashed consumer had read but not committed comes
    back; what its saved model already covers (offset <= saved) is skipped."""
    log = make_log()
    acks = log.append("labels", [ev(i) for i in range(6)])
    log.read("labels", START, 6)  # delivered, then the consumer dies before committing
    saved = acks[2].offset  # ...but its model version covering e0..e2 was saved
    restarted = make_log()
    again = restarted.read("labels", saved, 10)
    assert [e.event_id for e in again] == ["e3", "e4", "e5"]
    restarted.commit("labels", again[-1].offset)
    assert restarted.backlog("labels") == 0


def test_prediction_records_and_the_champion_pointer(make_log) -> None:
    log = make_log()
    log.put_records([("p-1", {"x": [1.0], "version": "v000001"})], keep_s=60)
    record, created = log.get_record("p-1")
    assert record["version"] == "v000001" and created > 0
    assert log.get_record("p-nope") is None
    assert log.champion() is None
    log.set_champion("v000001", "initial")
    log.set_champion("v000007", "gate")
    assert log.champion()["version"] == "v000007"
    assert [h["version"] for h in log.champion_history()] == ["v000007", "v000001"]
    assert make_log().champion()["version"] == "v000007"  # durable, seen by a new process
    assert make_log().log_id() == log.log_id()


def test_the_label_log_read_back_lists_each_label_once_in_offset_order(tmp_path) -> None:
    """``label_log``, what reliability/outages.py checks feedback with: every label appended
    (a repeated event id once), oldest first; offsets ordered as numbers, not strings."""
    from patterns.online_learning.feedback_log import Entry
    from patterns.online_learning.label_log import labels, last_offset

    url = f"sqlite:///{tmp_path / 'log.db'}"
    log = SqliteLog(tmp_path / "log.db")
    try:
        assert labels(url) == [] and last_offset([]) == START
        acks = log.append("labels", [ev(i) for i in range(12)] + [ev(3)])
        log.append("other", [ev(99)])
    finally:
        log.close()
    entries = labels(url)
    assert [e.event_id for e in entries] == [f"e{i}" for i in range(12)]
    assert last_offset(entries) == acks[11].offset == "12"  # "9" > "12" as strings
    assert [e.event_id for e in labels(url, limit=2)] == ["e10", "e11"]
    redis_ids = [Entry(o, o, {}) for o in ("1700-9", "1700-10", "999-0")]
    assert last_offset(redis_ids) == "1700-10"

"""The online learner across nodes (issue 24): the trainer's node SIGKILLed under load on a
three-raylet cluster, its log on Redis Streams (``reliability.nodes.lose_trainer_node``; ``make
chaos``'s ``nodes`` scenario runs the same). Marked ``chaos``: a cluster of its own for minutes,
so only ``pytest --chaos -m chaos tests/cluster`` (or ``make chaos``) runs it.

- The trainer starts on a worker node (it prefers the accelerator node, from config alone).
- Its node lost while clients predict and send keyed labels: no 500, no dropped connection, at
  most 1% answered 503 with Retry-After; the trainer runs again on a surviving node.
- Exactly once across the kill: every label answered 202 is in the log once, and the new
  trainer catches up to the last offset having learned or held out each of them once
  (``learned + held_out == logged``: nothing applied twice after the restart, nothing skipped).
"""

from __future__ import annotations

import pytest

from reliability import nodes

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.redis]


@pytest.fixture(scope="module")
def cluster():
    with nodes.online_cluster() as running:
        yield running


def test_the_trainer_starts_on_a_worker_node(cluster) -> None:
    server, _ = cluster
    _, placed = nodes.ready_lines(server, nodes.ONLINE)
    assert placed[nodes.TRAINER] == ["accelerator"], placed
    assert set(placed["OnlineIngress"]) <= {"general"}, placed


def test_losing_the_trainers_node_keeps_serving_and_applies_every_label_once(cluster) -> None:
    server, log_url = cluster
    row = nodes.lose_trainer_node(server, log_url)
    print(row)
    assert row.detail["lost"] == [f"{nodes.ONLINE}:{nodes.TRAINER}"], row
    c = row.detail["counts"]
    assert c["total"] > 50 and c["other_failures"] == 0, row  # no 500, no dropped connection
    assert c["retry_later_503"] <= max(1, c["total"] // 100), row
    w = row.detail["writes"]
    assert w["other"] == [] and w["given_up"] == 0, row
    t = row.detail["trainer"]
    assert t["new_pid"] != t["old_pid"] and t["moved_to"] in ("general", "general-head"), row
    check = row.detail["write_check"]
    assert check["accepted"] > 0 and check["lost"] == 0 and check["duplicated"] == 0, check
    assert check["half_written"] == 0, check
    assert check["trainer_caught_up"], check
    assert check["applied"] == check["logged"], check  # exactly once across the restart
    assert row.met, row

"""Which replicas ``cluster.placement`` would move (no Ray: Serve's details as a dict): a
replica on a node its selector does not match, only while a matching node has room, never
the last running replica, never in a deployment that is not HEALTHY."""

from __future__ import annotations

from typing import Any

from cluster.placement import matches, misplaced
from core.resources import NODE_KIND_LABEL

ACC, GEN = {NODE_KIND_LABEL: "accelerator"}, {NODE_KIND_LABEL: "general"}
NODES = {"a": ACC, "g1": GEN, "g2": GEN}


def details(nodes_of_replicas: list[str], status: str = "HEALTHY") -> dict[str, Any]:
    options = {
        "num_cpus": 0.5,
        "label_selector": {NODE_KIND_LABEL: "accelerator"},
        "fallback_strategy": [{"label_selector": {}}],
    }
    replicas = [
        {"replica_id": f"r{i}", "state": "RUNNING", "node_id": n, "actor_name": f"x#{i}"}
        for i, n in enumerate(nodes_of_replicas)
    ]
    deployment = {
        "status": status,
        "deployment_config": {"ray_actor_options": options},
        "replicas": replicas,
    }
    return {"applications": {"app": {"deployments": {"Model": deployment}}}}


def test_selectors_as_ray_reads_them() -> None:
    assert matches({NODE_KIND_LABEL: "accelerator"}, ACC)
    assert not matches({NODE_KIND_LABEL: "!accelerator"}, ACC)
    assert matches({NODE_KIND_LABEL: "!accelerator"}, {})  # an unlabelled node
    assert matches({NODE_KIND_LABEL: "in(general,accelerator)"}, GEN)
    assert not matches({NODE_KIND_LABEL: "!in(general,accelerator)"}, GEN)


def test_a_replica_off_its_preferred_node_moves_when_that_node_has_room() -> None:
    free = {"a": {"CPU": 3.0}, "g1": {"CPU": 1.0}, "g2": {"CPU": 1.0}}
    found = misplaced(details(["a", "g1"]), NODES, free)
    assert [(c.replica["replica_id"], c.from_kind) for c in found] == [("r1", "general")]
    assert [c.replica["replica_id"] for c in misplaced(details(["g1", "g2"]), NODES, free)] == [
        "r0",
        "r1",
    ]


def test_nothing_moves_without_room_nor_the_last_replica_nor_mid_update() -> None:
    free = {"a": {"CPU": 3.0}, "g1": {"CPU": 1.0}}
    assert misplaced(details(["g1", "g2"]), NODES, {"a": {"CPU": 0.25}}) == []  # no room
    assert misplaced(details(["g1", "g2"]), {"g1": GEN, "g2": GEN}, free) == []  # no such node
    assert misplaced(details(["g1"]), NODES, free) == []  # the last running replica
    assert misplaced(details(["g1", "g2"], "UPDATING"), NODES, free) == []
    starting = details(["g1", "g2"])
    starting["applications"]["app"]["deployments"]["Model"]["replicas"][0]["state"] = "STARTING"
    assert misplaced(starting, NODES, free) == []  # already short of a replica

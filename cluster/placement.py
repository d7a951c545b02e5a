"""Move Serve replicas back to the kind of node they prefer, one at a time.

A model stage prefers the accelerator node and falls back to any node (``core.resources``
writes a ``label_selector`` with a ``fallback_strategy`` into its ``ray_actor_options``). When
the accelerator node is lost, its replicas start again on the general nodes; when an
accelerator node joins again, nothing moves them back: Serve does not rebalance running
replicas. ``rebalance_once`` does, from outside the apps:

- a replica is misplaced when its node's labels do not match its deployment's
  ``label_selector`` while an alive node that matches has room for it (the replica's CPUs,
  GPUs, memory and custom resources free there);
- it is stopped (drained as Serve stops a replica, then ``ray.kill`` of the replica actor)
  and Serve starts its replacement, which the
  preference now places on the matching node; the next move waits until that replacement runs,
  so a deployment never loses more than one replica to a move;
- never the last running replica of a deployment, never one of a deployment that is not
  HEALTHY (starting, updating, already short of a replica), and nothing when no matching node
  has room. A stopped model replica costs no request: ingresses call models through
  ``core.resilience.call_surviving_replica``, which makes the call again on a survivor.

    python -m cluster.placement [--address auto] [--watch SECONDS]

once, or every SECONDS, against a running cluster (on KubeRay: a sidecar of the head, or a
CronJob, with the cluster's address). ``scripts.serve_all --nodes N`` runs it every few seconds.
It reads Serve's instance details from the controller (what ``serve status`` shows) and each
node's free resources from the GCS.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.resources import NODE_KIND_LABEL

logger = logging.getLogger("cluster.placement")

NAMESPACE = "serve"
CONTROLLER = "SERVE_CONTROLLER_ACTOR"


@dataclass
class Move:
    """One replica stopped so that Serve starts it again where it prefers to run."""

    app: str
    deployment: str
    replica_id: str
    from_kind: str
    to_kind: str | None  # where the replacement landed (None: not running within the timeout)
    seconds: float
    preferred: bool  # the replacement's node matches the deployment's selector

    def line(self) -> str:
        where = self.to_kind or "NOT RUNNING AGAIN"
        return (
            f"moved a {self.app}/{self.deployment} replica from the {self.from_kind} node to "
            f"the {where} node ({self.seconds:.1f} s)"
        )


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether node ``labels`` satisfy a Ray label selector (``v``, ``!v``, ``in(a,b)``,
    ``!in(a,b)`` per key)."""
    for key, want in selector.items():
        negated = want.startswith("!")
        expr = want[1:] if negated else want
        if expr.startswith("in(") and expr.endswith(")"):
            values = {v.strip() for v in expr[3:-1].split(",")}
        else:
            values = {expr}
        if (labels.get(key) in values) == negated:
            return False
    return True


def demand(options: dict[str, Any]) -> dict[str, float]:
    """The resources one replica reserves, from its deployment's ``ray_actor_options``."""
    need = {
        "CPU": float(options.get("num_cpus", 1) if options.get("num_cpus") is not None else 1),
        "GPU": float(options.get("num_gpus") or 0),
        "memory": float(options.get("memory") or 0),
    }
    need.update({k: float(v) for k, v in (options.get("resources") or {}).items()})
    return {k: v for k, v in need.items() if v > 0}


def has_room(free: dict[str, float], need: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in need.items())


def serve_details() -> dict[str, Any]:
    """Serve's instance details from the controller: apps, deployments (their configs with
    ``ray_actor_options``), replicas with state, node and actor name."""
    import ray

    controller = ray.get_actor(CONTROLLER, namespace=NAMESPACE)
    return dict(ray.get(controller.get_serve_instance_details.remote(), timeout=30))


def alive_nodes() -> dict[str, dict[str, str]]:
    """Labels of each alive node, by node id."""
    import ray

    return {n["NodeID"]: dict(n.get("Labels") or {}) for n in ray.nodes() if n["Alive"]}


def free_resources() -> dict[str, dict[str, float]]:
    """Free resources of each alive node, by node id (the GCS's view, as the scheduler's)."""
    from ray._private.state import available_resources_per_node

    return {k: dict(v) for k, v in available_resources_per_node().items()}


@dataclass
class Candidate:
    app: str
    deployment: str
    replica: dict[str, Any]
    selector: dict[str, str]
    from_kind: str


def kind_of(labels: dict[str, str] | None) -> str:
    return "gone" if labels is None else labels.get(NODE_KIND_LABEL, "unlabelled")


def misplaced(
    details: dict[str, Any], nodes: dict[str, dict[str, str]], free: dict[str, dict[str, float]]
) -> list[Candidate]:
    """Running replicas on a node their deployment's selector does not match, while an alive
    node that matches has room for one, in deployments that can spare one."""
    out: list[Candidate] = []
    for app, app_detail in sorted((details.get("applications") or {}).items()):
        for name, dep in sorted((app_detail.get("deployments") or {}).items()):
            options = (dep.get("deployment_config") or {}).get("ray_actor_options") or {}
            selector = options.get("label_selector") or {}
            replicas = dep.get("replicas") or []
            running = [r for r in replicas if r.get("state") == "RUNNING"]
            # a settled deployment with a replica to spare: never its last, never mid-update
            if not selector or dep.get("status") != "HEALTHY" or len(running) < 2:
                continue
            if len(running) != len(replicas):
                continue
            need = demand(options)
            room = [
                nid
                for nid, labels in nodes.items()
                if matches(selector, labels) and has_room(free.get(nid, {}), need)
            ]
            if not room:
                continue
            for r in running:
                labels = nodes.get(r.get("node_id") or "")
                if labels is not None and not matches(selector, labels):
                    out.append(Candidate(app, name, r, selector, kind_of(labels)))
    return out


def move(c: Candidate, *, timeout_s: float = 120.0, drain_s: float = 15.0) -> Move:
    """Stop ``c``'s replica (drained first, for at most ``drain_s``) and wait until Serve runs
    its replacement; where it landed."""
    import ray

    t0 = time.monotonic()
    before = {
        r["replica_id"]
        for r in serve_details()["applications"][c.app]["deployments"][c.deployment]["replicas"]
        if r.get("state") == "RUNNING"
    }
    actor = ray.get_actor(c.replica["actor_name"], namespace=NAMESPACE)
    # What Serve's controller does before it kills a replica it stops: the replica finishes
    # what it serves, then turns new calls away (routers send them to another replica, no
    # error). Without it, calls routed to it in the moment between its death and the routers
    # hearing of it fail as ActorUnavailableError. Bounded: then it is killed all the same.
    try:
        ray.get(actor.perform_graceful_shutdown.remote(), timeout=drain_s)
    except Exception as exc:
        logger.info("replica %s did not drain in %s s: %s", c.replica["replica_id"], drain_s, exc)
    ray.kill(actor, no_restart=True)
    landed: str | None = None
    preferred = False
    while time.monotonic() - t0 < timeout_s:
        time.sleep(1.0)
        try:
            dep = serve_details()["applications"][c.app]["deployments"][c.deployment]
            nodes = alive_nodes()
        except Exception as exc:  # the controller busy replacing it, a GCS blip: ask again
            logger.debug("no details yet: %s", exc)
            continue
        running = [r for r in dep.get("replicas") or [] if r.get("state") == "RUNNING"]
        ids = {r["replica_id"] for r in running}
        new = [r for r in running if r["replica_id"] not in before]
        if c.replica["replica_id"] not in ids and len(ids) >= len(before) and new:
            labels = nodes.get(new[0].get("node_id") or "")
            landed, preferred = kind_of(labels), labels is not None and matches(c.selector, labels)
            break
    return Move(
        c.app,
        c.deployment,
        c.replica["replica_id"],
        c.from_kind,
        landed,
        round(time.monotonic() - t0, 1),
        preferred,
    )


def rebalance_once(
    *,
    limit: int | None = None,
    timeout_s: float = 120.0,
    report: Callable[[Move], None] | None = None,
) -> list[Move]:
    """Move misplaced replicas back, one at a time (at most ``limit``); the moves made.
    State is read again before each move; a replacement that did not run again, or ran on a
    node its selector does not match, ends the round (no churn when the room was gone)."""
    moves: list[Move] = []
    while limit is None or len(moves) < limit:
        candidates = misplaced(serve_details(), alive_nodes(), free_resources())
        if not candidates:
            break
        m = move(candidates[0], timeout_s=timeout_s)
        moves.append(m)
        if report is not None:
            report(m)
        if not m.preferred:
            break
    return moves


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="auto", help="the Ray cluster (ray.init address)")
    parser.add_argument(
        "--watch", type=float, metavar="SECONDS", help="run every SECONDS (default: once)"
    )
    args = parser.parse_args(argv)
    import ray

    ray.init(address=args.address, namespace=NAMESPACE, logging_level="WARNING")
    while True:
        try:
            rebalance_once(report=lambda m: print(f"[placement] {m.line()}", flush=True))
        except Exception as exc:  # a controller or GCS restarting: the next round tries again
            if args.watch is None:
                raise
            print(f"[placement] skipped a round: {exc}", flush=True)
        if args.watch is None:
            return 0
        time.sleep(args.watch)


if __name__ == "__main__":
    raise SystemExit(main())

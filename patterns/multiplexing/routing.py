"""Tenant-affinity routing: a cold id keeps to one replica, a hot id spreads over k.

Serve's default router for multiplexed requests (``PowerOfTwoChoicesRequestRouter`` with its
``MultiplexMixin``, Ray 2.60) prefers a replica that already reports the id, and sends a new
id to the replicas holding the fewest models. Two things follow when models do not all fit:
the "holds it" signal lags (replicas push their ids to the controller, the controller to the
routers), so a burst for a cold id lands on whichever replica is least loaded and loads it
there too; and when a replica evicts an id the next request goes wherever the model count is
lowest, so over time every replica caches a bit of everything. This router decides from the
id alone, with no lagging signal:

- **Rendezvous hashing** (highest random weight): each (id, replica) pair gets a score from
  ``sha256``; an id's replicas in score order are its preference list. Every router process
  computes the same list from the same replica set, with nothing shared between them.
- **Spread by measured rate**: the router meters each id's request rate (exponentially
  decayed, half-life ``rate_half_life_s``) and sends it to the first
  ``k = ceil(rate / target_rps_per_replica)`` replicas of its list (at most ``max_spread``);
  Serve's own probe then picks the shortest queue among those k. A cold id (k = 1) lives on
  one replica; a hot one is cached on k, each still a stable choice, so a replica's cache
  sees a fixed share of the ids instead of all of them. A hot id's first k-1 replicas are the
  ones it already had: growing k adds a copy, it never moves the first.
- **A replica lost**: only the ids whose first k replicas included it move, each to its
  next replica in score order. Those ids are spread over all the survivors (the scores are
  independent per replica), so the reloads are the lost replica's share, split evenly,
  not a thundering herd on one neighbour; ids elsewhere keep their replica and their cache.
- **Known hot ids** (``hot_model_ids`` in config.yaml, prewarmed on every replica) start
  spread over ``hot_slots`` replicas, before their rate is measured.
- **Backpressure beats affinity**: the other replicas are a second rank, used only when the
  first k refuse (their queues are full), as Serve's routers do.

The rates are this router's own view: each ingress replica (and each handle) routes its share
of the traffic, so with n ingress replicas ``target_rps_per_replica`` is per router, i.e. a
replica's target divided by n. Hot ids sent as ``<id>#<slot>`` (ids.py) count as ``<id>``:
this router does the spreading that the slots do under Serve's default router.

``AffinityPolicy`` is the decision, tested without Serve; ``TenantAffinityRouter`` is the thin
Serve ``RequestRouter`` around it, selected in config.yaml by ``forecast.routing: affinity``.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from patterns.multiplexing.ids import SLOT_SEPARATOR

ROUTER_PATH = "patterns.multiplexing.routing.TenantAffinityRouter"
AFFINITY_DEFAULTS: dict[str, Any] = {
    "target_rps_per_replica": 20.0,
    "max_spread": 2,
    "rate_half_life_s": 10.0,
    "hot_ids": (),
    "hot_spread": 1,
}  # what AffinityArgs and ForecastArgs (deployments.py) default to


def score(model_id: str, replica: str) -> int:
    """The rendezvous score of ``replica`` for ``model_id`` (``hash()`` is salted per process:
    routers in different processes would disagree)."""
    digest = hashlib.sha256(f"{model_id}\x00{replica}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def preference(model_id: str, replicas: Sequence[str]) -> list[str]:
    """``replicas`` in the order ``model_id`` prefers them (highest score first)."""
    return sorted(replicas, key=lambda r: score(model_id, r), reverse=True)


class RateMeter:
    """Requests per second per id, exponentially decayed; bounded to ``max_ids`` ids."""

    def __init__(self, half_life_s: float, max_ids: int = 10_000) -> None:
        if half_life_s <= 0:
            raise ValueError("half_life_s must be > 0")
        self.tau = half_life_s / math.log(2)
        self.max_ids = max_ids
        self._rates: dict[str, tuple[float, float]] = {}  # id -> (rate at t, t)

    def rate(self, key: str, now: float) -> float:
        rate, t = self._rates.get(key, (0.0, now))
        return rate * math.exp(-(now - t) / self.tau)

    def add(self, key: str, now: float) -> float:
        """Count one request for ``key``; returns its rate including it."""
        rate = self.rate(key, now) + 1.0 / self.tau
        self._rates[key] = (rate, now)
        if len(self._rates) > self.max_ids:
            self._prune(now)
        return rate

    def _prune(self, now: float) -> None:
        """Drop the slowest half: an id that comes back starts cold again (k = 1)."""
        by_rate = sorted(self._rates, key=lambda k: self.rate(k, now))
        for key in by_rate[: len(by_rate) // 2]:
            del self._rates[key]

    def __len__(self) -> int:
        return len(self._rates)


class AffinityPolicy:
    """Which replicas an id goes to: its first k by rendezvous score, k from its rate."""

    def __init__(
        self,
        target_rps_per_replica: float,
        max_spread: int,
        rate_half_life_s: float,
        hot_ids: Sequence[str] = (),
        hot_spread: int = 1,
    ) -> None:
        if target_rps_per_replica <= 0 or max_spread < 1 or hot_spread < 1:
            raise ValueError("target_rps_per_replica must be > 0, the spreads >= 1")
        self.target = target_rps_per_replica
        self.max_spread = max_spread
        # ids known to be hot (config's hot_model_ids, prewarmed on every replica): spread
        # over hot_spread replicas from their first request, before any rate is measured
        self.hot = frozenset(hot_ids)
        self.hot_spread = hot_spread
        self.meter = RateMeter(rate_half_life_s)
        self._ranked: dict[str, list[str]] = {}  # id -> preference, for one replica set
        self._replica_set: frozenset[str] = frozenset()

    @staticmethod
    def tenant(serve_id: str) -> str:
        return serve_id.partition(SLOT_SEPARATOR)[0]

    def spread(self, rate: float, n_replicas: int) -> int:
        """k: how many replicas an id at ``rate`` requests/s is spread over."""
        return max(1, min(n_replicas, self.max_spread, math.ceil(rate / self.target)))

    def record(self, serve_id: str, now: float) -> float:
        return self.meter.add(self.tenant(serve_id), now)

    def rank(
        self, serve_id: str, replicas: Sequence[str], now: float
    ) -> tuple[list[str], list[str]]:
        """(the id's k replicas, the others in its order): Serve's first and second rank."""
        replica_set = frozenset(replicas)
        if replica_set != self._replica_set:  # a replica came or went: rank afresh
            self._ranked.clear()
            self._replica_set = replica_set
        model_id = self.tenant(serve_id)
        order = self._ranked.get(model_id)
        if order is None:
            if len(self._ranked) >= 100_000:
                self._ranked.clear()
            order = self._ranked[model_id] = preference(model_id, sorted(replica_set))
        k = self.spread(self.meter.rate(model_id, now), len(order))
        if model_id in self.hot:
            k = max(k, min(self.hot_spread, len(order)))
        return order[:k], order[k:]


class TenantAffinityRouter(RequestRouter):
    """Serve's ``RequestRouter`` over ``AffinityPolicy`` (kwargs: ``target_rps_per_replica``,
    ``max_spread``, ``rate_half_life_s``; see config.yaml). Requests without a multiplexed
    model id go to any replica, least queued first."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.policy = AffinityPolicy(**AFFINITY_DEFAULTS)

    def initialize_state(self, **kwargs: Any) -> None:
        self.policy = AffinityPolicy(**{**AFFINITY_DEFAULTS, **kwargs})

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        model_id = pending_request.metadata.multiplexed_model_id if pending_request else ""
        if not model_id:
            return [candidate_replicas]
        # Sleep between rounds when every replica refused (full queues), not spin.
        pending_request.routing_context.should_backoff = True  # type: ignore[union-attr]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        first, rest = self.policy.rank(model_id, list(by_id), time.monotonic())
        return [[by_id[r] for r in first], [by_id[r] for r in rest]]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: Any, result: Any
    ) -> None:
        """Count the request once it is placed (retries under backpressure count once)."""
        model_id = pending_request.metadata.multiplexed_model_id
        if model_id:
            self.policy.record(model_id, time.monotonic())

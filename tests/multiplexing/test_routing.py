"""Tenant-affinity routing decided without Serve (routing.py), and what it does to the replica
caches under a Zipf trace: each cold id cached on one replica, a hot id on k, a lost replica's
ids moved evenly with no other id moving."""

import asyncio
import math
from collections import Counter

import numpy as np
import pytest

from patterns.multiplexing.cache import ModelCache
from patterns.multiplexing.routing import AffinityPolicy, RateMeter, preference

REPLICAS = ["r-a", "r-b", "r-c", "r-d"]
IDS = [f"store-{i:04d}" for i in range(1, 1001)]


def _policy(**kw) -> AffinityPolicy:
    return AffinityPolicy(**{"target_rps_per_replica": 10.0, "max_spread": 3,
                             "rate_half_life_s": 5.0, **kw})  # fmt: skip


def _drive(policy: AffinityPolicy, model_id: str, rps: float, seconds: float, t0: float = 0.0):
    t = t0
    for _ in range(int(rps * seconds)):
        t += 1.0 / rps
        policy.record(model_id, t)
    return t


def test_a_cold_id_keeps_to_one_replica_the_same_in_every_router() -> None:
    a, b = _policy(), _policy()  # two routers (two ingress replicas): nothing shared
    first = a.rank("store-0042", REPLICAS, 0.0)[0]
    assert len(first) == 1
    for t in range(50):  # 1 request/s stays under the target: k stays 1
        a.record("store-0042", float(t))
        assert a.rank("store-0042", REPLICAS, float(t))[0] == first
    assert b.rank("store-0042", list(reversed(REPLICAS)), 0.0)[0] == first  # order-free
    spread = Counter(a.rank(m, REPLICAS, 0.0)[0][0] for m in IDS)
    assert min(spread.values()) > 200  # 1,000 ids over 4 replicas, about 250 each


def test_a_hot_id_spreads_by_its_rate_and_keeps_its_first_replica() -> None:
    policy = _policy()
    cold_choice = policy.rank("store-0001", REPLICAS, 0.0)[0]
    t = _drive(policy, "store-0001", rps=25, seconds=30)  # 25/s at 10/s per replica -> 3
    first, rest = policy.rank("store-0001", REPLICAS, t)
    assert len(first) == 3 and first[0] == cold_choice[0] and len(rest) == 1
    assert first + rest == preference("store-0001", REPLICAS)
    t = _drive(policy, "store-0001", rps=15, seconds=30, t0=t)  # 15/s -> 2
    assert policy.rank("store-0001", REPLICAS, t)[0] == first[:2]
    quiet = t + 60  # twelve half-lives of silence: cold again
    assert policy.rank("store-0001", REPLICAS, quiet)[0] == first[:1]
    # slots from the ingress (<id>#<slot>) are one tenant to this router
    assert policy.rank("store-0001#1", REPLICAS, quiet)[0] == first[:1]
    with pytest.raises(ValueError):
        _policy(max_spread=0)
    # an id the config names hot is spread from its first request, before any rate
    known = _policy(hot_ids=["store-0009"], hot_spread=2)
    assert known.rank("store-0009", REPLICAS, 0.0)[0] == preference("store-0009", REPLICAS)[:2]
    assert len(known.rank("store-0010", REPLICAS, 0.0)[0]) == 1


def test_a_lost_replica_moves_only_its_ids_spread_over_the_survivors() -> None:
    policy = _policy()
    before = {m: policy.rank(m, REPLICAS, 0.0)[0][0] for m in IDS}
    survivors = [r for r in REPLICAS if r != "r-c"]
    after = {m: policy.rank(m, survivors, 0.0)[0][0] for m in IDS}
    moved = [m for m in IDS if before[m] != after[m]]
    assert all(before[m] == "r-c" for m in moved) and len(moved) == Counter(before.values())["r-c"]
    # each survivor takes about a third of the lost replica's ids: no herd on one neighbour
    landed = Counter(after[m] for m in moved)
    assert set(landed) == set(survivors) and max(landed.values()) < 0.45 * len(moved)
    # a replica added back takes about a fifth of the ids from every other replica
    grown = {m: policy.rank(m, [*REPLICAS, "r-e"], 0.0)[0][0] for m in IDS}
    changed = [m for m in IDS if grown[m] != before[m]]
    assert all(grown[m] == "r-e" for m in changed) and 140 < len(changed) < 260


def test_the_rate_meter_decays_and_stays_bounded() -> None:
    meter = RateMeter(half_life_s=10.0, max_ids=100)
    for i in range(100):  # 10/s for 10 s
        meter.add("hot", i / 10)
    assert 4.5 < meter.rate("hot", 10.0) < 5.5  # one half-life in: half the true rate
    assert math.isclose(meter.rate("hot", 20.0), meter.rate("hot", 10.0) / 2, rel_tol=1e-9)
    for i in range(500):
        meter.add(f"cold-{i}", 10.0)
    assert len(meter) <= 100 and meter.rate("hot", 10.0) > 4.5  # the slow ones are dropped


def _zipf(n: int, s: float, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(IDS) + 1) ** s
    return [IDS[k] for k in rng.choice(len(IDS), size=n, p=p / p.sum())]


def _replay(trace: list[str], route, max_models: int) -> list[ModelCache]:
    """The trace through two replicas' caches (one request at a time), ``route`` choosing."""

    async def load(key: str) -> str:
        return key

    caches = [ModelCache(load, lambda _v: 1, max_models=max_models, max_bytes=1 << 30)
              for _ in range(2)]  # fmt: skip

    async def run() -> None:
        for i, model_id in enumerate(trace):
            await caches[route(i, model_id)].get(model_id)

    asyncio.run(run())
    return caches


def test_affinity_caches_each_cold_id_once_and_the_hot_one_on_both_without_thrash() -> None:
    trace = _zipf(20_000, s=1.1)
    rps = 300
    policy = AffinityPolicy(target_rps_per_replica=30.0, max_spread=2, rate_half_life_s=5.0)
    names = ["replica-0", "replica-1"]
    turn = Counter()

    def affinity(i: int, model_id: str) -> int:
        now = i / rps  # 300 requests/s: the top id (~13%) at ~40/s, over the 30/s target
        first, _ = policy.rank(model_id, names, now)
        policy.record(model_id, now)
        turn[model_id] += 1
        return names.index(first[turn[model_id] % len(first)])  # Serve picks among the k

    caches = _replay(trace, affinity, max_models=100)  # each replica: a tenth of the ids
    loads = [c.stats.loads_by_id for c in caches]
    both = [m for m in set(trace) if loads[0][m] and loads[1][m]]
    hot = policy.spread(policy.meter.rate("store-0001", len(trace) / rps), 2)
    assert hot == 2 and both and set(both) <= {"store-0001", "store-0002", "store-0003"}
    # the hot ids are loaded once per replica: shared, never thrashing between them
    assert all(loads[0][m] == 1 and loads[1][m] == 1 for m in both), both
    for c in caches:  # both bounds held throughout; every miss was one load
        assert len(c) <= 100 and c.stats.misses == sum(c.stats.loads_by_id.values())
    affinity_hits = sum(c.stats.hits for c in caches) / len(trace)
    rng = np.random.default_rng(1)
    random_caches = _replay(trace, lambda i, m: int(rng.integers(2)), max_models=100)
    random_hits = sum(c.stats.hits for c in random_caches) / len(trace)
    assert affinity_hits > random_hits + 0.05, (affinity_hits, random_hits)

"""The contextual bandit without Serve: it learns which offer suits which context."""

from __future__ import annotations

import numpy as np

from patterns.online_learning.bandit import (
    ACTIONS,
    BanditParams,
    LinearThompsonSampler,
    OfferSimulator,
)


def play(n: int, start: int = 0) -> tuple[LinearThompsonSampler, float, float]:
    world = OfferSimulator()
    bandit = LinearThompsonSampler(BanditParams())
    rng = np.random.default_rng(7)
    fixed = world.best_fixed_action(5000)
    got = best = 0.0
    for i in range(start, start + n):
        ctx = world.context(i)
        a, _ = bandit.choose(ctx, rng)
        r = world.reward(i, a)
        bandit.update(ctx, a, r)
        got += r
        best += world.reward(i, fixed)
    return bandit, got, best


def test_it_beats_the_best_fixed_offer_and_learns_what_suits_whom() -> None:
    bandit, got, best_fixed = play(1500)
    assert got > best_fixed * 1.1, (got, best_fixed)
    # Price-sensitive customers (high x0) get the discount; far-away ones free shipping.
    assert ACTIONS[int(np.argmax(bandit.expected([2.0, -1.0, 0.0])))] == "discount"
    assert ACTIONS[int(np.argmax(bandit.expected([-1.0, 2.0, 0.0])))] == "free_shipping"
    assert ACTIONS[int(np.argmax(bandit.expected([-1.5, -1.5, 0.0])))] == "bundle"


def test_state_round_trips_through_safetensors_exactly() -> None:
    from safetensors.numpy import load, save

    bandit, _, _ = play(200)
    arrays = {k: np.ascontiguousarray(v) for k, v in bandit.to_arrays().items()}
    back = LinearThompsonSampler.from_arrays(BanditParams(), load(save(arrays)))
    ctx = [0.3, -0.2, 1.0]
    assert back.expected(ctx) == bandit.expected(ctx)
    assert back.summary() == bandit.summary()

"""A contextual bandit: linear Thompson sampling in numpy, one Bayesian linear model per action.

For action ``a`` the expected reward is modelled as ``theta_a . [1, context]``. With prior
``theta_a ~ N(0, I / l2)`` and rewards seen so far, the posterior is ``N(B_a^-1 f_a,
v^2 B_a^-1)`` with ``B_a = l2 I + sum x x^T`` and ``f_a = sum r x``. ``choose`` draws one
``theta_a`` per action from its posterior and plays the action whose draw scores the context
highest: uncertain actions get tried, good ones get played, and because each action has its
own weights the choice depends on the context (what ``-q UA`` buys in vowpalwabbit).

The state is a handful of arrays (``B``, ``f``, counts) and is saved as safetensors in the
core model store with the reward-log offset it has consumed; the posterior is a sum over
events, so replaying the log after that offset rebuilds it exactly.

``OfferSimulator`` is the world the client, the tests and the benchmark play against: three
offers whose click probability depends on a 3-number context, each best for some customers.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, Field

BANDIT_NAME = "online-bandit"
ACTIONS = ("discount", "free_shipping", "bundle")
CONTEXT_DIM = 3


class BanditParams(BaseModel):
    actions: list[str] = Field(default_factory=lambda: list(ACTIONS), min_length=2)
    context_dim: int = Field(default=CONTEXT_DIM, ge=1, le=64)
    l2: float = Field(default=1.0, gt=0)  # prior precision
    # Posterior scale: higher explores longer. 0.5 suits rewards in [0, 1].
    exploration: float = Field(default=0.5, gt=0, le=10)


def _seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


class LinearThompsonSampler:
    def __init__(self, params: BanditParams) -> None:
        self.params = params
        k, d = len(params.actions), params.context_dim + 1
        self.B = np.stack([np.eye(d) * params.l2 for _ in range(k)])
        self.f = np.zeros((k, d))
        self.counts = np.zeros(k, dtype=np.int64)
        self.reward_sum = np.zeros(k)

    @property
    def actions(self) -> list[str]:
        return self.params.actions

    def _x(self, context: Sequence[float]) -> np.ndarray:
        return np.concatenate([[1.0], np.asarray(context, dtype=np.float64)])

    def choose(self, context: Sequence[float], rng: np.random.Generator) -> tuple[int, list[float]]:
        x = self._x(context)
        scores = []
        for a in range(len(self.actions)):
            cov = np.linalg.inv(self.B[a])
            mean = cov @ self.f[a]
            chol = np.linalg.cholesky(self.params.exploration**2 * cov)
            theta = mean + chol @ rng.standard_normal(len(x))
            scores.append(float(theta @ x))
        return int(np.argmax(scores)), scores

    def expected(self, context: Sequence[float]) -> list[float]:
        """Posterior mean reward of each action for this context (no sampling)."""
        x = self._x(context)
        return [float(np.linalg.solve(self.B[a], self.f[a]) @ x) for a in range(len(self.actions))]

    def update(self, context: Sequence[float], action: int, reward: float) -> None:
        x = self._x(context)
        self.B[action] += np.outer(x, x)
        self.f[action] += reward * x
        self.counts[action] += 1
        self.reward_sum[action] += reward

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"B": self.B, "f": self.f, "counts": self.counts, "reward_sum": self.reward_sum}

    @classmethod
    def from_arrays(
        cls, params: BanditParams, arrays: dict[str, np.ndarray]
    ) -> LinearThompsonSampler:
        bandit = cls(params)
        if arrays["B"].shape != bandit.B.shape:
            raise ValueError(
                f"saved bandit has shape {arrays['B'].shape}, the configured one "
                f"{bandit.B.shape}: actions or context size changed"
            )
        bandit.B = arrays["B"].astype(np.float64)
        bandit.f = arrays["f"].astype(np.float64)
        bandit.counts = arrays["counts"].astype(np.int64)
        bandit.reward_sum = arrays["reward_sum"].astype(np.float64)
        return bandit

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            name: {
                "plays": int(self.counts[a]),
                "mean_reward": round(float(self.reward_sum[a] / self.counts[a]), 4)
                if self.counts[a]
                else 0.0,
            }
            for a, name in enumerate(self.actions)
        }


# ------------------------------------------------------------------------------ the world
@dataclass(frozen=True)
class OfferSimulator:
    """Click probability ``sigmoid(w_a . [1, context])`` for each offer; context ~ N(0, I).

    ``discount`` wins for customers with a high first feature (price sensitive),
    ``free_shipping`` for a high second one (far away), ``bundle`` when both are low.
    """

    seed: str = "online-bandit/v1"
    weights: tuple[tuple[float, ...], ...] = (
        (-1.0, 2.0, 0.0, 0.0),
        (-1.0, 0.0, 2.0, 0.0),
        (-0.6, -1.0, -1.0, 0.5),
    )

    def context(self, i: int) -> list[float]:
        rng = np.random.default_rng(_seed(f"{self.seed}/ctx/{i}"))
        return [float(v) for v in rng.standard_normal(CONTEXT_DIM)]

    def probabilities(self, context: Sequence[float]) -> list[float]:
        x = np.concatenate([[1.0], np.asarray(context, dtype=np.float64)])
        return [1.0 / (1.0 + math.exp(-float(np.dot(w, x)))) for w in self.weights]

    def reward(self, i: int, action: int) -> float:
        """The reward of playing ``action`` on context ``i`` (deterministic per (i, action))."""
        rng = np.random.default_rng(_seed(f"{self.seed}/reward/{i}/{action}"))
        return float(rng.random() < self.probabilities(self.context(i))[action])

    def best_fixed_action(self, n: int = 20_000) -> int:
        means = np.mean([self.probabilities(self.context(i)) for i in range(n)], axis=0)
        return int(np.argmax(means))

"""A labelled stream whose concept drifts at known points (rotating hyperplane, abrupt).

Each event has ``N_FEATURES`` features drawn from a standard normal distribution. Its label
is 1 when the point lies on the positive side of the current concept's hyperplane,
``cos(a) * x0 + sin(a) * x1 > 0``, and 0 otherwise; features x2..x4 are distractors. A share
``noise`` of labels is flipped (so even a perfect model scores about ``1 - noise``).

The concept changes every ``drift_every`` events, cycling through ``angles_deg``:

    events [0, d)     concept 0   a =   0 deg   the initial champion is trained here
    events [d, 2d)    concept 1   a = 120 deg   a frozen concept-0 model scores ~1/3
    events [2d, 3d)   concept 2   a = 240 deg   frozen ~1/3
    events [3d, 4d)   concept 3   a =  60 deg   frozen ~2/3
    then concept 0 again, and so on.

For an isotropic distribution a model whose hyperplane is off by angle t scores 1 - t/180
(before label noise), which is why a frozen model visibly loses accuracy after each drift
while a model that keeps learning recovers.

Every event is a pure function of ``(seed, index)`` (seeded through ``hashlib``, never
``hash()``), so the client, the benchmark, the artifacts and the tests replay the same stream.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

N_FEATURES = 5
CLASSES = (0, 1)
DEFAULT_SEED = "online-learning/v1"
DEFAULT_ANGLES_DEG = (0.0, 120.0, 240.0, 60.0)


def _rng(seed: str, index: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}/{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


@dataclass(frozen=True)
class DriftingStream:
    seed: str = DEFAULT_SEED
    drift_every: int = 2000  # events per concept
    angles_deg: tuple[float, ...] = DEFAULT_ANGLES_DEG
    noise: float = 0.05  # share of flipped labels

    def concept_at(self, index: int) -> int:
        return (index // self.drift_every) % len(self.angles_deg)

    def drift_points(self, n_events: int) -> list[int]:
        return list(range(self.drift_every, n_events, self.drift_every))

    def weights(self, concept: int) -> np.ndarray:
        a = math.radians(self.angles_deg[concept])
        w = np.zeros(N_FEATURES)
        w[0], w[1] = math.cos(a), math.sin(a)
        return w

    def event(self, index: int) -> tuple[list[float], int, int]:
        """Features, label and concept of event ``index``."""
        rng = _rng(self.seed, index)
        x = rng.standard_normal(N_FEATURES)
        concept = self.concept_at(index)
        label = int(float(x @ self.weights(concept)) > 0)
        if rng.random() < self.noise:
            label = 1 - label
        return [float(v) for v in x], label, concept

    def batch(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Events ``start .. start + n - 1`` as arrays (features, labels, concepts)."""
        xs, ys, cs = [], [], []
        for i in range(start, start + n):
            x, y, c = self.event(i)
            xs.append(x)
            ys.append(y)
            cs.append(c)
        return np.asarray(xs), np.asarray(ys, dtype=np.int64), np.asarray(cs, dtype=np.int64)

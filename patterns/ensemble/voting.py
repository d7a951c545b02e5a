"""How member answers become one answer: hard, soft and weighted voting, plus the cascade rule.

Pure functions over arrays so the app and the offline evaluation (artifacts.py) use the same
code: the accuracy reported in the README is the accuracy of what the app does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np

VotingMode = Literal["hard", "soft", "weighted"]


def aggregate(
    probs: Mapping[str, np.ndarray],
    mode: VotingMode,
    weights: Mapping[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(classes, P(benign)) per row from the members that answered.

    - soft: mean probability; class = p >= 0.5.
    - weighted: weight-averaged probability (weights from config, e.g. held-out accuracy).
    - hard: majority of member classes; a tie falls back to the soft vote, and the returned
      probability is the share of members voting benign.
    """
    if not probs:
        raise ValueError("no member answered")
    names = sorted(probs)
    p = np.stack([np.asarray(probs[n], dtype=np.float64) for n in names])  # members x rows
    if mode == "soft":
        proba = p.mean(axis=0)
        return (proba >= 0.5).astype(np.int64), proba
    if mode == "weighted":
        w = np.array([float((weights or {}).get(n, 1.0)) for n in names])
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError("weights must be non-negative and not all zero")
        proba = (w[:, None] * p).sum(axis=0) / w.sum()
        return (proba >= 0.5).astype(np.int64), proba
    if mode == "hard":
        votes = (p >= 0.5).astype(np.int64)
        share = votes.mean(axis=0)
        classes = np.where(share > 0.5, 1, np.where(share < 0.5, 0, (p.mean(0) >= 0.5)))
        return classes.astype(np.int64), share
    raise ValueError(f"unknown voting mode {mode!r}")


def confident_mask(gate_proba: np.ndarray, low: float, high: float) -> np.ndarray:
    """Rows the gate member alone may answer: P(benign) <= low or >= high."""
    return (gate_proba <= low) | (gate_proba >= high)

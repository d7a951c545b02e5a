"""How member answers become one answer: hard, soft and weighted voting, and the cascade.

Pure functions over arrays, so the app (flow.py) and the held-out evaluation (artifacts.py)
run the same code: the accuracy reported in the README is the accuracy of what the app does.

The confidence cascade in two calls:

    uncertain = uncertain_rows(gate_proba, low, high)  # which rows the ensemble must see
    vote = cascade(n, gate=..., gate_proba=..., uncertain=uncertain, votes=..., mode=...)

where ``votes`` holds each counted member's P(benign) on the uncertain rows (the gate's
included). Without a gate answer every row is uncertain and the cascade is a plain vote.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

VotingMode = Literal["hard", "soft", "weighted"]


class SelectionSpec(BaseModel):
    """Dynamic selection. ``cascade``: the gate member answers alone when it is confident
    (P(benign) <= low or >= high); only the uncertain rows go to the whole ensemble."""

    mode: Literal["all", "cascade"] = "cascade"
    gate_member: str = "logreg"
    low: float = Field(default=0.02, ge=0, le=0.5)
    high: float = Field(default=0.98, ge=0.5, le=1)
    gate_deadline_ms: float = Field(default=150, gt=0)


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


def uncertain_rows(gate_proba: np.ndarray, low: float, high: float) -> np.ndarray:
    """Indices of the rows the gate is not sure about: the ones the ensemble votes on."""
    return np.flatnonzero(~confident_mask(gate_proba, low, high))


@dataclass(frozen=True)
class Vote:
    labels: np.ndarray  # class per row (1 = benign)
    p_benign: np.ndarray
    decided_by: list[str]  # per row: "gate:<name>" or "ensemble"
    votes: list[dict[str, float]]  # per row: the P(benign) of each member that counted


def cascade(
    n_rows: int,
    *,
    gate: str | None,
    gate_proba: np.ndarray | None,
    uncertain: np.ndarray,
    votes: Mapping[str, np.ndarray],
    mode: VotingMode,
    weights: Mapping[str, float] | None = None,
) -> Vote:
    """The answer for every row: the gate's on its confident rows, the vote on the rest.

    ``uncertain`` are the row indices the ensemble voted on (all rows when there is no gate
    answer); ``votes`` holds each member's P(benign) on exactly those rows, in that order.
    """
    labels = np.zeros(n_rows, dtype=np.int64)
    p_benign = np.zeros(n_rows)
    decided_by = ["ensemble"] * n_rows
    row_votes: list[dict[str, float]] = [{} for _ in range(n_rows)]
    if gate_proba is not None:
        if gate is None:
            raise ValueError("a gate answer needs the gate's name")
        gate_proba = np.asarray(gate_proba, dtype=np.float64)
        labels[:] = (gate_proba >= 0.5).astype(np.int64)
        p_benign[:] = gate_proba
        for i in np.setdiff1d(np.arange(n_rows), uncertain):
            decided_by[i] = f"gate:{gate}"
            row_votes[i] = {gate: float(gate_proba[i])}
    elif len(uncertain) != n_rows:
        raise ValueError("without a gate answer every row is uncertain")
    if len(uncertain):
        cls, proba = aggregate(votes, mode, weights)
        labels[uncertain] = cls
        p_benign[uncertain] = proba
        for j, i in enumerate(uncertain):
            row_votes[int(i)] = {k: float(v[j]) for k, v in votes.items()}
    return Vote(labels, p_benign, decided_by, row_votes)

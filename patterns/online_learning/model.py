"""The online classifier: scikit-learn ``SGDClassifier`` updated with ``partial_fit``, kept in
the core model store as skops (never pickle), one store version per trained candidate.

A version's manifest metadata says what it learned: ``consumed`` (the log offset it has read
up to; every event at or below it is inside this version or was deliberately not learned),
``learned`` and ``held_out`` (how many events it trained on and how many went to the gate's
window, cumulative), its gate metrics and its parent. Versions are ``v000001``, ``v000002``, ...
in training order; ``v000001`` is the initial champion from ``artifacts.py``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from core.errors import Unprocessable
from core.model_store import MANIFEST, ModelStore
from patterns.online_learning.stream import CLASSES, N_FEATURES

MODEL_NAME = "online-clf"
# Features are standardised: a value beyond this is corrupt input (422), not a rare event.
MAX_ABS_FEATURE = 1e6
BASELINE_VERSION = "v000001"


class LearnerParams(BaseModel):
    """The SGD learner. A constant step size is what lets it follow drift: the default
    ("optimal") schedule shrinks the step as 1/t, so after a long stable stretch a drift would
    take ages to unlearn."""

    eta0: float = Field(default=0.05, gt=0, le=1)  # step size
    alpha: float = Field(default=1e-4, ge=0)  # L2 penalty
    # Passes over each mini-batch. More passes learn a drift faster but also learn a poisoned
    # burst faster (the gate catches that; see README).
    epochs: int = Field(default=1, ge=1, le=10)


def new_classifier(params: LearnerParams) -> Any:
    from sklearn.linear_model import SGDClassifier

    return SGDClassifier(
        loss="log_loss",
        learning_rate="constant",
        eta0=params.eta0,
        alpha=params.alpha,
        random_state=0,
    )


def partial_fit(clf: Any, x: np.ndarray, y: np.ndarray, epochs: int = 1) -> None:
    for _ in range(epochs):
        clf.partial_fit(x, y, classes=np.asarray(CLASSES))


def version_name(n: int) -> str:
    return f"v{n:06d}"


def version_number(version: str) -> int:
    return int(version.lstrip("v"))


def is_holdout(event_id: str, every: int) -> bool:
    """One event in ``every`` (by a hash of its id, so it is the same in every process and on
    every retry) goes to the gate's held-out window and is never trained on."""
    digest = hashlib.sha256(f"holdout/{event_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % every == 0


def validate_rows(rows: Sequence[Sequence[Any]], n_features: int = N_FEATURES) -> np.ndarray:
    """Rows as a float array, or a 422 that says which row is wrong and how."""
    out = np.empty((len(rows), n_features), dtype=np.float64)
    for i, row in enumerate(rows):
        if len(row) != n_features:
            raise Unprocessable(
                f"Row {i} has {len(row)} features; this model takes exactly {n_features} "
                "(see GET /online/model for their order)."
            )
        for j, v in enumerate(row):
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise Unprocessable(
                    f"Row {i}, feature {j} is {v!r}; every feature must be a finite number "
                    "(no NaN, no infinity)."
                )
            if abs(v) > MAX_ABS_FEATURE:
                raise Unprocessable(
                    f"Row {i}, feature {j} is {v!r}; features are standardised, so values "
                    f"beyond +/-{MAX_ABS_FEATURE:,.0f} are refused as corrupt input."
                )
            out[i, j] = float(v)
    return out


def probability_of_one(clf: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(clf.predict_proba(x))[:, 1]


def drop_versions(
    store: ModelStore,
    name: str,
    versions: Iterable[str],
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Delete old versions (manifest first: a version without one is invisible, so a reader
    never loads a half-deleted one). The core store only adds versions; retention is the
    pattern's call, since only the pattern knows which versions still matter."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(store.root_uri, **dict(storage_options or {}))
    for version in versions:
        base = f"{root.rstrip('/')}/{name}/{version}"
        try:
            fs.rm(f"{base}/{MANIFEST}")
            fs.rm(base, recursive=True)
        except FileNotFoundError:
            pass

"""Default artifacts for the online-learning pattern (``make setup`` runs this).

    python -m patterns.online_learning.artifacts [--force]

- the initial champion ``online-clf/v000001``: the SGD classifier trained on the first
  ``drift_every`` events of the stream (concept 0 only), a fraction of a second on one core.
  Its manifest says it has consumed nothing from the feedback log (offset 0).

The feedback log (SQLite under artifacts/online_learning/, or ONLINE_LOG_URL) and the bandit's
state are created by the app itself on first use. ``--force`` retrains the champion only when
no other version exists: a store that has already learned online is never reset from here
(delete ``<store>/online-clf`` and the log together to start over).
"""

from __future__ import annotations

import argparse
import time

from core.model_store import ModelStore
from patterns.online_learning.feedback_log import START
from patterns.online_learning.learning import GatePolicy
from patterns.online_learning.model import (
    BASELINE_VERSION,
    MODEL_NAME,
    LearnerParams,
    new_classifier,
    partial_fit,
)
from patterns.online_learning.stream import DriftingStream


def _log(msg: str) -> None:
    print(f"[online_learning] {msg}", flush=True)


def train_baseline(stream: DriftingStream | None = None, params: LearnerParams | None = None):
    """The initial champion: a few passes over concept 0, plus its accuracy on fresh concept-0
    events and on the first events after the first drift (where it is expected to fail)."""
    stream = stream or DriftingStream()
    params = params or LearnerParams()
    x, y, _ = stream.batch(0, stream.drift_every)
    clf = new_classifier(params)
    partial_fit(clf, x, y, epochs=5)
    # Fresh concept-0 events from another seed (the stream itself moves on to concept 1).
    x_test, y_test, _ = DriftingStream(seed=stream.seed + "/test", drift_every=10**9).batch(0, 1000)
    x_next, y_next, _ = stream.batch(stream.drift_every, 1000)
    meta = {
        "kind": "baseline",
        "consumed": START,
        "learned": 0,
        "held_out": 0,
        "decision": "baseline",
        "trained_on": f"stream {stream.seed!r} events 0..{stream.drift_every - 1} (concept 0)",
        "concept0_accuracy": round(float((clf.predict(x_test) == y_test).mean()), 4),
        "after_first_drift_accuracy": round(float((clf.predict(x_next) == y_next).mean()), 4),
        "learner": params.model_dump(),
        "gate": {"holdout_every": GatePolicy().holdout_every},
    }
    return clf, meta


def ensure_artifacts(store: ModelStore | None = None, *, force: bool = False) -> None:
    store = store or ModelStore.open()
    versions = store.versions(MODEL_NAME)
    if versions and not (force and versions == [BASELINE_VERSION]):
        note = " (--force ignored: it has learned online since)" if force else ""
        _log(f"model {MODEL_NAME}/{BASELINE_VERSION} present ({len(versions)} versions){note}")
        return
    t0 = time.perf_counter()
    _log(f"training {MODEL_NAME}/{BASELINE_VERSION} on the first concept of the stream")
    clf, meta = train_baseline()
    store.save_sklearn(MODEL_NAME, BASELINE_VERSION, clf, meta, overwrite=force)
    _log(
        f"trained in {time.perf_counter() - t0:.1f}s; accuracy {meta['concept0_accuracy']} on "
        f"concept 0, {meta['after_first_drift_accuracy']} after the first drift"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the online-learning pattern's artifacts.")
    parser.add_argument("--force", action="store_true")
    ensure_artifacts(force=parser.parse_args().force)


if __name__ == "__main__":
    main()

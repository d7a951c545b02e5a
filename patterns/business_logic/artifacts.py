"""Default artifacts for the business-logic pattern (``make setup`` runs this).

    python -m patterns.business_logic.artifacts [--force]

- the fraud model, trained here on synthetic transactions from a known fraud process
  (``training_data``): ``business-fraud-gbm/v1`` in the core model store (skops, a safe
  format; the held-out AUC in its manifest, shown by ``GET /business/model``);
- the records database and the feature store, seeded deterministically (``seed.py``): the
  embedded SQLite files under artifacts/business_logic/ (``data_dir()``: ``records.db``,
  ``features.db``), or whatever BUSINESS_DATABASE_URL and BUSINESS_FEATURE_STORE_URL point to.

``ensure_model`` alone is the model without the databases, for a harness that seeds databases
of its own (``seed.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import time
from typing import Any

import numpy as np

from core.model_store import ModelStore
from patterns.business_logic.model import DEFAULT_SIGNAL, MODEL_INPUTS, MODEL_NAME, MODEL_VERSION
from patterns.business_logic.seed import seed_database, seed_feature_store
from patterns.business_logic.settings import BusinessSettings
from patterns.business_logic.settings import data_dir as data_dir  # where the SQLite files go


def _log(msg: str) -> None:
    print(f"[business_logic] {msg}", flush=True)


def training_data(n: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic labelled transactions from a known fraud process (seeded with hashlib)."""
    seed = int.from_bytes(hashlib.sha256(b"business_logic/training/v1").digest()[:8], "little")
    rng = np.random.default_rng(seed)
    avg = np.exp(rng.normal(3.5, 0.8, n))
    ratio = np.exp(rng.normal(0.0, 0.9, n))
    amount = avg * ratio
    txn_count = rng.integers(0, 40, n).astype(float)
    distinct = np.minimum(txn_count, rng.integers(1, 30, n)).astype(float)
    share_foreign = rng.beta(1.2, 4.0, n)
    age_years = rng.uniform(0, 10, n)
    kyc = (rng.random(n) < 0.85).astype(float)
    tier = rng.choice([0, 1, 2], size=n, p=[0.5, 0.3, 0.2]).astype(float)
    foreign = (rng.random(n) < 0.25).astype(float)
    cnp = (rng.random(n) < 0.6).astype(float)
    signal = np.clip(0.05 + 0.5 * rng.random(n) ** 4 + 0.25 * (amount > 2000) + 0.1 * cnp, 0, 1)
    logit = (
        -3.8
        + 1.1 * np.log(ratio)
        + 0.8 * tier
        + 0.9 * foreign * (1 - share_foreign)
        + 0.6 * cnp
        + 4.0 * (signal - 0.2)
        - 0.8 * kyc
        - 0.12 * age_years
        - 0.03 * txn_count
    )
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    missing = rng.random(n) < 0.1  # the outside service is sometimes down in training too
    seen_signal = np.where(missing, DEFAULT_SIGNAL, signal)
    x = np.column_stack(
        [
            np.log1p(amount),
            amount / (avg + 1.0),
            txn_count,
            distinct,
            share_foreign,
            age_years,
            kyc,
            tier,
            foreign,
            cnp,
            seen_signal,
            missing.astype(float),
        ]
    )
    return x.astype(np.float64), y


def train(n: int = 20_000) -> tuple[Any, dict[str, Any]]:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score

    x, y = training_data(n)
    cut = int(0.8 * n)
    clf = HistGradientBoostingClassifier(max_iter=150, max_depth=4, learning_rate=0.08)
    clf.random_state = 0
    clf.fit(x[:cut], y[:cut])
    auc = float(roc_auc_score(y[cut:], clf.predict_proba(x[cut:])[:, 1]))
    meta = {
        "inputs": list(MODEL_INPUTS),
        "n_train": cut,
        "fraud_rate": round(float(y.mean()), 4),
        "holdout_auc": round(auc, 4),
        "data": "synthetic transactions from patterns/business_logic/artifacts.py:training_data",
    }
    return clf, meta


def ensure_model(store: ModelStore, *, force: bool = False) -> None:
    if store.exists(MODEL_NAME, MODEL_VERSION) and not force:
        _log(f"model {MODEL_NAME}/{MODEL_VERSION} present")
        return
    t0 = time.perf_counter()
    _log(f"training {MODEL_NAME}/{MODEL_VERSION} on synthetic transactions")
    clf, meta = train()
    store.save_sklearn(MODEL_NAME, MODEL_VERSION, clf, meta, overwrite=force)
    _log(f"trained in {time.perf_counter() - t0:.1f}s; holdout AUC {meta['holdout_auc']}")


def ensure_artifacts(store: ModelStore | None = None, *, force: bool = False) -> None:
    store = store or ModelStore.open()
    ensure_model(store, force=force)
    settings = BusinessSettings()
    seed_database(settings.database_url, force=force)
    seed_feature_store(settings.feature_store_url, settings.database_url, force=force)


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the business-logic pattern's artifacts.")
    parser.add_argument("--force", action="store_true")
    ensure_artifacts(force=parser.parse_args().force)


if __name__ == "__main__":
    main()

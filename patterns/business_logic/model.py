"""The fraud model: its input vector, synthetic training data, training, and its deployment.

The model is compute-bound and lives in its own deployment (``FraudModel``), batched with
``@serve.batch`` so requests from every ingress replica share one ``predict_proba`` call.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any

import numpy as np
from ray import serve

MODEL_NAME = "business-fraud-gbm"
MODEL_VERSION = "v1"

# The model's input, in order. Built from the records, the feature store and the risk service.
MODEL_INPUTS = (
    "log_amount_eur",
    "amount_to_avg",  # this amount / the customer's average basket
    "txn_count",
    "distinct_merchants",
    "share_foreign",
    "account_age_years",
    "kyc_verified",
    "merchant_risk_tier",  # 0 low, 1 medium, 2 high
    "foreign_merchant",  # merchant country differs from the customer's
    "card_not_present",
    "risk_signal",
    "risk_signal_missing",
)
RISK_TIERS = {"low": 0, "medium": 1, "high": 2}
# What the model sees when the outside risk service cannot answer: a middling signal plus the
# risk_signal_missing flag. Training uses the same value for its 10% of rows without a signal,
# so the model knows this case (risk_client.py answers with it).
DEFAULT_SIGNAL = 0.5


def model_input(
    *,
    amount_eur: float,
    channel: str,
    customer: dict[str, Any],
    merchant: dict[str, Any],
    features: dict[str, float],
    risk_signal: float,
    risk_signal_missing: bool,
) -> dict[str, float]:
    """The named model inputs for one request (returned in the response as well)."""
    return {
        "log_amount_eur": round(math.log1p(amount_eur), 4),
        "amount_to_avg": round(amount_eur / (features["avg_amount_eur"] + 1.0), 4),
        "txn_count": features["txn_count"],
        "distinct_merchants": features["distinct_merchants"],
        "share_foreign": features["share_foreign"],
        "account_age_years": round(customer["account_age_days"] / 365.25, 3),
        "kyc_verified": float(customer["kyc_verified"]),
        "merchant_risk_tier": float(RISK_TIERS[merchant["risk_tier"]]),
        "foreign_merchant": float(merchant["country"] != customer["country"]),
        "card_not_present": float(channel != "in_store"),
        "risk_signal": risk_signal,
        "risk_signal_missing": float(risk_signal_missing),
    }


def as_row(named: dict[str, float]) -> list[float]:
    return [float(named[k]) for k in MODEL_INPUTS]


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
        "data": "synthetic transactions from patterns/business_logic/model.py:training_data",
    }
    return clf, meta


@serve.deployment(
    max_ongoing_requests=32,
    user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.005},
)
class FraudModel:
    """Loads the model from the store once per replica; scores batches of input rows."""

    def __init__(self, version: str = MODEL_VERSION, store_uri: str | None = None) -> None:
        from core.metrics import ModelMetrics
        from core.model_store import ModelStore

        store = ModelStore(store_uri) if store_uri else ModelStore.from_settings()
        self.model, self.ref = store.load_sklearn(MODEL_NAME, version)
        self.metrics = ModelMetrics("business_logic", MODEL_NAME, self.ref.version)

    def reconfigure(self, config: dict[str, Any]) -> None:
        # how many requests may share one predict_proba, and how long may a batch wait to fill?
        self._score_batch.set_max_batch_size(int(config.get("max_batch_size", 16)))
        self._score_batch.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.005)))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _score_batch(self, rows: list[list[float]]) -> list[float]:
        t0 = time.perf_counter()
        proba = self.model.predict_proba(np.asarray(rows, dtype=np.float64))[:, 1]
        self.metrics.observe(time.perf_counter() - t0)
        self.metrics.observe_batch(len(rows))
        return [float(p) for p in proba]

    async def score(self, row: list[float]) -> dict[str, Any]:
        return {"score": await self._score_batch(row), "version": self.ref.version}

    def info(self) -> dict[str, Any]:
        return self.ref.public()

"""The fraud model's input: which numbers, in which order, built from what.

Shared by the scorer (which builds the input of one request), the training in artifacts.py
(which builds the same columns from synthetic transactions) and the deployment (deployments.py).
"""

from __future__ import annotations

import math
from typing import Any

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

"""Business rules: the model's score and the records become approve / review / decline.

Pure functions, no I/O: the rules are what a risk team reads and changes most often, so they
sit apart from the plumbing and are tested without a cluster. Every rule that fires adds a
reason a person can read; the strictest outcome wins.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Decision = Literal["approve", "review", "decline"]
_SEVERITY = {"approve": 0, "review": 1, "decline": 2}


class DecisionRules(BaseModel):
    """Thresholds a risk team owns (config.yaml ``args.rules``)."""

    decline_score: float = Field(default=0.6, ge=0, le=1)
    review_score: float = Field(default=0.25, ge=0, le=1)
    # Large payments at high-risk merchants get a person's eye whatever the model says.
    high_risk_merchant_review_eur: float = Field(default=1000, ge=0)
    unverified_kyc_review_eur: float = Field(default=500, ge=0)
    # With the outside risk signal missing the model is less sure: big amounts go to review.
    degraded_review_eur: float = Field(default=250, ge=0)


def decide(
    rules: DecisionRules,
    *,
    score: float,
    amount_eur: float,
    customer: dict[str, Any],
    merchant: dict[str, Any],
    risk_signal_missing: bool,
) -> tuple[Decision, list[str]]:
    outcome: Decision = "approve"
    reasons: list[str] = []

    def hit(decision: Decision, reason: str) -> None:
        nonlocal outcome
        reasons.append(reason)
        if _SEVERITY[decision] > _SEVERITY[outcome]:
            outcome = decision

    if customer["status"] != "active":
        hit("decline", f"customer account is {customer['status']}")
    if amount_eur > customer["credit_limit_eur"]:
        hit(
            "decline",
            f"amount {amount_eur:.2f} EUR exceeds the credit limit "
            f"of {customer['credit_limit_eur']} EUR",
        )
    if score >= rules.decline_score:
        hit("decline", f"fraud score {score:.3f} >= decline threshold {rules.decline_score}")
    elif score >= rules.review_score:
        hit("review", f"fraud score {score:.3f} >= review threshold {rules.review_score}")
    if merchant["risk_tier"] == "high" and amount_eur >= rules.high_risk_merchant_review_eur:
        hit(
            "review",
            f"{merchant['category']} merchant (high risk) and amount >= "
            f"{rules.high_risk_merchant_review_eur:.0f} EUR",
        )
    if not customer["kyc_verified"] and amount_eur >= rules.unverified_kyc_review_eur:
        hit(
            "review",
            f"identity not verified and amount >= {rules.unverified_kyc_review_eur:.0f} EUR",
        )
    if risk_signal_missing and amount_eur >= rules.degraded_review_eur:
        hit(
            "review",
            f"outside risk signal unavailable and amount >= {rules.degraded_review_eur:.0f} EUR",
        )
    if not reasons:
        reasons.append(f"fraud score {score:.3f} below review threshold {rules.review_score}")
    return outcome, reasons

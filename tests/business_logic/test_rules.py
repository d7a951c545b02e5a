"""Business rules, without a cluster: every rule fires alone and the strictest outcome wins."""

import pytest

from patterns.business_logic.rules import DecisionRules, decide

RULES = DecisionRules()
CUSTOMER = {"status": "active", "credit_limit_eur": 2000, "kyc_verified": True}
MERCHANT = {"risk_tier": "low", "category": "grocery"}


def _decide(score=0.01, amount=50.0, customer=None, merchant=None, missing=False):
    return decide(
        RULES,
        score=score,
        amount_eur=amount,
        customer={**CUSTOMER, **(customer or {})},
        merchant={**MERCHANT, **(merchant or {})},
        risk_signal_missing=missing,
    )


def test_low_score_small_amount_is_approved_with_a_reason() -> None:
    decision, reasons = _decide()
    assert decision == "approve"
    assert reasons == ["fraud score 0.010 below review threshold 0.25"]


@pytest.mark.parametrize(
    ("kwargs", "decision", "reason_part"),
    [
        ({"score": 0.3}, "review", "review threshold"),
        ({"score": 0.7}, "decline", "decline threshold"),
        ({"customer": {"status": "blocked"}}, "decline", "account is blocked"),
        ({"amount": 2500.0}, "decline", "exceeds the credit limit"),
        (
            {"amount": 1200.0, "merchant": {"risk_tier": "high", "category": "gambling"}},
            "review",
            "gambling merchant (high risk)",
        ),
        ({"amount": 600.0, "customer": {"kyc_verified": False}}, "review", "not verified"),
        ({"amount": 300.0, "missing": True}, "review", "risk signal unavailable"),
    ],
)
def test_each_rule(kwargs, decision, reason_part) -> None:
    got, reasons = _decide(**kwargs)
    assert got == decision
    assert any(reason_part in r for r in reasons), reasons


def test_strictest_outcome_wins_and_all_reasons_are_kept() -> None:
    decision, reasons = _decide(score=0.3, customer={"status": "blocked"})
    assert decision == "decline"
    assert len(reasons) == 2


def test_degraded_small_amount_is_still_approved() -> None:
    decision, _ = _decide(amount=20.0, missing=True)
    assert decision == "approve"


def test_placeholder_api_keys_are_refused_in_production() -> None:
    from patterns.business_logic.settings import BusinessSettings, load_api_keys

    dev = BusinessSettings(api_keys=["dev-business-key"])
    assert load_api_keys(dev, "development") == ["dev-business-key"]
    with pytest.raises(ValueError, match="placeholder"):
        load_api_keys(dev, "production")
    real = BusinessSettings(api_keys=["k-7f3a9c1e5b2d4f60"])
    assert load_api_keys(real, "production") == ["k-7f3a9c1e5b2d4f60"]
    with pytest.raises(ValueError, match="empty"):
        load_api_keys(BusinessSettings(api_keys=[]), "production")

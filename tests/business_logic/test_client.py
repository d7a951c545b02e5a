"""The client's load-test requests are valid payments (the Locust harness replays them)."""

from patterns.business_logic.client import PAYMENTS, sample_request
from patterns.business_logic.flow import ScoreRequest


def test_sample_requests_are_valid_and_varied() -> None:
    reqs = [sample_request(i) for i in range(400)]
    for r in reqs:
        assert r["method"] == "POST" and r["path"] == "/business/score"
        assert r["headers"]["X-API-Key"]
        ScoreRequest(**r["json"])
    # each request its own Idempotency-Key (a retry of it is written once)
    assert len({r["headers"]["Idempotency-Key"] for r in reqs}) == len(reqs)
    assert len({r["json"]["customer_id"] for r in reqs}) == 200
    for payment in PAYMENTS:
        ScoreRequest(**payment)


def test_readme_example_blocks_parse() -> None:
    """Both README examples (checked against live answers in test_app.py) are where the
    client writes them: a whole answer, and the summary of the degraded one."""
    from patterns.business_logic import client

    text = client.README.read_text()
    whole = client.readme_answer(text)
    assert whole["decision"] == "approve" and "total" in whole["timings_ms"]
    degraded = client.readme_answer(text, degraded=True)
    assert degraded["decision"] == "review" and degraded["risk_signal"]["source"] == "default"
    assert client.stable_fields(whole)["features_from"] == "feature_store"

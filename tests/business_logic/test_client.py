"""The client's load-test requests are valid payments (the Locust harness replays them)."""

from patterns.business_logic.client import PAYMENTS, sample_request
from patterns.business_logic.scoring import ScoreRequest


def test_sample_requests_are_valid_and_varied() -> None:
    reqs = [sample_request(i) for i in range(400)]
    for r in reqs:
        assert r["method"] == "POST" and r["path"] == "/business/score"
        assert r["headers"]["X-API-Key"]
        ScoreRequest(**r["json"])
    assert len({r["json"]["customer_id"] for r in reqs}) == 200
    for payment in PAYMENTS:
        ScoreRequest(**payment)

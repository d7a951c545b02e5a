"""Keys on the ensemble's state-changing routes, in the production environment (the ops
cluster's ``ensemble`` app): no key 401, a wrong key 403, a key of the other kind 403, and the
recorder's state is the same after every refusal; the right key works. The fraud check's
``POST /score`` with keys required (``BUSINESS_REQUIRE_KEYS=true``): the same refusals, and the
OpenAPI document of each declares the key on exactly its keyed routes.
"""

from __future__ import annotations

import time

import httpx
import pytest

from patterns.ensemble.data import load_split
from tests.ops.conftest import ADMIN_KEY, CLIENT_KEY

pytestmark = pytest.mark.slow  # uses the ops cluster


def _state(url: str) -> dict:
    r = httpx.get(f"{url}/challenger", timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _refused(r: httpx.Response, status: int, phrase: str) -> None:
    assert r.status_code == status, r.text
    assert phrase in r.json()["error"]["message"], r.text
    if status == 401:
        assert r.headers["www-authenticate"] == "APIKey"


def test_feedback_needs_a_client_key_and_promote_rollback_an_admin_key(ops_cluster) -> None:
    url = f"{ops_cluster.http_url}/ensemble"
    split = load_split()
    # Predictions need no key; the shadow copies give the gate its samples.
    ids = []
    for i in range(4):
        rows = split.x_test[i * 3 : i * 3 + 3].tolist()
        r = httpx.post(f"{url}/predict", json={"instances": rows}, timeout=30)
        assert r.status_code == 200, r.text
        ids.append((r.json()["prediction_id"], [int(v) for v in split.y_test[i * 3 : i * 3 + 3]]))
    deadline = time.monotonic() + 20
    while _state(url)["shadowed_predictions"] < 4 and time.monotonic() < deadline:
        time.sleep(0.3)

    # Feedback: refused without the client key, and nothing is scored.
    before = _state(url)
    pid, labels = ids[0]
    body = {"prediction_id": pid, "labels": labels}
    _refused(httpx.post(f"{url}/feedback", json=body), 401, "Missing API key")
    _refused(
        httpx.post(f"{url}/feedback", json=body, headers={"X-API-Key": "nope"}), 403, "not valid"
    )
    admin = {"X-API-Key": ADMIN_KEY}
    _refused(httpx.post(f"{url}/feedback", json=body, headers=admin), 403, "not valid")
    assert _state(url)["labeled_rows"] == before["labeled_rows"] == 0
    client = {"X-API-Key": CLIENT_KEY}
    for pid, labels in ids:
        r = httpx.post(
            f"{url}/feedback", json={"prediction_id": pid, "labels": labels}, headers=client
        )
        assert r.status_code in (200, 202), r.text
    evidence = _state(url)
    assert evidence["labeled_rows"] == 12 and evidence["gate_passes"], evidence

    # Promote: the gate passes, so only the key stands in the way.
    for headers, status in (({}, 401), ({"X-API-Key": "nope"}, 403), (client, 403)):
        r = httpx.post(f"{url}/challenger/promote", headers=headers, timeout=30)
        _refused(r, status, "Missing API key" if status == 401 else "not valid")
        assert not _state(url)["promoted"]
    r = httpx.post(f"{url}/challenger/promote", headers=admin, timeout=30)
    assert r.status_code == 200 and r.json()["promoted"], r.text

    # Rollback: the same keys, the same refusals; still promoted after each.
    for headers, status in (({}, 401), ({"X-API-Key": "nope"}, 403), (client, 403)):
        r = httpx.post(f"{url}/challenger/rollback", headers=headers, timeout=30)
        _refused(r, status, "Missing API key" if status == 401 else "not valid")
        assert _state(url)["promoted"]
    r = httpx.post(f"{url}/challenger/rollback", headers=admin, timeout=30)
    assert r.status_code == 200 and r.json()["changed"] and not r.json()["promoted"], r.text
    assert not _state(url)["promoted"]
    # The replica that took the rollback applied it at once; every other ingress replica
    # within a refresh (PROMOTION_REFRESH_S): soon every answer shows the challenger shadowed
    # again (and the next tests on this cluster see it that way).
    rows = split.x_test[:3].tolist()
    deadline, streak = time.monotonic() + 20, 0
    while streak < 10:
        assert time.monotonic() < deadline, "an ingress replica still lets the challenger vote"
        answer = httpx.post(f"{url}/predict", json={"instances": rows}, timeout=30).json()
        streak = streak + 1 if answer["challenger"]["status"] == "shadow" else 0


def test_openapi_documents_the_key_header(ops_cluster) -> None:
    spec = httpx.get(f"{ops_cluster.http_url}/ensemble/openapi.json", timeout=30).json()
    for path in ("/challenger/promote", "/challenger/rollback", "/feedback"):
        assert spec["paths"][path]["post"].get("security"), path
    assert "security" not in spec["paths"]["/predict"]["post"]


def _secured(doc: dict) -> set[str]:
    return {
        f"{method.upper()} {path}"
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
        if op.get("security")
    }


def test_keyed_routes_are_declared_keyed_where_keys_are_required(ops_cluster) -> None:
    ensemble = httpx.get(f"{ops_cluster.http_url}/ensemble/openapi.json", timeout=30).json()
    assert _secured(ensemble) == {
        "POST /feedback",
        "POST /challenger/promote",
        "POST /challenger/rollback",
    }
    business = httpx.get(f"{ops_cluster.http_url}/business/openapi.json", timeout=30).json()
    assert _secured(business) == {"POST /score"}


def test_score_needs_a_key_when_keys_are_required(ops_cluster) -> None:
    from patterns.business_logic import client as business_client

    req = business_client.sample_request(0)
    url = f"{ops_cluster.http_url}/business/score"
    headers = {k: v for k, v in req["headers"].items() if k != "X-API-Key"}
    _refused(httpx.post(url, json=req["json"], headers=headers, timeout=30), 401, "Missing")
    wrong = {**headers, "X-API-Key": "nope"}
    _refused(httpx.post(url, json=req["json"], headers=wrong, timeout=30), 403, "not valid")
    r = httpx.post(url, json=req["json"], headers=req["headers"], timeout=30)
    assert r.status_code == 200, r.text

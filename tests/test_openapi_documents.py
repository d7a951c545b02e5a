"""Each app's OpenAPI document says what the app enforces (built in-process, as a replica would
with the default args): the limits the code checks, from the same constants and args, and an
API key only where this environment requires one. Through Serve, tests/reliability/test_fuzz.py
runs ``schemathesis -c all`` on the served documents."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
from fastapi import FastAPI
from pydantic import BaseModel

from core.openapi import document_replica, schema_property

KEYED_ROUTES = {
    "ensemble": {"POST /feedback", "POST /challenger/promote", "POST /challenger/rollback"},
    "business_logic": {"POST /score"},
    "online_learning": {
        "POST /rollback",
        "POST /feedback",
        "POST /feedback/batch",
        "POST /bandit/reward",
    },
    "pipeline": set(),
    "multiplexing": set(),
}
REQUIRE_KEYS = {
    "ensemble": "ENSEMBLE_REQUIRE_KEYS",
    "business_logic": "BUSINESS_REQUIRE_KEYS",
    "online_learning": "ONLINE_REQUIRE_KEYS",
}


def _doc(app: str) -> dict[str, Any]:
    return dict(importlib.import_module(f"patterns.{app}.app").api.openapi())


def _secured(doc: dict[str, Any]) -> set[str]:
    return {
        f"{method.upper()} {path}"
        for path, operations in doc["paths"].items()
        for method, operation in operations.items()
        if operation.get("security")
    }


@pytest.mark.parametrize("app", sorted(KEYED_ROUTES))
def test_development_declares_no_key(app: str, monkeypatch) -> None:
    monkeypatch.delenv("COOKBOOK_ENVIRONMENT", raising=False)
    for flag in REQUIRE_KEYS.values():
        monkeypatch.delenv(flag, raising=False)
    doc = _doc(app)
    assert _secured(doc) == set()
    assert "securitySchemes" not in doc.get("components", {})


@pytest.mark.parametrize("app", sorted(REQUIRE_KEYS))
def test_keys_required_declares_exactly_the_keyed_routes(app: str, monkeypatch) -> None:
    monkeypatch.setenv(REQUIRE_KEYS[app], "true")
    doc = _doc(app)
    assert _secured(doc) == KEYED_ROUTES[app]
    for label in KEYED_ROUTES[app]:  # and their 401/403 are documented
        method, path = label.split(" ")
        assert {"401", "403"} <= set(doc["paths"][path][method.lower()]["responses"]), label


def test_ensemble_rows_and_values_as_the_flow_checks_them() -> None:
    from patterns.ensemble.app import EnsembleArgs
    from patterns.ensemble.data import N_FEATURES

    args, doc = EnsembleArgs(), _doc("ensemble")
    rows = schema_property(doc, "PredictRequest", "instances")
    assert (rows["minItems"], rows["maxItems"]) == (1, args.max_instances)
    assert rows["items"]["minItems"] == rows["items"]["maxItems"] == N_FEATURES
    value = rows["items"]["items"]
    assert (value["minimum"], value["maximum"]) == (-args.max_abs_feature, args.max_abs_feature)
    labels = schema_property(doc, "FeedbackRequest", "labels")
    assert labels["maxItems"] == args.max_instances
    assert (labels["items"]["minimum"], labels["items"]["maximum"]) == (0, 1)


def test_online_rows_context_labels_and_rewards_as_the_service_checks_them() -> None:
    from patterns.online_learning.app import OnlineArgs
    from patterns.online_learning.model import MAX_ABS_FEATURE
    from patterns.online_learning.stream import CLASSES, N_FEATURES

    args, doc = OnlineArgs(), _doc("online_learning")
    rows = schema_property(doc, "PredictRequest", "instances")
    assert rows["maxItems"] == args.max_rows
    assert rows["items"]["minItems"] == rows["items"]["maxItems"] == N_FEATURES
    assert rows["items"]["items"]["maximum"] == MAX_ABS_FEATURE
    context = schema_property(doc, "ChooseRequest", "context")
    dim = args.bandit.params.context_dim
    assert context["minItems"] == context["maxItems"] == dim
    assert schema_property(doc, "FeedbackEvent", "label")["enum"] == list(CLASSES)
    reward = schema_property(doc, "RewardRequest", "reward")
    assert (reward["minimum"], reward["maximum"]) == (0, 1)


def test_pipeline_uploads_state_their_byte_and_file_limits() -> None:
    from patterns.pipeline.app import PipelineArgs

    args, doc = PipelineArgs(), _doc("pipeline")
    batch = doc["paths"]["/read/batch"]["post"]["requestBody"]["content"]["multipart/form-data"]
    images = batch["schema"]["properties"]["images"]
    assert (images["minItems"], images["maxItems"]) == (1, args.max_batch_images)
    assert images["items"]["maxLength"] == args.max_image_bytes
    assert batch["schema"]["required"] == ["images"]
    single = doc["paths"]["/read"]["post"]
    assert single["requestBody"]["content"]["image/png"]["schema"]["maxLength"] == (
        args.max_image_bytes
    )
    assert "16x16" in single["description"] and "422" in single["responses"]


def test_multiplexing_ids_and_calendar_as_the_code_checks_them() -> None:
    import datetime as dt
    import re

    from patterns.multiplexing.forecast_service import (
        CALENDAR_PATTERN,
        EARLIEST_DAY,
        LATEST_DAY,
    )
    from patterns.multiplexing.ids import ID_PATTERN, MAX_ID_LENGTH

    doc = _doc("multiplexing")
    for path in ("/models/{model_id}/predict", "/models/{model_id}"):
        (param,) = next(iter(doc["paths"][path].values()))["parameters"]
        assert param["schema"]["pattern"] == ID_PATTERN.pattern
        assert param["schema"]["maxLength"] == MAX_ID_LENGTH
    (header,) = doc["paths"]["/predict"]["post"]["parameters"]
    assert header["in"] == "header" and header["required"]
    start = schema_property(doc, "ForecastRequest", "start_date")
    assert start["pattern"] == CALENDAR_PATTERN
    one_day = dt.timedelta(days=1)
    for day, inside in (
        (EARLIEST_DAY, True),
        (LATEST_DAY, True),
        (EARLIEST_DAY - one_day, False),
        (LATEST_DAY + one_day, False),
    ):
        assert bool(re.match(CALENDAR_PATTERN, day.isoformat())) is inside, day


class _Body(BaseModel):
    rows: list[int]


def test_a_replica_serves_its_own_limits() -> None:
    """document_replica runs ``edit`` each time the document is asked for, on a copy: the
    generated document stays as FastAPI made it."""
    api = FastAPI()

    @api.post("/x")
    async def x(body: _Body) -> int:
        return len(body.rows)

    limit = {"n": 3}

    def edit(doc: dict[str, Any]) -> None:
        schema_property(doc, "_Body", "rows")["maxItems"] = limit["n"]

    document_replica(api, edit)
    assert schema_property(api.openapi(), "_Body", "rows")["maxItems"] == 3
    limit["n"] = 5
    assert schema_property(api.openapi(), "_Body", "rows")["maxItems"] == 5
    generated = api.openapi_schema
    assert generated is not None
    assert "maxItems" not in generated["components"]["schemas"]["_Body"]["properties"]["rows"]

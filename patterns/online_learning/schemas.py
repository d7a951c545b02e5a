"""The request bodies of the online-learning routes.

FastAPI validates the shapes; rows, labels and rewards are checked by the service
(``model.validate_rows``, flow.py) with sentences that name the row or event, so their
schemas state the same limits (the same constants) without enforcing them twice. Limits that
come from the app's args (rows per request, the bandit's context length) are written into the
served document by ``app._document``."""

from typing import Any

from pydantic import BaseModel, Field

# IdempotencyKey: a repeat gets the first answer (feedback and rewards are also idempotent by
# event id without it).
from core.ingress import IdempotencyKey  # noqa: F401  (the routes import it from here)
from core.openapi import JsonInt
from patterns.online_learning.model import MAX_ABS_FEATURE
from patterns.online_learning.stream import CLASSES, N_FEATURES

# Event, client and choice ids: a safe token, so they can be logged and used as keys as-is.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
Label = JsonInt  # 1 or 1.0, never true
# What validate_rows accepts: finite numbers (not booleans) within +/-MAX_ABS_FEATURE.
_NUMBER = {"type": "number", "minimum": -MAX_ABS_FEATURE, "maximum": MAX_ABS_FEATURE}
_ROW = {"type": "array", "items": _NUMBER, "minItems": N_FEATURES, "maxItems": N_FEATURES}
# OpenAPI links: where an answer's ids go next. Clients (and schemathesis's stateful phase)
# follow them: a prediction's id to its feedback, a choice's id to its reward.
PREDICT_LINKS: dict[int | str, dict[str, Any]] = {
    200: {
        "links": {
            "FeedbackForTheFirstRow": {
                "operationId": "feedback_feedback_post",
                "requestBody": {"prediction_id": "$response.body#/predictions/0/prediction_id"},
            }
        }
    }
}
CHOICE_LINKS: dict[int | str, dict[str, Any]] = {
    200: {
        "links": {
            "RewardForTheChoice": {
                "operationId": "bandit_reward_bandit_reward_post",
                "requestBody": {"choice_id": "$response.body#/choice_id"},
            }
        }
    }
}


class PredictRequest(BaseModel):
    instances: list[list[Any]] = Field(
        min_length=1,
        description=f"Rows of {N_FEATURES} finite numbers (x0..x{N_FEATURES - 1}).",
        examples=[[[0.5, -1.2, 0.3, 0.0, 1.1]]],
        json_schema_extra={"items": _ROW},
    )
    version: str | None = Field(
        default=None,
        pattern=r"^v\d{6}$",
        description="Pin a version (e.g. the frozen baseline v000001) instead of the champion.",
    )


class FeedbackEvent(BaseModel):
    event_id: str = Field(pattern=ID_PATTERN, description="Your id for this feedback event.")
    prediction_id: str = Field(min_length=1, max_length=128)
    label: Label = Field(
        description=f"The true class: one of {list(CLASSES)}.",
        json_schema_extra={"enum": list(CLASSES)},
    )
    client_id: str | None = Field(default=None, pattern=ID_PATTERN)


class FeedbackBatch(BaseModel):
    events: list[FeedbackEvent] = Field(min_length=1, max_length=512)
    client_id: str | None = Field(default=None, pattern=ID_PATTERN)


class RollbackRequest(BaseModel):
    to_version: str | None = Field(default=None, pattern=r"^v\d{6}$")
    reason: str = Field(default="manual rollback", max_length=200)


class ChooseRequest(BaseModel):
    context: list[Any] = Field(
        min_length=1, examples=[[1.2, -0.3, 0.1]], json_schema_extra={"items": _NUMBER}
    )


class RewardRequest(BaseModel):
    event_id: str = Field(pattern=ID_PATTERN)
    choice_id: str = Field(min_length=1, max_length=128)
    reward: float = Field(
        description="In [0, 1], e.g. 1 = clicked.", json_schema_extra={"minimum": 0, "maximum": 1}
    )
    client_id: str | None = Field(default=None, pattern=ID_PATTERN)

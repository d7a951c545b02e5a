"""The request bodies of the online-learning routes (FastAPI validates them; the sentences
for values the types cannot express, like a label out of range, come from service.py)."""

from typing import Annotated, Any

from pydantic import BaseModel, Field, Strict

# IdempotencyKey: a repeat gets the first answer (feedback and rewards are also idempotent by
# event id without it).
from core.ingress import IdempotencyKey  # noqa: F401  (the routes import it from here)
from patterns.online_learning.stream import CLASSES, N_FEATURES

# Event, client and choice ids: a safe token, so they can be logged and used as keys as-is.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
Label = Annotated[int, Strict()]


class PredictRequest(BaseModel):
    instances: list[list[Any]] = Field(
        min_length=1,
        description=f"Rows of {N_FEATURES} finite numbers (x0..x{N_FEATURES - 1}).",
        examples=[[[0.5, -1.2, 0.3, 0.0, 1.1]]],
    )
    version: str | None = Field(
        default=None,
        pattern=r"^v\d{6}$",
        description="Pin a version (e.g. the frozen baseline v000001) instead of the champion.",
    )


class FeedbackEvent(BaseModel):
    event_id: str = Field(pattern=ID_PATTERN, description="Your id for this feedback event.")
    prediction_id: str = Field(min_length=1, max_length=128)
    label: Label = Field(description=f"The true class: one of {list(CLASSES)}.")
    client_id: str | None = Field(default=None, pattern=ID_PATTERN)


class FeedbackBatch(BaseModel):
    events: list[FeedbackEvent] = Field(min_length=1, max_length=512)
    client_id: str | None = Field(default=None, pattern=ID_PATTERN)


class RollbackRequest(BaseModel):
    to_version: str | None = Field(default=None, pattern=r"^v\d{6}$")
    reason: str = Field(default="manual rollback", max_length=200)


class ChooseRequest(BaseModel):
    context: list[Any] = Field(min_length=1, examples=[[1.2, -0.3, 0.1]])


class RewardRequest(BaseModel):
    event_id: str = Field(pattern=ID_PATTERN)
    choice_id: str = Field(min_length=1, max_length=128)
    reward: float = Field(description="In [0, 1], e.g. 1 = clicked.")
    client_id: str | None = Field(default=None, pattern=ID_PATTERN)

"""The business rule: straight-through processing of parcel codes, or a person looks.

A sorting line photographs each parcel label and needs its code (the digits, read left to
right). Reading automatically is only worth it when a wrong read is rare, so each reading is
given one of three actions:

- ``accept``: route the parcel automatically. Every condition holds:
  1. at least one digit was found and at most ``max_code_length``;
  2. the detector and the independent scene classifier agree on how many digits there are
     (two models, two ways of looking: a disagreement means one of them is wrong);
  3. every digit was read with confidence >= ``min_digit_confidence``;
  4. every detection scored >= ``min_detection_score``.
- ``review``: send the picture to a person, with the reasons (which conditions failed).
- ``reject``: neither model sees any digit: no label in the picture; ask for a new photo.

The thresholds are config (``rules`` in config.yaml); ``artifacts.py`` measures how often
``accept`` is right on held-out scenes with the defaults and stores it in the manifest.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Action = Literal["accept", "review", "reject"]


class RuleConfig(BaseModel):
    min_digit_confidence: float = Field(default=0.9, ge=0, le=1)
    min_detection_score: float = Field(default=0.5, ge=0, le=1)
    max_code_length: int = Field(default=4, ge=1)
    require_count_agreement: bool = True


def decide(
    detections: list[dict[str, Any]], scene_count: int | None, rules: RuleConfig
) -> dict[str, Any]:
    """Action, reasons and code for one image. ``detections`` are sorted left to right and
    carry ``score`` (detector) and ``digit_confidence`` (classifier). ``scene_count`` is
    None when the scene classifier did not answer in time: no cross-check, so no accept."""
    code = "".join(str(d["label"]) for d in detections)
    n = len(detections)
    if n == 0 and scene_count == 0:
        return {
            "action": "reject",
            "code": "",
            "reasons": ["no digits visible: take a new photo of the label"],
        }
    reasons = []
    if n == 0 and scene_count is not None:
        reasons.append(f"the scene classifier sees {scene_count} digit(s) but none were found")
    if n > rules.max_code_length:
        reasons.append(f"{n} digits found; codes have at most {rules.max_code_length}")
    if scene_count is None:
        reasons.append("the scene classifier did not answer, so the count is not cross-checked")
    elif rules.require_count_agreement and n != scene_count:
        reasons.append(f"detector found {n} digit(s), scene classifier counts {scene_count}")
    for i, d in enumerate(detections):
        if d["digit_confidence"] < rules.min_digit_confidence:
            reasons.append(
                f"digit {i + 1} read as {d['label']} with confidence "
                f"{d['digit_confidence']:.2f} < {rules.min_digit_confidence}"
            )
        if d["score"] < rules.min_detection_score:
            reasons.append(
                f"digit {i + 1} detected with score {d['score']:.2f} < {rules.min_detection_score}"
            )
    return {"action": "review" if reasons else "accept", "code": code, "reasons": reasons}

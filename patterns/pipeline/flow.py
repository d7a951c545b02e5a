"""One image through the pipeline, end to end: the request flow, without Serve.

    preprocess --+--> detector --> digit classifier --+--> business rule (in process)
                 '--> scene classifier ---------------'

``PipelineFlow`` gets its four stage calls injected (``Stages``): with ``topology: split``
they are DeploymentHandle calls (``deployments.HandleStages``), with ``topology: fused`` the
stage classes in the ingress replica, the models batched together (``stages.FusedStages``),
in the tests the stage classes one request at a time (``stages.InProcessStages``). Each call
returns an awaitable that can also be handed to a later call: in Serve a DeploymentResponse
passed into the next ``.remote()`` is resolved by Serve's router as soon as it is ready, so
the digit classifier is called the moment the detector answers, without waiting for this
code to await the detector (the ingress process still holds both answers: they are small).

The business rule is a pure function of a few numbers (``rules.decide``, microseconds): it
runs here, in process. A deployment of its own would add a hop (7.5 ms measured on a 2-core
box, README) to save nothing.

Failure policy, in one place:
- a refused image (preprocess): its 4xx with the sentence (``Image N (name): ...`` in a batch);
- preprocess, detector or digit classifier late (``stage_timeout_s`` each) or failing: 503;
- scene classifier late or failing: the answer is ``degraded``, the count is not
  cross-checked, and the rule sends the parcel to review.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Mapping
from typing import Any, Protocol

from core.errors import (
    BadRequest,
    HTTPError,
    PayloadTooLarge,
    ServiceUnavailable,
    Unprocessable,
    UnsupportedMediaType,
)
from core.resilience import describe_error, gather_with_deadline
from core.timing import Timings
from patterns.pipeline.preprocess import to_original
from patterns.pipeline.rules import RuleConfig, decide

logger = logging.getLogger("patterns.pipeline")

# The statuses Preprocess refuses an image with, as the flow raises them.
REFUSALS: dict[int, type[HTTPError]] = {
    400: BadRequest,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: Unprocessable,
}
MODEL_STAGES = ("detector", "scene_classifier", "digit_classifier")

Call = Awaitable[Any]  # a DeploymentResponse or an asyncio.Task; both have .cancel()


class Stages(Protocol):
    def preprocess(self, data: bytes) -> Call: ...
    def detect(self, prepared: Call) -> Call: ...
    def count(self, prepared: Call) -> Call: ...
    def read_digits(self, prepared: Call, detections: Call) -> Call: ...
    def model_info(self) -> Mapping[str, Call]: ...


def too_big(where: str, size: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"{where}The image is {size} bytes; at most {limit} bytes per image.")


def _cancel(call: Any) -> None:
    cancel = getattr(call, "cancel", None)
    if callable(cancel):
        cancel()


class PipelineFlow:
    def __init__(
        self,
        stages: Stages,
        *,
        rules: RuleConfig,
        stage_timeout_s: float = 10.0,
        max_image_bytes: int = 5_000_000,
    ) -> None:
        self.stages = stages
        self.rules = rules
        self.stage_timeout_s = stage_timeout_s
        self.max_image_bytes = max_image_bytes

    async def _await(self, stage: str, call: Call, timeout_s: float) -> Any:
        """One stage's answer within ``timeout_s``; late or failed is a 503."""
        try:
            return await asyncio.wait_for(_resolve(call), max(timeout_s, 0.0))
        except TimeoutError:
            _cancel(call)
            raise ServiceUnavailable(
                f"The {stage} stage did not answer within {self.stage_timeout_s:g} s; "
                "retry shortly."
            ) from None
        except Exception as exc:
            logger.warning("stage %s failed: %s", stage, describe_error(exc))
            raise ServiceUnavailable(
                f"The {stage} stage failed ({describe_error(exc)}); retry shortly."
            ) from None

    async def read(self, data: bytes, request_id: str, *, where: str = "") -> dict[str, Any]:
        """The answer for one image. ``where`` prefixes refusals (``Image 2 (x.png): ``)."""
        if not data:
            raise BadRequest(f"{where}The image is empty (0 bytes); send PNG or JPEG bytes.")
        if len(data) > self.max_image_bytes:
            raise too_big(where, len(data), self.max_image_bytes)
        t = Timings()
        compute: dict[str, float] = {}
        batch_sizes: dict[str, int] = {}

        with t.stage("preprocess"):  # the call too: it may decode right here (in process)
            pre_call = self.stages.preprocess(data)
            pre = await self._await("preprocess", pre_call, self.stage_timeout_s)
        compute["preprocess"] = pre["compute_ms"]
        if not pre["ok"]:  # 400, 413, 415 or 422, chosen by Preprocess
            raise REFUSALS.get(pre["status"], Unprocessable)(where + pre["message"])

        # All three model calls start now; each gets what it needs straight from the stage
        # that made it (the digit classifier waits for the detector's boxes in Serve's router).
        det_call = self.stages.detect(pre_call)
        scene_call = self.stages.count(pre_call)
        digits_call = self.stages.read_digits(pre_call, det_call)
        started = time.perf_counter()
        fan = await gather_with_deadline(
            {"detector": det_call, "scene_classifier": scene_call},
            deadline_s=self.stage_timeout_s,
            quorum=1,
        )
        if "detector" not in fan.results:
            _cancel(digits_call)
            raise ServiceUnavailable(
                f"The detector stage did not answer ({fan.failed['detector']}); retry shortly."
            )
        det = fan.results["detector"]
        det_ms = fan.elapsed_ms["detector"]
        t.add("detector", det_ms)
        compute["detector"], batch_sizes["detector"] = det["compute_ms"], det["batch_size"]
        versions = {"detector": det["model"]}
        scene_count: int | None = None
        scene_out: dict[str, Any] = {"status": fan.failed.get("scene_classifier", "ok")}
        if "scene_classifier" in fan.results:
            scene = fan.results["scene_classifier"]
            t.add("scene_classifier", fan.elapsed_ms["scene_classifier"])
            compute["scene_classifier"] = scene["compute_ms"]
            batch_sizes["scene_classifier"] = scene["batch_size"]
            versions["scene_classifier"] = scene["model"]
            scene_count = scene["count"]
            scene_out = {"digit_count": scene["count"], "confidence": scene["confidence"]}

        # The digit classifier has stage_timeout_s from the detector's answer, as if called
        # then; its time is counted from there too (its hop plus its work).
        det_done = started + det_ms / 1000
        left = self.stage_timeout_s - (time.perf_counter() - det_done)
        read = await self._await("digit classifier", digits_call, left)
        t.add("digit_classifier", (time.perf_counter() - det_done) * 1000)
        compute["digit_classifier"] = read["compute_ms"]
        batch_sizes["digit_classifier"] = read["batch_size"]
        versions["digit_classifier"] = read["model"]

        detections = [
            {
                "box": to_original(box, pre["meta"]),
                "object": kind,
                "score": round(float(score), 4),
                "label": int(label),
                "digit_confidence": conf,
            }
            for box, score, kind, label, conf in zip(
                det["boxes"], det["scores"], det["labels"], read["labels"], read["confidences"],
                strict=True,
            )
        ]  # fmt: skip
        detections.sort(key=lambda d: d["box"][0])  # reading order: left to right

        t0 = time.perf_counter()
        decision = decide(detections, scene_count, self.rules)
        rule_ms = (time.perf_counter() - t0) * 1000
        t.add("business_rules", rule_ms)
        compute["business_rules"] = round(rule_ms, 3)
        meta = pre["meta"]
        return {
            "request_id": request_id,
            "image": {k: meta[k] for k in ("width", "height", "format")},
            "detections": detections,
            "scene": scene_out,
            "decision": decision,
            "degraded": fan.degraded,
            "timings_ms": t.as_dict(),
            "compute_ms": compute,
            "batch_sizes": batch_sizes,
            "model_versions": versions,
        }

    async def read_many(self, files: list[tuple[str, bytes]], request_id: str) -> dict[str, Any]:
        """Several images at once: they go through the stages concurrently, so the model
        stages batch them. The first refusal, in upload order, answers for the batch."""
        t = Timings()
        results = await asyncio.gather(
            *(
                self.read(data, f"{request_id}/{i}", where=f"Image {i + 1} ({name}): ")
                for i, (name, data) in enumerate(files)
            ),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return {
            "request_id": request_id,
            "count": len(results),
            "results": results,
            "timings_ms": t.as_dict(),
        }

    async def model_info(self) -> dict[str, Any]:
        """Each model stage's version, device and held-out figures, and the rule's
        thresholds (GET /model). A stage that does not answer in time: 503."""
        fan = await gather_with_deadline(
            dict(self.stages.model_info()), deadline_s=self.stage_timeout_s, quorum=3
        )
        fan.require_quorum("model stages")
        stages = fan.results
        # The three models were trained and measured together: one set of figures, from
        # the manifest of the detector version its replica loaded (None when the detector's
        # weights came from a bare checkpoint or torchvision).
        heldout = stages["detector"].get("heldout_metrics")
        for info in stages.values():
            info.pop("heldout_metrics", None)
        return {
            **{name: stages[name] for name in MODEL_STAGES},
            "business_rules": {
                "rule": "accept / review / reject parcel codes (in process, rules.py)",
                **self.rules.model_dump(),
            },
            "heldout_metrics": heldout,
        }


async def _resolve(call: Call) -> Any:
    return await call

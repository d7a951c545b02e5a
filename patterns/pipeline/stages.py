"""What each stage does, as plain classes: no Serve in here.

A deployment in ``deployments.py`` wraps one of these per replica (``topology: split``, each
with its own ``batcher.AdaptiveBatcher``); ``FusedStages`` runs all four in one replica, the
three models batched together (``topology: fused``); ``InProcessStages`` runs them one
request at a time (the flow's tests). Either way the stage code is the same, so a scene is
read the same way.

- ``PreprocessStage``: bytes -> letterboxed uint8 image + meta, or a refusal (a value with
  a status and a sentence). CPU only; never imports torch.
- ``DetectorStage``, ``SceneStage``, ``DigitStage``: a batch in, one answer per item out
  (one forward pass per batch), each batch timed (``core.batching.timed_batch``: latency,
  ok/failed, size in the metrics).

What travels between stages is small on purpose: the 28 KB uint8 image (normalised on the
model's own device), box lists and a few numbers.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from core.batching import timed_batch
from core.model_store import ModelStore
from core.resources import StageResources
from patterns.pipeline.preprocess import ImageLimits, ImageRejected, install_pil_guard, prepare
from patterns.pipeline.scenes import CANVAS

logger = logging.getLogger("patterns.pipeline")

# The batching knobs reach a replica through user_config (reconfigure), not its init args,
# so changing them never restarts it.
BATCH_KNOBS = {"max_batch_size", "batch_wait_timeout_s"}
# Which held-out figures (measured together by artifacts.py, stored in every manifest) speak
# for which stage; GET /model shows each stage its own.
HELDOUT_KEYS = {
    "detector": ("detection_precision", "detection_recall", "detection_ap50", "score_threshold"),
    "scene_classifier": ("count_accuracy",),
    "digit_classifier": ("digit_reading_accuracy",),
}


# ------------------------------------------------------------------------------ config
class ModelSpec(BaseModel):
    """One model stage: which network, which weights, how it batches, what it asks for."""

    arch: str
    # store:NAME/VERSION | file:///x.safetensors | s3://bucket/x.safetensors |
    # torchvision:DEFAULT (published weights; detector architectures only; needs network).
    weights: str
    # how many requests may share one forward pass, and how long may a batch wait to fill?
    max_batch_size: int = Field(default=16, ge=1, le=256)
    batch_wait_timeout_s: float = Field(default=0.005, ge=0, le=1)
    resources: StageResources = StageResources(num_cpus=0.2)


class DetectorSpec(ModelSpec):
    arch: str = "centernet_digits"
    weights: str = "store:pipeline-detector/v1"
    score_threshold: float = Field(default=0.3, ge=0, le=1)
    # Fractional GPU: two detector replicas can share one GPU. No GPU -> CPU placement.
    resources: StageResources = StageResources(num_cpus=0.2, num_gpus=0.5)


class SceneSpec(ModelSpec):
    arch: str = "count_cnn"
    weights: str = "store:pipeline-scene/v1"
    resources: StageResources = StageResources(num_cpus=0.1, num_gpus=0.25)


class DigitsSpec(ModelSpec):
    arch: str = "digit_cnn"
    weights: str = "store:pipeline-digits/v1"
    max_batch_size: int = Field(default=32, ge=1, le=256)  # requests, each with 0-4 crops
    resources: StageResources = StageResources(num_cpus=0.1, num_gpus=0.25)


def blank_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (CANVAS, CANVAS)).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------ stages
class PreprocessStage:
    """Bytes in; ``{"ok": True, "image", "meta", "compute_ms"}`` or ``{"ok": False, "status",
    "message", "compute_ms"}`` out. A refusal is a value, not an exception: raised inside a
    replica it would reach the caller wrapped in Ray's error, with details a client must not
    see."""

    def __init__(self, limits: ImageLimits) -> None:
        self.limits = limits
        install_pil_guard(limits)
        prepare(blank_png(), limits)  # warm up: import PIL's codecs now, not on request 1

    def run(self, data: bytes) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            out = prepare(data, self.limits)
        except Exception as exc:
            # prepare() names every refusal it knows; anything else the decoder raised is
            # still about these bytes (retrying them cannot help), so it is a 422 too.
            logger.warning("preprocess: unexpected error from prepare()", exc_info=True)
            out = ImageRejected(
                422,
                f"The image could not be decoded ({type(exc).__name__}); send a complete, "
                "valid PNG or JPEG file.",
            )
        ms = round((time.perf_counter() - t0) * 1000, 2)
        if isinstance(out, ImageRejected):
            return {"ok": False, "status": out.status, "message": out.message, "compute_ms": ms}
        return {"ok": True, "image": out.image, "meta": out.meta, "compute_ms": ms}


class ModelStage:
    """Shared by the model stages: load the weights, move them to ``device``, warm up.

    A subclass names its config model (``spec_cls``) and its stage name (``name``, the key
    in answers and the metrics tag), and defines ``_forward`` (the batch's model input in,
    the model's output for the batch out) and ``_answers`` (that output -> one dict per
    item); where one forward pass on a blank image does not fit its model, ``_warm_up``.
    """

    name = "model"
    spec_cls: type[ModelSpec] = ModelSpec

    def __init__(
        self,
        spec: ModelSpec | dict[str, Any],
        store: ModelStore,
        device: str = "cpu",
        *,
        storage_options: dict[str, Any] | None = None,
        metrics_app: str | None = None,
    ) -> None:
        import torch

        from patterns.pipeline.models import load_model

        self.spec = spec if isinstance(spec, self.spec_cls) else self.spec_cls(**dict(spec))
        self.device = device
        self.model = load_model(
            self.spec.arch, self.spec.weights, store, storage_options=storage_options
        )
        self.model.module.to(device)
        self.info = {**self.model.info, "arch": self.spec.arch, "device": device}
        self.metrics = None
        if metrics_app:  # needs a Ray worker (a Serve replica): off in plain tests
            from core.metrics import ModelMetrics

            self.metrics = ModelMetrics(metrics_app, self.name, str(self.info.get("version")))
        # One forward pass before traffic: the first one pays for lazy initialisation.
        with torch.inference_mode():
            self._warm_up(torch.zeros(1, 3, CANVAS, CANVAS, device=device))

    def _warm_up(self, x: Any) -> None:
        self.model.module(x)

    def _input(self, images: list[np.ndarray]) -> Any:
        from patterns.pipeline.models import as_input

        return as_input(images, self.device)

    def run(self, batch: list[Any]) -> list[dict[str, Any]]:
        """One answer per item of ``batch``, from one forward pass (timed and counted)."""
        import torch

        with timed_batch(self.metrics, len(batch)) as t, torch.inference_mode():
            out = self._forward(self._input(self._images(batch)), batch)
        return self._answers(out, t)

    def answer(self, x: Any, batch: list[Any]) -> list[dict[str, Any]]:
        """``run`` with the batch's model input ``x`` already made (on this device): the
        fused stages make it once and hand it to all three models."""
        import torch

        with timed_batch(self.metrics, len(batch)) as t, torch.inference_mode():
            out = self._forward(x, batch)
        return self._answers(out, t)

    def _images(self, batch: list[Any]) -> list[np.ndarray]:
        return batch

    def _forward(self, x: Any, batch: list[Any]) -> Any:
        raise NotImplementedError

    def _answers(self, out: Any, timing: Any) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _common(self, timing: Any) -> dict[str, Any]:
        """What every answer of one batch reports about it."""
        return {"compute_ms": round(timing.ms, 2), "batch_size": timing.size, "model": self.info}

    def describe(self) -> dict[str, Any]:
        """Version, device and held-out figures of the manifest this replica loaded:
        ``heldout`` the ones about this stage, ``heldout_metrics`` all of them (the three
        models were measured together). None for weights from a bare checkpoint or
        published weights."""
        figures = self.model.heldout_metrics
        if not figures:
            return {**self.info, "heldout": None, "heldout_metrics": None}
        own = {k: figures[k] for k in HELDOUT_KEYS.get(self.name, ()) if k in figures}
        return {**self.info, "heldout": own, "heldout_metrics": figures}


class DetectorStage(ModelStage):
    """A batch of images -> boxes, scores and labels per image."""

    name = "detector"
    spec_cls = DetectorSpec

    def _warm_up(self, x: Any) -> None:
        from patterns.pipeline.models import run_detector

        run_detector(self.model, self.spec.arch, x, 1.0)

    def _forward(self, x: Any, batch: list[Any]) -> Any:
        from patterns.pipeline.models import run_detector

        spec: DetectorSpec = self.spec  # type: ignore[assignment]
        return run_detector(self.model, spec.arch, x, spec.score_threshold)

    def _answers(self, dets: Any, timing: Any) -> list[dict[str, Any]]:
        common = self._common(timing)
        names = self.model.categories
        return [
            {
                "boxes": d["boxes"].tolist(),
                "scores": d["scores"].tolist(),
                "labels": [names[int(i)] if 0 <= i < len(names) else str(i) for i in d["labels"]],
                **common,
            }
            for d in dets
        ]


class SceneStage(ModelStage):
    """A batch of images -> how many digits each holds, with its confidence."""

    name = "scene_classifier"
    spec_cls = SceneSpec

    def _forward(self, x: Any, batch: list[Any]) -> Any:
        import torch

        return torch.softmax(self.model.module(x), 1).cpu().numpy()

    def _answers(self, probs: Any, timing: Any) -> list[dict[str, Any]]:
        common = self._common(timing)
        return [
            {"count": int(p.argmax()), "confidence": round(float(p.max()), 4), **common}
            for p in probs
        ]


class DigitStage(ModelStage):
    """A batch of (image, its boxes) -> 0-9 and a confidence per box. All crops of all
    requests go through one forward pass; the boxes reach the device as one (K, 5) tensor."""

    name = "digit_classifier"
    spec_cls = DigitsSpec

    def _warm_up(self, x: Any) -> None:
        from patterns.pipeline.models import read_digits, rois

        read_digits(self.model, x, rois([[[10.0, 10.0, 40.0, 40.0]]], x.device))

    def _images(self, batch: list[Any]) -> list[np.ndarray]:
        return [image for image, _ in batch]

    def _forward(self, x: Any, batch: list[Any]) -> Any:
        from patterns.pipeline.models import read_digits, rois

        boxes = [b for _, b in batch]
        return boxes, read_digits(self.model, x, rois(boxes, self.device))

    def _answers(self, out: Any, timing: Any) -> list[dict[str, Any]]:
        boxes, probs = out
        common = self._common(timing)
        answers, start = [], 0
        for b in boxes:
            p = probs[start : start + len(b)]
            start += len(b)
            answers.append(
                {
                    "labels": p.argmax(1).tolist(),
                    "confidences": [round(float(v), 4) for v in p.max(1)],
                    **common,
                }
            )
        return answers

    def nothing_to_read(self) -> dict[str, Any]:
        """The answer for an image without boxes: no forward pass, no batch."""
        return {"labels": [], "confidences": [], "compute_ms": 0.0, "batch_size": 0,
                "model": self.info}  # fmt: skip


# ------------------------------------------------------------------------------ in process
class InProcessStages:
    """The stage calls of ``flow.Stages``, all in this process (no Serve, no batching across
    requests): what the flow's tests run on. Each call returns a task; a later call may be
    handed that task, as a DeploymentResponse is handed on in Serve."""

    def __init__(
        self,
        preprocessor: PreprocessStage,
        detector: DetectorStage,
        scene: SceneStage,
        digits: DigitStage,
    ) -> None:
        self.preprocessor = preprocessor
        self.detector = detector
        self.scene = scene
        self.digits = digits

    @classmethod
    def load(
        cls,
        store: ModelStore,
        device: str = "cpu",
        *,
        limits: ImageLimits | None = None,
        detector: DetectorSpec | None = None,
        scene: SceneSpec | None = None,
        digits: DigitsSpec | None = None,
        storage_options: dict[str, Any] | None = None,
        metrics_app: str | None = None,
        **batching: Any,
    ) -> Any:
        """Every stage, its model loaded on ``device``; ``batching`` (``max_batch_size``,
        ``batch_wait_timeout_s``) for ``FusedStages``."""
        opts = {"storage_options": storage_options, "metrics_app": metrics_app}
        return cls(
            PreprocessStage(limits or ImageLimits()),
            DetectorStage(detector or DetectorSpec(), store, device, **opts),
            SceneStage(scene or SceneSpec(), store, device, **opts),
            DigitStage(digits or DigitsSpec(), store, device, **opts),
            **batching,
        )

    def preprocess(self, data: bytes) -> asyncio.Task:
        return _task(self._now(self.preprocessor.run, data))

    def detect(self, prepared: Awaitable[dict]) -> asyncio.Task:
        return _task(self._on_image(self.detector.run, prepared))

    def count(self, prepared: Awaitable[dict]) -> asyncio.Task:
        return _task(self._on_image(self.scene.run, prepared))

    def read_digits(self, prepared: Awaitable[dict], detections: Awaitable[dict]) -> asyncio.Task:
        return _task(self._read(prepared, detections))

    def model_info(self) -> dict[str, asyncio.Task]:
        return {s.name: _task(self._now(ModelStage.describe, s)) for s in self.models}

    @property
    def models(self) -> tuple[ModelStage, ...]:
        return (self.detector, self.scene, self.digits)

    @staticmethod
    async def _now(fn: Any, arg: Any) -> Any:
        return fn(arg)

    @staticmethod
    async def _on_image(run: Any, prepared: Awaitable[dict]) -> dict[str, Any]:
        return run([(await prepared)["image"]])[0]

    async def _read(self, prepared: Awaitable[dict], detections: Awaitable[dict]) -> dict:
        image, boxes = (await prepared)["image"], (await detections)["boxes"]
        if not boxes:
            return self.digits.nothing_to_read()
        return self.digits.run([(image, boxes)])[0]


class FusedStages(InProcessStages):
    """All four stages in one replica, batched across requests: the ``fused`` topology.

    Decode runs on the caller's event loop as each request arrives; the three models run
    together on a batch of requests (``AdaptiveBatcher``: one worker thread, batches formed
    when the models are free): one stacked input on the device, the detector and the scene
    classifier on it, the digit classifier on every box of the batch, each model once per
    batch. No hop between stages: what a small box (2 CPU cores, no GPU) wants, where every
    hop costs more than the models (README). The flow's four calls map onto it: the
    detector, scene and digit calls of one request share that request's place in a batch.
    """

    def __init__(
        self,
        preprocessor: PreprocessStage,
        detector: DetectorStage,
        scene: SceneStage,
        digits: DigitStage,
        *,
        max_batch_size: int = 16,
        batch_wait_timeout_s: float = 0.0,
    ) -> None:
        from patterns.pipeline.batcher import AdaptiveBatcher

        super().__init__(preprocessor, detector, scene, digits)
        self.batcher: AdaptiveBatcher[np.ndarray, dict[str, Any]] = AdaptiveBatcher(
            self.run_models,
            max_batch_size=max_batch_size,
            batch_wait_timeout_s=batch_wait_timeout_s,
            name="fused",
        )
        # One batch place per request, found again by the call that prepared its image.
        self._places: weakref.WeakKeyDictionary[Any, asyncio.Task] = weakref.WeakKeyDictionary()

    def run_models(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        """The three models on one batch of prepared images, each model once."""
        x = self.detector._input(images)  # one stack, one copy to the device
        dets = self.detector.answer(x, images)
        scenes = self.scene.answer(x, images)
        reads = [self.digits.nothing_to_read() for _ in images]
        if any(d["boxes"] for d in dets):  # every box of the batch, cropped from x
            read = self.digits.answer(x, [(None, d["boxes"]) for d in dets])
            reads = [r if d["boxes"] else n for d, r, n in zip(dets, read, reads, strict=True)]
        return [
            {"detector": d, "scene_classifier": s, "digit_classifier": r}
            for d, s, r in zip(dets, scenes, reads, strict=True)
        ]

    def detect(self, prepared: Awaitable[dict]) -> asyncio.Task:
        return _task(self._part(prepared, "detector"))

    def count(self, prepared: Awaitable[dict]) -> asyncio.Task:
        return _task(self._part(prepared, "scene_classifier"))

    def read_digits(self, prepared: Awaitable[dict], detections: Awaitable[dict]) -> asyncio.Task:
        return _task(self._part(prepared, "digit_classifier"))

    def _place(self, prepared: Awaitable[dict]) -> asyncio.Task:
        place = self._places.get(prepared)
        if place is None:
            place = self._places[prepared] = _task(self._submit(prepared))
        return place

    async def _submit(self, prepared: Awaitable[dict]) -> dict[str, Any]:
        return await self.batcher.submit((await prepared)["image"])

    async def _part(self, prepared: Awaitable[dict], stage: str) -> dict[str, Any]:
        # shield: one of the three calls given up (a late scene classifier) must not
        # cancel the batch place the other two still wait on.
        return (await asyncio.shield(self._place(prepared)))[stage]


def _task(coro: Any) -> asyncio.Task:
    """A task whose failure is read even if nobody awaits it (the flow abandons the digit
    call when the detector failed), so asyncio logs no "exception was never retrieved"."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task

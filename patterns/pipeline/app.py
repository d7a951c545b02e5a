"""Vision pipeline on Ray Serve: each stage its own deployment, resources and batching.

    client --> PipelineIngress (FastAPI: raw PNG/JPEG, multipart, multipart batch)
                  |
                  +--> Preprocess (CPU: decode, bomb guard, letterbox 96x96, normalise)
                  |
                  +--> Detector (digits: boxes, scores) --+   in parallel,
                  +--> SceneClassifier (digit count)    --+   batched across requests
                  |
                  +--> DigitClassifier (one crop per box -> 0-9, batched)
                  |
                  +--> BusinessRules (accept / review / reject a parcel code)

Run: ``serve run patterns.pipeline.app:app`` (after ``make setup``). Knobs: config.yaml.
"""

# No `from __future__ import annotations` here: Serve's class-based FastAPI views need real
# annotations (with string annotations `self` becomes a required query parameter).
import asyncio
import logging
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from core.errors import (
    BadRequest,
    HTTPError,
    PayloadTooLarge,
    ServiceUnavailable,
    Unprocessable,
    UnsupportedMediaType,
)
from core.ingress import install_ingress, request_id_of
from core.metrics import ModelMetrics
from core.model_store import ModelStore
from core.resilience import describe_error, gather_with_deadline
from core.resources import StageResources, resolve_actor_options, wants_gpu
from patterns.pipeline.preprocess import (
    ImageLimits,
    ImageRejected,
    install_pil_guard,
    prepare,
    to_original,
)
from patterns.pipeline.rules import RuleConfig, decide
from patterns.pipeline.scenes import CANVAS

logger = logging.getLogger("patterns.pipeline")
RAW_TYPES = ("image/png", "image/jpeg", "image/jpg")
# The statuses Preprocess refuses an image with, as the ingress raises them.
REFUSALS: dict[int, type[HTTPError]] = {
    400: BadRequest,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: Unprocessable,
}


# ------------------------------------------------------------------------------ config
class ModelStage(BaseModel):
    """One model stage: which network, which weights, how it batches, what it asks for."""

    arch: str
    # store:NAME/VERSION | file:///x.safetensors | s3://bucket/x.safetensors |
    # torchvision:DEFAULT (published weights; detector architectures only; needs network).
    weights: str
    # how many requests may share one forward pass, and how long may a batch wait to fill?
    max_batch_size: int = Field(default=16, ge=1, le=256)
    batch_wait_timeout_s: float = Field(default=0.005, ge=0, le=1)
    resources: StageResources = StageResources(num_cpus=0.2)


class DetectorStage(ModelStage):
    arch: str = "centernet_digits"
    weights: str = "store:pipeline-detector/v1"
    score_threshold: float = Field(default=0.3, ge=0, le=1)
    # Fractional GPU: two detector replicas can share one GPU. No GPU -> CPU placement.
    resources: StageResources = StageResources(num_cpus=0.2, num_gpus=0.5)


class SceneStage(ModelStage):
    arch: str = "count_cnn"
    weights: str = "store:pipeline-scene/v1"
    resources: StageResources = StageResources(num_cpus=0.1, num_gpus=0.25)


class DigitStage(ModelStage):
    arch: str = "digit_cnn"
    weights: str = "store:pipeline-digits/v1"
    max_batch_size: int = Field(default=32, ge=1, le=256)  # requests, each with 0-4 crops
    resources: StageResources = StageResources(num_cpus=0.1, num_gpus=0.25)


class PipelineArgs(BaseModel):
    detector: DetectorStage = DetectorStage()
    scene: SceneStage = SceneStage()
    digits: DigitStage = DigitStage()
    limits: ImageLimits = ImageLimits()
    rules: RuleConfig = RuleConfig()
    max_image_bytes: int = Field(default=5_000_000, ge=1)
    max_batch_images: int = Field(default=8, ge=1, le=64)  # images in one /read/batch
    # No request waits on a stage longer than this; a late stage -> 503 (or, for the scene
    # classifier, an answer that says it is degraded and a decision of "review").
    stage_timeout_s: float = Field(default=10.0, gt=0)
    preprocess_resources: StageResources = StageResources(num_cpus=0.2)
    rules_resources: StageResources = StageResources(num_cpus=0.05)
    ingress_resources: StageResources = StageResources(num_cpus=0.1)
    model_store_uri: str | None = None  # default: COOKBOOK_MODEL_STORE_URI
    # fsspec options for checkpoint URIs, e.g. {"endpoint_url": "http://127.0.0.1:9000"}.
    checkpoint_storage_options: dict[str, Any] = Field(default_factory=dict)


# ------------------------------------------------------------------------------ stages
@serve.deployment(max_ongoing_requests=16)
class Preprocess:
    """CPU stage: bytes in, a normalised 96x96 tensor (or a refusal with a sentence) out."""

    def __init__(self, limits: dict[str, Any]) -> None:
        self.limits = ImageLimits(**limits)
        install_pil_guard(self.limits)
        prepare(_blank_png(), self.limits)  # warm up: import PIL's codecs now, not on request 1

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
        return {"ok": True, "tensor": out.tensor, "meta": out.meta, "compute_ms": ms}


class _TorchStage:
    """Shared by the model stages: load weights, pick the device, warm up, batching knobs.

    A subclass names its config model (``spec_cls``) and its metric tag (``stage``), and
    defines ``_batched`` (a ``@serve.batch`` method) and, where a plain forward pass on one
    blank image does not fit its model, ``_warm_up``.
    """

    stage = "model"
    spec_cls: type[ModelStage] = ModelStage

    def __init__(self, spec: dict, store_uri: str | None, on_gpu: bool, opts: dict) -> None:
        import torch

        from patterns.pipeline.models import load_model

        self.spec = self.spec_cls(**spec)
        # A replica owns a fraction of a core: more threads would only contend.
        torch.set_num_threads(1)
        self.device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
        store = ModelStore(store_uri) if store_uri else ModelStore.from_settings()
        self.model = load_model(self.spec.arch, self.spec.weights, store, storage_options=opts)
        self.model.module.to(self.device)
        self.info = {**self.model.info, "arch": self.spec.arch, "device": self.device}
        self.metrics = ModelMetrics("pipeline", self.stage, str(self.info.get("version")))
        # One forward pass before traffic: the first one pays for lazy initialisation.
        with torch.inference_mode():
            self._warm_up(torch.zeros(1, 3, CANVAS, CANVAS, device=self.device))

    def _warm_up(self, x: Any) -> None:
        self.model.module(x)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """user_config (max_batch_size, batch_wait_timeout_s; see _model_stage), applied
        live when it changes; validated as the stage's config, a knob left out keeps its
        value."""
        self.spec = self.spec_cls(**{**self.spec.model_dump(), **config})
        self._batched.set_max_batch_size(self.spec.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.spec.batch_wait_timeout_s)

    def _stack(self, tensors: list[np.ndarray]):
        import torch

        return torch.as_tensor(np.stack(tensors)).float().to(self.device)

    def _observed(self, t0: float, batch_size: int) -> dict[str, Any]:
        """Record one forward pass (started at ``t0``) in the metrics; returns the fields
        every request of the batch reports about it."""
        ms = (time.perf_counter() - t0) * 1000
        self.metrics.observe(ms / 1000)
        self.metrics.observe_batch(batch_size)
        return {"compute_ms": round(ms, 2), "batch_size": batch_size, "model": self.info}

    def model_info(self) -> dict[str, Any]:
        """This replica's model version and the held-out figures of the manifest it loaded
        (None for weights from a bare checkpoint or published weights)."""
        return {**self.info, "heldout_metrics": self.model.heldout_metrics}


@serve.deployment(max_ongoing_requests=32)
class Detector(_TorchStage):
    stage = "detector"
    spec_cls = DetectorStage

    def _warm_up(self, x: Any) -> None:
        from patterns.pipeline.models import run_detector

        run_detector(self.model, self.spec.arch, x, 1.0)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _batched(self, tensors: list[np.ndarray]) -> list[dict[str, Any]]:
        import torch

        from patterns.pipeline.models import run_detector

        t0 = time.perf_counter()
        with torch.inference_mode():
            dets = run_detector(
                self.model, self.spec.arch, self._stack(tensors), self.spec.score_threshold
            )
        common = self._observed(t0, len(tensors))
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

    async def detect(self, tensor: np.ndarray) -> dict[str, Any]:
        return await self._batched(tensor)


@serve.deployment(max_ongoing_requests=32)
class SceneClassifier(_TorchStage):
    stage = "scene_classifier"
    spec_cls = SceneStage

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _batched(self, tensors: list[np.ndarray]) -> list[dict[str, Any]]:
        import torch

        t0 = time.perf_counter()
        with torch.inference_mode():
            probs = torch.softmax(self.model.module(self._stack(tensors)), 1).cpu().numpy()
        common = self._observed(t0, len(tensors))
        return [
            {"count": int(p.argmax()), "confidence": round(float(p.max()), 4), **common}
            for p in probs
        ]

    async def classify(self, tensor: np.ndarray) -> dict[str, Any]:
        return await self._batched(tensor)


@serve.deployment(max_ongoing_requests=32)
class DigitClassifier(_TorchStage):
    stage = "digit_classifier"
    spec_cls = DigitStage

    def _warm_up(self, x: Any) -> None:
        import torch

        from patterns.pipeline.models import crop_digits

        box = torch.tensor([[10.0, 10.0, 40.0, 40.0]], device=self.device)
        self.model.module(crop_digits(x, [box]))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batched(self, items: list[tuple[np.ndarray, list]]) -> list[dict[str, Any]]:
        import torch

        from patterns.pipeline.models import crop_digits

        t0 = time.perf_counter()
        x = self._stack([t for t, _ in items])
        boxes = [torch.as_tensor(b, dtype=torch.float32, device=self.device) for _, b in items]
        with torch.inference_mode():  # one forward pass for every crop of every request
            probs = torch.softmax(self.model.module(crop_digits(x, boxes)), 1).cpu().numpy()
        common = self._observed(t0, len(items))
        out, start = [], 0
        for _, b in items:
            p = probs[start : start + len(b)]
            start += len(b)
            out.append(
                {
                    "labels": p.argmax(1).tolist(),
                    "confidences": [round(float(v), 4) for v in p.max(1)],
                    **common,
                }
            )
        return out

    async def read(self, tensor: np.ndarray, boxes: list[list[float]]) -> dict[str, Any]:
        return await self._batched((tensor, boxes))


@serve.deployment(max_ongoing_requests=64)
class BusinessRules:
    """Turns model outputs into the action a sorting line takes (see rules.py)."""

    def __init__(self, rules: dict[str, Any]) -> None:
        self.rules = RuleConfig(**rules)

    def decide(self, detections: list[dict], scene_count: int | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        out = decide(detections, scene_count, self.rules)
        out["compute_ms"] = round((time.perf_counter() - t0) * 1000, 3)
        return out

    def describe(self) -> dict[str, Any]:
        return {"rule": "accept / review / reject parcel codes", **self.rules.model_dump()}


# ------------------------------------------------------------------------------ ingress
api = FastAPI(
    title="Vision pipeline",
    description="Reads digit codes off parcel-label images: decode -> detect + count "
    "(in parallel) -> classify each digit -> business rule. Every stage is its own Ray "
    "Serve deployment with its own resources and batching.",
)
install_ingress(api, app_name="pipeline", max_body_bytes=64 * 1024 * 1024)

_IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"image": {"type": "string", "format": "binary"}},
                }
            },
        },
    }
}
_BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                        }
                    },
                }
            }
        },
    }
}


def _blank_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (CANVAS, CANVAS)).save(buf, format="PNG")
    return buf.getvalue()


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


@serve.deployment(max_ongoing_requests=100)
@serve.ingress(api)
class PipelineIngress:
    def __init__(
        self,
        preprocess: DeploymentHandle,
        detector: DeploymentHandle,
        scene: DeploymentHandle,
        digits: DeploymentHandle,
        rules: DeploymentHandle,
        args: dict[str, Any],
    ) -> None:
        self.args = PipelineArgs(**args)
        self.preprocess = preprocess
        self.detector = detector
        self.scene = scene
        self.digits = digits
        self.rules = rules

    # -- routes --------------------------------------------------------------------------
    @api.post(
        "/read",
        summary="Read the digit code in one image",
        openapi_extra=_IMAGE_BODY,
        responses={400: {}, 413: {}, 415: {}, 422: {}, 503: {}},
    )
    async def read(self, request: Request) -> dict[str, Any]:
        """Body: PNG or JPEG bytes (Content-Type image/png or image/jpeg), or multipart
        form data with one file field (``image``)."""
        ctype = _content_type(request)
        if ctype == "multipart/form-data":
            files = await self._files(request, limit=self.args.max_batch_images, single=True)
            if not files:
                raise BadRequest(
                    "The multipart upload holds no file; attach the image in field 'image'."
                )
            name, data = files[0]
        elif ctype in RAW_TYPES:
            # Refuse an oversized image on its declared length, before reading the body.
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.args.max_image_bytes:
                raise PayloadTooLarge(self._too_big_sentence("", int(declared)))
            name, data = "body", await request.body()
        else:
            raise UnsupportedMediaType(self._media_sentence(ctype))
        return await self._read_one(data, name, request_id_of(request))

    @api.post(
        "/read/batch",
        summary="Read several images in one request",
        openapi_extra=_BATCH_BODY,
        responses={400: {}, 413: {}, 415: {}, 422: {}, 503: {}},
    )
    async def read_batch(self, request: Request) -> dict[str, Any]:
        """Multipart form data with up to ``max_batch_images`` files (field ``images``).
        The images go through the pipeline concurrently, so the model stages batch them."""
        ctype = _content_type(request)
        if ctype != "multipart/form-data":
            raise UnsupportedMediaType(
                "/read/batch takes multipart/form-data with one file per image "
                f"(field 'images'); got {ctype or 'no Content-Type'}."
            )
        files = await self._files(request, limit=self.args.max_batch_images)
        if not files:
            raise BadRequest("The batch holds no files; attach images in the 'images' field.")
        rid = request_id_of(request)
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(self._read_one(data, name, f"{rid}/{i}", index=i) for i, (name, data) in
              enumerate(files)),
            return_exceptions=True,
        )  # fmt: skip
        for r in results:  # the first refusal, in upload order, answers for the batch
            if isinstance(r, BaseException):
                raise r
        return {
            "request_id": rid,
            "count": len(results),
            "results": results,
            "total_ms": round((time.perf_counter() - t0) * 1000, 2),
        }

    @api.get("/models", summary="Model versions, devices and held-out quality")
    async def models(self) -> dict[str, Any]:
        det, scene, digits, rules = await asyncio.gather(
            self.detector.model_info.remote(),
            self.scene.model_info.remote(),
            self.digits.model_info.remote(),
            self.rules.describe.remote(),
        )
        # The three models were trained and measured together: one set of figures, from the
        # manifest of the detector version its replica loaded (None when the detector's
        # weights came from a bare checkpoint or torchvision).
        heldout = det.pop("heldout_metrics")
        scene.pop("heldout_metrics")
        digits.pop("heldout_metrics")
        return {
            "detector": det,
            "scene_classifier": scene,
            "digit_classifier": digits,
            "business_rules": rules,
            "heldout_metrics": heldout,
        }

    # -- helpers -------------------------------------------------------------------------
    def _too_big_sentence(self, where: str, size: int) -> str:
        limit = self.args.max_image_bytes
        return f"{where}The image is {size} bytes; at most {limit} bytes per image."

    def _media_sentence(self, ctype: str) -> str:
        got = ctype or "no Content-Type"
        return (
            f"Got {got}; send the image as image/png or image/jpeg bytes, or as "
            "multipart/form-data with the file in field 'image'."
        )

    async def _files(
        self, request: Request, limit: int, single: bool = False
    ) -> list[tuple[str, bytes]]:
        try:
            # max_files bounds the parser itself; the limit below gives the sentence.
            form = await request.form(max_files=limit + 32, max_fields=limit + 32)
        except Exception as exc:  # malformed multipart: missing boundary, cut-off parts...
            raise BadRequest(f"The multipart body could not be parsed ({exc}).") from exc
        files = [v for _, v in form.multi_items() if hasattr(v, "read")]
        if len(files) > 1 and single:
            raise BadRequest(
                f"The multipart upload holds {len(files)} files; /read takes one "
                "(use /read/batch for several)."
            )
        if len(files) > limit:
            raise PayloadTooLarge(
                f"{len(files)} images in one request; send at most {limit} per request."
            )
        out = []
        for i, upload in enumerate(files):
            name = upload.filename or "upload"
            # The parser has spooled the part already; refuse it before reading it into memory.
            if upload.size is not None and upload.size > self.args.max_image_bytes:
                where = "" if single else f"Image {i + 1} ({name}): "
                raise PayloadTooLarge(self._too_big_sentence(where, upload.size))
            out.append((name, await upload.read()))
        return out

    async def _call(self, stage: str, response: Any) -> tuple[Any, float]:
        """Await one stage with the stage timeout; a late or failed stage is a 503."""
        t0 = time.perf_counter()
        try:
            result = await asyncio.wait_for(response, self.args.stage_timeout_s)
        except TimeoutError:
            response.cancel()
            raise ServiceUnavailable(
                f"The {stage} stage did not answer within {self.args.stage_timeout_s:g} s; "
                "retry shortly."
            ) from None
        except Exception as exc:
            logger.warning("stage %s failed: %s", stage, describe_error(exc))
            raise ServiceUnavailable(
                f"The {stage} stage failed ({describe_error(exc)}); retry shortly."
            ) from None
        return result, round((time.perf_counter() - t0) * 1000, 2)

    async def _read_one(
        self, data: bytes, name: str, request_id: str, index: int | None = None
    ) -> dict[str, Any]:
        where = f"Image {index + 1} ({name}): " if index is not None else ""
        if not data:
            raise BadRequest(f"{where}The image is empty (0 bytes); send PNG or JPEG bytes.")
        if len(data) > self.args.max_image_bytes:
            raise PayloadTooLarge(self._too_big_sentence(where, len(data)))
        t_start = time.perf_counter()
        hops: dict[str, float] = {}
        compute: dict[str, float] = {}
        batch_sizes: dict[str, int] = {}

        pre, hops["preprocess"] = await self._call("preprocess", self.preprocess.run.remote(data))
        compute["preprocess"] = pre["compute_ms"]
        if not pre["ok"]:  # 400, 413, 415 or 422, chosen by Preprocess
            raise REFUSALS.get(pre["status"], Unprocessable)(where + pre["message"])
        tensor, meta = pre["tensor"], pre["meta"]

        async def timed(aw: Any) -> tuple[Any, float]:
            t0 = time.perf_counter()
            return await aw, round((time.perf_counter() - t0) * 1000, 2)

        det_call = self.detector.detect.remote(tensor)
        scene_call = self.scene.classify.remote(tensor)
        fan = await gather_with_deadline(
            {"detector": timed(det_call), "scene_classifier": timed(scene_call)},
            deadline_s=self.args.stage_timeout_s,
            quorum=1,
        )
        for stage, call in (("detector", det_call), ("scene_classifier", scene_call)):
            if stage in fan.failed:
                call.cancel()
        if "detector" not in fan.results:
            raise ServiceUnavailable(
                f"The detector stage did not answer ({fan.failed.get('detector')}); retry shortly."
            )
        det, hops["detector"] = fan.results["detector"]
        compute["detector"], batch_sizes["detector"] = det["compute_ms"], det["batch_size"]
        versions = {"detector": det["model"]}
        scene_count: int | None = None
        scene_out: dict[str, Any] = {"status": fan.failed.get("scene_classifier", "ok")}
        if "scene_classifier" in fan.results:
            scene, hops["scene_classifier"] = fan.results["scene_classifier"]
            compute["scene_classifier"] = scene["compute_ms"]
            batch_sizes["scene_classifier"] = scene["batch_size"]
            versions["scene_classifier"] = scene["model"]
            scene_count = scene["count"]
            scene_out = {"digit_count": scene["count"], "confidence": scene["confidence"]}

        detections: list[dict[str, Any]] = []
        if det["boxes"]:
            read, hops["digit_classifier"] = await self._call(
                "digit classifier", self.digits.read.remote(tensor, det["boxes"])
            )
            compute["digit_classifier"] = read["compute_ms"]
            batch_sizes["digit_classifier"] = read["batch_size"]
            versions["digit_classifier"] = read["model"]
            for box, score, kind, label, conf in zip(
                det["boxes"], det["scores"], det["labels"], read["labels"], read["confidences"],
                strict=True,
            ):  # fmt: skip
                detections.append(
                    {
                        "box": to_original(box, meta),
                        "object": kind,
                        "score": round(float(score), 4),
                        "label": int(label),
                        "digit_confidence": conf,
                    }
                )
        detections.sort(key=lambda d: d["box"][0])  # reading order: left to right

        decision, hops["business_rules"] = await self._call(
            "business rules", self.rules.decide.remote(detections, scene_count)
        )
        compute["business_rules"] = decision.pop("compute_ms")
        hops["total"] = round((time.perf_counter() - t_start) * 1000, 2)
        return {
            "request_id": request_id,
            "image": {k: meta[k] for k in ("width", "height", "format")},
            "detections": detections,
            "scene": scene_out,
            "decision": decision,
            "degraded": fan.degraded,
            "timings_ms": hops,
            "compute_ms": compute,
            "batch_sizes": batch_sizes,
            "model_versions": versions,
        }


# ------------------------------------------------------------------------------ builder
def _model_stage(cls: Any, spec: ModelStage, args: PipelineArgs, stage: str) -> Application:
    options = resolve_actor_options(spec.resources, f"pipeline/{stage}")
    return cls.options(
        ray_actor_options=options,
        user_config={
            "max_batch_size": spec.max_batch_size,
            "batch_wait_timeout_s": spec.batch_wait_timeout_s,
        },
    ).bind(spec.model_dump(), args.model_store_uri, wants_gpu(options),
           args.checkpoint_storage_options)  # fmt: skip


def build_app(args: PipelineArgs) -> Application:
    if isinstance(args, dict):  # `serve run ... key=value` or a config's args block
        args = PipelineArgs(**args)
    preprocess = Preprocess.options(
        ray_actor_options=resolve_actor_options(args.preprocess_resources, "pipeline/preprocess")
    ).bind(args.limits.model_dump())
    detector = _model_stage(Detector, args.detector, args, "detector")
    scene = _model_stage(SceneClassifier, args.scene, args, "scene_classifier")
    digits = _model_stage(DigitClassifier, args.digits, args, "digit_classifier")
    rules = BusinessRules.options(
        ray_actor_options=resolve_actor_options(args.rules_resources, "pipeline/rules")
    ).bind(args.rules.model_dump())
    ingress = PipelineIngress.options(
        ray_actor_options=resolve_actor_options(args.ingress_resources, "pipeline/ingress")
    )
    return ingress.bind(preprocess, detector, scene, digits, rules, args.model_dump())


def __getattr__(name: str) -> Any:
    """``serve run patterns.pipeline.app:app`` builds the default app here, on first access.

    Not at import: building resolves placements against the cluster and logs, and importing
    this module (for its args model, say) should do neither.
    """
    if name == "app":
        return build_app(PipelineArgs())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Vision pipeline on Ray Serve: the same stages split into deployments, or fused in one.

``topology: split`` (a GPU node: each model stage its own replicas, GPU fraction, batching):

    client --> PipelineIngress (FastAPI: raw PNG/JPEG, multipart, multipart batch)
                  |  PipelineFlow (flow.py): the request, in order
                  v
               Preprocess (CPU: bomb guard, decode, letterbox to a 96x96 uint8 image)
                  |  the image goes on to the models straight from Preprocess
                  +--> Detector (boxes) ------> DigitClassifier (0-9 per box)
                  +--> SceneClassifier (how many digits)        |
                  v                                             v
               business rule (rules.py, in process): accept / review / reject

``topology: fused`` (a small CPU box: no hop at all): PipelineIngress runs the same flow over
``stages.FusedStages``: decode in the replica, the three models batched together in it.

Run: ``serve run patterns.pipeline.app:app`` (after ``python -m patterns.pipeline.artifacts``).
Knobs: config.yaml (the same values as the defaults below).
"""

# No `from __future__ import annotations` here: Serve's class-based FastAPI views need real
# annotations (with string annotations `self` becomes a required query parameter).
from typing import Any, Literal

from fastapi import FastAPI, Request
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from core.apps import SURGE, coerce_args, default_app
from core.ingress import IDEMPOTENT, install_ingress, request_id_of
from core.model_store import ModelStore
from core.openapi import document_replica, error_responses
from core.readiness import Readiness
from core.resources import StageResources, resolve_actor_options, torch_device, wants_gpu
from patterns.pipeline.deployments import (
    Detector,
    DigitClassifier,
    HandleStages,
    Preprocess,
    SceneClassifier,
)
from patterns.pipeline.flow import PipelineFlow
from patterns.pipeline.preprocess import ImageLimits
from patterns.pipeline.rules import RuleConfig
from patterns.pipeline.stages import (
    BATCH_KNOBS,
    DetectorSpec,
    DigitsSpec,
    FusedStages,
    ModelSpec,
    PreprocessStage,
    SceneSpec,
)
from patterns.pipeline.uploads import (
    BATCH_BODY,
    IMAGE_BODY,
    batch_of_images,
    document_limits,
    one_image,
)


class FusedSpec(BaseModel):
    """The one replica of ``topology: fused``: it decodes, runs the three models on a batch
    of requests at once, and answers."""

    # how many requests may share one pass of the three models, and how long may a batch
    # wait to fill? (scaled by load: no wait after a one-request batch; batcher.py)
    max_batch_size: int = Field(default=16, ge=1, le=256)
    batch_wait_timeout_s: float = Field(default=0.002, ge=0, le=1)
    # Where the cluster has no GPU, the GPU fraction becomes a CPU placement (core.resources).
    resources: StageResources = StageResources(num_cpus=0.25, num_gpus=0.25)


class PipelineArgs(BaseModel):
    # split: every stage its own deployment (scale stages apart, share a GPU by fractions);
    # fused: all stages in the ingress replica (no hop; a small CPU-only box). The local
    # profile (config.yaml) is fused: measured faster on 2 cores (README); the GPU profile
    # (config.gpu.yaml) is split.
    topology: Literal["split", "fused"] = "fused"
    # split only: decode in the ingress replicas (one hop fewer per request: measured 7 ms
    # less per request and 25% less CPU on 2 cores, README) or in a Preprocess deployment of
    # its own (to scale decoding of large photos apart from the ingress).
    preprocess_in: Literal["ingress", "deployment"] = "ingress"
    fused: FusedSpec = FusedSpec()
    detector: DetectorSpec = DetectorSpec()
    scene: SceneSpec = SceneSpec()
    digits: DigitsSpec = DigitsSpec()
    limits: ImageLimits = ImageLimits()
    rules: RuleConfig = RuleConfig()
    max_image_bytes: int = Field(default=5_000_000, ge=1)
    max_batch_images: int = Field(default=8, ge=1, le=64)  # images in one /read/batch
    # No request waits on a stage longer than this; a late stage -> 503 (or, for the scene
    # classifier, an answer that says it is degraded and a decision of "review").
    stage_timeout_s: float = Field(default=10.0, gt=0)
    preprocess_resources: StageResources = StageResources(num_cpus=0.2)
    ingress_resources: StageResources = StageResources(num_cpus=0.1)
    model_store_uri: str | None = None  # default: COOKBOOK_MODEL_STORE_URI
    # fsspec options for checkpoint URIs, e.g. {"endpoint_url": "http://127.0.0.1:9000"}.
    checkpoint_storage_options: dict[str, Any] = Field(default_factory=dict)


api = FastAPI(
    title="Vision pipeline",
    description="Reads digit codes off parcel-label images: decode -> detect + count "
    "(in parallel) -> classify each digit -> business rule. Each model stage is its own "
    "Ray Serve deployment with its own resources and batching.",
)
install_ingress(api, app_name="pipeline", max_body_bytes=64 * 1024 * 1024)
_ERRORS = error_responses(400, 413, 415, 422, 503)


def _document(doc: dict[str, Any]) -> None:
    """The limits this replica's args set, in the schema it serves (the routes check them)."""
    try:
        args = serve.get_replica_context().servable_object.args
    except Exception:  # not in a replica: the defaults
        args = PipelineArgs()
    document_limits(
        doc,
        max_image_bytes=args.max_image_bytes,
        max_files=args.max_batch_images,
        limits=args.limits,
    )


document_replica(api, _document)


# split: I/O-bound, awaits the stages, many requests in flight per replica are cheap.
# fused: the options below are replaced by FUSED_OPTIONS in build_app.
@serve.deployment(
    max_surge_percent=SURGE,
    max_ongoing_requests=100,
    # Two at least: one lost ingress never takes the app's route away (reliability/).
    autoscaling_config={"min_replicas": 2, "max_replicas": 3, "target_ongoing_requests": 50},
)
@serve.ingress(api)
class PipelineIngress:
    def __init__(
        self,
        preprocess: DeploymentHandle | None,
        detector: DeploymentHandle | None,
        scene: DeploymentHandle | None,
        digits: DeploymentHandle | None,
        args: dict[str, Any],
    ) -> None:
        self.args = PipelineArgs(**args)
        self.fused: FusedStages | None = None
        stages: Any
        if self.args.topology == "fused":
            stages = self.fused = self._load_fused()
        else:
            local = PreprocessStage(self.args.limits) if preprocess is None else preprocess
            stages = HandleStages(local, detector, scene, digits)  # type: ignore[arg-type]
        self.flow = PipelineFlow(
            stages,
            rules=self.args.rules,
            stage_timeout_s=self.args.stage_timeout_s,
            max_image_bytes=self.args.max_image_bytes,
        )
        self.readiness = Readiness("pipeline", self._warm_up)

    async def check_health(self) -> None:
        """Healthy once every stage (one held-out scene read end to end) answered for real
        (core/readiness.py)."""
        await self.readiness.wait()

    def _load_fused(self) -> FusedStages:
        """fused: every stage in this replica, on the device it was given."""
        import torch

        # A replica owns a core at most: more torch threads would only contend.
        torch.set_num_threads(1)
        args = self.args
        on_gpu = wants_gpu(resolve_actor_options(args.fused.resources, "pipeline/fused"))
        return FusedStages.load(
            ModelStore.open(args.model_store_uri),
            torch_device(on_gpu),
            limits=args.limits,
            detector=args.detector,
            scene=args.scene,
            digits=args.digits,
            storage_options=args.checkpoint_storage_options,
            metrics_app="pipeline",
            max_batch_size=args.fused.max_batch_size,
            batch_wait_timeout_s=args.fused.batch_wait_timeout_s,
        )

    async def _warm_up(self) -> None:
        from patterns.pipeline.scenes import scene_png

        await self.flow.model_info()
        await self.flow.read(scene_png("heldout", 0), "warm-up")

    def reconfigure(self, config: dict[str, Any]) -> None:
        """fused: the batching knobs (user_config), applied live to the replica's batcher."""
        if self.fused is not None:
            knobs = FusedSpec(**{**self.args.fused.model_dump(), **config})
            self.fused.batcher.set_max_batch_size(knobs.max_batch_size)
            self.fused.batcher.set_batch_wait_timeout_s(knobs.batch_wait_timeout_s)

    @api.post(
        "/read",
        summary="Read the digit code in one image",
        openapi_extra={**IMAGE_BODY, **IDEMPOTENT},
        responses=_ERRORS,
    )
    async def read(self, request: Request) -> dict[str, Any]:
        """Body: PNG or JPEG bytes (Content-Type image/png or image/jpeg), or multipart
        form data with one file field (``image``)."""
        data = await one_image(
            request,
            max_image_bytes=self.args.max_image_bytes,
            max_files=self.args.max_batch_images,
        )
        return await self.flow.read(data, request_id_of(request))

    @api.post(
        "/read/batch",
        summary="Read several images in one request",
        openapi_extra={**BATCH_BODY, **IDEMPOTENT},
        responses=_ERRORS,
    )
    async def read_batch(self, request: Request) -> dict[str, Any]:
        """Multipart form data with up to ``max_batch_images`` files (field ``images``).
        The images go through the pipeline concurrently, so the model stages batch them."""
        files = await batch_of_images(
            request,
            max_image_bytes=self.args.max_image_bytes,
            max_files=self.args.max_batch_images,
        )
        return await self.flow.read_many(files, request_id_of(request))

    @api.get(
        "/model",
        summary="Model versions, devices and held-out quality of each stage",
        responses=error_responses(503),
    )
    async def model(self) -> dict[str, Any]:
        return await self.flow.model_info()


# ------------------------------------------------------------------------------ builder
# fused: one process per core does all the work (decode and models); two replicas use both
# cores of the local 2-CPU box. Each holds at most this many requests: enough to fill a batch
# twice over, few enough that a burst queues in the proxy instead of in a busy replica.
FUSED_OPTIONS: dict[str, Any] = {"num_replicas": 2, "max_ongoing_requests": 32}


def _model_stage(cls: Any, spec: ModelSpec, args: PipelineArgs, stage: str) -> Application:
    options = resolve_actor_options(spec.resources, f"pipeline/{stage}")
    return cls.options(
        ray_actor_options=options,
        # Batching knobs travel as user_config (applied live by reconfigure), not as init
        # args, so changing them reconfigures the replicas instead of replacing them.
        user_config=spec.model_dump(include=BATCH_KNOBS),
    ).bind(
        spec.model_dump(exclude=BATCH_KNOBS),
        args.model_store_uri,
        wants_gpu(options),
        args.checkpoint_storage_options,
    )


def build_app(args: PipelineArgs | dict[str, Any] | None = None) -> Application:
    args = coerce_args(args, PipelineArgs)
    if args.topology == "fused":
        ingress = PipelineIngress.options(
            ray_actor_options=resolve_actor_options(args.fused.resources, "pipeline/fused"),
            user_config=args.fused.model_dump(include=BATCH_KNOBS),
            autoscaling_config=None,
            **FUSED_OPTIONS,
        )
        return ingress.bind(None, None, None, None, args.model_dump())
    preprocess = None
    if args.preprocess_in == "deployment":
        preprocess = Preprocess.options(
            ray_actor_options=resolve_actor_options(
                args.preprocess_resources, "pipeline/preprocess"
            )
        ).bind(args.limits.model_dump())
    detector = _model_stage(Detector, args.detector, args, "detector")
    scene = _model_stage(SceneClassifier, args.scene, args, "scene_classifier")
    digits = _model_stage(DigitClassifier, args.digits, args, "digit_classifier")
    ingress = PipelineIngress.options(
        ray_actor_options=resolve_actor_options(args.ingress_resources, "pipeline/ingress")
    )
    return ingress.bind(preprocess, detector, scene, digits, args.model_dump())


__getattr__ = default_app(lambda: build_app(PipelineArgs()))

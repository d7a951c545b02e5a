"""The pipeline's stage deployments (``topology: split``): each wraps one plain stage class
from ``stages.py``.

A deployment adds only what Serve is for: its own replicas and resources, batching across
requests (``batcher.AdaptiveBatcher``, knobs from ``user_config``, live through
``reconfigure``), and the device it was given. ``HandleStages`` is what the request flow
(``flow.PipelineFlow``) calls. Every entry point is ``async def``: Serve runs a sync method in
a thread, and that thread hop is most of what a hop costs once the proxy is out of the way
(README, "cost of each hop").

The options written here are the defaults ``serve run patterns.pipeline.app:app`` uses (with
``topology: split``); patterns/pipeline/config.gpu.yaml states them per stage for a GPU node.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from core.apps import SURGE
from core.batching import BatchedDeployment
from core.model_store import ModelStore
from core.resources import torch_device
from patterns.pipeline.batcher import AdaptiveBatcher
from patterns.pipeline.preprocess import ImageLimits
from patterns.pipeline.stages import (
    DetectorStage,
    DigitStage,
    ModelStage,
    PreprocessStage,
    SceneStage,
)


# CPU-bound decode: scale it on its own, without copying the models.
@serve.deployment(
    max_surge_percent=SURGE,
    max_ongoing_requests=16,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8},
)
class Preprocess:
    """CPU stage: bytes in, a letterboxed uint8 image (or a refusal with a sentence) out."""

    def __init__(self, limits: dict[str, Any]) -> None:
        self.stage = PreprocessStage(ImageLimits(**limits))

    async def run(self, data: bytes) -> dict[str, Any]:
        # Decoding a label photo takes well under a millisecond: done on the replica's loop,
        # not in a thread (a thread hop costs about as much as the decode).
        return self.stage.run(data)


class _ModelDeployment(BatchedDeployment):
    """Loads its stage on the device it was given and batches its calls across requests;
    batching knobs come from user_config."""

    stage_cls: type[ModelStage] = ModelStage
    stage: ModelStage

    def __init__(
        self, spec: dict[str, Any], store_uri: str | None, on_gpu: bool, opts: dict[str, Any]
    ) -> None:
        import torch

        # A replica owns a fraction of a core: more threads would only contend.
        torch.set_num_threads(1)
        self.stage = self.stage_cls(
            spec,
            ModelStore.open(store_uri),
            torch_device(on_gpu),
            storage_options=opts,
            metrics_app="pipeline",
        )
        # reconfigure (core.batching.BatchedDeployment) sets its knobs from user_config.
        self._batched = AdaptiveBatcher(self.stage.run, name=self.stage.name)

    def model_info(self) -> dict[str, Any]:
        return self.stage.describe()


# Allow at least max_batch_size requests in flight, or batches can never fill.
@serve.deployment(max_surge_percent=SURGE, max_ongoing_requests=32)
class Detector(_ModelDeployment):
    stage_cls = DetectorStage

    async def detect(self, prepared: dict[str, Any]) -> dict[str, Any]:
        return await self._batched.submit(prepared["image"])


@serve.deployment(max_surge_percent=SURGE, max_ongoing_requests=32)
class SceneClassifier(_ModelDeployment):
    stage_cls = SceneStage

    async def classify(self, prepared: dict[str, Any]) -> dict[str, Any]:
        return await self._batched.submit(prepared["image"])


@serve.deployment(max_surge_percent=SURGE, max_ongoing_requests=64)
class DigitClassifier(_ModelDeployment):
    stage_cls = DigitStage
    stage: DigitStage

    async def read(self, prepared: dict[str, Any], detections: dict[str, Any]) -> dict[str, Any]:
        """``prepared`` from Preprocess and ``detections`` from the Detector, each handed
        over by Serve straight from the stage that made it."""
        if not detections["boxes"]:
            return self.stage.nothing_to_read()
        return await self._batched.submit((prepared["image"], detections["boxes"]))


class HandleStages:
    """``flow.Stages`` over DeploymentHandles: each call returns its DeploymentResponse,
    which the flow awaits or hands on to the next call.

    ``preprocess`` is the Preprocess deployment's handle, or a ``PreprocessStage`` to decode in
    this (the ingress) process: one hop fewer on every request, and the models get the image
    from where it was decoded."""

    def __init__(
        self,
        preprocess: DeploymentHandle | PreprocessStage,
        detector: DeploymentHandle,
        scene: DeploymentHandle,
        digits: DeploymentHandle,
    ) -> None:
        self._preprocess = preprocess
        self._detector = detector
        self._scene = scene
        self._digits = digits

    def preprocess(self, data: bytes) -> Any:
        if isinstance(self._preprocess, PreprocessStage):
            return _done(self._preprocess.run(data))
        return self._preprocess.run.remote(data)

    def detect(self, prepared: Any) -> DeploymentResponse:
        return self._detector.detect.remote(_value(prepared))

    def count(self, prepared: Any) -> DeploymentResponse:
        return self._scene.classify.remote(_value(prepared))

    def read_digits(self, prepared: Any, detections: DeploymentResponse) -> DeploymentResponse:
        return self._digits.read.remote(_value(prepared), detections)

    def model_info(self) -> Mapping[str, DeploymentResponse]:
        return {
            "detector": self._detector.model_info.remote(),
            "scene_classifier": self._scene.model_info.remote(),
            "digit_classifier": self._digits.model_info.remote(),
        }


def _done(value: Any) -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


def _value(call: Any) -> Any:
    """What a handle call takes: a DeploymentResponse as it is (Serve resolves it), the
    result of a finished local future."""
    return call.result() if isinstance(call, asyncio.Future) else call

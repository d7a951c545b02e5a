"""The pipeline pattern as a monolith and as microservices: plain FastAPI apps, no Ray.

Both reuse the pattern's own public code (``patterns.pipeline``: ``PipelineFlow``, the stage
classes of ``stages``, ``PipelineArgs`` defaults, the monolith's routes in ``bench.monolith``),
so all three architectures of the study give the same answers from the same models. The
factories are for ``uvicorn --factory``; ``loadtests.targets`` starts them (one command per
architecture).

- ``monolith_app``: every stage in the worker process (``InProcessStages``); run it with
  ``--workers N``, each worker holding all the models.
- ``stage_app``: one stage as its own service (``LOADTEST_STAGE=preprocess|detector|scene|
  digits``): ``POST /run``, ``GET /describe``. Only that stage's model is loaded.
- ``gateway_app``: ``PipelineFlow`` over ``HttpStages``: each stage call is an HTTP request
  (httpx, keep-alive) to that stage's service (``LOADTEST_UPSTREAMS``, JSON name -> URL).

The image travels between services as base64 of the 96x96 uint8 array (27 KB), the boxes as
lists: what one Kubernetes Deployment per model would send.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request

from core.ingress import install_ingress

MODEL_STAGES = {"detector": "detector", "scene": "scene", "digits": "digits"}


def _args() -> Any:
    from patterns.pipeline.app import PipelineArgs

    return PipelineArgs()


def _store(args: Any) -> Any:
    from core.model_store import ModelStore

    return ModelStore.open(args.model_store_uri)


# ---------------------------------------------------------------------------- monolith
def monolith_app() -> FastAPI:
    """The pattern's own monolith (``patterns.pipeline.bench.monolith``): the study measures
    what the pipeline README measures."""
    from patterns.pipeline.bench.monolith import create_app

    return create_app()


def batched_monolith_app() -> FastAPI:
    """The same monolith, the three models batched across requests in each worker."""
    from patterns.pipeline.bench.monolith import create_batched_app

    return create_batched_app()


# ---------------------------------------------------------------------------- microservices
def encode_image(image: Any) -> dict[str, Any]:
    return {
        "image_b64": base64.b64encode(image.tobytes()).decode(),
        "shape": list(image.shape),
        "dtype": str(image.dtype),
    }


def decode_image(body: dict[str, Any]) -> Any:
    import numpy as np

    raw = base64.b64decode(body["image_b64"])
    return np.frombuffer(raw, dtype=body["dtype"]).reshape(body["shape"])


def _jsonable(value: Any) -> Any:
    """numpy scalars/arrays in stage answers -> plain JSON values."""
    import numpy as np

    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def stage_app() -> FastAPI:
    """One stage as its own service: ``LOADTEST_STAGE`` names it."""
    stage_name = os.environ.get("LOADTEST_STAGE", "")
    if stage_name not in ("preprocess", *MODEL_STAGES):
        raise SystemExit("set LOADTEST_STAGE=preprocess|detector|scene|digits")
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        import torch

        from patterns.pipeline import stages

        torch.set_num_threads(1)
        args = _args()
        opts = {"storage_options": args.checkpoint_storage_options}
        device = os.environ.get("LOADTEST_DEVICE", "cpu")  # the study's --gpu: every arm
        if stage_name == "preprocess":
            state["stage"] = stages.PreprocessStage(args.limits)
        elif stage_name == "detector":
            state["stage"] = stages.DetectorStage(args.detector, _store(args), device, **opts)
        elif stage_name == "scene":
            state["stage"] = stages.SceneStage(args.scene, _store(args), device, **opts)
        else:
            state["stage"] = stages.DigitStage(args.digits, _store(args), device, **opts)
        yield

    api = FastAPI(title=f"Vision pipeline: {stage_name} service", lifespan=lifespan)
    install_ingress(api, app_name=f"pipeline-{stage_name}", max_body_bytes=64 * 1024 * 1024)

    @api.post("/run")
    async def run(request: Request) -> dict[str, Any]:
        stage = state["stage"]  # sync torch work: in the threadpool, off the event loop
        if stage_name == "preprocess":
            out = await asyncio.to_thread(stage.run, await request.body())
            if out.get("ok"):
                out = {**out, **encode_image(out.pop("image"))}
            return _jsonable(out)
        body = await request.json()
        image = decode_image(body)
        if stage_name == "digits":
            return _jsonable((await asyncio.to_thread(stage.run, [(image, body["boxes"])]))[0])
        return _jsonable((await asyncio.to_thread(stage.run, [image]))[0])

    @api.get("/describe")
    async def describe() -> dict[str, Any]:
        if stage_name == "preprocess":
            return {"stage": "preprocess"}
        return _jsonable(state["stage"].describe())

    return api


class HttpStages:
    """``flow.Stages`` over HTTP: each call a task posting to that stage's service."""

    def __init__(self, client: Any, upstreams: dict[str, str]) -> None:
        self.client = client
        self.up = upstreams

    async def _post(self, stage: str, **kw: Any) -> dict[str, Any]:
        r = await self.client.post(f"{self.up[stage]}/run", **kw)
        r.raise_for_status()
        return r.json()

    async def _pre(self, data: bytes) -> dict[str, Any]:
        out = await self._post(
            "preprocess", content=data, headers={"Content-Type": "application/octet-stream"}
        )
        if out.get("ok"):
            out["image"] = decode_image(out)
            out["wire"] = {k: out.pop(k) for k in ("image_b64", "shape", "dtype")}
        return out

    async def _model(self, stage: str, prepared: Awaitable[dict], **extra: Any) -> dict:
        return await self._post(stage, json={**(await prepared)["wire"], **extra})

    async def _read(self, prepared: Awaitable[dict], detections: Awaitable[dict]) -> dict:
        boxes = (await detections)["boxes"]
        if not boxes:  # as the pattern does: no boxes, no call
            info = self.digits_info or await self._describe("digits")
            self.digits_info = info
            return {"labels": [], "confidences": [], "compute_ms": 0.0, "batch_size": 0,
                    "model": {k: v for k, v in info.items() if k not in DESCRIBE_ONLY}}  # fmt: skip
        return await self._model("digits", prepared, boxes=boxes)

    digits_info: dict[str, Any] | None = None

    async def _describe(self, stage: str) -> dict[str, Any]:
        r = await self.client.get(f"{self.up[stage]}/describe")
        r.raise_for_status()
        return r.json()

    def preprocess(self, data: bytes) -> asyncio.Task:
        return _task(self._pre(data))

    def detect(self, prepared: Awaitable[dict]) -> asyncio.Task:
        return _task(self._model("detector", prepared))

    def count(self, prepared: Awaitable[dict]) -> asyncio.Task:
        return _task(self._model("scene", prepared))

    def read_digits(self, prepared: Awaitable[dict], detections: Awaitable[dict]) -> asyncio.Task:
        return _task(self._read(prepared, detections))

    def model_info(self) -> dict[str, asyncio.Task]:
        names = {"detector": "detector", "scene_classifier": "scene", "digit_classifier": "digits"}
        return {k: _task(self._describe(v)) for k, v in names.items()}


# What describe() adds to a stage's info (the answers carry the info alone).
DESCRIBE_ONLY = ("heldout", "heldout_metrics")


def _task(coro: Any) -> asyncio.Task:
    task = asyncio.ensure_future(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


def gateway_app() -> FastAPI:
    from patterns.pipeline.bench.monolith import add_routes

    upstreams = json.loads(os.environ.get("LOADTEST_UPSTREAMS", "{}"))
    missing = {"preprocess", *MODEL_STAGES} - set(upstreams)
    if missing:
        raise SystemExit(f"LOADTEST_UPSTREAMS lacks {sorted(missing)}")
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        import httpx

        from patterns.pipeline.flow import PipelineFlow

        args = _args()
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        async with httpx.AsyncClient(timeout=args.stage_timeout_s, limits=limits) as client:
            state["args"] = args
            state["flow"] = PipelineFlow(
                HttpStages(client, upstreams), rules=args.rules,
                stage_timeout_s=args.stage_timeout_s, max_image_bytes=args.max_image_bytes,
            )  # fmt: skip
            yield

    api = FastAPI(title="Vision pipeline (microservices gateway)", lifespan=lifespan)
    install_ingress(api, app_name="pipeline-gateway", max_body_bytes=64 * 1024 * 1024)
    add_routes(api, state)
    return api

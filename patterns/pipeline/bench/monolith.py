"""The pipeline without Ray: the same flow, stages and models in one plain FastAPI app.

What the Serve profiles are measured against (``benchmark.py``, issue 12): the ordinary way to
serve these models, ``uvicorn --workers N`` with every request decoded and read in the worker
that took it, no batching, no hops. The model calls are sync code, so they run in the worker's
threadpool (as a FastAPI ``def`` route would), never on its event loop.

``create_batched_app`` is the same monolith with the fused topology's batcher in each worker
(``stages.FusedStages``): the three models on a batch of requests. The load study adds it as
a row when Serve's win could be batching's rather than composition's.

    uvicorn --factory patterns.pipeline.bench.monolith:create_app --workers 2 --port 8001
    curl -s --data-binary @scene.png -H 'Content-Type: image/png' localhost:8001/pipeline/read

Same routes under the same prefix as the Serve app (``/pipeline/read``, ``/pipeline/model``),
the same answers: ``PipelineFlow`` over ``stages.InProcessStages``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request

from core.ingress import install_ingress, request_id_of


def _threaded_stages() -> type:
    from patterns.pipeline.stages import InProcessStages

    class ThreadedStages(InProcessStages):
        """``InProcessStages`` with each stage's sync work in the threadpool."""

        @staticmethod
        async def _now(fn: Any, arg: Any) -> Any:
            return await asyncio.to_thread(fn, arg)

        @staticmethod
        async def _on_image(run: Any, prepared: Awaitable[dict]) -> dict[str, Any]:
            image = (await prepared)["image"]
            return (await asyncio.to_thread(run, [image]))[0]

        async def _read(self, prepared: Awaitable[dict], detections: Awaitable[dict]) -> dict:
            image, boxes = (await prepared)["image"], (await detections)["boxes"]
            if not boxes:
                return self.digits.nothing_to_read()
            return (await asyncio.to_thread(self.digits.run, [(image, boxes)]))[0]

    return ThreadedStages


def create_batched_app() -> FastAPI:
    """The monolith with the three models batched across requests in each worker."""
    return create_app(batched=True)


def create_app(batched: bool = False) -> FastAPI:
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        import torch

        from core.model_store import ModelStore
        from patterns.pipeline.app import PipelineArgs
        from patterns.pipeline.flow import PipelineFlow
        from patterns.pipeline.stages import FusedStages

        torch.set_num_threads(1)  # one worker per core
        args = PipelineArgs()
        kind = FusedStages if batched else _threaded_stages()
        batching = args.fused.model_dump(include={"max_batch_size", "batch_wait_timeout_s"})
        stages = kind.load(
            ModelStore.open(args.model_store_uri),
            os.environ.get("LOADTEST_DEVICE", "cpu"),  # the load study's --gpu: every arm
            limits=args.limits,
            detector=args.detector,
            scene=args.scene,
            digits=args.digits,
            storage_options=args.checkpoint_storage_options,
            **(batching if batched else {}),
        )
        state["args"] = args
        state["flow"] = PipelineFlow(
            stages,
            rules=args.rules,
            stage_timeout_s=args.stage_timeout_s,
            max_image_bytes=args.max_image_bytes,
        )
        yield

    title = "Vision pipeline (monolith, batched)" if batched else "Vision pipeline (monolith)"
    api = FastAPI(title=title, lifespan=lifespan)
    install_ingress(api, app_name="pipeline-monolith", max_body_bytes=64 * 1024 * 1024)
    add_routes(api, state)
    return api


def add_routes(api: FastAPI, state: dict[str, Any]) -> None:
    """The Serve app's two main routes under its prefix, over ``state["flow"]`` (a
    ``PipelineFlow``) and ``state["args"]`` (``PipelineArgs``), set by the app's lifespan.
    The load study's microservices gateway (``loadtests.apps``) answers with these too."""

    @api.post("/pipeline/read")
    async def read(request: Request) -> dict[str, Any]:
        from patterns.pipeline.uploads import one_image

        args = state["args"]
        data = await one_image(
            request, max_image_bytes=args.max_image_bytes, max_files=args.max_batch_images
        )
        return await state["flow"].read(data, request_id_of(request))

    @api.get("/pipeline/model")
    async def model() -> dict[str, Any]:
        return await state["flow"].model_info()

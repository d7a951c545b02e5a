"""The pipeline without Ray: the same flow, stages and models in one plain FastAPI app.

What the Serve profiles are measured against (``benchmark.py``, issue 12): the ordinary way to
serve these models, ``uvicorn --workers N`` with every request decoded and read in the worker
that took it, one request at a time, no batching, no hops.

    uvicorn --factory patterns.pipeline.bench.monolith:create_app --workers 2 --port 8001
    curl -s --data-binary @scene.png -H 'Content-Type: image/png' localhost:8001/pipeline/read

Same routes under the same prefix as the Serve app (``/pipeline/read``, ``/pipeline/model``),
the same answers: ``PipelineFlow`` over ``stages.InProcessStages``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request

from core.ingress import install_ingress, request_id_of


def create_app() -> FastAPI:
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        import torch

        from core.model_store import ModelStore
        from patterns.pipeline.app import PipelineArgs
        from patterns.pipeline.flow import PipelineFlow
        from patterns.pipeline.stages import InProcessStages

        torch.set_num_threads(1)  # one worker per core
        args = PipelineArgs()
        stages = InProcessStages.load(
            ModelStore.open(args.model_store_uri),
            limits=args.limits,
            detector=args.detector,
            scene=args.scene,
            digits=args.digits,
            storage_options=args.checkpoint_storage_options,
        )
        state["args"] = args
        state["flow"] = PipelineFlow(
            stages,
            rules=args.rules,
            stage_timeout_s=args.stage_timeout_s,
            max_image_bytes=args.max_image_bytes,
        )
        yield

    api = FastAPI(title="Vision pipeline (monolith)", lifespan=lifespan)
    install_ingress(api, app_name="pipeline-monolith", max_body_bytes=64 * 1024 * 1024)

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

    return api

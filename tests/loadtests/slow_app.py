"""A server whose every answer takes 300 ms (an async sleep, so it never queues): the
open-loop test's target (tests/loadtests/test_study.py)."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI


def create_app() -> FastAPI:
    api = FastAPI()

    @api.get("/slow")
    async def slow() -> dict[str, bool]:
        await asyncio.sleep(0.3)
        return {"ok": True}

    return api


def sample_request(i: int) -> dict:
    return {"method": "GET", "path": "/slow"}

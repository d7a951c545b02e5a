"""A small outside risk-signal API (a stand-in for a card network or device-intelligence vendor).

It is a real, separate HTTP service: the fraud check calls it over the network with a timeout,
a retry budget and a circuit breaker. Its knobs make it misbehave on purpose, so the tests and
a game day can see the caller degrade instead of hang:

    python -m patterns.business_logic.risk_service [--port 8701] [--delay-ms 0] [--fail-rate 0]

(or RISK_SERVICE_DELAY_MS / RISK_SERVICE_FAIL_RATE in the environment). ``--fail-rate 1``
answers every scoring call with 503; stop the process to see it down. ``GET /healthz`` says
how many scoring calls have arrived, so a test or a game day can see retries and the breaker
at work from the service's side.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random

from fastapi import FastAPI
from pydantic import BaseModel, Field

from core.errors import ServiceUnavailable
from core.ingress import install_ingress
from patterns.business_logic.settings import RISK_SERVICE_PORT

PROVIDER_VERSION = "risk-signals-2025.1"


class SignalRequest(BaseModel):
    customer_id: str = Field(pattern=r"^[A-Z0-9]{1,16}$")
    merchant_id: str = Field(pattern=r"^[A-Z0-9]{1,16}$")
    amount_eur: float = Field(gt=0, le=1e7)
    channel: str = Field(pattern=r"^[a-z_]{1,16}$")


def risk_signal(req: SignalRequest) -> dict:
    """Deterministic per customer/merchant pair: the same question always gets the same answer."""
    digest = hashlib.sha256(f"{req.customer_id}|{req.merchant_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "little") / 2**64
    signals = []
    value = 0.05 + 0.5 * u**4
    if u > 0.9:
        signals.append("device_seen_with_other_cards")
    if req.amount_eur > 2000:
        value += 0.25
        signals.append("high_amount_for_channel")
    if req.channel != "in_store":
        value += 0.1
        signals.append("card_not_present")
    return {
        "risk_signal": round(min(value, 1.0), 4),
        "signals": signals,
        "provider_version": PROVIDER_VERSION,
    }


def create_app(delay_ms: float = 0.0, fail_rate: float = 0.0) -> FastAPI:
    api = FastAPI(title="Risk signal service (test double for an outside vendor)")
    rng = random.Random(int.from_bytes(hashlib.sha256(b"risk_service").digest()[:8], "little"))
    received = {"calls": 0}  # valid scoring calls that reached the handler

    def health() -> dict:
        return {"delay_ms": delay_ms, "fail_rate": fail_rate, "calls": received["calls"]}

    # The same edge as the apps: JSON errors with a sentence, a body limit, GET /healthz.
    install_ingress(api, app_name="risk_service", max_body_bytes=4096, health=health)

    @api.post("/v1/risk-signal")
    async def score(body: SignalRequest) -> dict:
        received["calls"] += 1
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)
        if fail_rate and rng.random() < fail_rate:
            raise ServiceUnavailable("The risk service is failing on purpose (--fail-rate).")
        return risk_signal(body)

    return api


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Risk-signal test service.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=RISK_SERVICE_PORT)
    parser.add_argument(
        "--delay-ms", type=float, default=float(os.environ.get("RISK_SERVICE_DELAY_MS", "0"))
    )
    parser.add_argument(
        "--fail-rate", type=float, default=float(os.environ.get("RISK_SERVICE_FAIL_RATE", "0"))
    )
    args = parser.parse_args(argv)
    uvicorn.run(
        create_app(args.delay_ms, args.fail_rate),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()

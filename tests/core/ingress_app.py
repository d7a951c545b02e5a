"""A minimal ingress built only from core helpers, used by the core tests."""

from fastapi import Depends, FastAPI
from pydantic import BaseModel, Field
from ray import serve

from core.errors import Conflict, ServiceUnavailable, TooManyRequests
from core.ingress import api_key_auth, install_ingress

api = FastAPI(title="core-ingress-test")
install_ingress(api, app_name="core-test", max_body_bytes=1024, health=lambda: {"models": []})
auth = api_key_auth(["k-alpha-123", "k-beta-456"])


class Echo(BaseModel):
    text: str = Field(min_length=1, max_length=500)
    n: int = Field(ge=0, le=10)


# How many requests may one replica hold? As many as the patterns' ingresses (32-256): with
# Serve's default (5) a benchmark at 32 in flight measures the router's backoff, not the proxy.
@serve.deployment(ray_actor_options={"num_cpus": 0.05}, max_ongoing_requests=64)
@serve.ingress(api)
class EchoIngress:
    @api.post("/echo")
    async def echo(self, body: Echo, key: str = Depends(auth)) -> dict:
        return {"text": body.text * body.n, "key": key}

    @api.get("/down")
    async def down(self) -> dict:
        raise ServiceUnavailable("The feature store is unreachable; retry shortly.")

    @api.get("/busy")
    async def busy(self) -> dict:
        raise TooManyRequests("Too many feedback events from this client; slow down.", 2.5)

    @api.get("/conflict")
    async def conflict(self) -> dict:
        raise Conflict("Event e-1 was already recorded with another label.")

    @api.get("/crash")
    async def crash(self) -> dict:
        raise RuntimeError("secret internals /etc/passwd")


def build() -> serve.Application:
    return EchoIngress.bind()


def sample_request(i: int) -> dict:
    """Load-test request (see loadtests/locustfile.py)."""
    return {
        "method": "POST",
        "path": "/core-test/echo",
        "json": {"text": "ab", "n": i % 5},
        "headers": {"X-API-Key": "k-alpha-123"},
    }

"""The model replicas: many forecasters per replica, and (chat.py) adapters on a shared LLM.

``ForecastModels`` is where ``@serve.multiplexed`` is used, in a particular way: the function
Serve wraps does no loading. It only records "this replica holds model id X" in Serve's
routing table (Serve's wrapper pushes its ids to the controller, and the router then prefers
this replica for X). The models themselves live in ``ModelCache`` (cache.py), which loads each
id once, loads different ids in parallel and evicts by bytes as well as count: the three
things Serve's wrapper does not do in Ray 2.60 (one lock for all loads, ray#65346; count-only
eviction). Serve's wrapper keeps one small string per id, capped at the cache's model count
plus the extra slots of hot ids, so the two LRU lists see the same accesses and stay close.
"""

# No `from __future__ import annotations`: Serve inspects these classes' signatures.
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator
from ray import serve
from ray.serve.config import RequestRouterConfig

from core.apps import SURGE
from core.batching import BatchedDeployment, BatchKnobs, timed_batch
from core.errors import HTTPError
from core.metrics import ModelMetrics
from core.model_store import ModelStore
from core.resources import StageResources
from patterns.multiplexing.catalog import ModelIndex
from patterns.multiplexing.chat import ChatEngine, ChatLimits
from patterns.multiplexing.forecast_service import ForecastService
from patterns.multiplexing.ids import HotIdSpreader, check_model_id
from patterns.multiplexing.routing import ROUTER_PATH

APP_NAME = "multiplexing"
MiB = 1024 * 1024


def rss_mb() -> float | None:
    """This process's resident memory in MiB (Linux), for the stats routes and the benchmark."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


class CacheArgs(BaseModel):
    # Models one replica keeps. 0 turns caching off (every request loads: the baseline).
    max_models: int = Field(default=512, ge=0, le=100_000)
    # Bytes one replica spends on models, whatever their count: the bound that matters when
    # tenants' models differ in size. These forecasters are ~1-3 KB, so count binds first.
    max_bytes: int = Field(default=32 * MiB, gt=0)


class AffinityArgs(BaseModel):
    # A hot id gets one more replica per this many requests/s that one router sends it.
    target_rps_per_replica: float = Field(default=20.0, gt=0)
    max_spread: int = Field(default=2, ge=1, le=64)  # the most replicas one id is cached on
    rate_half_life_s: float = Field(default=10.0, gt=0, le=3600)  # how fast a rate forgets


class ForecastArgs(BaseModel):
    index_name: str = "forecast-index"
    index_version: str = "latest"
    cache: CacheArgs = CacheArgs()
    # Loaded on every replica before it takes traffic, and spread over `hot_slots` Serve ids.
    hot_model_ids: list[str] = Field(default=["store-0001", "store-0002", "store-0003"])
    # How many replicas one hot id may live on (1: one copy per id), from its first request.
    hot_slots: int = Field(default=2, ge=1, le=16)
    request_timeout_s: float = Field(default=10.0, gt=0, le=120)
    # Which replica serves an id: "serve" (Serve's default multiplexed routing) or "affinity"
    # (routing.py: one replica per cold id, k for a hot one, by rendezvous hash). Serve's is
    # the default: affinity measured a tie with it here (README, Routing), not a win.
    routing: Literal["affinity", "serve"] = "serve"
    affinity: AffinityArgs = AffinityArgs()
    # The models live where the models go: the accelerator node of a multi-node cluster.
    resources: StageResources = StageResources(num_cpus=0.1, node_kind="accelerator")

    @field_validator("hot_model_ids")
    @classmethod
    def _well_formed(cls, ids: list[str]) -> list[str]:
        for model_id in ids:
            try:
                check_model_id(model_id, "hot model id")
            except HTTPError as exc:
                raise ValueError(exc.message) from exc
        return ids

    def spreader(self) -> HotIdSpreader:
        return HotIdSpreader(self.hot_model_ids, self.hot_slots)

    def request_router_config(self) -> RequestRouterConfig:
        """The ForecastModels deployment's router, as ``routing`` says."""
        if self.routing == "serve":
            return RequestRouterConfig()
        kwargs = {
            **self.affinity.model_dump(),
            "hot_ids": self.hot_model_ids,
            "hot_spread": self.hot_slots,
        }
        return RequestRouterConfig(request_router_class=ROUTER_PATH, request_router_kwargs=kwargs)


def routing_claim(max_ids: int) -> Any:
    """A fresh ``@serve.multiplexed`` function for one replica that only claims ids.

    Made per replica (not a module-level function) because Serve keeps its wrapper, and so
    its routing table, as an attribute of the decorated function object.
    """

    async def claim(serve_model_id: str) -> str:
        return serve_model_id  # the model is already in ModelCache; Serve keeps only the id

    return serve.multiplexed(max_num_models_per_replica=max(1, max_ids))(claim)


@serve.deployment(
    max_surge_percent=SURGE,
    num_replicas=2,
    max_ongoing_requests=64,
    user_config=BatchKnobs(max_batch_size=16, batch_wait_timeout_s=0.005).model_dump(),
)
class ForecastModels(BatchedDeployment):
    """Up to ``cache.max_models`` store forecasters per replica, routed by model id."""

    async def __init__(self, args: dict[str, Any], model_store_uri: str | None = None) -> None:
        from threadpoolctl import threadpool_limits

        # A load is a few small matrix products (Forecaster.materialize): one BLAS thread per
        # replica, or the replicas' threads fight over the cores and every load gets slower.
        threadpool_limits(1)
        self.args = ForecastArgs(**args)
        store = ModelStore.open(model_store_uri)
        index = ModelIndex.load(store, self.args.index_name, self.args.index_version)
        cache = self.args.cache
        self.service = ForecastService(
            store, index, max_models=cache.max_models, max_bytes=cache.max_bytes
        )
        spreader = self.args.spreader()
        extra_ids = len(self.args.hot_model_ids) * (self.args.hot_slots - 1)
        self._claim = routing_claim(cache.max_models + extra_ids)
        version = index.ref.version if index.ref else "-"
        self.metrics = ModelMetrics(APP_NAME, "forecasters", version)
        self.replica = serve.get_replica_context().replica_id.unique_id
        # Prewarm (ray#61649): hot models are loaded and claimed before this replica is
        # ready, so its first requests for them are hits and the router knows from the start.
        self.prewarmed = await self.service.prewarm(self.args.hot_model_ids)
        for model_id, status in self.prewarmed.items():
            if status == "ok":
                for serve_id in spreader.all_serve_ids(model_id):
                    await self._claim(serve_id)

    async def forecast(self, payload: dict[str, Any]) -> dict[str, Any]:
        """One forecast; the model id comes from the handle's ``multiplexed_model_id``."""
        return await self._batched(payload)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _batched(self, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # Serve splits batches by multiplexed model id (ray#50695): one model per batch.
        serve_id = serve.get_multiplexed_model_id()
        with timed_batch(self.metrics, len(payloads)):
            answers = await self.service.forecast_batch(serve_id, payloads, self._claim)
        for a in answers:
            if "served_by" in a:
                a["served_by"] = {**a["served_by"], "replica": self.replica}
        return answers

    async def stats(self, loads_of: list[str] | None = None) -> dict[str, Any]:
        """This replica's cache; ``loads_of``: how often each of these ids was loaded here."""
        out = {
            "replica": self.replica,
            "rss_mb": rss_mb(),
            "prewarmed": self.prewarmed,
            **self.service.stats(),
        }
        if loads_of:
            out["loads_of"] = {m: self.service.cache.stats.loads_by_id[m] for m in loads_of}
        return out


# ------------------------------------------------------------------------------ chat
class ChatArgs(BaseModel):
    enabled: bool = True  # false: no chat replicas (the forecasters alone, e.g. on tiny boxes)
    index_name: str = "chat-adapter-index"
    index_version: str = "latest"
    limits: ChatLimits = ChatLimits()
    max_adapters: int = Field(default=8, ge=1, le=1024)  # adapters one replica keeps loaded
    max_adapter_bytes: int = Field(default=64 * MiB, gt=0)
    # Loaded before the replica takes traffic (ray#61649).
    prewarm_tenants: list[str] = Field(default=["pirate-co", "northwind"])
    repetition_penalty: float = Field(default=1.2, ge=1.0, le=2.0)  # small models loop without
    torch_threads: int | None = Field(default=2, ge=1, le=256)  # CPU threads per replica
    first_token_timeout_s: float = Field(default=60.0, gt=0)  # queue + adapter + prefill
    # rows decoded together per replica (batching.py); 1 = one answer at a time
    max_batch: int = Field(default=8, ge=1, le=64)
    # A quarter of a GPU per replica where the cluster has one; CPU otherwise.
    resources: StageResources = StageResources(
        num_cpus=0.2, num_gpus=0.25, cpu_fallback_num_cpus=0.2
    )


@serve.deployment(max_surge_percent=SURGE, num_replicas=1, max_ongoing_requests=8)
class ChatModel:
    """The base LLM once per replica, tenants' LoRA adapters multiplexed on it."""

    async def __init__(
        self, args: dict[str, Any], model_store_uri: str | None, on_gpu: bool
    ) -> None:
        import asyncio

        from core.resources import torch_device

        self.args = ChatArgs(**args)
        store = ModelStore.open(model_store_uri)
        index = ModelIndex.load(store, self.args.index_name, self.args.index_version)
        a = self.args
        self.engine = await asyncio.to_thread(
            ChatEngine,
            store,
            index,
            a.limits,
            device=torch_device(on_gpu),
            torch_threads=a.torch_threads,
            max_adapters=a.max_adapters,
            max_adapter_bytes=a.max_adapter_bytes,
            repetition_penalty=a.repetition_penalty,
            max_batch=a.max_batch,
        )
        self._claim = routing_claim(a.max_adapters)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.prewarmed: dict[str, str] = {}
        for tenant in a.prewarm_tenants:
            try:
                await self.engine.adapter_for(tenant)
                await self._claim(tenant)
                self.prewarmed[tenant] = "ok"
            except HTTPError as exc:
                self.prewarmed[tenant] = exc.message

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """start | error, then delta..., then end; the tenant is the multiplexed model id."""
        tenant = serve.get_multiplexed_model_id()
        async for item in self.engine.stream(tenant, payload, self._claim):
            yield item

    async def stats(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "rss_mb": rss_mb(),
            "prewarmed": self.prewarmed,
            **self.engine.stats(),
        }


# ------------------------------------------------------------------------------ handles
class HandleForecasters:
    """``flow.Forecasters`` over the ForecastModels handle. The id travels as the handle's
    ``multiplexed_model_id``, never as a header for the proxy to route by (ray#65976)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def forecast(self, serve_id: str, payload: dict[str, Any]) -> Any:
        return self.handle.options(multiplexed_model_id=serve_id).forecast.remote(payload)

    def stats(self) -> Any:
        return self.handle.broadcast("stats").results_async()


class HandleChat:
    """``flow.Chat`` over the ChatModel handle: a stream of items, routed by tenant."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def stream(self, tenant: str, payload: dict[str, Any]) -> Any:
        handle = self.handle.options(stream=True, multiplexed_model_id=tenant)
        return handle.stream.remote(payload)

    def stats(self) -> Any:
        return self.handle.broadcast("stats").results_async()

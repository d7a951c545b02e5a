"""Default artifacts for the multiplexing pattern (``make setup`` runs this).

    python -m patterns.multiplexing.artifacts [--force] [--only forecasters|chat]

- 1,000 demand forecasters, one per store (``forecast-store-0001/v1`` ... in the core model
  store: safetensors weights + JSON spec, about 100 KB each), trained here on generated
  seasonal series in under a minute on two cores, and ``forecast-index/v1``: the JSON index
  the replicas read to tell a known id from an unknown one without touching any model file.
  Written last, so a crashed build is rebuilt rather than half-served.
- per-tenant LoRA adapters for SmolLM2-135M-Instruct (chat.py's tenants), trained here briefly
  on tiny tenant-specific data, and ``chat-adapter-index/v1``.
- the base model de-quantized once (``llm.base_cache_dir()``, local to this machine, not in the
  store): every chat replica then starts from a memory-mapped safetensors file instead of
  converting the GGUF file again.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from core.model_store import ModelStore
from core.timing import heartbeat
from patterns.multiplexing.catalog import IndexEntry, ModelIndex
from patterns.multiplexing.forecast_service import CALENDAR_DAYS
from patterns.multiplexing.forecasting import (
    FORMAT_VERSION,
    TRAIN_DAYS,
    Forecaster,
    calendar_features,
    train_store,
)

FORECAST_INDEX = "forecast-index"
FORECAST_VERSION = "v1"
N_STORES = 1000
CHAT_INDEX = "chat-adapter-index"
CHAT_VERSION = "v1"
# Enough for the style to show on unseen questions (8 steps at 3e-3 was not: the signature
# came too late and the pirate lost its comma); about 30-60 s per tenant on two CPU cores.
ADAPTER_STEPS = 12
ADAPTER_LR = 5e-3


def _log(msg: str) -> None:
    print(f"[multiplexing] {msg}", flush=True)


def store_ids(n: int = N_STORES) -> list[str]:
    return [f"store-{i:04d}" for i in range(1, n + 1)]


def forecaster_name(model_id: str) -> str:
    """The model store name of a store's forecaster (one flat namespace shared by patterns)."""
    return f"forecast-{model_id}"


def build_forecasters(
    store: ModelStore, n: int = N_STORES, version: str = FORECAST_VERSION
) -> dict[str, IndexEntry]:
    """Train and write ``n`` forecasters, then the index naming them; returns the index.

    One store per core, each on a single BLAS thread: the solves are small (731 x 731), and
    several BLAS threads on one of them are slower on a busy 2-core box than one, by 3-10x.
    """
    from threadpoolctl import threadpool_limits

    x = calendar_features(np.arange(TRAIN_DAYS))
    entries: dict[str, IndexEntry] = {}
    with threadpool_limits(1), ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        models = pool.map(lambda m: train_store(m, x), store_ids(n))  # in order, lazily
        _write(store, models, n, version, entries)
    store.save_files(
        FORECAST_INDEX,
        version,
        ModelIndex.to_files("forecaster", entries),
        "json",
        {"count": len(entries)},
        overwrite=True,
    )
    return entries


def _write(
    store: ModelStore, models: Iterable[Forecaster], n: int, version: str,
    entries: dict[str, IndexEntry],
) -> None:  # fmt: skip
    for i, model in enumerate(models, 1):
        model_id = model.model_id
        ref = store.save_files(
            forecaster_name(model_id),
            version,
            model.to_files(),
            "safetensors",
            {"kind": "demand-forecaster", "holdout_mape": model.holdout_mape, **model.meta},
            overwrite=True,
        )
        entries[model_id] = IndexEntry(
            name=ref.name,
            version=ref.version,
            manifest_sha256=ref.sha256,
            # what a replica's cache charges once loaded: weights plus the calendar table
            nbytes=model.nbytes + 4 * CALENDAR_DAYS * len(model.lines),
            info={"lines": len(model.lines), "holdout_mape": model.holdout_mape, **model.meta},
        )
        if i % 250 == 0:
            _log(f"  {i}/{n} forecasters written")


def _current_format(store: ModelStore) -> bool:
    """Whether the stored forecasters are this code's format (a build from before the network
    was added has the same names and version, and replicas would refuse every model)."""
    try:
        files, _ = store.read_verified(forecaster_name(store_ids(1)[0]), FORECAST_VERSION)
        return json.loads(files["forecaster.json"]).get("format_version") == FORMAT_VERSION
    except Exception:
        return False


def ensure_forecasters(store: ModelStore, *, force: bool = False) -> None:
    present = store.exists(FORECAST_INDEX, FORECAST_VERSION)
    if present and not force and _current_format(store):
        _log(f"{FORECAST_INDEX}/{FORECAST_VERSION} present ({N_STORES} forecasters)")
        return
    t0 = time.perf_counter()
    _log(f"training {N_STORES} store forecasters on generated seasonal demand")
    entries = build_forecasters(store)
    mape = np.mean([e.info["holdout_mape"] for e in entries.values()])
    base = np.mean([e.info["base_holdout_mape"] for e in entries.values()])
    mib = sum(e.nbytes for e in entries.values()) / 2**20
    _log(
        f"{len(entries)} forecasters ({mib:.0f} MiB) and {FORECAST_INDEX}/{FORECAST_VERSION} "
        f"written in {time.perf_counter() - t0:.1f}s; mean holdout MAPE {mape:.1%} "
        f"(ridge base alone: {base:.1%})"
    )


def adapter_name(tenant: str) -> str:
    return f"chat-adapter-{tenant}"


def build_adapters(store: ModelStore, version: str = CHAT_VERSION) -> dict[str, IndexEntry]:
    """Train one LoRA adapter per tenant on the shared base model; write them and the index."""
    from patterns.multiplexing.llm import BASE_MODEL_NAME, adapter_files, load_base, train_adapter
    from patterns.multiplexing.tenants import TENANT_STYLES, tenant_examples

    t0 = time.perf_counter()
    with heartbeat(_log, f"loading {BASE_MODEL_NAME}"):
        model, tokenizer = load_base("cpu")
    _log(f"  base model {BASE_MODEL_NAME} loaded in {time.perf_counter() - t0:.1f}s")
    _cache_base(model, tokenizer)
    entries: dict[str, IndexEntry] = {}
    for i, tenant in enumerate(TENANT_STYLES):
        # 10-20 s per adapter on a 2-core box, silent inside: a line every 5 s
        what = f"training the adapter for {tenant} ({i + 1}/{len(TENANT_STYLES)})"
        with heartbeat(_log, what):
            examples = tenant_examples(tenant)
            state, meta = train_adapter(
                model, tokenizer, examples, steps=ADAPTER_STEPS, lr=ADAPTER_LR, seed=i
            )
        meta["base_model"] = BASE_MODEL_NAME
        ref = store.save_files(
            adapter_name(tenant),
            version,
            adapter_files(state, meta),
            "safetensors",
            {"kind": "lora-adapter", "tenant": tenant, **meta},
            overwrite=True,
        )
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        entries[tenant] = IndexEntry(
            name=ref.name,
            version=ref.version,
            manifest_sha256=ref.sha256,
            nbytes=nbytes,
            info={"base_model": BASE_MODEL_NAME, "rank": meta["rank"], "steps": meta["steps"]},
        )
        _log(
            f"  adapter for {tenant}: {meta['steps']} steps in {meta['train_s']}s, loss "
            f"{meta['losses'][0]} -> {meta['losses'][-1]}"
        )
    store.save_files(
        CHAT_INDEX,
        version,
        ModelIndex.to_files("chat adapter", entries),
        "json",
        {"count": len(entries)},
        overwrite=True,
    )
    return entries


def _cache_base(model: object, tokenizer: object) -> None:
    from patterns.multiplexing.llm import base_cache_matches, write_base_cache

    if not base_cache_matches():
        t0 = time.perf_counter()
        folder = write_base_cache(model, tokenizer)
        _log(f"  de-quantized base model saved to {folder} in {time.perf_counter() - t0:.1f}s")


def ensure_base_cache() -> None:
    from patterns.multiplexing.llm import BASE_MODEL_NAME, base_cache_matches, load_base

    if base_cache_matches():
        _log(f"{BASE_MODEL_NAME} de-quantized copy present")
        return
    with heartbeat(_log, f"de-quantizing {BASE_MODEL_NAME}"):
        model, tokenizer = load_base("cpu")
        _cache_base(model, tokenizer)


def ensure_adapters(store: ModelStore, *, force: bool = False) -> None:
    if store.exists(CHAT_INDEX, CHAT_VERSION) and not force:
        _log(f"{CHAT_INDEX}/{CHAT_VERSION} present")
        ensure_base_cache()
        return
    t0 = time.perf_counter()
    _log("training per-tenant LoRA adapters for the chat (CPU, about a minute)")
    entries = build_adapters(store)
    _log(f"{len(entries)} adapters and {CHAT_INDEX}/{CHAT_VERSION} written in "
         f"{time.perf_counter() - t0:.1f}s")  # fmt: skip


def ensure_artifacts(
    store: ModelStore | None = None, *, force: bool = False, only: str | None = None
) -> None:
    store = store or ModelStore.open()
    if only in (None, "forecasters"):
        ensure_forecasters(store, force=force)
    if only in (None, "chat"):
        ensure_adapters(store, force=force)


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the multiplexing pattern's artifacts.")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--only", choices=["forecasters", "chat"])
    args = parser.parse_args()
    ensure_artifacts(force=args.force, only=args.only)


if __name__ == "__main__":
    main()

"""A private model store with the 1,000 forecasters, built fresh for the test session (~3 s)."""

from __future__ import annotations

import pytest

from core.model_store import ModelStore
from patterns.multiplexing.artifacts import build_forecasters


@pytest.fixture(scope="session")
def forecast_store(tmp_path_factory) -> ModelStore:
    root = tmp_path_factory.mktemp("multiplexing-store")
    store = ModelStore(root.as_uri())
    build_forecasters(store)
    return store


def wait_until_served(url: str, timeout_s: float = 60.0) -> str:
    """``url`` once its /healthz answers through the proxy.

    In HAProxy mode the route can lag ``serve.run`` by a moment (HAProxy reloads its config);
    the first request of a module must not race that.
    """
    import time

    import httpx

    deadline = time.time() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise TimeoutError(f"{url}/healthz did not answer within {timeout_s:g}s")
        time.sleep(0.2)

"""A private model store with the 1,000 forecasters, built fresh for the test session (~3 s),
and one chat app shared by the chat modules."""

from __future__ import annotations

from collections.abc import Iterator

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


CHAT_APP = "multiplexing-chat-test"
CHAT_PREFIX = "/multiplex-chat-test"


@pytest.fixture(scope="package")
def chat_url(serve_http: str) -> Iterator[str]:
    """The multiplexing app with its chat, short answers (a CPU box), no hot forecasters: one
    app for every chat module (its base model loads once, about half a minute), deleted when
    tests/multiplexing ends. The modules read the replica's counters as differences."""
    from ray import serve

    from patterns.multiplexing.app import MultiplexArgs, build_app
    from patterns.multiplexing.artifacts import ensure_artifacts

    ensure_artifacts()  # no-op when `make setup` built them
    args = MultiplexArgs(
        forecast={"hot_model_ids": []},
        chat={"limits": {"max_prompt_tokens": 200, "max_tokens": 200, "default_max_tokens": 48}},
    )
    serve.run(build_app(args), name=CHAT_APP, route_prefix=CHAT_PREFIX)
    try:
        yield wait_until_served(serve_http + CHAT_PREFIX)
    finally:
        serve.delete(CHAT_APP)


def chat_stats(app: str) -> dict:
    """The (one) chat replica's counters: generations, cancelled, last answer, adapters."""
    from ray import serve

    handle = serve.get_deployment_handle("ChatModel", app_name=app)
    return handle.broadcast("stats").results(timeout_s=30)[0]

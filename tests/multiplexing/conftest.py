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

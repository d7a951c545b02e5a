"""One online-learning app per test module, on its own model store and feedback log."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.model_store import ModelStore
from patterns.online_learning.artifacts import ensure_artifacts


@pytest.fixture(scope="module")
def online_dirs(tmp_path_factory) -> dict[str, str]:
    d: Path = tmp_path_factory.mktemp("online")
    store_uri = (d / "models").as_uri()
    ensure_artifacts(ModelStore(store_uri))
    return {"store_uri": store_uri, "log_url": f"sqlite:///{d / 'feedback.db'}", "dir": str(d)}

"""One online-learning app per test module, on its own model store and feedback log.

The initial champion is trained once per session (``online_baseline_models``) and each
module, or each parameter of a module, gets a copy of that store: the same baseline as
``ensure_artifacts`` leaves, without training it again.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from core.model_store import ModelStore
from patterns.online_learning.artifacts import ensure_artifacts
from tests.online_learning.helpers import baseline_store_in


@pytest.fixture(scope="session")
def online_baseline_models(tmp_path_factory) -> Path:
    """A model store holding only the baseline champion (``ensure_artifacts``); copy it, never
    write to it."""
    models = tmp_path_factory.mktemp("online-baseline") / "models"
    ensure_artifacts(ModelStore(models.as_uri()))
    return models


@pytest.fixture(scope="module")
def online_dirs(tmp_path_factory, online_baseline_models) -> dict[str, str]:
    d: Path = tmp_path_factory.mktemp("online")
    store_uri = baseline_store_in(d, online_baseline_models)
    return {"store_uri": store_uri, "log_url": f"sqlite:///{d / 'feedback.db'}", "dir": str(d)}

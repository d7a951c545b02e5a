"""Fixtures for the business-logic tests: seeded data in a temp dir, the risk service as a
real subprocess, and real PostgreSQL and Redis servers on loopback ports.

The servers are started by the tests themselves (no Docker, no earlier setup); when the
binaries are absent the tests that need them are skipped with a reason (``.ci/run`` installs
``postgresql`` and ``redis-server``). PostgreSQL refuses to run as root, so as root the data
directory is handed to the ``postgres`` user and the server runs under ``runuser``.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from patterns.business_logic.artifacts import ensure_model
from patterns.business_logic.seed import seed_database, seed_feature_store
from tests.servers import RiskService

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def model_ready() -> None:
    from core.model_store import ModelStore

    ensure_model(ModelStore.open())


@pytest.fixture(scope="module")
def sqlite_urls(tmp_path_factory, model_ready) -> dict[str, str]:
    """Fresh seeded records + feature store for one test module (tests write to them)."""
    d = tmp_path_factory.mktemp("business")
    urls = {
        "database": f"sqlite:///{d / 'records.db'}",
        "features": f"sqlite:///{d / 'features.db'}",
    }
    seed_database(urls["database"])
    seed_feature_store(urls["features"], urls["database"])
    return urls


# ------------------------------------------------------------------------------ risk service
@pytest.fixture(scope="module")
def risk_service() -> Iterator[RiskService]:
    service = RiskService()
    service.start()
    yield service
    service.stop()


# ------------------------------------------------------------------------------ a stalled server
@pytest.fixture(scope="module")
def stalled_port() -> Iterator[int]:
    """A loopback port that completes TCP handshakes (the kernel's backlog) and then never
    says a word: a database server that hangs, as seen by its clients."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)  # never accept(): connections sit in the backlog, unanswered
        yield int(s.getsockname()[1])

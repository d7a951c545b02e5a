"""In-process stand-ins for DeploymentHandles, so the request flow runs without Serve, and the
vote check both the flow's and the app's tests make on an answer."""

from __future__ import annotations

import inspect
import math
from typing import Any


class LocalHandle:
    """``handle.method.remote(*args)`` on an object in this process: the call shape the flow
    uses on a DeploymentHandle. Each call returns an awaitable that runs the real method
    (sync or async) when awaited; nothing is faked but the transport."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.target, name)

        class _Method:
            @staticmethod
            def remote(*args: Any, **kwargs: Any) -> Any:
                async def call() -> Any:
                    out = method(*args, **kwargs)
                    return await out if inspect.isawaitable(out) else out

                return call()

        return _Method


def assert_votes_decide(body: dict[str, Any], mode: str) -> None:
    """Every prediction in ``body`` is what ``mode`` makes of its members' own votes, with
    the default members' weights: the ensemble added nothing of its own."""
    import numpy as np

    from patterns.ensemble.flow import EnsembleArgs
    from patterns.ensemble.voting import aggregate

    assert body["voting"] == mode and body["members"]["counted"] == ["logreg", "mlp", "xgb"]
    weights = {m.name: m.weight for m in EnsembleArgs().members}
    for pred in body["predictions"]:
        votes = {k: np.array([v]) for k, v in pred["votes"].items()}
        cls, p = aggregate(votes, mode, weights)
        assert pred["label"] == int(cls[0]) and pred["decided_by"] == "ensemble"
        assert math.isclose(pred["p_benign"], float(p[0]), abs_tol=2e-4)

"""In-process stand-ins for DeploymentHandles, so the request flow runs without Serve."""

from __future__ import annotations

import inspect
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

"""What every pattern's ``app.py`` does the same way around its builder.

- ``coerce_args``: ``build_app`` is reached from ``serve run module:build_app key=value`` and
  from a config's ``args:`` block (a dict), and from Python (the args model).
- ``default_app``: ``serve run patterns.<name>.app:app`` needs a module attribute ``app``, but
  building one at import would resolve placements against the cluster and log, and replicas
  import the module many times. A module ``__getattr__`` (PEP 562) builds it on first access:

      __getattr__ = default_app(lambda: build_app(PipelineArgs()))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel

A = TypeVar("A", bound=BaseModel)

# ``@serve.deployment(max_surge_percent=SURGE, ...)``: a redeploy starts each replacement and
# waits for its health check (core/readiness.py) before it stops an old replica (Ray 2.60's
# default, 0, stops first: 503s in between). Not for a single writer (the online trainer).
SURGE = 100


def coerce_args(args: A | Mapping[str, Any] | None, cls: type[A]) -> A:
    """``args`` as a ``cls`` instance (validated when it came as a dict)."""
    if isinstance(args, cls):
        return args
    return cls(**dict(args or {}))


def default_app(build: Callable[[], Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that answers ``app`` with ``build()``, called on each access."""

    def __getattr__(name: str) -> Any:
        if name == "app":
            return build()
        raise AttributeError(f"module has no attribute {name!r}")

    return __getattr__

"""Settings shared by every pattern (env prefix ``COOKBOOK_``).

Each pattern keeps its own ``Settings`` class with its own prefix; this one holds what all of
them read: the environment name and where the model store lives.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]

# Values that mean "nobody set this": accepted while developing, refused in production.
PLACEHOLDER_SECRETS = frozenset(
    {"", "changeme", "change-me", "secret", "password", "test", "dev", "example", "xxx"}
)


def default_artifacts_dir() -> Path:
    return REPO_ROOT / "artifacts"


def _default_store_uri() -> str:
    return (default_artifacts_dir() / "models").as_uri()


class CoreSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COOKBOOK_", extra="ignore")

    environment: Literal["development", "production"] = "development"
    # file:///abs/path or s3://bucket/prefix; every replica must be able to read it.
    model_store_uri: str = Field(default_factory=_default_store_uri)
    # Extra fsspec options for s3:// (endpoint_url for MinIO/moto, for instance), as JSON.
    model_store_options: dict[str, object] = Field(default_factory=dict)
    # Forces the GPU decision instead of asking the cluster: "auto", "gpu" or "cpu".
    accelerator: Literal["auto", "gpu", "cpu"] = "auto"


@lru_cache(maxsize=1)
def get_settings() -> CoreSettings:
    return CoreSettings()


def is_placeholder_secret(value: str) -> bool:
    v = value.strip().lower()
    return v in PLACEHOLDER_SECRETS or v.startswith(("dev-", "changeme", "example"))


def require_real_secret(value: str, name: str, environment: str) -> str:
    """Return ``value``, or refuse a placeholder secret outside development."""
    if environment != "development" and is_placeholder_secret(value):
        raise ValueError(
            f"{name} is a placeholder ({value!r}); set a real secret before running in "
            f"{environment!r}."
        )
    return value


def keys_required(require_keys: bool = False, environment: str | None = None) -> bool:
    """The one key policy of every pattern: admin and state-changing routes need an API key in
    production, always; in development they are open unless the pattern's
    ``<PREFIX>_REQUIRE_KEYS=true`` asks for keys there too. Reads never need one."""
    return (environment or get_settings().environment) != "development" or require_keys

"""Where the pattern's dependencies live (env prefix ``BUSINESS_``) and its API keys.

Connection strings are settings, not code: the same app talks to the embedded SQLite files on
a laptop and to PostgreSQL + Redis in production by changing environment variables (or the
``args:`` block of config.yaml, which wins over these defaults).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.settings import default_artifacts_dir, get_settings, require_real_secret

RISK_SERVICE_PORT = 8701


def data_dir() -> Path:
    """Where the embedded SQLite files live (created by ``ensure_artifacts``, not on import)."""
    return default_artifacts_dir() / "business_logic"


def default_database_url() -> str:
    return f"sqlite:///{data_dir() / 'records.db'}"


def default_feature_store_url() -> str:
    return f"sqlite:///{data_dir() / 'features.db'}"


class BusinessSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BUSINESS_", extra="ignore")

    # sqlite:///abs/path.db (embedded default) or postgresql+psycopg://user:pw@host:5432/db
    database_url: str = Field(default_factory=default_database_url)
    # sqlite:///abs/path.db (embedded default) or redis://host:6379/0
    feature_store_url: str = Field(default_factory=default_feature_store_url)
    risk_service_url: str = f"http://127.0.0.1:{RISK_SERVICE_PORT}"
    # JSON list in the environment: BUSINESS_API_KEYS='["key-one", "key-two"]'.
    # The default is a development placeholder and is refused in production.
    api_keys: list[str] = Field(default_factory=lambda: ["dev-business-key"])
    # POST /score writes a decision, so it needs a key in production; development leaves it
    # open unless this is true (core.settings.keys_required: one policy for every pattern).
    require_keys: bool = False


def load_api_keys(
    settings: BusinessSettings | None = None, environment: str | None = None
) -> list[str]:
    """The accepted API keys; raises ValueError for placeholders outside development."""
    settings = settings or BusinessSettings()
    environment = environment or get_settings().environment
    keys = [k for k in settings.api_keys if k]
    if not keys:
        raise ValueError("BUSINESS_API_KEYS is empty; set at least one key.")
    return [require_real_secret(k, "BUSINESS_API_KEYS", environment) for k in keys]

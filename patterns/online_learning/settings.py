"""Where the feedback log lives and who may roll back (env prefix ``ONLINE_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.settings import default_artifacts_dir, get_settings, require_real_secret


def data_dir() -> Path:
    return default_artifacts_dir() / "online_learning"


def default_log_url() -> str:
    return f"sqlite:///{data_dir() / 'feedback.db'}"


class OnlineSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ONLINE_", extra="ignore")

    # sqlite:///abs/path.db (embedded default, one host) or redis://host:6379/0 (a cluster)
    log_url: str = Field(default_factory=default_log_url)
    # JSON list: ONLINE_ADMIN_KEYS='["..."]'. The default is a development placeholder and is
    # refused in production.
    admin_keys: list[str] = Field(default_factory=lambda: ["dev-online-admin-key"])


def load_admin_keys(
    settings: OnlineSettings | None = None, environment: str | None = None
) -> list[str]:
    """The keys that may call POST /online/rollback; ValueError for placeholders in production."""
    settings = settings or OnlineSettings()
    environment = environment or get_settings().environment
    keys = [k for k in settings.admin_keys if k]
    if not keys:
        raise ValueError("ONLINE_ADMIN_KEYS is empty; set at least one key.")
    return [require_real_secret(k, "ONLINE_ADMIN_KEYS", environment) for k in keys]

"""Where the feedback log lives and who may change the model (env prefix ``ONLINE_``).

Keys follow the one policy of every pattern (``core.settings.keys_required``): in production
``POST /rollback`` needs an admin key (``ONLINE_ADMIN_KEYS``) and the writes that move the model
(``POST /feedback``, ``/feedback/batch``, ``/bandit/reward``) a client key
(``ONLINE_CLIENT_KEYS``); development leaves them open unless ``ONLINE_REQUIRE_KEYS=true``.
Predictions and reads never need a key.
"""

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
    # Labels and rewards come from many systems: their keys are spread wide, so they are not
    # the admin keys (a leaked one can skew the evidence but never roll back).
    client_keys: list[str] = Field(default_factory=lambda: ["dev-online-client-key"])
    # Development only: ask for the keys anyway (production always does).
    require_keys: bool = False


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


def load_client_keys(
    settings: OnlineSettings | None = None, environment: str | None = None
) -> list[str]:
    """The keys that may send feedback and rewards; ValueError for placeholders in production
    and for a key that is also an admin key."""
    settings = settings or OnlineSettings()
    environment = environment or get_settings().environment
    keys = [k for k in settings.client_keys if k]
    if not keys:
        raise ValueError("ONLINE_CLIENT_KEYS is empty; set at least one key.")
    if set(keys) & set(settings.admin_keys):
        raise ValueError("A key is in both ONLINE_ADMIN_KEYS and ONLINE_CLIENT_KEYS.")
    return [require_real_secret(k, "ONLINE_CLIENT_KEYS", environment) for k in keys]

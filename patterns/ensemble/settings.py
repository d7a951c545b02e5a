"""Who may change the ensemble (env prefix ``ENSEMBLE_``): admin keys and client keys.

Two kinds of key, on purpose (README, "Keys"):
- admin keys (``ENSEMBLE_ADMIN_KEYS``) for ``POST /challenger/promote`` and
  ``/challenger/rollback``: they change which models answer every caller, so few hold them
  (the operator on call, a deploy job);
- client keys (``ENSEMBLE_CLIENT_KEYS``) for ``POST /feedback``: labels move the promotion
  gate's evidence and come from many systems (each labelling job or app that learns the true
  outcome), so these keys are spread wide and leak more easily. A leaked client key can skew the
  evidence but can neither promote nor roll back, and it is rotated without touching the
  operators' keys. A key may not be both.

Production (``COOKBOOK_ENVIRONMENT=production``) always requires them and refuses placeholder
keys. Development keeps the routes open unless ``ENSEMBLE_REQUIRE_KEYS=true``; the ingress says
which it is in its log when it starts (``Access.describe``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.ingress import key_id
from core.settings import get_settings, require_real_secret

KEY_HEADER = "X-API-Key"
ADMIN_ROUTES = "POST /challenger/promote and /challenger/rollback"
CLIENT_ROUTES = "POST /feedback"


class EnsembleSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ENSEMBLE_", extra="ignore")

    # JSON lists in the environment: ENSEMBLE_ADMIN_KEYS='["..."]'. The defaults are
    # development placeholders, refused in production.
    admin_keys: list[str] = Field(default_factory=lambda: ["dev-ensemble-admin-key"])
    client_keys: list[str] = Field(default_factory=lambda: ["dev-ensemble-client-key"])
    # Development only: ask for the keys anyway (production always does).
    require_keys: bool = False


@dataclass(frozen=True)
class Access:
    """What the ingress enforces: whether keys are required, and which keys open what."""

    environment: str
    required: bool
    admin_keys: tuple[str, ...]
    client_keys: tuple[str, ...]

    def describe(self) -> str:
        """The sentence the ingress logs when it starts (key ids only, never the keys)."""
        if not self.required:
            return (
                f"ensemble: {self.environment} profile: {ADMIN_ROUTES} and {CLIENT_ROUTES} are "
                "OPEN (no key needed). Production (COOKBOOK_ENVIRONMENT=production) requires "
                "ENSEMBLE_ADMIN_KEYS and ENSEMBLE_CLIENT_KEYS; ENSEMBLE_REQUIRE_KEYS=true "
                "requires them here too."
            )
        ids = lambda keys: ", ".join(key_id(k) for k in keys)  # noqa: E731
        return (
            f"ensemble: {self.environment} profile: {ADMIN_ROUTES} need an admin key "
            f"({ids(self.admin_keys)}); {CLIENT_ROUTES} needs a client key "
            f"({ids(self.client_keys)}); header {KEY_HEADER}."
        )

    def announce(self) -> None:
        """Log ``describe()`` on Serve's logger (replica logs, and `serve run`'s output): a
        warning while the routes are open, info otherwise."""
        level = logging.INFO if self.required else logging.WARNING
        logging.getLogger("ray.serve").log(level, self.describe())


def load_access(settings: EnsembleSettings | None = None, environment: str | None = None) -> Access:
    """The access policy from the environment; ValueError for a policy that is not safe to run
    (no keys, a key in both lists, or a placeholder key outside development)."""
    settings = settings or EnsembleSettings()
    environment = environment or get_settings().environment
    required = environment != "development" or settings.require_keys
    admin = tuple(k for k in settings.admin_keys if k)
    client = tuple(k for k in settings.client_keys if k)
    if required:
        for name, keys in (("ENSEMBLE_ADMIN_KEYS", admin), ("ENSEMBLE_CLIENT_KEYS", client)):
            if not keys:
                raise ValueError(f"{name} is empty; set at least one key.")
            for k in keys:
                require_real_secret(k, name, environment)
        shared = set(admin) & set(client)
        if shared:
            raise ValueError(
                f"{len(shared)} key(s) are in both ENSEMBLE_ADMIN_KEYS and ENSEMBLE_CLIENT_KEYS "
                f"({', '.join(key_id(k) for k in sorted(shared))}); give admins their own keys."
            )
    return Access(environment, required, admin, client)

"""Who may promote, roll back and send feedback: the policy read from the environment.

(The routes themselves, with missing, wrong and right keys against a production-profile
cluster, are in tests/ops/test_admin_keys.py.)
"""

import logging

import pytest

from core.ingress import key_id
from patterns.ensemble.settings import EnsembleSettings, load_access

ADMIN = "k7Qe2-admin-0c1f9b"
CLIENT = "p3Xv8-client-77a2de"


def test_development_keeps_the_routes_open_and_says_so() -> None:
    access = load_access(EnsembleSettings(), environment="development")
    assert not access.required
    sentence = access.describe()
    assert "OPEN (no key needed)" in sentence
    assert "POST /challenger/promote" in sentence and "POST /feedback" in sentence
    assert "COOKBOOK_ENVIRONMENT=production" in sentence


def test_development_may_require_the_keys_and_accepts_dev_keys() -> None:
    access = load_access(EnsembleSettings(require_keys=True), environment="development")
    assert access.required
    assert access.admin_keys == ("dev-ensemble-admin-key",)
    assert access.client_keys == ("dev-ensemble-client-key",)


def test_production_requires_keys_and_logs_only_their_ids() -> None:
    settings = EnsembleSettings(admin_keys=[ADMIN], client_keys=[CLIENT], require_keys=False)
    access = load_access(settings, environment="production")
    assert access.required  # production ignores require_keys=false
    sentence = access.describe()
    assert key_id(ADMIN) in sentence and key_id(CLIENT) in sentence
    assert ADMIN not in sentence and CLIENT not in sentence


@pytest.mark.parametrize(
    ("admin", "client", "phrase"),
    [
        (["dev-ensemble-admin-key"], [CLIENT], "ENSEMBLE_ADMIN_KEYS is a placeholder"),
        ([ADMIN], ["changeme"], "ENSEMBLE_CLIENT_KEYS is a placeholder"),
        ([], [CLIENT], "ENSEMBLE_ADMIN_KEYS is empty"),
        ([ADMIN], [""], "ENSEMBLE_CLIENT_KEYS is empty"),
        ([ADMIN], [CLIENT, ADMIN], "in both ENSEMBLE_ADMIN_KEYS and ENSEMBLE_CLIENT_KEYS"),
    ],
)
def test_production_refuses_unsafe_keys(admin, client, phrase) -> None:
    settings = EnsembleSettings(admin_keys=admin, client_keys=client)
    with pytest.raises(ValueError, match=phrase):
        load_access(settings, environment="production")


def test_keys_come_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("COOKBOOK_ENVIRONMENT", "production")
    monkeypatch.setenv("ENSEMBLE_ADMIN_KEYS", f'["{ADMIN}"]')
    monkeypatch.setenv("ENSEMBLE_CLIENT_KEYS", f'["{CLIENT}", "second-client-key-9f"]')
    access = load_access(environment="production")
    assert access.admin_keys == (ADMIN,)
    assert access.client_keys == (CLIENT, "second-client-key-9f")


def test_the_ingress_logs_the_policy_when_it_starts(caplog) -> None:
    """EnsembleIngress.__init__ calls announce(): a warning while open, info otherwise."""
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        load_access(EnsembleSettings(), environment="development").announce()
        load_access(EnsembleSettings(require_keys=True), environment="development").announce()
    open_, required = caplog.records[-2:]
    assert open_.levelno == logging.WARNING and "OPEN" in open_.getMessage()
    assert required.levelno == logging.INFO and "need an admin key" in required.getMessage()


def test_readme_shows_the_development_log_line() -> None:
    from patterns.ensemble.client import README

    line = load_access(EnsembleSettings(), environment="development").describe()
    assert line in README.read_text()

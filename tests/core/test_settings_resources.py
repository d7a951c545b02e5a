"""Settings refuse placeholder secrets outside development; GPU asks fall back to CPU."""

from __future__ import annotations

import logging

import pytest

from core.resources import NODE_KIND_LABEL, StageResources, resolve_actor_options, torch_device
from core.settings import REPO_ROOT, CoreSettings, require_real_secret


def test_placeholder_secret_allowed_in_development_only() -> None:
    assert require_real_secret("dev-key", "API_KEYS", "development") == "dev-key"
    for placeholder in ("", "changeme", "dev-key", "secret"):
        with pytest.raises(ValueError, match="placeholder"):
            require_real_secret(placeholder, "API_KEYS", "production")
    assert require_real_secret("k9f8a7s6d5", "API_KEYS", "production") == "k9f8a7s6d5"


def test_settings_read_env_prefix(monkeypatch) -> None:
    monkeypatch.setenv("COOKBOOK_MODEL_STORE_URI", "s3://bucket/models")
    monkeypatch.setenv("COOKBOOK_ENVIRONMENT", "production")
    s = CoreSettings()
    assert s.model_store_uri == "s3://bucket/models" and s.environment == "production"
    # unset: the repo's artifacts/models, as a file URI
    monkeypatch.delenv("COOKBOOK_MODEL_STORE_URI")
    assert CoreSettings().model_store_uri == (REPO_ROOT / "artifacts" / "models").as_uri()


def test_gpu_fraction_falls_back_to_cpu_and_says_so(caplog) -> None:
    res = StageResources(num_cpus=0.1, num_gpus=0.5, cpu_fallback_num_cpus=0.25)
    with caplog.at_level(logging.WARNING, logger="core.resources"):
        opts = resolve_actor_options(res, "detector", gpus_available=0)
    assert opts["num_cpus"] == 0.25 and "num_gpus" not in opts
    # still a model stage: it prefers the accelerator node even where it runs on CPU
    assert opts["label_selector"] == {NODE_KIND_LABEL: "accelerator"}
    assert "no GPU" in caplog.text and "detector" in caplog.text


def test_gpu_fraction_kept_on_gpu_cluster() -> None:
    res = StageResources(num_cpus=0.1, num_gpus=0.25, memory_mb=512)
    opts = resolve_actor_options(res, "classifier", gpus_available=1)
    assert opts == {
        "num_cpus": 0.1,
        "num_gpus": 0.25,
        "memory": 512 * 1024 * 1024,
        "label_selector": {NODE_KIND_LABEL: "accelerator"},
        "fallback_strategy": [{"label_selector": {}}],
    }


def test_node_kind_is_a_preference_with_a_fallback_to_any_node() -> None:
    from ray._private.label_utils import validate_fallback_strategy, validate_label_selector

    ingress = resolve_actor_options(StageResources(num_cpus=0.1), "ingress", gpus_available=0)
    assert ingress["label_selector"] == {NODE_KIND_LABEL: "!accelerator"}
    model = resolve_actor_options(
        StageResources(num_cpus=0.1, node_kind="accelerator"), "forecasters", gpus_available=0
    )
    assert model["label_selector"] == {NODE_KIND_LABEL: "accelerator"}
    for opts in (ingress, model):
        # Ray's own checks, the ones `serve deploy` runs
        assert validate_label_selector(opts["label_selector"]) is None
        assert validate_fallback_strategy(opts["fallback_strategy"]) is None
        assert opts["fallback_strategy"] == [{"label_selector": {}}]  # any node will do
    free = resolve_actor_options(StageResources(node_kind="any"), "x", gpus_available=0)
    assert "label_selector" not in free and "fallback_strategy" not in free
    with pytest.raises(ValueError):
        StageResources(node_kind="gpu")


def test_node_kind_head_is_a_requirement_on_rays_head_resource() -> None:
    head = StageResources(num_cpus=0.1, node_kind="head")
    opts = resolve_actor_options(head, "x", gpus_available=0)
    assert opts["resources"] == {"node:__internal_head__": 0.001}  # every head node has 1.0
    assert "label_selector" not in opts and "fallback_strategy" not in opts


def test_accelerator_setting_forces_cpu(monkeypatch) -> None:
    from core import settings

    monkeypatch.setenv("COOKBOOK_ACCELERATOR", "cpu")
    settings.get_settings.cache_clear()
    try:
        opts = resolve_actor_options(StageResources(num_gpus=1), "x")
        assert "num_gpus" not in opts
    finally:
        settings.get_settings.cache_clear()


def test_torch_device_is_cpu_unless_the_replica_was_given_a_gpu() -> None:
    import torch

    assert torch_device(False) == "cpu"
    assert torch_device(True) == ("cuda" if torch.cuda.is_available() else "cpu")

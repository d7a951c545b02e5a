"""config.yaml holds one application whose values are the code defaults, and it validates."""

from __future__ import annotations

from pathlib import Path

import yaml

from patterns.online_learning.app import OnlineArgs

CONFIG = Path(__file__).resolve().parents[2] / "patterns" / "online_learning" / "config.yaml"


def _assert_subset(given, default, path="args") -> None:
    if isinstance(given, dict):
        assert isinstance(default, dict), path
        for key, value in given.items():
            assert key in default, f"{path}.{key} is not an OnlineArgs field"
            _assert_subset(value, default[key], f"{path}.{key}")
    else:
        assert given == default, f"{path}: config.yaml says {given!r}, the code {default!r}"


def test_config_values_equal_the_code_defaults() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(CONFIG.read_text())
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert (app["name"], app["route_prefix"]) == ("online_learning", "/online")
    _assert_subset(app["args"], OnlineArgs().model_dump())
    OnlineArgs(**app["args"])
    names = {d["name"]: d for d in app["deployments"]}
    assert names["OnlineTrainer"]["num_replicas"] == 1  # the only writer of versions
    assert names["BanditPolicy"]["num_replicas"] == 1

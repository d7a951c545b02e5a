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


def test_the_sqlite_log_pins_its_readers_and_writers_to_the_head_and_redis_pins_nothing() -> None:
    kinds = lambda a: (  # noqa: E731
        a.trainer_resources.node_kind,
        a.ingress_resources.node_kind,
        a.bandit.resources.node_kind,
    )
    sqlite = OnlineArgs(log_url="sqlite:////tmp/feedback.db").placed_by_the_log()
    assert kinds(sqlite) == ("head", "head", "head")
    assert sqlite.trainer_resources.num_cpus == OnlineArgs().trainer_resources.num_cpus
    assert kinds(OnlineArgs(log_url="redis://127.0.0.1:6379/1").placed_by_the_log()) == (
        None, None, None,
    )  # fmt: skip
    chosen = OnlineArgs(log_url="sqlite:////tmp/f.db", trainer_resources={"node_kind": "general"})
    assert kinds(chosen.placed_by_the_log())[0] == "general"  # config wins

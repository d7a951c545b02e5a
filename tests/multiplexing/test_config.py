"""config.yaml holds the code defaults, and it is a valid Serve config."""

from pathlib import Path

import yaml

from patterns.multiplexing.app import MultiplexArgs, MultiplexIngress
from patterns.multiplexing.client import sample_request, zipf_model_id
from patterns.multiplexing.deployments import ChatModel, ForecastModels

CONFIG = Path(__file__).resolve().parents[2] / "patterns" / "multiplexing" / "config.yaml"


def _app() -> dict:
    apps = yaml.safe_load(CONFIG.read_text())["applications"]
    assert len(apps) == 1
    return apps[0]


def test_config_args_equal_the_code_defaults() -> None:
    app = _app()
    assert app["name"] == "multiplexing" and app["route_prefix"] == "/multiplex"
    assert MultiplexArgs(**app["args"]) == MultiplexArgs()
    # every default is written out, so the file shows every knob
    assert MultiplexArgs(**app["args"]).model_dump() == MultiplexArgs().model_dump()


def test_config_deployment_options_equal_the_decorators() -> None:
    by_name = {d["name"]: d for d in _app()["deployments"]}
    for deployment in (MultiplexIngress, ForecastModels, ChatModel):
        options = by_name[deployment.name]
        for key, value in options.items():
            if key != "name":
                assert getattr(deployment, key) == value, (deployment.name, key)


def test_config_is_a_valid_serve_schema() -> None:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema(**yaml.safe_load(CONFIG.read_text()))


def test_sample_requests_follow_zipf() -> None:
    ids = [zipf_model_id(i) for i in range(2000)]
    top = ids.count("store-0001") / len(ids)
    assert 0.08 < top < 0.2  # 1/H(1000, 1.1) ~ 0.13
    assert len(set(ids)) > 300
    assert sample_request(3)["path"].startswith("/multiplex/models/store-")

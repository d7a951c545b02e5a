"""config.yaml and the code agree: every value config.yaml states is the default that
``serve run patterns.pipeline.app:app`` uses, for the args and for each deployment's options.
No Ray needed: the applications are built, not run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from patterns.pipeline.app import PipelineArgs, build_app

ROOT = Path(__file__).resolve().parents[2]
CONFIG = yaml.safe_load((ROOT / "patterns" / "pipeline" / "config.yaml").read_text())
(APP,) = CONFIG["applications"]


def _deployments(app: Any) -> dict[str, Any]:
    """Every deployment of a built application graph, by name."""
    from ray.serve import Application

    found: dict[str, Any] = {}
    todo = [app]
    while todo:
        deployment = todo.pop()._bound_deployment
        found[deployment.name] = deployment
        args = [*deployment.init_args, *deployment.init_kwargs.values()]
        todo.extend(a for a in args if isinstance(a, Application))
    return found


def _unknown_keys(given: Any, known: Any, where: str) -> list[str]:
    """Keys in the config that the args model does not have (pydantic would drop them)."""
    if not isinstance(given, dict) or not isinstance(known, dict):
        return []
    out = []
    for key, value in given.items():
        if key not in known:
            out.append(f"{where}.{key}")
        else:
            out += _unknown_keys(value, known[key], f"{where}.{key}")
    return out


def test_config_args_are_the_code_defaults() -> None:
    assert PipelineArgs(**APP["args"]) == PipelineArgs()
    assert _unknown_keys(APP["args"], PipelineArgs().model_dump(), "args") == []


def test_config_deployment_options_are_the_code_defaults() -> None:
    from ray.serve.config import AutoscalingConfig

    import patterns.pipeline.app as module

    default = _deployments(module.app)  # what `serve run patterns.pipeline.app:app` runs
    from_config = _deployments(build_app(APP["args"]))
    listed = {d["name"]: d for d in APP["deployments"]}
    assert set(listed) == set(default), "config.yaml lists other deployments than the app has"
    for name, options in listed.items():
        code = default[name]._deployment_config
        for key, value in options.items():
            if key == "name":
                continue
            if key == "autoscaling_config":
                assert AutoscalingConfig(**value) == code.autoscaling_config, name
            else:
                assert getattr(code, key) == value, f"{name}.{key}: code {getattr(code, key)}"
    for name, deployment in default.items():
        assert deployment.user_config == from_config[name].user_config, name
        assert deployment.ray_actor_options == from_config[name].ray_actor_options, name
    # The batching knobs reach the model stages as user_config, from the stage's args.
    for name, stage in (("Detector", "detector"), ("SceneClassifier", "scene"),
                        ("DigitClassifier", "digits")):  # fmt: skip
        spec = APP["args"][stage]
        assert default[name].user_config == {
            "max_batch_size": spec["max_batch_size"],
            "batch_wait_timeout_s": spec["batch_wait_timeout_s"],
        }
        # Batches can only fill when this many requests may be in flight.
        assert default[name].max_ongoing_requests >= spec["max_batch_size"], name

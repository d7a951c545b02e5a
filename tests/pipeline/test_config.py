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


def _check_listed_options(listed: dict[str, Any], built: dict[str, Any]) -> None:
    """Every option a config lists for a deployment is what that deployment gets."""
    from ray.serve.config import AutoscalingConfig

    assert set(listed) == set(built), "the config lists other deployments than the app has"
    for name, options in listed.items():
        code = built[name]._deployment_config
        for key, value in options.items():
            if key == "name":
                continue
            if key == "autoscaling_config":
                assert AutoscalingConfig(**value) == code.autoscaling_config, name
            else:
                assert getattr(code, key) == value, f"{name}.{key}: code {getattr(code, key)}"


def test_config_deployment_options_are_the_code_defaults() -> None:
    import patterns.pipeline.app as module

    default = _deployments(module.app)  # what `serve run patterns.pipeline.app:app` runs
    from_config = _deployments(build_app(APP["args"]))
    _check_listed_options({d["name"]: d for d in APP["deployments"]}, default)
    for name, deployment in default.items():
        assert deployment.user_config == from_config[name].user_config, name
        assert deployment.ray_actor_options == from_config[name].ray_actor_options, name
    # The local profile is fused: the ingress batches the three models itself, its knobs
    # sent as user_config; batches can only fill when that many requests may be in flight.
    assert APP["args"]["topology"] == "fused" and set(default) == {"PipelineIngress"}
    spec = APP["args"]["fused"]
    ingress = default["PipelineIngress"]
    assert ingress.user_config == {
        "max_batch_size": spec["max_batch_size"],
        "batch_wait_timeout_s": spec["batch_wait_timeout_s"],
    }
    assert ingress.max_ongoing_requests >= spec["max_batch_size"]


def _model_stage_user_configs(app_args: dict[str, Any], built: dict[str, Any]) -> None:
    for name, stage in (("Detector", "detector"), ("SceneClassifier", "scene"),
                        ("DigitClassifier", "digits")):  # fmt: skip
        spec = {**PipelineArgs().model_dump()[stage], **app_args.get(stage, {})}
        assert built[name].user_config == {
            "max_batch_size": spec["max_batch_size"],
            "batch_wait_timeout_s": spec["batch_wait_timeout_s"],
        }
        # Batches can only fill when this many requests may be in flight.
        assert built[name].max_ongoing_requests >= spec["max_batch_size"], name


def test_split_topology_code_defaults() -> None:
    """The same args with ``topology: split``: the four stage deployments, each model stage
    with its batching knobs as user_config."""
    built = _deployments(build_app({**APP["args"], "topology": "split"}))
    assert set(built) == {"PipelineIngress", "Detector", "SceneClassifier", "DigitClassifier"}
    _model_stage_user_configs(APP["args"], built)
    # Decoding in a deployment of its own instead of the ingress: one more deployment.
    apart = _deployments(
        build_app({**APP["args"], "topology": "split", "preprocess_in": "deployment"})
    )
    assert set(apart) == set(built) | {"Preprocess"}


# ------------------------------------------------------------------------------ GPU profile
GPU_CONFIG = yaml.safe_load((ROOT / "patterns" / "pipeline" / "config.gpu.yaml").read_text())
(GPU_APP,) = GPU_CONFIG["applications"]
GPU_NODE = {"CPU": 16, "GPU": 1}  # what the profile is sized for (configs/gpu.yaml header)


def test_gpu_profile_is_a_valid_split_app_that_fits_one_node() -> None:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(GPU_CONFIG)
    assert {k: GPU_APP[k] for k in ("name", "route_prefix", "import_path")} == {
        k: APP[k] for k in ("name", "route_prefix", "import_path")
    }
    args = PipelineArgs(**GPU_APP["args"])
    assert args.topology == "split"
    assert _unknown_keys(GPU_APP["args"], PipelineArgs().model_dump(), "args") == []
    built = _deployments(build_app(GPU_APP["args"]))
    listed = {d["name"]: d for d in GPU_APP["deployments"]}
    assert set(listed) == set(built), "config.gpu.yaml lists other deployments than the app has"
    for name in ("Detector", "SceneClassifier", "DigitClassifier"):
        stage = {"Detector": "detector", "SceneClassifier": "scene"}.get(name, "digits")
        # Batches can only fill when this many requests may be in flight.
        assert listed[name]["max_ongoing_requests"] >= getattr(args, stage).max_batch_size
        assert built[name].user_config == getattr(args, stage).model_dump(
            include={"max_batch_size", "batch_wait_timeout_s"}
        )
    resources = {
        "PipelineIngress": args.ingress_resources,
        "Detector": args.detector.resources,
        "SceneClassifier": args.scene.resources,
        "DigitClassifier": args.digits.resources,
    }
    cpus = sum(resources[n].num_cpus * listed[n]["num_replicas"] for n in listed)
    gpus = sum(resources[n].num_gpus * listed[n]["num_replicas"] for n in listed)
    assert cpus <= GPU_NODE["CPU"] and 0 < gpus <= GPU_NODE["GPU"], (cpus, gpus)
    for name in ("Detector", "SceneClassifier", "DigitClassifier"):
        assert resources[name].num_gpus > 0, f"{name} should run on the GPU"


def test_generated_gpu_profile_and_rayservice_carry_it() -> None:
    """configs/gpu.yaml and the RayService hold config.gpu.yaml's app; the RayService's GPU
    worker group is the node it is sized for, started in HAProxy mode."""
    from ray.serve.schema import ServeDeploySchema

    profile = yaml.safe_load((ROOT / "configs" / "gpu.yaml").read_text())
    ServeDeploySchema.model_validate(profile)
    (pipeline,) = [a for a in profile["applications"] if a["name"] == "pipeline"]
    assert pipeline == GPU_APP
    local = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    (shipped,) = [a for a in local["applications"] if a["name"] == "pipeline"]
    assert shipped == APP
    rayservice = yaml.safe_load((ROOT / "configs" / "rayservice.yaml").read_text())
    served = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(served)
    (pipeline,) = [a for a in served["applications"] if a["name"] == "pipeline"]
    assert pipeline == GPU_APP
    (group,) = [
        g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        if g["groupName"] == "gpu"
    ]  # fmt: skip
    assert group["rayStartParams"] == {
        "num-cpus": str(GPU_NODE["CPU"]),
        "num-gpus": "1",
        "labels": "cookbook.io/node-kind=accelerator",  # where the model stages go
    }
    (container,) = group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"

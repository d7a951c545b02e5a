"""The KubeRay manifests in configs/ checked offline: the Serve config inside each RayService
against Serve's own schema, and every pod template (head and each worker group) against the
Kubernetes schema (kubernetes-validate, strict: unknown fields fail), wrapped into the Pod
KubeRay makes of it. The RayService object itself has no schema here (its CRD is not part of
the Kubernetes schema), so its few fields the platform relies on are checked by hand.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
# The Kubernetes API version the templates are checked against (kubernetes-validate ships it).
KUBERNETES_VERSION = "1.33.0"


def _rayservices() -> list[Path]:
    out = []
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "RayService":
                out.append(path)
                break
    return out


MANIFESTS = _rayservices()


def _load(path: Path) -> dict[str, Any]:
    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "RayService"]
    return dict(doc)


def _pod_templates(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster.get("workerGroupSpecs", []):
        templates[f"worker/{group['groupName']}"] = group["template"]
    return templates


def as_pod(name: str, template: dict[str, Any]) -> dict[str, Any]:
    """The Pod KubeRay creates from a template (its metadata, its spec)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name.replace("/", "-"), **template.get("metadata", {})},
        "spec": copy.deepcopy(template["spec"]),
    }


def _validate(pod: dict[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


def test_there_is_a_manifest_to_check() -> None:
    assert MANIFESTS, "no RayService manifest under configs/"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_serve_config_v2_is_a_valid_serve_config(path: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    rayservice = _load(path)
    assert rayservice["apiVersion"] == "ray.io/v1"
    config = ServeDeploySchema.model_validate(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))
    assert config.applications, "serveConfigV2 deploys no application"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_pod_templates_are_valid_kubernetes_pods(path: Path) -> None:
    templates = _pod_templates(_load(path))
    assert "head" in templates and len(templates) >= 2, templates.keys()
    for name, template in templates.items():
        _validate(as_pod(name, template))
        containers = template["spec"]["containers"]
        assert containers and all(c.get("image") for c in containers), name


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_rayservice_fields_the_upgrade_path_relies_on(path: Path) -> None:
    spec = _load(path)["spec"]
    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == __import__("ray").__version__  # the image's Ray
    for group in cluster.get("workerGroupSpecs", []):
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group
    # GCS fault tolerance (a dead head must not take the replicas with it): Redis, password
    # from a Secret, never written into the manifest
    ft = cluster["gcsFaultToleranceOptions"]
    assert ft["redisAddress"].rsplit(":", 1)[1].isdigit(), ft
    assert set(ft["redisPassword"]) == {"valueFrom"}, ft
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"]["key"], ft
    strategy = spec.get("upgradeStrategy", {"type": "NewCluster"})  # KubeRay's default
    assert strategy["type"] in {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
    if strategy["type"] == "NewClusterWithIncrementalUpgrade":
        options = strategy["clusterUpgradeOptions"]
        assert options["gatewayClassName"] and cluster.get("enableInTreeAutoscaling") is True
        assert 0 < options["stepSizePercent"] <= 100 and 0 < options["maxSurgePercent"] <= 100


@pytest.mark.parametrize(
    ("mutate", "phrase"),
    [
        (lambda spec: spec["containers"][0].update(ports=[{"containerPort": "http"}]), "http"),
        (lambda spec: spec["containers"][0].update(imagee="typo:latest"), "imagee"),
        (lambda spec: spec["containers"][0]["env"].append({"value": "no name"}), "name"),
        (lambda spec: spec.update(containers="ray-head"), "ray-head"),
    ],
)
def test_the_check_catches_a_broken_template(mutate: Any, phrase: str) -> None:
    """The validation is real: a port that is not a number, a misspelt field, an env var
    without a name and a list that is a string each fail."""
    import kubernetes_validate

    template = copy.deepcopy(_pod_templates(_load(MANIFESTS[0]))["head"])
    mutate(template["spec"])
    with pytest.raises(kubernetes_validate.ValidationError) as caught:
        _validate(as_pod("head", template))
    assert phrase in str(caught.value)


# Keys each app refuses to start without in production (its settings.py: placeholders refused).
PRODUCTION_KEYS = {
    "business_logic": {"BUSINESS_API_KEYS"},
    "ensemble": {"ENSEMBLE_ADMIN_KEYS", "ENSEMBLE_CLIENT_KEYS"},
    "online_learning": {"ONLINE_ADMIN_KEYS", "ONLINE_CLIENT_KEYS"},
}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_production_containers_get_every_key_the_apps_need(path: Path) -> None:
    rayservice = _load(path)
    apps = {a["name"] for a in yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]}
    for name, template in _pod_templates(rayservice).items():
        for container in template["spec"]["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            if env.get("COOKBOOK_ENVIRONMENT", {}).get("value") != "production":
                continue
            needed = set().union(*(PRODUCTION_KEYS.get(app, set()) for app in apps))
            missing = needed - set(env)
            assert not missing, f"{name}/{container['name']} lacks {sorted(missing)}"
            for key in needed:  # secrets come from a Secret, never inline in the manifest
                assert "secretKeyRef" in env[key].get("valueFrom", {}), key

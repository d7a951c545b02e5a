"""Repository-level checks: the multi-app config, the pattern layout, `make serve` itself."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scripts import build_serve_config

ROOT = Path(__file__).resolve().parents[1]
PATTERNS = sorted(p.parent.name for p in ROOT.glob("patterns/*/app.py"))


def test_serve_config_is_generated_from_pattern_configs() -> None:
    assert build_serve_config.main(["--check"]) == 0, "run `python -m scripts.build_serve_config`"


@pytest.mark.parametrize("name", PATTERNS)
def test_pattern_lists_its_requirements_and_each_is_pinned(name: str) -> None:
    """Every pattern has a requirements.txt (a copy installs it with ``-c constraints.txt``),
    and each line names a distribution constraints.txt pins, so the install resolves."""
    import re

    pinned = {
        re.split(r"[=<>\[ ]", line, maxsplit=1)[0].lower().replace("_", "-")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    path = ROOT / "patterns" / name / "requirements.txt"
    assert path.exists(), f"patterns/{name}/requirements.txt is missing"
    wanted = [
        re.split(r"[=<>\[ ]", line, maxsplit=1)[0].lower().replace("_", "-")
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert "ray" in wanted and "fastapi" in wanted, wanted
    assert not [w for w in wanted if w not in pinned], f"not in constraints.txt: {wanted}"
    readme = (ROOT / "patterns" / name / "README.md").read_text()
    assert f"pip install -r patterns/{name}/requirements.txt" in readme


@pytest.mark.parametrize("name", PATTERNS)
def test_pattern_is_a_copyable_unit(name: str) -> None:
    folder = ROOT / "patterns" / name
    for required in ("app.py", "config.yaml", "client.py", "README.md", "__init__.py"):
        assert (folder / required).exists(), f"patterns/{name}/{required} is missing"
    config = yaml.safe_load((folder / "config.yaml").read_text())
    (app_cfg,) = config["applications"]
    assert app_cfg["import_path"].startswith(f"patterns.{name}.")
    module = importlib.import_module(f"patterns.{name}.app")
    assert hasattr(module, "build_app") and hasattr(module, "app")


@pytest.mark.parametrize("name", PATTERNS)
def test_importing_a_pattern_does_no_work(name: str, tmp_path) -> None:
    """Replicas import pattern modules many times: importing must not load models, make
    directories, touch the network or start Ray."""
    code = (
        "import sys, time; t=time.perf_counter();"
        f"import patterns.{name}.app;"
        "import ray; assert not ray.is_initialized(), 'ray started at import';"
        "print(time.perf_counter()-t)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert list(tmp_path.iterdir()) == [], "import created files in the working directory"
    # Building the app (resolving placements, which logs) waits for `module.app` to be asked for.
    assert out.stderr.strip() == "", f"import logged: {out.stderr[-500:]}"


def test_configs_validate_as_serve_deploy_schemas() -> None:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve_config.yaml").read_text()))
    rayservice = yaml.safe_load((ROOT / "configs" / "rayservice.yaml").read_text())
    assert rayservice["kind"] == "RayService"
    ServeDeploySchema.model_validate(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))
    for path in ROOT.glob("patterns/*/config.yaml"):
        ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))

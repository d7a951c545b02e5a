"""One shape for every pattern: config agrees with code, no import circles, a copy runs.

- Every pattern has the same files: ``flow.py`` (its request flow in a plain class, no Ray),
  ``app.py`` (at most 300 lines, ``build_app(args: <Args> | dict | None = None)``),
  ``deployments.py``, ``artifacts.py``, ``client.py``, ``config.yaml``, ``requirements.txt``,
  ``README.md``, and its measurement code in ``bench/`` (``bench/benchmark.py``).

- Every value a pattern's ``config.yaml`` sets (its ``args`` and its deployments' options) equals
  what ``serve run patterns.<name>.app:app`` uses, so the two ways to start a pattern behave the
  same. The code side is read the way ``serve build`` reads it.
- No import circles anywhere in the repo (every package; a circle hidden inside a
  function still ties two modules together: counted too).
- ``core/`` plus one ``patterns/<name>/`` copied into an empty folder runs under ``serve run``
  and answers the pattern's own sample request (slow: one Ray cluster per pattern).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import typing
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
PATTERNS = sorted(p.parent.name for p in ROOT.glob("patterns/*/app.py"))


def _config_app(name: str) -> dict[str, Any]:
    config = yaml.safe_load((ROOT / "patterns" / name / "config.yaml").read_text())
    (app,) = config["applications"]
    return app


def _differences(configured: Any, default: Any, where: str) -> list[str]:
    """Paths where ``configured`` (a config.yaml value) differs from the code's ``default``."""
    if isinstance(configured, dict) and isinstance(default, dict):
        out: list[str] = []
        for key, value in configured.items():
            if key not in default:
                out.append(f"{where}.{key}: set in config.yaml, unknown to the code")
            else:
                out.extend(_differences(value, default[key], f"{where}.{key}"))
        return out
    if isinstance(configured, list) and isinstance(default, list):
        if len(configured) != len(default):
            return [f"{where}: {len(configured)} items vs {len(default)}"]
        return [
            d
            for i, (c, v) in enumerate(zip(configured, default, strict=True))
            for d in _differences(c, v, f"{where}[{i}]")
        ]
    if isinstance(configured, float | int) and isinstance(default, float | int):
        return (
            [] if float(configured) == float(default) else [f"{where}: {configured} vs {default}"]
        )
    return [] if configured == default else [f"{where}: {configured!r} vs {default!r}"]


SHAPE_FILES = (
    "flow.py",
    "app.py",
    "deployments.py",
    "artifacts.py",
    "client.py",
    "config.yaml",
    "requirements.txt",
    "README.md",
    "bench/__init__.py",
    "bench/benchmark.py",
)
MEASUREMENT = ("benchmark", "bench_", "_bench", "loadgen", "monolith")


@pytest.mark.parametrize("name", PATTERNS)
def test_every_pattern_has_the_one_shape(name: str) -> None:
    here = ROOT / "patterns" / name
    missing = [f for f in SHAPE_FILES if not (here / f).is_file()]
    assert not missing, f"patterns/{name} lacks {missing}"
    stray = [p.name for p in here.glob("*.py") if any(m in p.stem for m in MEASUREMENT)]
    assert not stray, f"measurement code outside patterns/{name}/bench/: {stray}"
    lines = len((here / "app.py").read_text().splitlines())
    assert lines <= 300, f"patterns/{name}/app.py is {lines} lines (at most 300)"
    # the flow is plain Python: no Ray anywhere in what flow.py imports at its top
    tree = ast.parse((here / "flow.py").read_text())
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
    assert not [m for m in names if m.split(".")[0] == "ray"], (name, names)
    # one builder signature: build_app(args: <Args> | dict[str, Any] | None = None)
    fn = next(
        n
        for n in ast.parse((here / "app.py").read_text()).body
        if isinstance(n, ast.FunctionDef) and n.name == "build_app"
    )
    (arg,) = fn.args.args
    assert arg.arg == "args" and fn.args.defaults and ast.unparse(fn.args.defaults[0]) == "None"
    assert ast.unparse(arg.annotation).endswith("| dict[str, Any] | None"), ast.unparse(
        arg.annotation
    )


def test_core_reads_in_one_sitting() -> None:
    """core/ is what a copied pattern needs; cluster and proxy plumbing lives in cluster/."""
    lines = sum(len(p.read_text().splitlines()) for p in (ROOT / "core").glob("*.py"))
    assert lines <= 1_600, f"core/ is {lines} lines"
    for p in (ROOT / "core").glob("*.py"):
        tree = ast.parse(p.read_text())
        for n in ast.walk(tree):
            mods = []
            if isinstance(n, ast.ImportFrom):
                mods = [n.module or ""]
            elif isinstance(n, ast.Import):
                mods = [a.name for a in n.names]
            bad = [m for m in mods if m.split(".")[0] in ("patterns", "cluster")]
            assert not bad, f"{p.name} imports {bad}"


@pytest.mark.parametrize("name", PATTERNS)
def test_config_yaml_equals_the_code_defaults(name: str) -> None:
    from ray.serve._private.build_app import build_app
    from ray.serve.deployment import deployment_to_schema

    module = importlib.import_module(f"patterns.{name}.app")
    app_cfg = _config_app(name)
    builder = app_cfg["import_path"].split(":")[1]
    params = list(inspect.signature(getattr(module, builder)).parameters.values())
    annotation = params[0].annotation
    if isinstance(annotation, str):  # string annotations: resolve in the module
        annotation = eval(annotation, vars(module))
    # `PipelineArgs` or `PipelineArgs | dict`: the pydantic model is the args class
    candidates = typing.get_args(annotation) or (annotation,)
    args_cls = next(c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel))
    problems = _differences(app_cfg.get("args") or {}, args_cls().model_dump(), "args")

    from ray.serve._private.utils import DEFAULT

    built = build_app(module.app, name=name)
    code = {}
    for d in built.deployments:
        # every option with its effective value: `num_replicas: 1` in config.yaml is what the
        # code uses when it sets nothing (Serve's schema says "default" for those)
        options = deployment_to_schema(d).model_dump()
        code[d.name] = {
            k: ((1 if k == "num_replicas" else None) if v is DEFAULT.VALUE else v)
            for k, v in options.items()
        }
    for dep in app_cfg.get("deployments") or []:
        dep = dict(dep)
        dep_name = dep.pop("name")
        if dep_name not in code:
            problems.append(f"deployments.{dep_name}: not a deployment of the default app")
            continue
        problems += _differences(dep, code[dep_name], f"deployments.{dep_name}")
    assert not problems, (
        f"patterns/{name}/config.yaml disagrees with `serve run patterns.{name}.app:app`:\n"
        + "\n".join(problems)
    )


def _imports(path: Path, package: str) -> set[str]:
    """Every module ``path`` names in an import, wherever the import sits (a function body
    included), and in ``importlib.import_module("...")`` with a literal name."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *filter(None, [base])])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return found


# Not the repo's own code: the virtual environment, built artifacts, caches.
_NOT_CODE = {".venv", "artifacts", "build", "node_modules", "__pycache__"}


def _import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the repo modules it imports, over every ``.py`` file under ``root``: every
    package (core, patterns, loadtests, reliability, scripts, tests, and any added later)."""
    modules: dict[str, Path] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if any(p in _NOT_CODE or p.startswith(".") for p in parts):
            continue
        modules[".".join(parts).removesuffix(".__init__")] = path
    graph = {}
    for m, p in modules.items():
        package = m if p.name == "__init__.py" else m.rpartition(".")[0]
        graph[m] = {i for i in _imports(p, package) if i in modules and i != m}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        if node in stack:
            cycles.append([*stack[stack.index(node) :], node])
            return
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, [*stack, node], done)
        done.add(node)

    done: set[str] = set()
    for m in sorted(graph):
        visit(m, [], done)
    return cycles


def test_the_circle_check_sees_every_package_and_a_hidden_circle(tmp_path: Path) -> None:
    graph = _import_graph(ROOT)
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert {"core", "patterns", "loadtests", "reliability", "scripts", "tests"} <= packages
    assert packages <= {m.split(".")[0] for m in graph}, packages
    # the harness's lazy imports of its scenarios are edges too
    assert "reliability.soak" in graph["reliability.chaos"]
    # a circle closed by an import inside a function, in a package of its own
    (tmp_path / "newpkg").mkdir()
    (tmp_path / "newpkg" / "__init__.py").write_text("")
    (tmp_path / "newpkg" / "a.py").write_text("from newpkg import b\n")
    (tmp_path / "newpkg" / "b.py").write_text("def f():\n    from . import a\n")
    assert _cycles(_import_graph(tmp_path)) == [["newpkg.a", "newpkg.b", "newpkg.a"]]


def test_no_import_circles() -> None:
    cycles = _cycles(_import_graph(ROOT))
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


# ------------------------------------------------------------------------------ public entry points
# The harnesses and tools around the patterns: they use a pattern the way a user's code would.
OUTSIDE = ("reliability", "loadtests", "scripts", "cluster")
# A module path in a string: ``python -m patterns.x.y``, ``uvicorn patterns.x.y:factory``, an
# ``import_module`` name; ``*`` stands for an f-string's placeholder (``f"patterns.{app}.client"``).
_MODULE_PATH = re.compile(r"patterns\.(\w+|\*)((?:\.\w+)*)(?::\w+)?")


def _public(name: str, root: Path = ROOT) -> tuple[str, ...]:
    """``PUBLIC`` of ``patterns/<name>/__init__.py``, read without importing the pattern."""
    tree = ast.parse((root / "patterns" / name / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["PUBLIC"]:
            return tuple(ast.literal_eval(node.value))
    return ()


def _pattern_references(path: Path) -> list[tuple[int, str, str]]:
    """(line, pattern or ``*``, first module under it or "") for every pattern module ``path``
    names: in an import (a function body included), or as a string that is a module path."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append((node.lineno, node.value))
        elif isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "*" for v in node.values)
            found.append((node.lineno, text))
    out = []
    for line, text in found:
        m = _MODULE_PATH.fullmatch(text)
        if m:
            out.append((line, m.group(1), m.group(2).lstrip(".").split(".")[0]))
    return out


def _reach_ins(root: Path, packages: tuple[str, ...]) -> list[str]:
    """Imports by ``packages`` of a pattern module that is not in that pattern's ``PUBLIC``;
    and any pattern naming another pattern's module at all."""
    patterns = sorted(p.parent.name for p in root.glob("patterns/*/__init__.py"))
    public = {p: _public(p, root) for p in patterns}

    def is_module(pattern: str, name: str) -> bool:
        here = root / "patterns" / pattern
        return (here / f"{name}.py").is_file() or (here / name / "__init__.py").is_file()

    bad = []
    files = [(f, None) for pkg in packages for f in sorted((root / pkg).rglob("*.py"))]
    files += [(f, p) for p in patterns for f in sorted((root / "patterns" / p).rglob("*.py"))]
    for path, own in files:
        where = path.relative_to(root)
        for line, pattern, module in _pattern_references(path):
            if own is not None:  # inside a pattern: its own modules only
                if pattern not in (own, "*"):
                    bad.append(f"{where}:{line} patterns/{own} uses patterns.{pattern}")
                continue
            for p in patterns if pattern == "*" else [pattern]:
                if module and is_module(p, module) and module not in public.get(p, ()):
                    bad.append(f"{where}:{line} patterns.{p}.{module} (not in its PUBLIC)")
    return list(dict.fromkeys(bad))  # one line per module named, however many names


@pytest.mark.parametrize("name", PATTERNS)
def test_public_entry_points_are_listed_once_for_readme_and_code(name: str) -> None:
    """``PUBLIC`` in the pattern's ``__init__.py`` names real modules, and the README's
    "Public entry points" lists exactly those (``- `x.py`: ...`` or ``- `bench/`: ...``)."""
    here = ROOT / "patterns" / name
    public = _public(name)
    assert {"app", "flow", "client", "artifacts", "bench"} <= set(public), public
    missing = [m for m in public if not ((here / f"{m}.py").is_file() or (here / m).is_dir())]
    assert not missing, f"patterns/{name} PUBLIC names no such module: {missing}"
    readme = (here / "README.md").read_text()
    assert "\n## Public entry points\n" in readme, f"patterns/{name}/README.md lacks the section"
    section = readme.split("\n## Public entry points\n", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^- `(\w+)(?:\.py|/)`", section, flags=re.M)
    assert sorted(listed) == sorted(public), (listed, public)


def test_the_reach_in_check_sees_imports_strings_and_f_strings(tmp_path: Path) -> None:
    """A harness importing a module its pattern keeps inside is caught, whether it imports it
    (at the top or in a function), starts it by name, or builds the name in an f-string."""
    pat = tmp_path / "patterns" / "demo"
    pat.mkdir(parents=True)
    (tmp_path / "patterns" / "__init__.py").write_text("")
    (pat / "__init__.py").write_text('PUBLIC = ("client", "bench")\n')
    for m in ("client", "records", "helper"):
        (pat / f"{m}.py").write_text("")
    (pat / "bench").mkdir()
    (pat / "bench" / "__init__.py").write_text("from patterns.demo import records\n")
    (tmp_path / "harness").mkdir()
    (tmp_path / "harness" / "ok.py").write_text(
        "from patterns.demo import PUBLIC, client\nfrom patterns.demo.bench import x\n"
        "import patterns.demo.client\nARGV = ['-m', 'patterns.demo.client']\n"
    )
    assert _reach_ins(tmp_path, ("harness",)) == []
    (tmp_path / "harness" / "bad.py").write_text(
        "def f(app):\n    from patterns.demo.records import decisions\n"
        "    from patterns.demo import helper\n"
        "    return ['-m', 'patterns.demo.records:main', f'patterns.{app}.helper']\n"
    )
    assert _reach_ins(tmp_path, ("harness",)) == [
        f"harness/bad.py:{n} patterns.demo.{m} (not in its PUBLIC)"
        for n, m in ((2, "records"), (3, "helper"), (4, "records"), (4, "helper"))
    ]


def test_harnesses_use_only_the_patterns_public_entry_points() -> None:
    """reliability/, loadtests/, scripts/ and cluster/ import from a pattern only what its
    ``PUBLIC`` names (README, "Public entry points"); no pattern imports another."""
    bad = _reach_ins(ROOT, OUTSIDE)
    assert not bad, "reach-ins:\n" + "\n".join(bad)


# ------------------------------------------------------------------------------ copy test
def _copy_pattern(name: str, dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "core", dest / "core", ignore=ignore)
    (dest / "patterns").mkdir()
    (dest / "patterns" / "__init__.py").write_text("")
    shutil.copytree(ROOT / "patterns" / name, dest / "patterns" / name, ignore=ignore)


# Copies run side by side, each on a Ray cluster of its own. On 2 cores a copy's time is CPU:
# Ray's own processes (dashboard, controller, agents) cost about as much as its replicas, and
# a cluster's idle loops burn CPU for as long as it lives, so more copies at once make every
# copy slower; three at once beat five (the fixture prints each copy's phases).
COPIES_AT_ONCE = 3
# Started first, so that the longest copy (the chat model's load) is not the last to begin.
SLOWEST_FIRST = ("multiplexing", "ensemble")
# Lighter clusters, the same proof: no idle workers started ahead for a driver that runs no
# tasks, no metrics export nobody reads.
LIGHT_RAY = {"RAY_prestart_worker_first_driver": "false", "RAY_enable_metrics_collection": "false"}


# Lines of `serve run`'s output that mark its phases, for the copy's timings.
PHASES = {
    "ray": "Started a local Ray instance",
    "submitted": "Submitted deploy config successfully",
    "built": "Imported and built app",
}


def _one_replica_each(name: str) -> list[dict[str, Any]]:
    """Deployment overrides for ``run.yaml``, as a team writes them for a laptop: one replica
    of every deployment that config.yaml (the code's defaults) gives more. Every deployment
    still starts; a second replica of one proves nothing more about the copy and costs a
    process's start on a busy 2-core box."""
    out = []
    for dep in _config_app(name).get("deployments") or []:
        if "autoscaling_config" in dep:
            auto = {**dep["autoscaling_config"], "min_replicas": 1, "initial_replicas": 1}
            out.append({"name": dep["name"], "autoscaling_config": auto})
        elif dep.get("num_replicas", 1) != 1:
            out.append({"name": dep["name"], "num_replicas": 1})
    return out


def _stop(proc: subprocess.Popen, timings: dict[str, float], t0: float) -> None:
    """Ctrl-C to ``serve run``'s process group, as in a terminal; SIGKILL after 60 s."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    timings["stopped"] = time.monotonic() - t0


def _run_copy(
    name: str, tmp: Path, timings: dict[str, float], stopper: Executor
) -> str | dict[str, Any]:
    """Copy core/ and ``patterns/<name>/`` into ``tmp``, build its artifacts, ``serve run`` it
    and send its sample request: the answer's JSON, or why there was none. ``timings`` gets
    the seconds from the copy's start to each phase's end, to see where a copy's time goes.
    ``stopper`` stops it: the next copy starts while this one's Ray winds down (mostly
    waiting for its workers to exit)."""
    from patterns.multiplexing.llm import base_cache_dir
    from tests.conftest import free_port

    t0 = time.monotonic()
    dest = tmp / "myrepo"
    dest.mkdir(parents=True)
    _copy_pattern(name, dest)
    assert not (dest / "scripts").exists() and not (dest / "tests").exists()
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTHONPATH"))},
        "PYTHONPATH": str(dest),
        "COOKBOOK_MODEL_STORE_URI": (ROOT / "artifacts" / "models").as_uri(),
        # and this machine's de-quantized chat base model, as a copy on the same machine would
        "COOKBOOK_LLM_CACHE": str(base_cache_dir()),
        "RAY_USAGE_STATS_ENABLED": "0",
        **LIGHT_RAY,
    }
    built = subprocess.run(
        [sys.executable, "-m", f"patterns.{name}.artifacts"],
        cwd=dest,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    timings["artifacts"] = time.monotonic() - t0
    if built.returncode != 0:
        return "artifacts failed: " + (built.stdout + built.stderr)[-3000:]
    # `serve run patterns.<name>.app:app` always listens on :8000; the same import path in a
    # one-app config chooses a free port, so the test never collides with a running cluster.
    run_config = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": name,
                "route_prefix": _config_app(name)["route_prefix"],
                "import_path": f"patterns.{name}.app:app",
            }
        ],
    }
    run_config["applications"][0]["deployments"] = _one_replica_each(name)
    (dest / "run.yaml").write_text(yaml.safe_dump(run_config))
    serve_bin = Path(sys.executable).parent / "serve"
    log_path = tmp / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(serve_bin), "run", "run.yaml"],
            cwd=dest,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            client = importlib.import_module(f"patterns.{name}.client")
            request = client.sample_request(0)
            url = f"http://127.0.0.1:{port}{request['path']}"
            kwargs = {k: request[k] for k in ("json", "headers", "files") if k in request}
            if "data" in request or "content" in request:  # raw bytes (an image, say)
                kwargs["content"] = request.get("content", request.get("data"))
            deadline = time.monotonic() + 420
            last = "no answer yet"
            seen, tail = 0, ""
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    return "serve run exited: " + log_path.read_text()[-3000:]
                with log_path.open("rb") as f:  # only what was written since the last look
                    f.seek(seen)
                    new = f.read()
                seen += len(new)
                text = tail + new.decode(errors="replace")
                tail = text[-200:]
                for phase, marker in PHASES.items():
                    if phase not in timings and marker in text:
                        timings[phase] = time.monotonic() - t0
                try:
                    # the proxy holds a request until the app has a replica (30 s at most)
                    r = httpx.request(request["method"], url, timeout=30, **kwargs)
                    timings.setdefault("proxy_up", time.monotonic() - t0)
                    if r.status_code == 200:
                        timings["answered"] = time.monotonic() - t0
                        return r.json()
                    last = f"{r.status_code} {r.text[:300]}"
                except httpx.HTTPError as exc:
                    last = repr(exc)
                time.sleep(0.5)
            return f"no 200 from the copied {name}: {last}\n" + log_path.read_text()[-3000:]
        finally:
            stopper.submit(_stop, proc, timings, t0)


@pytest.fixture(scope="module")
def copies(request, tmp_path_factory) -> dict[str, str | dict[str, Any]]:
    """Every copy this session's tests ask for, run side by side."""
    names = sorted(
        {
            item.callspec.params["name"]
            for item in request.session.items
            if item.originalname == "test_a_copied_pattern_runs_with_serve_run"
        },
        key=lambda n: (SLOWEST_FIRST.index(n) if n in SLOWEST_FIRST else len(SLOWEST_FIRST), n),
    )
    timings: dict[str, dict[str, float]] = {n: {} for n in names}
    t0 = time.monotonic()
    # The stopper's pool is left last: every copy has stopped when the fixture returns.
    with ThreadPoolExecutor(len(names)) as stopper, ThreadPoolExecutor(COPIES_AT_ONCE) as pool:
        runs = {
            n: pool.submit(_run_copy, n, tmp_path_factory.mktemp(f"copy-{n}"), timings[n], stopper)
            for n in names
        }
        results = {n: run.result() for n, run in runs.items()}
    # Where each copy's time went (seconds from its own start), on the terminal, past capture.
    lines = [f"copies: {time.monotonic() - t0:.0f} s for {len(names)}, {COPIES_AT_ONCE} at once"]
    lines += [f"  {n}: " + ", ".join(f"{k} {v:.1f}" for k, v in timings[n].items()) for n in names]
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + "\n".join(lines), flush=True)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", PATTERNS)
def test_a_copied_pattern_runs_with_serve_run(name: str, copies) -> None:
    """What a team does: copy core/ and one pattern, `serve run` it, send its sample request.

    The copy points COOKBOOK_MODEL_STORE_URI at the repo's model store (how a copy shares a
    store, and it saves retraining the pipeline for minutes), then runs the pattern's own
    ``python -m patterns.<name>.artifacts`` there, as its README says: models already in the
    store are kept, anything else (seeded databases, say) is built inside the copy.
    """
    body = copies[name]
    assert isinstance(body, dict), body
    assert "timings_ms" in body and "total" in body["timings_ms"], body

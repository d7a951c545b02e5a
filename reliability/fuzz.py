"""Requests generated from each app's own OpenAPI document (schemathesis), against a running
cluster: every route of every app, with and without the development keys.

    python -m reliability.fuzz --url http://127.0.0.1:8000 [--apps pipeline ensemble ...]
                               [--max-examples 50]

Per operation (a method and a route) it sends ``max_examples`` requests generated from the
schema (valid ones), up to as many invalid ones (wrong types, missing fields, out-of-range
values: the app must refuse them with a 4xx), the examples the schema documents, on a route
that takes a key a few with no key and with a wrong key, and on a route that takes files (an
image upload) the app's own sample images mutated (cut, overwritten, the image size in the
header rewritten). Every answer is checked by schemathesis:

- ``not_a_server_error``: no 5xx, except a 503 with Retry-After that the route documents (a
  dependency too slow or down: the answer the README promises). Nothing is down during a fuzz
  run, so such answers are counted apart (``unavailable``, column 503+RA) for a person to read:
  on a quiet machine there are none.
- ``status_code_conformance``: the status is one the OpenAPI document lists for the route,
  so every 4xx a route can give is documented (``core.openapi.error_responses``).
- ``content_type_conformance``, ``response_headers_conformance``,
  ``response_schema_conformance``: the answer has the documented media type, headers and body
  (the error body ``{"error": {"status", "message", "request_id"}}`` on every 4xx).
- ``negative_data_rejection``: an invalid request is refused with a 4xx.

Left off: ``positive_data_acceptance`` (a valid-looking request may rightly get a 404 for an
unknown id or a 409), ``max_response_time`` (a timing assertion; a hang is caught instead by a
per-request timeout, counted as a failure), ``ignored_auth`` (the no-key and wrong-key probes
do its work: a request without the key the schema requires is invalid, so
``negative_data_rejection`` fails a keyed route that accepts it, and ``status_code_conformance``
fails an undocumented 401/403; probes go only to apps that require keys on that cluster, as the
ensemble keeps its routes open in the development profile by design), and the stateful checks
(``use_after_free``, ``ensure_resource_availability``: no route here creates a resource it then
serves; feedback needs a prediction id, so generated feedback mostly reaches the 404 path).

Generation is deterministic (``derandomize``): the same code gets the same requests.
``run(base_url, apps, max_examples)`` returns the figures per app; the command prints them and
exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

PREFIXES: dict[str, str] = {
    "pipeline": "/pipeline",
    "ensemble": "/ensemble",
    "business_logic": "/business",
    "online_learning": "/online",
    "multiplexing": "/multiplex",
}
KEY_HEADER = "X-API-Key"
# The development keys (each pattern's settings.py); the fuzzer sends them so it reaches the
# handlers. (path suffix, key): the first match wins.
DEV_KEYS: dict[str, list[tuple[str, str]]] = {
    "business_logic": [("", "dev-business-key")],
    "online_learning": [("", "dev-online-admin-key")],
    "ensemble": [
        ("/challenger/promote", "dev-ensemble-admin-key"),
        ("/challenger/rollback", "dev-ensemble-admin-key"),
        ("", "dev-ensemble-client-key"),
    ],
}
# Apps that refuse a request without a key in the development profile too. The ensemble keeps
# its routes open there unless ENSEMBLE_REQUIRE_KEYS=true (its README, "Keys"): probe it
# without keys only when the cluster runs it so (``keys_required=[..., "ensemble"]``).
KEYS_ENFORCED = ("business_logic", "online_learning")
WRONG_KEY = "not-a-valid-key"
REQUEST_TIMEOUT_S = 60.0  # an answer slower than this is a hang (a failure)
MAX_REPORTED = 20  # failures kept per app (the counts cover all)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class OperationResult:
    label: str  # "POST /score"
    requests: int = 0
    server_errors: int = 0
    conformance_failures: int = 0
    hangs: int = 0
    # documented 503 with Retry-After: a dependency too slow on a loaded box (the model's
    # deadline passed, say); reported, not a failure
    unavailable: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return self.server_errors + self.conformance_failures + self.hangs


@dataclass
class AppResult:
    app: str
    operations: list[OperationResult] = field(default_factory=list)
    error: str | None = None  # the schema could not be read at all

    def as_dict(self) -> dict[str, Any]:
        statuses: Counter[int] = Counter()
        for op in self.operations:
            statuses.update(op.statuses)
        failures = [f for op in self.operations for f in op.failures][:MAX_REPORTED]
        if self.error:
            failures.insert(0, self.error)
        return {
            "operations": len(self.operations),
            "requests": sum(op.requests for op in self.operations),
            "server_errors": sum(op.server_errors for op in self.operations),
            "conformance_failures": sum(op.conformance_failures for op in self.operations),
            "hangs": sum(op.hangs for op in self.operations),
            "unavailable": sum(op.unavailable for op in self.operations),
            "failed": sum(op.failed for op in self.operations) + (1 if self.error else 0),
            "statuses": dict(sorted(statuses.items())),
            "failures": failures,
            "per_operation": {
                op.label: {
                    "requests": op.requests,
                    "failed": op.failed,
                    "statuses": dict(sorted(op.statuses.items())),
                }
                for op in self.operations
            },
        }


def _checks() -> list[Any]:
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    return [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        negative_data_rejection,
    ]


def _key_for(app: str, path: str) -> str | None:
    for suffix, key in DEV_KEYS.get(app, []):
        if path.endswith(suffix):
            return key
    return None


def _retry_later(operation: Any, response: Any) -> bool:
    """A 503 the route documents, with Retry-After: the answer a client is told to expect when
    a dependency is slow or down."""
    documented = "503" in (operation.definition.raw.get("responses") or {})
    return response.status_code == 503 and documented and "retry-after" in response.headers


def _needs_key(operation: Any) -> bool:
    definition = operation.definition.raw
    return bool(definition.get("security"))


def fuzz_operation(
    operation: Any,
    base_url: str,
    app: str,
    max_examples: int,
    session: Any,
    probe_keys: bool = True,
) -> OperationResult:
    """Generated requests for one operation; failures are counted, not raised."""
    import requests
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.core.failures import FailureGroup

    label = f"{operation.method.upper()} {operation.path}"
    out = OperationResult(label)
    checks = _checks()
    key = _key_for(app, operation.path)
    passes: list[tuple[GenerationMode, str | None, int]] = [
        (GenerationMode.POSITIVE, key, max_examples),
        (GenerationMode.NEGATIVE, key, max_examples),
    ]
    if probe_keys and _needs_key(operation):
        probes = max(2, max_examples // 5)
        passes += [(GenerationMode.POSITIVE, None, probes), (GenerationMode.POSITIVE, "", probes)]

    def record(case: Any, failure: str) -> None:
        if len(out.failures) < MAX_REPORTED:
            try:
                curl = case.as_curl_command()
            except Exception:  # a body curl cannot show
                curl = f"{case.method} {case.formatted_path} ({case.media_type})"
            out.failures.append(f"{app}: {label}: {failure}\n    {curl}")

    def sender(sent_key: str | None) -> Any:
        def one(case: Any) -> None:
            headers = dict(case.headers or {})
            for name in [h for h in headers if h.lower() == KEY_HEADER.lower()]:
                del headers[name]
            if sent_key:
                headers[KEY_HEADER] = sent_key
            elif sent_key == "":
                headers[KEY_HEADER] = WRONG_KEY
            case.headers = headers
            out.requests += 1
            try:
                response = case.call(base_url=base_url, session=session, timeout=REQUEST_TIMEOUT_S)
            except requests.Timeout:
                out.hangs += 1
                record(case, f"no answer within {REQUEST_TIMEOUT_S:g}s")
                return
            except requests.RequestException as exc:  # reset, refused: the server failed
                out.server_errors += 1
                out.statuses[0] += 1
                record(case, f"no HTTP answer: {type(exc).__name__}: {exc}"[:400])
                return
            out.statuses[response.status_code] += 1
            used = checks
            if _retry_later(operation, response):
                out.unavailable += 1
                used = [c for c in checks if c.__name__ != "not_a_server_error"]
            elif response.status_code >= 500:
                out.server_errors += 1
            try:
                case.validate_response(response, checks=used)
            except FailureGroup as group:
                if response.status_code < 500:
                    out.conformance_failures += 1
                titles = "; ".join(sorted({f.title for f in group.exceptions}))
                body = response.text[:300].replace("\n", " ")
                record(case, f"{response.status_code} {titles}: {body}")
            except Exception as exc:  # a check that could not run counts as a failure
                out.conformance_failures += 1
                record(case, f"{response.status_code} check error: {type(exc).__name__}: {exc}")

        return one

    strategies: list[tuple[str, Any, str | None, int]] = [
        (mode.value, operation.as_strategy(generation_mode=mode), sent_key, n)
        for mode, sent_key, n in passes
    ]
    # the examples the schema documents (pydantic ``examples=``): valid requests that reach
    # the handler where the types alone cannot say what is valid (rows of N numbers)
    for strategy in operation.schema.get_strategies_from_examples(operation):
        strategies.append(("examples", strategy, key, max(1, max_examples // 5)))
    mutated = _mutated_samples(app, operation)
    if mutated is not None:
        strategies.append(("mutated samples", mutated, key, max_examples))
    for kind, strategy, sent_key, n in strategies:
        test = settings(
            max_examples=n,
            derandomize=True,  # the same requests every run: CI stays stable
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )(given(case=strategy)(sender(sent_key)))
        try:
            test()
        except Exception as exc:
            if type(exc).__name__ in ("Unsatisfiable", "FailedHealthCheck"):
                continue  # no invalid request can be made for this route, say
            record_msg = f"generation stopped ({kind}): {type(exc).__name__}: {exc}"
            if len(out.failures) < MAX_REPORTED:
                out.failures.append(f"{app}: {label}: {record_msg[:500]}")
            out.conformance_failures += 1
    return out


def _upload_targets(operation: Any) -> tuple[list[str], list[tuple[str, bool]]]:
    """Where ``operation`` takes file bytes: raw body media types (``image/png``...), and
    multipart fields (name, whether it is a list of files)."""
    body = operation.definition.raw.get("requestBody") or {}
    raw: list[str] = []
    fields: list[tuple[str, bool]] = []
    for media, spec in (body.get("content") or {}).items():
        schema = spec.get("schema") or {}
        if schema.get("format") == "binary":
            raw.append(media)
        elif media == "multipart/form-data":
            for name, prop in (schema.get("properties") or {}).items():
                if prop.get("format") == "binary":
                    fields.append((name, False))
                elif (prop.get("items") or {}).get("format") == "binary":
                    fields.append((name, True))
    return raw, fields


def _mutated_samples(app: str, operation: Any) -> Any:
    """For a route that takes files: the app's own sample files (``client.sample_request``),
    mutated (cut short, bytes overwritten, the image header's size rewritten, junk appended),
    as a raw body or in multipart fields, so decoding and the models behind it are fuzzed with
    real inputs too. Schemathesis alone sends a 1x1 file of each image type at most."""
    import importlib

    from hypothesis import strategies as st

    raw, fields = _upload_targets(operation)
    if not (raw or fields) or operation.method.upper() != "POST":
        return None
    try:
        client = importlib.import_module(f"patterns.{app}.client")
    except ImportError:
        return None
    samples: list[tuple[bytes, str]] = []
    for i in range(8):
        req = client.sample_request(i)
        ctype = (req.get("headers") or {}).get("Content-Type", "")
        if isinstance(req.get("data"), bytes | bytearray) and ctype.startswith("image/"):
            samples.append((bytes(req["data"]), ctype))
    if not samples:
        return None

    @st.composite
    def one_file(draw: Any) -> tuple[bytes, str]:
        data, ctype = draw(st.sampled_from(samples))
        buf = bytearray(data)
        how = draw(st.sampled_from(["as is", "cut", "overwrite", "header", "append"]))
        if how == "cut":
            buf = buf[: draw(st.integers(0, len(buf) - 1))]
        elif how == "overwrite":
            for _ in range(draw(st.integers(1, 16))):
                buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
        elif how == "header" and buf.startswith(PNG_SIGNATURE) and len(buf) > 33:
            # The IHDR width or height (bytes 16-24) rewritten, its CRC made right again, so
            # the decoder believes it: huge (a decompression bomb), zero or odd sizes.
            at = draw(st.sampled_from([16, 20]))
            size = draw(st.one_of(st.integers(0, 2**31 - 1), st.sampled_from([0, 1, 15, 65_535])))
            buf[at : at + 4] = size.to_bytes(4, "big")
            buf[29:33] = zlib.crc32(bytes(buf[12:29])).to_bytes(4, "big")
        elif how == "append":
            buf += draw(st.binary(min_size=1, max_size=4096))
        return bytes(buf), ctype

    targets: list[tuple[str, Any]] = [("raw", m) for m in raw if any(c == m for _, c in samples)]
    targets += [("form", f) for f in fields]
    if not targets:
        return None

    @st.composite
    def mutated(draw: Any) -> Any:
        kind, target = draw(st.sampled_from(targets))
        if kind == "raw":
            data, ctype = draw(one_file().filter(lambda f: f[1] == target))
            return operation.Case(body=data, media_type=ctype)
        name, many = target
        files = [d for d, _ in draw(st.lists(one_file(), min_size=1, max_size=4 if many else 1))]
        return operation.Case(
            body={name: files if many else files[0]}, media_type="multipart/form-data"
        )

    return mutated()


def fuzz_app(base_url: str, app: str, max_examples: int, probe_keys: bool = True) -> AppResult:
    import requests
    import schemathesis

    prefix = PREFIXES[app]
    result = AppResult(app)
    url = f"{base_url.rstrip('/')}{prefix}"
    try:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    except Exception as exc:
        result.error = f"{app}: no OpenAPI document at {url}/openapi.json: {exc}"
        return result
    # An invalid request refused for its size (413, the ingress's body limit, checked before
    # the body is parsed) is refused all the same; schemathesis does not count 413 by default.
    rejection = schema.config.checks.negative_data_rejection
    rejection.expected_statuses = [*rejection.expected_statuses, "413"]
    with requests.Session() as session:
        for item in schema.get_all_operations():
            try:
                operation = item.ok()
            except Exception:
                result.error = f"{app}: an operation in the OpenAPI document is invalid: {item}"
                continue
            result.operations.append(
                fuzz_operation(operation, url, app, max_examples, session, probe_keys)
            )
    return result


def run(
    base_url: str,
    apps: Iterable[str] | None = None,
    max_examples: int = 20,
    keys_required: Iterable[str] = KEYS_ENFORCED,
) -> dict[str, dict[str, Any]]:
    """Fuzz ``apps`` (default: all) on the cluster at ``base_url``; figures per app.
    ``keys_required``: the apps that refuse requests without a key on this cluster (they are
    also sent requests with no key and a wrong key)."""
    out: dict[str, dict[str, Any]] = {}
    enforced = set(keys_required)
    for app in apps or PREFIXES:
        started = time.monotonic()
        figures = fuzz_app(base_url, app, max_examples, app in enforced).as_dict()
        figures["seconds"] = round(time.monotonic() - started, 1)
        out[app] = figures
    return out


def print_table(results: dict[str, dict[str, Any]]) -> None:
    print(
        f"{'app':<16} {'operations':>10} {'requests':>9} {'5xx':>5} {'conformance':>11} "
        f"{'hangs':>6} {'503+RA':>6} {'seconds':>8}  statuses"
    )
    for app, r in results.items():
        print(
            f"{app:<16} {r['operations']:>10} {r['requests']:>9} {r['server_errors']:>5} "
            f"{r['conformance_failures']:>11} {r['hangs']:>6} {r['unavailable']:>6} "
            f"{r['seconds']:>8}  {r['statuses']}"
        )
    for r in results.values():
        for failure in r["failures"]:
            print(f"FAIL {failure}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the cluster's HTTP base")
    parser.add_argument("--apps", nargs="+", choices=sorted(PREFIXES), help="default: all")
    parser.add_argument(
        "--max-examples", type=int, default=50, help="generated requests per operation and kind"
    )
    parser.add_argument(
        "--ensemble-keys-required",
        action="store_true",
        help="the cluster runs the ensemble with ENSEMBLE_REQUIRE_KEYS=true: probe it without keys",
    )
    args = parser.parse_args(argv)
    keys_required = [*KEYS_ENFORCED, *(["ensemble"] if args.ensemble_keys_required else [])]
    results: dict[str, dict[str, Any]] = {}
    for app in args.apps or PREFIXES:
        results.update(run(args.url, [app], args.max_examples, keys_required))
        r = results[app]
        print(
            f"[fuzz] {app}: {r['requests']} requests, {r['failed']} failed ({r['seconds']:g}s)",
            flush=True,
        )
    print_table(results)
    return 1 if any(r["failed"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

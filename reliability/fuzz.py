"""Requests generated from each app's own OpenAPI document (schemathesis), against a running
cluster: every route of every app.

    python -m reliability.fuzz --url http://127.0.0.1:8000 [--apps pipeline ensemble ...]
                               [--max-examples 50]

Per app, two parts:

- ``schemathesis run -c all``, the command a reviewer runs against ``make serve``, with every
  check and every phase: the documented examples, coverage (boundary values, every undeclared
  method: 405 expected), fuzzing (valid and invalid requests) and stateful (sequences that
  follow the document's links; "not applicable" where an app has none), with the repo's
  ``schemathesis.toml`` (the CLI finds it when run from the repo root): the statuses that are
  right answers for reasons no JSON Schema can state, each one also in its route's
  description. A finding is a unique
  failure as schemathesis counts them; the goal is none on every app.
- on a route that takes files (an image upload), the app's own sample images mutated (cut,
  overwritten, the image size in the header rewritten), checked for server errors and for
  answers the document does not list. Schemathesis alone sends a 1x1 file of each image type.

Nothing is down during a fuzz run, but on a loaded box a model may miss its deadline: a 503
with Retry-After is an answer the document lists (schemathesis counts a 5xx as a server error
all the same, so such a run shows it). Keys: where the cluster requires them (production, or
``<PREFIX>_REQUIRE_KEYS=true``), pass ``headers`` (the key header); in development the keyed
routes are open and the documents declare no key.

Generation is deterministic: the same code gets the same requests. ``run(base_url, apps,
max_examples)`` returns the figures per app; the command prints them and exits 1 on any
finding.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PREFIXES: dict[str, str] = {
    "pipeline": "/pipeline",
    "ensemble": "/ensemble",
    "business_logic": "/business",
    "online_learning": "/online",
    "multiplexing": "/multiplex",
}
PHASES = "examples,coverage,fuzzing,stateful"
REQUEST_TIMEOUT_S = 60.0  # an answer slower than this is a hang (a failure)
MAX_REPORTED = 20  # failures kept per app (the counts cover all)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class CliResult:
    """What ``schemathesis run`` reported for one app."""

    returncode: int
    findings: int  # unique failures
    generated: int  # test cases
    phases: dict[str, str]  # phase -> "passed" | "failed" | "skipped" | "not applicable"
    failures: list[str]  # "<METHOD path>: <check title>", as printed
    tail: str  # the end of its output, for a person


def parse_cli_output(text: str, returncode: int) -> CliResult:
    """Figures from the text ``schemathesis run`` prints (schemathesis 4)."""
    phases: dict[str, str] = {}
    for mark, name, note in re.findall(r"^\s*(✅|❌|⏭|🚫)\s+(\w+)(.*)$", text, re.M):
        if name in ("Examples", "Coverage", "Fuzzing", "Stateful"):
            state = {"✅": "passed", "❌": "failed", "🚫": "errored"}.get(mark, "skipped")
            phases[name.lower()] = "not applicable" if "not applicable" in note else state
    generated = sum(int(n) for n in re.findall(r"^\s*(\d+) generated", text, re.M))
    unique = re.search(r"found (\d+) unique failures?", text)
    findings = int(unique.group(1)) if unique else 0
    errors = re.search(r"^\s*(\d+) errors?\b", text, re.M)
    if errors:  # an operation schemathesis could not test counts as a finding
        findings += int(errors.group(1))
    if returncode != 0 and findings == 0:
        findings = 1  # it failed for a reason the summary does not count: see the tail
    failures: list[str] = []
    operation = ""
    for line in text.splitlines():
        header = re.match(r"^_+ ((?:GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS) \S+) _+$", line)
        if header:
            operation = header.group(1)
        elif operation and re.match(r"^- [A-Z]{2}\d{3} ", line):
            failures.append(f"{operation}: {line[2:]}")
    return CliResult(returncode, findings, generated, phases, failures, text[-4000:])


def schemathesis_run(
    base_url: str,
    app: str,
    max_examples: int,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 1800,
) -> CliResult:
    """``schemathesis run -c all`` (every phase) on ``app`` at ``base_url``, with the repo's
    schemathesis.toml."""
    url = f"{base_url.rstrip('/')}{PREFIXES[app]}/openapi.json"
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        cmd = [
            str(Path(sys.executable).parent / "schemathesis"),
            "--config-file",
            str(ROOT / "schemathesis.toml"),
            "run",
            url,
            "--checks",
            "all",
            "--phases",
            PHASES,
            "--max-examples",
            str(max_examples),
            "--generation-deterministic",  # the same requests every run: CI stays stable
            "--workers",
            "1",  # one request at a time: a 2-core box serves the apps too
            "--request-timeout",
            f"{REQUEST_TIMEOUT_S:g}",
            "--no-color",
            "--report-dir",
            tmp,  # its report files stay out of the checkout
        ]
        for name, value in (headers or {}).items():
            cmd += ["--header", f"{name}: {value}"]
        # in a scratch folder: schemathesis keeps a crash cache (.schemathesis/) where it runs
        out = subprocess.run(
            cmd, cwd=tmp, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    return parse_cli_output(out.stdout + out.stderr, out.returncode)


@dataclass
class OperationResult:
    """The mutated-sample requests of one upload route."""

    label: str  # "POST /read"
    requests: int = 0
    server_errors: int = 0
    conformance_failures: int = 0
    hangs: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return self.server_errors + self.conformance_failures + self.hangs


def _checks() -> list[Any]:
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
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
    ]


def fuzz_mutated_samples(
    operation: Any, base_url: str, app: str, max_examples: int, session: Any, headers: Any
) -> OperationResult | None:
    """The app's own sample files, mutated, sent to ``operation``; None if it takes no files."""
    import requests
    from hypothesis import HealthCheck, given, settings
    from schemathesis.core.failures import FailureGroup

    strategy = _mutated_samples(app, operation)
    if strategy is None:
        return None
    label = f"{operation.method.upper()} {operation.path}"
    out = OperationResult(label)
    checks = _checks()

    def record(case: Any, failure: str) -> None:
        if len(out.failures) < MAX_REPORTED:
            out.failures.append(f"{app}: {label} (mutated sample): {failure}")

    def one(case: Any) -> None:
        case.headers = {**(case.headers or {}), **(headers or {})}
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
        if response.status_code >= 500:
            out.server_errors += 1
        try:
            case.validate_response(response, checks=checks)
        except FailureGroup as group:
            if response.status_code < 500:
                out.conformance_failures += 1
            titles = "; ".join(sorted({f.title for f in group.exceptions}))
            record(case, f"{response.status_code} {titles}: {response.text[:300]}")

    test = settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )(given(case=strategy)(one))
    test()
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


def fuzz_app(
    base_url: str, app: str, max_examples: int, headers: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Both parts on ``app``: the figures, and every failure as a line a person can act on."""
    import requests
    import schemathesis

    started = time.monotonic()
    cli = schemathesis_run(base_url, app, max_examples, headers)
    url = f"{base_url.rstrip('/')}{PREFIXES[app]}"
    mutated: list[OperationResult] = []
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    with requests.Session() as session:
        for item in schema.get_all_operations():
            result = fuzz_mutated_samples(item.ok(), url, app, max_examples, session, headers)
            if result is not None:
                mutated.append(result)
    statuses: Counter[int] = Counter()
    for op in mutated:
        statuses.update(op.statuses)
    failures = [f"{app}: {f}" for f in cli.failures]
    failures += [f for op in mutated for f in op.failures]
    return {
        "findings": cli.findings,
        "generated": cli.generated,
        "phases": cli.phases,
        "mutated_requests": sum(op.requests for op in mutated),
        "mutated_failed": sum(op.failed for op in mutated),
        "mutated_statuses": dict(sorted(statuses.items())),
        "failed": cli.findings + sum(op.failed for op in mutated),
        "failures": failures[:MAX_REPORTED],
        "cli_tail": cli.tail,
        "seconds": round(time.monotonic() - started, 1),
    }


def run(
    base_url: str,
    apps: Iterable[str] | None = None,
    max_examples: int = 20,
    headers: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Fuzz ``apps`` (default: all) on the cluster at ``base_url``; figures per app.
    ``headers``: per app, the headers to send (a key, where the cluster requires one)."""
    return {
        app: fuzz_app(base_url, app, max_examples, (headers or {}).get(app))
        for app in apps or PREFIXES
    }


def print_table(results: dict[str, dict[str, Any]]) -> None:
    print(
        f"{'app':<16} {'findings':>8} {'generated':>9} {'mutated':>8} {'failed':>6} "
        f"{'seconds':>8}  phases"
    )
    for app, r in results.items():
        print(
            f"{app:<16} {r['findings']:>8} {r['generated']:>9} {r['mutated_requests']:>8} "
            f"{r['mutated_failed']:>6} {r['seconds']:>8}  {r['phases']}"
        )
    for r in results.values():
        for failure in r["failures"]:
            print(f"FAIL {failure}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the cluster's HTTP base")
    parser.add_argument("--apps", nargs="+", choices=sorted(PREFIXES), help="default: all")
    parser.add_argument(
        "--max-examples", type=int, default=50, help="generated requests per operation and phase"
    )
    args = parser.parse_args(argv)
    results: dict[str, dict[str, Any]] = {}
    for app in args.apps or PREFIXES:
        results.update(run(args.url, [app], args.max_examples))
        r = results[app]
        print(f"[fuzz] {app}: {r['findings']} findings ({r['seconds']:g}s)", flush=True)
    print_table(results)
    return 1 if any(r["failed"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

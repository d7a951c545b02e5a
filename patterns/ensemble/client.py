"""Send held-out tumours to the ensemble and print the vote.

    python -m patterns.ensemble.client [--url http://127.0.0.1:8000/ensemble] [--rows 3] [--key K]
    python -m patterns.ensemble.client --readme [--write]   # the README's example (into README.md)

The README's example answer is this client's output against a running app; a test compares it
with a live answer (``stable_fields``), so the page cannot drift from what the app says.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any

import httpx

from patterns.ensemble.data import load_split

README = Path(__file__).with_name("README.md")
BEGIN, END = "<!-- client --readme: begin -->", "<!-- client --readme: end -->"


def sample_request(i: int) -> dict:
    """One request for load tests: a held-out row, cycling through the test set."""
    split = load_split()
    row = split.x_test[i % len(split.x_test)]
    return {"method": "POST", "path": "/ensemble/predict", "json": {"instances": [row.tolist()]}}


def example(url: str, rows: int = 3, key: str | None = None) -> dict[str, Any]:
    """Predict ``rows`` held-out rows, send their true labels as feedback, read the gate.
    ``key``: a client key for the feedback (needed in production, see settings.py)."""
    split = load_split()
    r = httpx.post(f"{url}/predict", json={"instances": split.x_test[:rows].tolist()}, timeout=30)
    out: dict[str, Any] = {"status": r.status_code, "answer": r.json()}
    if r.status_code == 200:
        truth = [int(v) for v in split.y_test[:rows]]
        fb = httpx.post(
            f"{url}/feedback",
            json={"prediction_id": r.json()["prediction_id"], "labels": truth},
            headers={"X-API-Key": key} if key else None,
            timeout=30,
        )
        stats = httpx.get(f"{url}/challenger", timeout=30).json()
        out.update(truth=truth, feedback=(fb.status_code, fb.json()), gate=stats["gate_failures"])
    return out


def stable_fields(answer: dict[str, Any]) -> dict[str, Any]:
    """What a deterministic run repeats: the votes and who cast them (no ids, no times)."""
    return {
        "predictions": answer["predictions"],
        "voting": answer["voting"],
        "members": {k: answer["members"][k] for k in ("counted", "late", "failed")},
        "degraded": answer["degraded"],
        "model_versions": answer["model_versions"],
        "challenger": answer["challenger"],
        "timings_ms": sorted(answer["timings_ms"]),
    }


def readme_block(url: str) -> str:
    """The README's example: the command, then what it printed."""
    ex = example(url)
    lines = [BEGIN, "```json", f"HTTP {ex['status']}", json.dumps(ex["answer"], indent=2)]
    if ex["status"] == 200:
        status, body = ex["feedback"]
        lines += [
            f"true labels: {ex['truth']} (1 = benign)",
            f"feedback: {status} {json.dumps(body)}",
            f"promotion gate failures: {json.dumps(ex['gate'])}",
        ]
    return "\n".join([*lines, "```", END])


def readme_answer(text: str) -> dict[str, Any]:
    """The answer shown in the README (between the markers)."""
    block = text[text.index(BEGIN) : text.index(END)]
    match = re.search(r"^HTTP \d+\n(\{.*?^\})$", block, re.S | re.M)
    if match is None:
        raise ValueError("README example block holds no JSON answer")
    return json.loads(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/ensemble")
    parser.add_argument("--rows", type=int, default=3)
    parser.add_argument(
        "--key",
        default=os.environ.get("ENSEMBLE_CLIENT_KEY"),
        help="client key for the feedback (production; default: $ENSEMBLE_CLIENT_KEY)",
    )
    parser.add_argument("--readme", action="store_true", help="print the README example")
    parser.add_argument("--write", action="store_true", help="write it into README.md")
    args = parser.parse_args()
    if args.readme:
        block = readme_block(args.url)
        if args.write:
            text = README.read_text()
            start, stop = text.index(BEGIN), text.index(END) + len(END)
            README.write_text(text[:start] + block + text[stop:])
        print(block)
        return
    ex = example(args.url, args.rows, args.key)
    print(f"HTTP {ex['status']}")
    print(json.dumps(ex["answer"], indent=2))
    if ex["status"] == 200:
        status, body = ex["feedback"]
        print("true labels:", ex["truth"], "(1 = benign)")
        print("feedback:", status, body)
        if status == 202:
            print("(held: the shadow copy was not recorded yet; the labels are scored when it is)")
        print("promotion gate failures:", ex["gate"])


if __name__ == "__main__":
    main()

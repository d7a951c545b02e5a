"""Check a few card payments against the fraud-check app and print the decisions.

    python -m patterns.business_logic.client [--url http://127.0.0.1:8000/business] [--key KEY]
    python -m patterns.business_logic.client --readme [--degraded] [--write]

``--readme`` prints the README's example answer (the first payment, whole) as markdown;
``--degraded`` the README's second example (400 EUR, run it with the risk service stopped);
``--write`` puts it into README.md. Tests compare both with live answers (``stable_fields``),
so the page cannot drift from what the app says.
"""

from __future__ import annotations

import argparse
import json
import re
import uuid
from pathlib import Path
from typing import Any

import httpx

README = Path(__file__).with_name("README.md")

DEFAULT_KEY = "dev-business-key"  # the development placeholder (refused in production)

PAYMENTS = [
    # an everyday online purchase
    {
        "customer_id": "C00042",
        "merchant_id": "M0007",
        "amount": 129.90,
        "currency": "USD",
        "channel": "online",
        "memo": "order 2024-118",
    },
    # a blocked account
    {
        "customer_id": "C00007",
        "merchant_id": "M0002",
        "amount": 25.00,
        "currency": "EUR",
        "channel": "in_store",
    },
    # a customer whose precomputed features are 30 days old (recomputed from the database)
    {
        "customer_id": "C00185",
        "merchant_id": "M0010",
        "amount": 240.00,
        "currency": "GBP",
        "channel": "phone",
    },
]


def sample_request(i: int) -> dict:
    """One request for load tests: customers, merchants, amounts and channels vary with i."""
    channels = ("online", "in_store", "phone")
    return {
        "method": "POST",
        "path": "/business/score",
        "json": {
            "customer_id": f"C{1 + i % 200:05d}",
            "merchant_id": f"M{1 + (i * 7) % 50:04d}",
            "amount": round(5 + (i * 37) % 900 + 0.99, 2),
            "currency": ("EUR", "USD", "GBP")[i % 3],
            "channel": channels[i % 3],
        },
        # A new key per request, as a payment client would send: the request may then be
        # retried (by the client, or by the edge when a replica is lost) and is written once.
        "headers": {"X-API-Key": DEFAULT_KEY, "Idempotency-Key": f"load-{uuid.uuid4().hex}"},
    }


# The README's second example: the first customer paying 400 EUR, risk service stopped.
DEGRADED_EXAMPLE = {**PAYMENTS[0], "amount": 400.0, "currency": "EUR"}


def markers(degraded: bool = False) -> tuple[str, str]:
    kind = "client --readme --degraded" if degraded else "client --readme"
    return f"<!-- {kind}: begin -->", f"<!-- {kind}: end -->"


def readme_example(url: str, key: str = DEFAULT_KEY, degraded: bool = False) -> dict[str, Any]:
    """The answer a README example shows: whole for the first payment, summarised for the
    degraded one."""
    payment = DEGRADED_EXAMPLE if degraded else PAYMENTS[0]
    r = httpx.post(f"{url}/score", json=payment, headers={"X-API-Key": key}, timeout=30)
    r.raise_for_status()
    return summary(r.json()) if degraded else r.json()


def stable_fields(answer: dict[str, Any]) -> dict[str, Any]:
    """What repeats from run to run: not ids, times, or what moves with today's date (the
    account's age, and so the score and the sentence quoting it)."""
    out: dict[str, Any] = {
        "decision": answer["decision"],
        "degraded": answer["degraded"],
        "timings_ms": sorted(answer["timings_ms"]),
    }
    if "records" in answer:  # a whole answer
        customer = dict(answer["records"]["customer"])
        customer.pop("account_age_days")
        out["records"] = {**answer["records"], "customer": customer}
        out["model"] = answer["model"]
        out["features_from"] = answer["features"]["provenance"]["source"]
        out["risk_signal"] = answer["risk_signal"]
        out["degraded_reasons"] = answer["degraded_reasons"]
    else:  # a summary (its "degraded" holds the reasons)
        out["features_from"] = answer["features"]["source"]
        out["risk_signal"] = answer["risk_signal"]
    return out


def readme_block(url: str, key: str = DEFAULT_KEY, degraded: bool = False) -> str:
    begin, end = markers(degraded)
    body = json.dumps(readme_example(url, key, degraded), indent=2)
    return "\n".join([begin, "```json", body, "```", end])


def readme_answer(text: str, degraded: bool = False) -> dict[str, Any]:
    """The answer a README example shows (between its markers)."""
    begin, end = markers(degraded)
    block = text[text.index(begin) : text.index(end)]
    match = re.search(r"^```json\n(.*?)^```$", block, re.S | re.M)
    if match is None:
        raise ValueError(f"README block {begin} holds no JSON answer")
    return json.loads(match.group(1))


def summary(body: dict) -> dict:
    return {
        "decision": body["decision"],
        "reasons": body["reasons"],
        "score": body["score"],
        "features": body["features"]["provenance"],
        "risk_signal": body["risk_signal"],
        "degraded": body["degraded_reasons"],
        "timings_ms": body["timings_ms"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/business")
    parser.add_argument("--key", default=DEFAULT_KEY)
    parser.add_argument("--full", action="store_true", help="print whole answers")
    parser.add_argument("--readme", action="store_true", help="print a README example")
    parser.add_argument("--degraded", action="store_true", help="the risk-service-down one")
    parser.add_argument("--write", action="store_true", help="write it into README.md")
    args = parser.parse_args()
    if args.readme:
        block = readme_block(args.url, args.key, args.degraded)
        if args.write:
            begin, end = markers(args.degraded)
            text = README.read_text()
            start, stop = text.index(begin), text.index(end) + len(end)
            README.write_text(text[:start] + block + text[stop:])
        print(block)
        return
    for payment in PAYMENTS:
        r = httpx.post(
            f"{args.url}/score", json=payment, headers={"X-API-Key": args.key}, timeout=30
        )
        print(f"POST {args.url}/score {json.dumps(payment)}\n-> HTTP {r.status_code}")
        body = r.json()
        out = body if args.full or r.status_code != 200 else summary(body)
        print(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

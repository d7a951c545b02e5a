"""Check a few card payments against the fraud-check app and print the decisions.

python -m patterns.business_logic.client [--url http://127.0.0.1:8000/business] [--key KEY]
"""

from __future__ import annotations

import argparse
import json

import httpx

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
        "headers": {"X-API-Key": DEFAULT_KEY},
    }


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
    args = parser.parse_args()
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

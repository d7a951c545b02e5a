"""Send held-out tumours to the ensemble and print the vote.

python -m patterns.ensemble.client [--url http://127.0.0.1:8000/ensemble] [--rows 3]
"""

from __future__ import annotations

import argparse
import json

import httpx

from patterns.ensemble.data import load_split


def sample_request(i: int) -> dict:
    """One request for load tests: a held-out row, cycling through the test set."""
    split = load_split()
    row = split.x_test[i % len(split.x_test)]
    return {"method": "POST", "path": "/ensemble/predict", "json": {"instances": [row.tolist()]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/ensemble")
    parser.add_argument("--rows", type=int, default=3)
    args = parser.parse_args()
    split = load_split()
    rows = split.x_test[: args.rows].tolist()
    r = httpx.post(f"{args.url}/predict", json={"instances": rows}, timeout=30)
    print(f"HTTP {r.status_code}")
    print(json.dumps(r.json(), indent=2))
    if r.status_code == 200:
        truth = [int(v) for v in split.y_test[: args.rows]]
        print("true labels:", truth, "(1 = benign)")
        fb = httpx.post(
            f"{args.url}/feedback",
            json={"prediction_id": r.json()["prediction_id"], "labels": truth},
            timeout=30,
        )
        print("feedback:", fb.status_code, fb.json())
        if fb.status_code == 202:
            print("(held: the shadow copy was not recorded yet; the labels are scored when it is)")
        stats = httpx.get(f"{args.url}/challenger", timeout=30).json()
        print("promotion gate failures:", stats.get("gate_failures"))


if __name__ == "__main__":
    main()

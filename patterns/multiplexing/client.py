"""Ask several stores' forecasters, then stream one chat question for two tenants.

python -m patterns.multiplexing.client [--url http://127.0.0.1:8000/multiplex] [--no-chat]
"""

from __future__ import annotations

import argparse
import json
import time

import httpx

HEADER = "serve_multiplexed_model_id"
STORES = ["store-0001", "store-0042", "store-0777"]
TENANTS = ["pirate-co", "northwind"]
QUESTION = "What is the tallest mountain in the world?"


def zipf_model_id(i: int, n: int = 1000, s: float = 1.1) -> str:
    """A store id for request ``i``, Zipf-distributed like real tenant traffic (deterministic)."""
    import hashlib

    u = int.from_bytes(hashlib.sha256(f"zipf:{i}".encode()).digest()[:8], "big") / 2**64
    weights = [1 / k**s for k in range(1, n + 1)]
    target, acc = u * sum(weights), 0.0
    for k, w in enumerate(weights, 1):
        acc += w
        if acc >= target:
            return f"store-{k:04d}"
    return f"store-{n:04d}"


def sample_request(i: int) -> dict:
    """One request for load tests: a forecast for a Zipf-popular store (path form)."""
    return {
        "method": "POST",
        "path": f"/multiplex/models/{zipf_model_id(i)}/predict",
        "json": {"horizon_days": 7},
    }


def forecasts(url: str) -> None:
    for i, store in enumerate(STORES):
        body = {"start_date": "2026-01-05", "horizon_days": 3}
        if i % 2:  # the header form (any HTTP client or proxy that keeps the header)
            r = httpx.post(f"{url}/predict", json=body, headers={HEADER: store}, timeout=30)
            how = f"POST {url}/predict  {HEADER}: {store}"
        else:  # the path form (works whatever the ingress mode)
            r = httpx.post(f"{url}/models/{store}/predict", json=body, timeout=30)
            how = f"POST {url}/models/{store}/predict"
        print(f"{how}\n-> HTTP {r.status_code}")
        a = r.json()
        if r.status_code != 200:
            print(json.dumps(a, indent=2) + "\n")
            continue
        lines = ", ".join(f"{k} {v[0]}" for k, v in list(a["by_line"].items())[:3])
        print(
            f"   {a['dates'][0]}..{a['dates'][-1]} total demand {a['total']} "
            f"(first day by line: {lines}, ...); cache {a['served_by']['cache']}, replica "
            f"{a['served_by']['replica']}, {a['timings_ms']['total']} ms\n"
        )
    r = httpx.post(f"{url}/models/store-5000/predict", json={}, timeout=30)
    print(f"unknown store -> HTTP {r.status_code}: {r.json()['error']['message']}\n")


def stream_chat(url: str, tenant: str, question: str = QUESTION) -> str:
    body = {
        "model": tenant,
        "messages": [{"role": "user", "content": question}],
        "stream": True,
        "max_tokens": 64,
    }
    print(f"[{tenant}] {question}\n[{tenant}] ", end="", flush=True)
    t0, first, text = time.perf_counter(), None, []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        if r.status_code != 200:
            print(f"HTTP {r.status_code}: {r.read().decode()}")
            return ""
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            piece = json.loads(line[6:])["choices"][0]["delta"].get("content", "")
            if piece:
                first = first or time.perf_counter() - t0
                text.append(piece)
                print(piece, end="", flush=True)
    print(f"\n[{tenant}] first token after {first or 0:.2f}s, done after "
          f"{time.perf_counter() - t0:.2f}s\n")  # fmt: skip
    return "".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/multiplex")
    parser.add_argument("--no-chat", action="store_true", help="forecasts only")
    args = parser.parse_args()
    forecasts(args.url)
    if not args.no_chat:
        for tenant in TENANTS:
            stream_chat(args.url, tenant)


if __name__ == "__main__":
    main()

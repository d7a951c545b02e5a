"""What batching buys the chat, measured through Serve over HTTP: aggregate tokens/s and time
to first token at 1, 4 and 8 concurrent streams, tenants mixed.

    python -m patterns.multiplexing.bench.chat_bench [--levels 1 4 8] [--repeats 3] [--seconds 15]

Two copies of the multiplexing app run side by side, one chat replica each, the same config
but ``chat.max_batch``: the configured value (continuous batching) and 1 (one answer at a
time, what the chat did before batching: the baseline). Each round runs every level on both
arms, the arms alternating, so a slow moment of a shared machine falls on both. A stream sends
chat requests one after another for ``--seconds`` (greedy, ``--max-tokens`` each), its tenant
the next of pirate-co, northwind and base in turn; tokens/s counts the completion tokens that
arrived in that window (``level``), time to first token is the client's, to the first content
chunk. Printed per arm and level: the median over the rounds and the spread (min-max).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import numpy as np

TENANTS = ("pirate-co", "northwind", "base")
QUESTIONS = (
    "Tell me a long story about the sea.",
    "Explain how rain forms, in detail.",
    "Describe a day in a busy harbour.",
    "What should I pack for a week of hiking?",
)


async def _one(client: Any, url: str, tenant: str, question: str, max_tokens: int) -> dict:
    """One streamed answer: when it was sent, when each content chunk came, its tokens."""
    body = {
        "model": tenant,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent, chunks, tokens = time.perf_counter(), [], 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line.removeprefix("data: "))
            if event["choices"] and event["choices"][0]["delta"].get("content"):
                chunks.append(time.perf_counter())
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {"sent": sent, "chunks": chunks or [time.perf_counter()], "tokens": tokens}


async def level(url: str, streams: int, seconds: float, max_tokens: int) -> dict[str, float]:
    """``streams`` concurrent streams, each sending its next request when its last answer
    ended, for ``seconds``: tokens/s within the window, time to first token p50/p95.

    A stream's answers are of different lengths, so a fixed number of requests per stream
    would end in a tail where few streams run; counting tokens in a fixed window measures the
    steady state. An answer's tokens are spread over its content chunks (a chunk is a word or
    more), and those chunks that arrived inside the window count. Requests sent inside the
    window finish afterwards; their time to first token counts too.
    """
    import httpx

    t0 = time.perf_counter()
    end = t0 + seconds

    async def stream(i: int, client: Any) -> list[dict]:
        answers, k = [], 0
        while time.perf_counter() < end:
            tenant, question = TENANTS[(i + k) % 3], QUESTIONS[(i + k) % 4]
            answers.append(await _one(client, url, tenant, question, max_tokens))
            k += 1
        return answers

    limits = httpx.Limits(max_connections=streams + 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        runs = await asyncio.gather(*(stream(i, client) for i in range(streams)))
    answers = [a for run in runs for a in run]
    inside = sum(
        a["tokens"] * sum(c <= end for c in a["chunks"]) / len(a["chunks"]) for a in answers
    )
    ttft = [a["chunks"][0] - a["sent"] for a in answers]
    return {
        "tokens_per_s": inside / seconds,
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p95_s": float(np.percentile(ttft, 95)),
        "answers": len(answers),
    }


def wait_until_served(url: str, timeout_s: float = 300.0) -> str:
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/healthz did not answer within {timeout_s:g}s")


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    from ray import serve

    from cluster.local import local_serve
    from patterns.multiplexing.app import MultiplexArgs, build_app
    from patterns.multiplexing.artifacts import ensure_artifacts
    from patterns.multiplexing.deployments import ChatArgs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15.0, help="the window of a level")
    parser.add_argument("--max-tokens", type=int, default=48)
    opts = parser.parse_args()

    ensure_artifacts()
    arms = {f"max_batch {ChatArgs().max_batch}": ChatArgs().max_batch, "max_batch 1": 1}
    with local_serve(4) as base:
        urls = {}
        for i, (label, max_batch) in enumerate(arms.items()):
            args = MultiplexArgs(forecast={"hot_model_ids": []}, chat={"max_batch": max_batch})
            serve.run(build_app(args), name=f"chat-bench-{i}", route_prefix=f"/chat-bench-{i}")
            urls[label] = wait_until_served(f"{base}/chat-bench-{i}", timeout_s=300)
        for url in urls.values():  # warm-up: first requests, adapters in, threads started
            asyncio.run(level(url, 2, 1.0, 8))
        print(f"chat through Serve over HTTP: levels {opts.levels} concurrent streams, "
              f"{opts.seconds:g} s each, greedy, max_tokens {opts.max_tokens}, tenants "
              f"{', '.join(TENANTS)} in turn, {opts.repeats} rounds; median (min-max)")  # fmt: skip
        results: dict[tuple[str, int], list[dict[str, float]]] = {}
        for r in range(opts.repeats):
            order = list(urls.items()) if r % 2 == 0 else list(urls.items())[::-1]
            for n in opts.levels:
                for label, url in order:
                    results.setdefault((label, n), []).append(
                        asyncio.run(level(url, n, opts.seconds, opts.max_tokens))
                    )
        for label in urls:
            for n in opts.levels:
                runs = results[(label, n)]
                print(f"  {label:>12}, {n} streams: "
                      f"{_summary([x['tokens_per_s'] for x in runs])} tokens/s, TTFT p50 "
                      f"{_summary([x['ttft_p50_s'] for x in runs])} s, p95 "
                      f"{_summary([x['ttft_p95_s'] for x in runs])} s")  # fmt: skip
        for label in urls:
            if 1 in opts.levels and max(opts.levels) > 1:
                top = max(opts.levels)
                one = statistics.median(x["tokens_per_s"] for x in results[(label, 1)])
                many = statistics.median(x["tokens_per_s"] for x in results[(label, top)])
                print(f"  {label}: {top} streams = {many / one:.1f}x the tokens/s of 1 stream")
        handle = serve.get_deployment_handle("ChatModel", app_name="chat-bench-0")
        batch = handle.broadcast("stats").results(timeout_s=30)[0]["batch"]
        print(f"  batched replica: {batch}")


if __name__ == "__main__":
    main()

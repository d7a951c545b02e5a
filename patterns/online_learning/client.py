"""Stream labelled events through the online-learning app and watch it learn across drifts.

    python -m patterns.online_learning.client [--url http://127.0.0.1:8000/online]
        [--events 8000] [--start 0] [--batch 32]

Each step predicts a batch of stream events with the live champion (and with the frozen
baseline ``v000001`` for comparison), then sends their true labels as feedback, from 8 client
ids (a shop's customers). Every ``--report-every`` events it prints the prequential accuracy
(each answer scored before its label was sent) of both, the concept and the live version.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from patterns.online_learning.stream import DriftingStream

FROZEN_VERSION = "v000001"


def sample_request(i: int) -> dict:
    """One request for load tests: a predict call on stream event ``i``."""
    x, _, _ = DriftingStream().event(i)
    return {"method": "POST", "path": "/online/predict", "json": {"instances": [x]}}


@dataclass
class Step:
    start: int
    n: int
    concept: int
    live_correct: int
    frozen_correct: int
    version: str
    trained_through: str | None
    acked: int
    last_offset: str | None


def _post(http: httpx.Client, url: str, body: dict, client: str, attempts: int = 30) -> dict:
    """POST; on 429/503 wait as Retry-After says and try again (what a polite client does)."""
    for _ in range(attempts):
        r = http.post(url, json=body, headers={"X-Client-ID": client})
        if r.status_code not in (429, 503):
            r.raise_for_status()
            return r.json()
        time.sleep(min(2.0, float(r.headers.get("Retry-After", "1"))))
    r.raise_for_status()
    return r.json()


def stream_and_learn(
    url: str,
    stream: DriftingStream,
    start: int,
    n: int,
    *,
    batch: int = 32,
    frozen: str | None = FROZEN_VERSION,
    run_tag: str | None = None,
) -> Iterator[Step]:
    """Predict, score, send labels; one ``Step`` per batch."""
    run_tag = run_tag or uuid.uuid4().hex[:8]
    with httpx.Client(timeout=30) as http:
        for s in range(start, start + n, batch):
            idx = range(s, min(s + batch, start + n))
            events = [stream.event(i) for i in idx]
            rows = [x for x, _, _ in events]
            live = _post(http, f"{url}/predict", {"instances": rows}, "client")
            frozen_correct = 0
            if frozen:
                old = _post(
                    http, f"{url}/predict", {"instances": rows, "version": frozen}, "client"
                )
                frozen_correct = sum(
                    p["label"] == y for p, (_, y, _) in zip(old["predictions"], events, strict=True)
                )
            feedback = [
                {"event_id": f"{run_tag}-{i}", "prediction_id": p["prediction_id"], "label": y}
                for i, p, (_, y, _) in zip(idx, live["predictions"], events, strict=True)
            ]
            acks = _post(
                http, f"{url}/feedback/batch", {"events": feedback}, f"shop-{(s // batch) % 8}"
            )["acks"]
            yield Step(
                start=s,
                n=len(rows),
                concept=stream.concept_at(s),
                live_correct=sum(
                    p["label"] == y
                    for p, (_, y, _) in zip(live["predictions"], events, strict=True)
                ),
                frozen_correct=frozen_correct,
                version=live["model_version"],
                trained_through=live["trained_through"],
                acked=sum(a["status"] in ("logged", "duplicate") for a in acks),
                last_offset=acks[-1].get("offset") if acks else None,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/online")
    parser.add_argument("--events", type=int, default=8000)
    parser.add_argument("--start", type=int, default=0, help="first stream index")
    parser.add_argument("--batch", type=int, default=50, help="events per request (<= 64)")
    parser.add_argument("--report-every", type=int, default=500)
    args = parser.parse_args()
    stream = DriftingStream()
    print(
        f"stream: {args.events} events from #{args.start}; the concept changes every "
        f"{stream.drift_every} events (angles {list(stream.angles_deg)} degrees); "
        f"{stream.noise:.0%} label noise"
    )
    print(f"{'events':>13} {'concept':>7} {'live acc':>8} {'frozen acc':>10}  live version")
    window: list[Step] = []
    t0 = time.perf_counter()
    acked, last_offset = 0, None
    for step in stream_and_learn(args.url, stream, args.start, args.events, batch=args.batch):
        window.append(step)
        acked += step.acked
        last_offset = step.last_offset or last_offset
        if sum(s.n for s in window) >= args.report_every:
            n = sum(s.n for s in window)
            live = sum(s.live_correct for s in window) / n
            frozen = sum(s.frozen_correct for s in window) / n
            first, end = window[0].start, window[-1].start + window[-1].n
            drift = "  <- drift" if any(first <= d < end for d in stream.drift_points(end)) else ""
            print(
                f"{first:>6}-{end - 1:<6} "
                f"{window[-1].concept:>7} {live:>8.3f} {frozen:>10.3f}  {window[-1].version}"
                f"{drift}"
            )
            window = []
    elapsed = time.perf_counter() - t0
    print(f"{acked} labels acknowledged in {elapsed:.1f}s ({args.events / elapsed:.0f} events/s)")
    deadline = time.monotonic() + 10  # give the trainer a moment to learn the last labels
    while True:
        model = httpx.get(f"{args.url}/model", timeout=30).json()
        if model["trainer"].get("consumed") == last_offset or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    trainer = model["trainer"]
    print(
        f"trainer: consumed the labels log up to offset {trainer.get('consumed')}, learned "
        f"{trainer.get('learned')} events, held out {trainer.get('held_out')}; champion "
        f"{model['version']} (learned up to offset {model['consumed_offsets']['labels']})"
    )


if __name__ == "__main__":
    main()

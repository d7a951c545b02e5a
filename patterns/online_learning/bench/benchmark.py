"""Figures for the online-learning pattern, measured end to end over HTTP.

    python -m patterns.online_learning.bench.benchmark [--out patterns/online_learning/bench]
        [--events 8000] [--freshness 40] [--ingest 4000] [--bandit 1500]

Starts a local Ray + Serve, deploys the app (default args) on a fresh model store and SQLite
log in a temp dir, and measures:

1. prequential accuracy across the drifts, live model vs the frozen baseline (each answer
   scored before its label is sent) -> prequential.png;
2. freshness: from a label's acknowledgement to the first answer from a live model that has
   learned it (``trained_through >= the label's offset``), p50 / p95;
3. feedback ingestion: events/s through ``POST /feedback/batch`` (and one event per request),
   then a check that every acknowledged event reached the trainer (0 lost);
4. the bandit over HTTP: cumulative regret against the best fixed offer and against the
   oracle -> bandit_regret.png.

About two minutes on a 2-core machine. The PNGs go to --out: by default next to this file,
where the pattern's README shows them (committed: a rerun replaces them).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from patterns.online_learning.bandit import ACTIONS, OfferSimulator
from patterns.online_learning.client import stream_and_learn
from patterns.online_learning.feedback_log import offset_key
from patterns.online_learning.model import is_holdout
from patterns.online_learning.stream import DriftingStream


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.node()}: {os.cpu_count()} CPUs, {mem:.0f} GiB RAM, no GPU used"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ------------------------------------------------------------------------------ 1. prequential
def prequential(url: str, events: int, out: Path) -> dict[str, Any]:
    stream = DriftingStream()
    steps = list(stream_and_learn(url, stream, 0, events))
    live = np.concatenate([[1] * s.live_correct + [0] * (s.n - s.live_correct) for s in steps])
    frozen = np.concatenate(
        [[1] * s.frozen_correct + [0] * (s.n - s.frozen_correct) for s in steps]
    )
    # Per-batch counts do not keep order inside a batch; a 250-event rolling mean hides that.
    k = 250
    roll = lambda a: np.convolve(a, np.ones(k) / k, mode="valid")  # noqa: E731
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    x = np.arange(k - 1, len(live))
    ax.plot(x, roll(live), label="live (learns from feedback)")
    ax.plot(x, roll(frozen), label="frozen baseline v000001")
    for d in stream.drift_points(events):
        ax.axvline(d, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("event")
    ax.set_ylabel(f"prequential accuracy ({k}-event rolling mean)")
    ax.set_ylim(0, 1)
    ax.set_title("Online learning across concept drifts (dashed: drift points)")
    ax.legend(loc="lower left")
    fig.tight_layout()
    path = out / "prequential.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    per_concept = []
    for c in range(0, events, stream.drift_every):
        seg = slice(c, min(c + stream.drift_every, events))
        late = slice(c + 500, min(c + stream.drift_every, events))
        per_concept.append(
            {
                "events": f"{c}-{seg.stop - 1}",
                "concept": stream.concept_at(c),
                "live": float(live[seg].mean()),
                "frozen": float(frozen[seg].mean()),
                "live_after_500": float(live[late].mean()),
            }
        )
    return {"png": str(path), "per_concept": per_concept, "versions": steps[-1].version}


# ------------------------------------------------------------------------------ 2. freshness
def freshness(url: str, samples: int, start: int) -> dict[str, Any]:
    stream = DriftingStream()
    probe = [[0.1, 0.2, 0.3, 0.4, 0.5]]
    times, timeouts = [], 0
    tag = uuid.uuid4().hex[:8]
    with httpx.Client(timeout=30) as http:
        for k in range(samples):
            x, y, _ = stream.event(start + k)
            pid = http.post(f"{url}/predict", json={"instances": [x]}).json()["predictions"][0][
                "prediction_id"
            ]
            n = 0
            while is_holdout(f"fresh-{tag}-{k}-{n}", 5):  # a training event, not a held-out one
                n += 1
            event = {"event_id": f"fresh-{tag}-{k}-{n}", "prediction_id": pid, "label": y}
            r = http.post(f"{url}/feedback", json=event)
            acked = time.perf_counter()
            offset = offset_key(r.json()["offset"])
            while True:
                answer = http.post(f"{url}/predict", json={"instances": probe}).json()
                through = answer.get("trained_through")
                if through is not None and offset_key(through) >= offset:
                    times.append(time.perf_counter() - acked)
                    break
                if time.perf_counter() - acked > 10:
                    timeouts += 1
                    times.append(float("inf"))  # counts in the percentiles as "over 10 s"
                    break
                time.sleep(0.01)
            time.sleep(0.2)  # let the trainer go idle again: each sample starts from rest
    return {
        "samples": len(times),
        "timeouts_over_10s": timeouts,
        "p50_s": _pct(times, 0.5),
        "p95_s": _pct(times, 0.95),
        "max_s": max(times),
    }


# ------------------------------------------------------------------------------ 3. ingestion
def ingestion(url: str, n: int, start: int, batch: int = 256, workers: int = 4) -> dict[str, Any]:
    stream = DriftingStream()
    before = httpx.get(f"{url}/model", timeout=30).json()["trainer"]
    pids: list[tuple[str, int]] = []
    with httpx.Client(timeout=30) as http:
        for s in range(start, start + n, 64):
            rows = [stream.event(i) for i in range(s, min(s + 64, start + n))]
            body = http.post(f"{url}/predict", json={"instances": [r[0] for r in rows]}).json()
            pids += [
                (p["prediction_id"], r[1]) for p, r in zip(body["predictions"], rows, strict=True)
            ]
    tag = uuid.uuid4().hex[:8]
    chunks = [pids[i : i + batch] for i in range(0, len(pids), batch)]
    pushed_back = [0]

    def send(j: int) -> list[dict[str, Any]]:
        events = [
            {"event_id": f"ing-{tag}-{j}-{i}", "prediction_id": pid, "label": y}
            for i, (pid, y) in enumerate(chunks[j])
        ]
        with httpx.Client(timeout=60) as http:
            while True:
                r = http.post(
                    f"{url}/feedback/batch",
                    json={"events": events},
                    headers={"X-Client-ID": f"ingest-{j % 8}"},
                )
                if r.status_code in (429, 503):
                    pushed_back[0] += 1
                    time.sleep(float(r.headers.get("Retry-After", "1")))
                    continue
                r.raise_for_status()
                return r.json()["acks"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        acks = [a for part in pool.map(send, range(len(chunks))) for a in part]
    batch_rate = len(acks) / (time.perf_counter() - t0)
    # One event per request, for comparison (the per-request cost dominates).
    single = pids[: min(400, len(pids))]
    t0 = time.perf_counter()

    def send_ones(w: int) -> list[dict[str, Any]]:
        out = []
        with httpx.Client(timeout=30) as http:  # one keep-alive connection per sender
            for i in range(w, len(single), 8):
                pid, y = single[i]
                r = http.post(
                    f"{url}/feedback",
                    json={"event_id": f"one-{tag}-{i}", "prediction_id": pid, "label": y},
                    headers={"X-Client-ID": f"single-{w}"},
                )
                r.raise_for_status()
                out.append(r.json())
        return out

    with ThreadPoolExecutor(8) as pool:
        singles = [a for part in pool.map(send_ones, range(8)) for a in part]
    single_rate = len(singles) / (time.perf_counter() - t0)
    all_acks = acks + singles
    offsets = {a["offset"] for a in all_acks}
    last = max(offsets, key=offset_key)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        trainer = httpx.get(f"{url}/model", timeout=30).json()["trainer"]
        if trainer.get("consumed") and offset_key(trainer["consumed"]) >= offset_key(last):
            break
        time.sleep(0.5)
    reached = (trainer["learned"] + trainer["held_out"]) - (before["learned"] + before["held_out"])
    return {
        "events": len(all_acks),
        "distinct_offsets": len(offsets),
        "batch_events_per_s": batch_rate,
        "single_events_per_s": single_rate,
        "pushed_back_requests": pushed_back[0],
        "reached_trainer": reached,
        "lost": len(all_acks) - reached,
    }


# ------------------------------------------------------------------------------ 4. bandit
def bandit(url: str, rounds: int, out: Path) -> dict[str, Any]:
    world = OfferSimulator()
    fixed = world.best_fixed_action()
    got, best_fixed, oracle = [], [], []
    tag = uuid.uuid4().hex[:8]
    with httpx.Client(timeout=30) as http:
        for i in range(rounds):
            ctx = world.context(i)
            choice = http.post(f"{url}/bandit/choose", json={"context": ctx}).json()
            a = ACTIONS.index(choice["action"])
            r = world.reward(i, a)
            http.post(
                f"{url}/bandit/reward",
                json={"event_id": f"b-{tag}-{i}", "choice_id": choice["choice_id"], "reward": r},
            ).raise_for_status()
            p = world.probabilities(ctx)
            got.append(p[a])  # expected reward of the choice: less noisy than the draw
            best_fixed.append(p[fixed])
            oracle.append(max(p))
    got_a, fixed_a, oracle_a = map(np.asarray, (got, best_fixed, oracle))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(np.cumsum(fixed_a - got_a), label=f"vs best fixed offer ({ACTIONS[fixed]})")
    ax.plot(np.cumsum(oracle_a - got_a), label="vs oracle (best offer per context)")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative expected regret")
    ax.set_title("Contextual bandit (linear Thompson sampling) over HTTP")
    ax.legend(loc="lower left")
    fig.tight_layout()
    path = out / "bandit_regret.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {
        "png": str(path),
        "rounds": rounds,
        "best_fixed_action": ACTIONS[fixed],
        "regret_vs_fixed": float(np.sum(fixed_a - got_a)),
        "regret_vs_oracle": float(np.sum(oracle_a - got_a)),
        "mean_reward": float(got_a.mean()),
        "fixed_mean_reward": float(fixed_a.mean()),
        "oracle_mean_reward": float(oracle_a.mean()),
    }


# ------------------------------------------------------------------------------ main
def run(args: argparse.Namespace) -> None:
    from ray import serve

    from core.model_store import ModelStore
    from patterns.online_learning.app import OnlineArgs, build_app
    from patterns.online_learning.artifacts import ensure_artifacts

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="online-bench-"))
    store_uri = (work / "models").as_uri()
    ensure_artifacts(ModelStore(store_uri))
    app_args = OnlineArgs(log_url=f"sqlite:///{work / 'feedback.db'}", model_store_uri=store_uri)
    serve.run(build_app(app_args), name="online_learning", route_prefix="/online")
    url = f"http://127.0.0.1:{args.port}/online"
    print(f"machine: {machine()}")
    print("app: default OnlineArgs, one ingress replica, SQLite log (WAL) on local disk\n")

    pre = prequential(url, args.events, out)
    print(f"1. prequential accuracy, {args.events} events, concept changes every 2000")
    print(f"   {'events':>11} {'concept':>7} {'live':>6} {'frozen':>6} {'live after 500':>14}")
    for row in pre["per_concept"]:
        print(
            f"   {row['events']:>11} {row['concept']:>7} {row['live']:>6.3f} "
            f"{row['frozen']:>6.3f} {row['live_after_500']:>14.3f}"
        )
    print(f"   plot: {pre['png']}\n")

    # Fresh events of the concept the stream ended on: freshness in steady state. (Right
    # after a drift the gate holds promotions until its window has seen the new concept.)
    stream = DriftingStream()
    last = stream.concept_at(args.events - 1)
    start = next(
        i for i in range(2 * args.events, 10**9, stream.drift_every) if stream.concept_at(i) == last
    )
    fresh = freshness(url, args.freshness, start=start)
    print(
        f"2. freshness (label acknowledged -> live answer from a model that learned it), "
        f"{fresh['samples']} samples"
    )
    print(
        f"   p50 {fresh['p50_s']:.3f} s, p95 {fresh['p95_s']:.3f} s, max {fresh['max_s']:.3f} s,"
        f" over 10 s: {fresh['timeouts_over_10s']}  (goal: p95 <= 2 s)\n"
    )

    ing = ingestion(url, args.ingest, start=args.events + 5000)
    print(f"3. feedback ingestion: {ing['events']} events acknowledged")
    print(f"   batches of 256, 4 clients in parallel: {ing['batch_events_per_s']:.0f} events/s")
    print(f"   one event per request, 8 in parallel:  {ing['single_events_per_s']:.0f} events/s")
    print(f"   requests pushed back (429/503, retried): {ing['pushed_back_requests']}")
    print(f"   reached the trainer: {ing['reached_trainer']}, lost: {ing['lost']}\n")

    bd = bandit(url, args.bandit, out)
    print(
        f"4. bandit, {bd['rounds']} rounds: mean expected reward {bd['mean_reward']:.3f} "
        f"(best fixed offer {bd['best_fixed_action']}: {bd['fixed_mean_reward']:.3f}, "
        f"oracle: {bd['oracle_mean_reward']:.3f})"
    )
    print(
        f"   cumulative regret vs best fixed offer {bd['regret_vs_fixed']:.1f}, "
        f"vs oracle {bd['regret_vs_oracle']:.1f}"
    )
    print(f"   plot: {bd['png']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent), help="where PNGs go")
    parser.add_argument("--events", type=int, default=8000)
    parser.add_argument("--freshness", type=int, default=40)
    parser.add_argument("--ingest", type=int, default=4000)
    parser.add_argument("--bandit", type=int, default=1500)
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs for local Ray")
    args = parser.parse_args()
    from cluster.local import local_serve

    with local_serve(args.num_cpus) as base_url:
        args.port = int(base_url.rsplit(":", 1)[1])
        run(args)


if __name__ == "__main__":
    main()

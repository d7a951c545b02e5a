"""Drive the app the way a user's system would: predict on stream events, then send labels."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from patterns.online_learning.stream import N_FEATURES, DriftingStream


def baseline_store_in(d: Path, baseline: Path) -> str:
    """A model store of its own under ``d`` that starts as a copy of ``baseline`` (the
    session's ``online_baseline_models``); its URI."""
    shutil.copytree(baseline, d / "models")
    return (d / "models").as_uri()


def wait_for(check, timeout_s: float = 30.0, every_s: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")


def wait_until_served(
    url: str, ok: Callable[[str], bool], what: str, in_a_row: int = 8, timeout_s: float = 30.0
) -> list[str]:
    """Until ``in_a_row`` answers in a row come from versions that are ``ok``: the pointer
    moves first, and each ingress replica loads the new champion on the trainer's nudge (or
    its next poll) a moment later. Returns the versions seen."""
    row = [[0.0] * N_FEATURES]
    seen: list[str] = []

    def served() -> bool:
        r = httpx.post(f"{url}/predict", json={"instances": row}, timeout=30)
        seen.append(r.json().get("model_version"))
        return len(seen) >= in_a_row and all(ok(v) for v in seen[-in_a_row:])

    try:
        wait_for(served, timeout_s, 0.05, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; versions that answered, last 20: {seen[-20:]}") from None
    return seen


def wait_trained_on(url: str, played: dict[str, Any], timeout_s: float = 90.0) -> dict[str, Any]:
    """Until the trainer has finished the round that consumed the last event ``play`` had
    acknowledged, and every ingress replica serves the champion it left: the next ``play``
    then measures what the model learned, not how fast the requests outran the trainer.
    Returns GET /model.

    "Finished" is ``consumed`` at the offset *and* no round in flight: the trainer records
    the offset once the version is durable, and promotes it a moment later."""
    model = wait_trainer_done(url, played["acks"][-1]["offset"], timeout_s)
    champion = model["trainer"]["champion"]
    wait_until_served(url, lambda v: v == champion, f"every replica on {champion}", 8, 60)
    return model


def wait_trainer_done(url: str, last: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """GET /model once the trainer's round that consumed offset ``last`` has finished: the
    trainer records the offset when the version is durable and promotes it a moment later,
    so ``consumed`` alone can show the champion before the round's own promotion."""

    def done() -> dict[str, Any] | None:
        m = httpx.get(f"{url}/model", timeout=30).json()
        t = m["trainer"]
        return m if t.get("consumed") == last and t.get("in_batch") is None else None

    return wait_for(done, timeout_s, 0.25, what=f"the trainer to finish up to offset {last}")


def send_with_backoff(
    http: httpx.Client, url: str, body: dict[str, Any], client: str, attempts: int = 20
) -> httpx.Response:
    """POST, and on 429/503 wait as long as Retry-After says (what a polite client does)."""
    for _ in range(attempts):
        r = http.post(url, json=body, headers={"X-Client-ID": client})
        if r.status_code not in (429, 503):
            return r
        time.sleep(min(2.0, float(r.headers.get("Retry-After", "1"))))
    return r


def play(
    url: str,
    stream: DriftingStream,
    start: int,
    n: int,
    *,
    batch: int = 32,
    client: str = "users",
    flip: bool = False,
    tag: str | None = None,
) -> dict[str, Any]:
    """Predict events start..start+n-1 in batches, then label them (flipped if ``flip``).
    Honest traffic (``client="users"``) comes from 8 client ids, like a shop's customers; any
    other name is one client. Returns the prequential accuracy of the answers (against the
    true labels) and the versions that served them."""
    tag = tag or uuid.uuid4().hex[:8]
    correct = total = 0
    versions: list[str] = []
    acks: list[dict[str, Any]] = []
    with httpx.Client(timeout=30) as http:
        for s in range(start, start + n, batch):
            rows, labels = [], []
            for i in range(s, min(s + batch, start + n)):
                x, y, _ = stream.event(i)
                rows.append(x)
                labels.append(1 - y if flip else y)
            r = http.post(f"{url}/predict", json={"instances": rows})
            assert r.status_code == 200, r.text
            body = r.json()
            versions.append(body["model_version"])
            events = []
            for i, (p, y) in enumerate(zip(body["predictions"], labels, strict=True)):
                true = 1 - y if flip else y  # y is what we send; true is the stream's label
                correct += int(p["label"] == true)
                total += 1
                events.append(
                    {"event_id": f"{tag}-{s + i}", "prediction_id": p["prediction_id"], "label": y}
                )
            who = f"user-{(s // batch) % 8}" if client == "users" else client
            r = send_with_backoff(http, f"{url}/feedback/batch", {"events": events}, who)
            assert r.status_code == 202, r.text
            acks += r.json()["acks"]
    return {"accuracy": correct / max(1, total), "versions": versions, "acks": acks}

"""The ensemble app under Serve: real members, real requests, assertions on the answers.
(The flow's every branch, over the same members in-process, is in test_flow.py.)"""

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np
import pytest

from cluster.ports import wait_http_ok
from patterns.ensemble import client
from patterns.ensemble.app import CHALLENGER_BATCHING
from patterns.ensemble.artifacts import ensure_artifacts
from patterns.ensemble.data import N_FEATURES, load_split
from patterns.ensemble.deployments import EnsembleMember
from patterns.ensemble.flow import FLOAT32_MAX, EnsembleArgs
from patterns.ensemble.members import FaultInjection
from tests.conftest import delete_apps
from tests.ensemble.local import assert_votes_decide

# Three apps, deployed together once for the module from one Serve config: a redeploy with
# other args restarts every replica, so the args a test needs are one of these three. What it
# needs beyond them, a slow or failing member, is switched on the running app through the
# member's user_config (``EnsembleMember.reconfigure``), as a game day would with ``serve
# deploy``: Serve reconfigures that replica in place, nothing restarts.
APPS: dict[str, tuple[str, dict[str, Any]]] = {
    # The shipped defaults: cascade, soft vote, 250 ms deadline, quorum 2, the xgb_v2 shadow.
    "default": ("ensemble-test", {}),
    # Every member votes, weighted, quorum 2; a challenger whose promotion gate a test can
    # pass with a few labelled predictions. (A generous deadline, so that no member is merely
    # late on a loaded machine.)
    "weighted": (
        "ensemble-test-weighted",
        {
            "voting": "weighted",
            "selection": {"mode": "all"},
            "deadline_ms": 1500,
            "challenger": {
                **EnsembleArgs().challenger.model_dump(),
                "gate": {
                    "min_samples": 5,
                    "min_labeled": 10,
                    "min_agreement": 0.8,
                    "max_accuracy_drop": 0.1,
                },
            },
        },
    ),
    # The same vote with no challenger, a quorum of 1, and the input bound lifted to float32's
    # largest value (so that -3e38 reaches the members).
    "quorum_one": (
        "ensemble-test-q1",
        {
            "voting": "weighted",
            "selection": {"mode": "all"},
            "deadline_ms": 1500,
            "quorum": 1,
            "max_abs_feature": FLOAT32_MAX,
            "challenger": {"member": None},
        },
    ),
}
NO_FAULT = FaultInjection().model_dump()
MEMBER_BATCHING = dict(EnsembleMember.user_config)


@pytest.fixture(scope="module")
def split():
    ensure_artifacts()
    return load_split()


class Apps:
    """The module's apps, deployed from one Serve config (``serve deploy``'s path: the code
    version is the config's, so a change to a ``user_config`` alone reconfigures in place)."""

    def __init__(self, base_url: str) -> None:
        from ray.serve._private.api import serve_start

        self.base_url = base_url
        self.client = serve_start()  # the session's Serve instance (conftest.py)

    def url(self, app: str) -> str:
        return f"{self.base_url}/{APPS[app][0]}"

    def config(self, faults: dict[str, dict[str, dict[str, float]]]) -> Any:
        """Every app, every member's (and challenger's) fault spelled out: a user_config
        without ``fault`` would leave the last one on."""
        from ray.serve.schema import ServeDeploySchema

        applications = []
        for key, (name, overrides) in APPS.items():
            args = EnsembleArgs(**{**EnsembleArgs().model_dump(), **overrides})
            on = faults.get(key, {})
            deployments = [
                {
                    "name": f"member_{m.name}",
                    "user_config": {**MEMBER_BATCHING, "fault": on.get(m.name, NO_FAULT)},
                }
                for m in args.members
            ]
            ch = args.challenger.member
            if ch is not None:
                deployments.append(
                    {
                        "name": f"challenger_{ch.name}",
                        "user_config": {**CHALLENGER_BATCHING, "fault": on.get(ch.name, NO_FAULT)},
                    }
                )
            applications.append(
                {
                    "name": name,
                    "route_prefix": f"/{name}",
                    "import_path": "patterns.ensemble.app:build_app",
                    "args": args.model_dump(mode="json"),
                    "deployments": deployments,
                }
            )
        return ServeDeploySchema.model_validate({"applications": applications})

    def deploy(self, split) -> None:
        from ray import serve

        self.client.deploy_apps(self.config({}))
        names = [name for name, _ in APPS.values()]
        deadline = time.monotonic() + 600
        while True:
            now = serve.status().applications
            statuses = {n: now.get(n) for n in names}
            failed = {
                n: s.message for n, s in statuses.items() if s and s.status == "DEPLOY_FAILED"
            }
            assert not failed, failed
            if all(s is not None and s.status == "RUNNING" for s in statuses.values()):
                break
            assert time.monotonic() < deadline, {n: s and s.status for n, s in statuses.items()}
            time.sleep(0.5)
        for app in APPS:
            wait_http_ok(f"{self.url(app)}/healthz", timeout_s=60)
            # A fresh ingress replica learns where the members are on its first calls; warm
            # it up so the first asserted request is not measured against that one-off cost.
            for _ in range(3):
                httpx.post(
                    f"{self.url(app)}/predict",
                    json={"instances": [split.x_test[0].tolist()]},
                    timeout=30,
                )

    def faults_now(self, app: str) -> dict[str, dict[str, float]]:
        """Each member's fault as it reports it (GET /model): what its replica applied."""
        model = httpx.get(f"{self.url(app)}/model", timeout=30).json()
        out = {name: m["fault"] for name, m in model["members"].items()}
        if model["challenger_model"]:
            out[model["challenger_model"]["member"]] = model["challenger_model"]["fault"]
        return out

    def set_faults(self, app: str, faults: dict[str, dict[str, float]]) -> None:
        self.client.deploy_apps(self.config({app: faults}))
        want = {k: FaultInjection(**faults.get(k, {})).model_dump() for k in self.faults_now(app)}
        deadline = time.monotonic() + 60
        while (now := self.faults_now(app)) != want:
            assert time.monotonic() < deadline, (now, want)
            time.sleep(0.1)

    @contextmanager
    def faulty(self, app: str, **faults: dict[str, float]) -> Iterator[str]:
        """``app`` with these members' faults on (the others' off); all off afterwards."""
        self.set_faults(app, faults)
        try:
            yield self.url(app)
        finally:
            self.set_faults(app, {})


@pytest.fixture(scope="module")
def apps(serve_http, split) -> Iterator[Apps]:
    deployed = Apps(serve_http)
    try:
        deployed.deploy(split)
        yield deployed
    finally:
        delete_apps([name for name, _ in APPS.values()])


@pytest.fixture(scope="module")
def run(apps) -> Callable[..., str]:
    """The URL of one of the module's apps (``APPS``; the defaults unless named)."""
    return lambda app="default": apps.url(app)


def test_default_app_reads_held_out_data_well(run, split) -> None:
    url = run()
    x, y = split.x_test, split.y_test
    labels = []
    for start in range(0, len(x), 32):
        r = httpx.post(
            f"{url}/predict", json={"instances": x[start : start + 32].tolist()}, timeout=30
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert not body["degraded"]
        assert body["challenger"] == {"name": "xgb_v2", "status": "shadow"}
        labels += [p["label"] for p in body["predictions"]]
    accuracy = float((np.array(labels) == y).mean())
    # Offline evaluation gives 0.959 on these 171 rows (artifacts.py); chance is 0.63.
    assert accuracy >= 0.93, accuracy
    decided = {p["decided_by"] for p in body["predictions"]}
    assert decided <= {"ensemble", "gate:logreg"}
    assert set(body["timings_ms"]) == {"gate", "fan_out", "total"}


def _shape(value):
    """The keys of an answer, recursively: what a README example must show."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return type(value).__name__ if isinstance(value, str | bool) else "number"


def test_readme_example_is_a_live_answer(run) -> None:
    """README.md shows `client --readme` output: same keys and same votes as the app now."""
    live = client.example(run())
    assert live["status"] == 200, live
    shown = client.readme_answer(client.README.read_text())
    assert _shape(shown) == _shape(live["answer"])
    assert client.stable_fields(shown) == client.stable_fields(live["answer"])


def test_cascade_sends_only_uncertain_rows_to_the_ensemble(run, split) -> None:
    url = run()
    r = httpx.post(f"{url}/predict", json={"instances": split.x_test[:40].tolist()}, timeout=30)
    preds = r.json()["predictions"]
    gate_rows = [p for p in preds if p["decided_by"] == "gate:logreg"]
    full_rows = [p for p in preds if p["decided_by"] == "ensemble"]
    assert gate_rows and full_rows
    for p in gate_rows:
        assert set(p["votes"]) == {"logreg"}
        assert p["votes"]["logreg"] <= 0.02 or p["votes"]["logreg"] >= 0.98
    for p in full_rows:
        assert set(p["votes"]) == {"logreg", "mlp", "xgb"}
        assert 0.02 < p["votes"]["logreg"] < 0.98


GOOD_ROW = [1.0] * N_FEATURES


@pytest.mark.parametrize(
    ("content", "status", "phrase"),
    [
        ({"instances": [[1.0] * 29]}, 422, "29 features"),
        ({"instances": [GOOD_ROW, [1.0] * 31]}, 422, "Row 1 has 31 features"),
        ('{"instances": [[NaN' + ", 1.0" * 29 + "]]}", 422, "finite"),
        ('{"instances": [[Infinity' + ", 1.0" * 29 + "]]}", 422, "finite"),
        ({"instances": [["NaN"] + [1.0] * 29]}, 422, "valid number"),
        # Finite in JSON, infinite as the float32 the members compute in.
        ({"instances": [[1e300] + [1.0] * 29]}, 422, "Row 0, column 0 (mean radius) is 1e+300"),
        # Finite in float32, but the MLP's standardisation turns it into NaN.
        (
            {"instances": [GOOD_ROW, [1.0] * 5 + [-3e38] + [1.0] * 24]},
            422,
            "Row 1, column 5 (mean compactness) is -3e+38; every feature must be a finite "
            "number between -1e+30 and 1e+30.",
        ),
        ({"instances": [["abc"] + [1.0] * 29]}, 422, "valid number"),
        ({"instances": []}, 422, "at least 1"),
        ({"rows": [GOOD_ROW]}, 422, "instances"),
        ("", 422, "empty"),
        ("{oops", 422, "not valid JSON"),
        ({"instances": [GOOD_ROW] * 65}, 413, "at most 64"),
    ],
)
def test_bad_input_gets_a_clear_4xx(run, content, status, phrase) -> None:
    url = run()
    if isinstance(content, str):
        r = httpx.post(
            f"{url}/predict",
            content=content,
            headers={"content-type": "application/json"},
            timeout=30,
        )
    else:
        r = httpx.post(f"{url}/predict", json=content, timeout=30)
    assert r.status_code == status, r.text
    assert phrase in r.json()["error"]["message"], r.text
    assert "Traceback" not in r.text
    ok = httpx.post(f"{url}/predict", json={"instances": [GOOD_ROW]}, timeout=30)
    assert ok.status_code == 200  # and the app keeps serving


def test_feedback_errors(run) -> None:
    url = run()
    r = httpx.post(f"{url}/feedback", json={"prediction_id": "nope", "labels": [1]}, timeout=30)
    assert r.status_code == 202 and r.json()["status"] == "held"
    pred = httpx.post(f"{url}/predict", json={"instances": [GOOD_ROW] * 2}, timeout=30).json()
    time.sleep(0.5)  # let the shadow copy be recorded
    r = httpx.post(
        f"{url}/feedback", timeout=30, json={"prediction_id": pred["prediction_id"], "labels": [1]}
    )
    assert r.status_code == 422 and "had 2 rows" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/feedback", json={"prediction_id": "x", "labels": [2]}, timeout=30)
    assert r.status_code == 422
    # No prediction has more than max_instances rows, so more labels can never be scored.
    r = httpx.post(f"{url}/feedback", json={"prediction_id": "y", "labels": [1] * 65}, timeout=30)
    assert r.status_code == 422, r.text
    assert "65 labels, but a prediction has at most 64 rows" in r.json()["error"]["message"]


def test_schema_and_model_routes(run) -> None:
    url = run()
    schema = httpx.get(f"{url}/schema", timeout=30).json()
    assert schema["n_features"] == 30 and schema["features"][0] == "mean radius"
    model = httpx.get(f"{url}/model", timeout=30).json()
    assert model["members"]["xgb"]["version"] == "v1" and model["members"]["xgb"]["weight"] == 1.5
    for member in model["members"].values():  # no GPU here: the MLP fell back to the CPU
        assert member["device"] == "cpu" and member["held_out"]["n_test"] == 171
    assert model["members"]["mlp"]["held_out"]["accuracy"] == 0.9591
    assert model["held_out"]["cascade"]["accuracy"] == 0.9591
    assert model["challenger_model"]["version"] == "v2"
    assert httpx.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"


def test_feedback_promotion_and_rollback(apps, split) -> None:
    url = apps.url("weighted")
    refused = httpx.post(f"{url}/challenger/promote", timeout=30)
    assert refused.status_code == 409 and "shadowed predictions" in refused.text
    before = httpx.get(f"{url}/challenger", timeout=30).json()["shadowed_predictions"]
    x, y = split.x_test, split.y_test
    for i in range(6):
        rows = x[i * 4 : i * 4 + 4].tolist()
        r = httpx.post(f"{url}/predict", json={"instances": rows}, timeout=30).json()
        fb = httpx.post(
            f"{url}/feedback",
            timeout=30,
            json={
                "prediction_id": r["prediction_id"],
                "labels": [int(v) for v in y[i * 4 : i * 4 + 4]],
            },
        )
        assert fb.status_code in (200, 202), fb.text
    deadline = time.monotonic() + 10  # shadow copies are recorded asynchronously
    while time.monotonic() < deadline:
        stats = httpx.get(f"{url}/challenger", timeout=30).json()
        if stats["shadowed_predictions"] >= before + 6:  # (the warm-up's were there before)
            break
        time.sleep(0.2)
    assert stats["labeled_rows"] == 24 and stats["agreement"] >= 0.8
    promoted = httpx.post(f"{url}/challenger/promote", timeout=30)
    assert promoted.status_code == 200 and promoted.json()["promoted"]
    time.sleep(1.2)  # ingress replicas re-read the promotion state within a second
    body = httpx.post(f"{url}/predict", json={"instances": x[:2].tolist()}, timeout=30).json()
    assert body["challenger"]["status"] == "voting"
    assert "xgb_v2" in body["members"]["counted"]
    # Promoted, the challenger is no longer shadowed: labels for new predictions cannot be
    # scored, and the answer says so instead of holding them forever.
    fb = httpx.post(
        f"{url}/feedback",
        timeout=30,
        json={"prediction_id": body["prediction_id"], "labels": [int(v) for v in y[:2]]},
    )
    assert fb.status_code == 409, fb.text
    assert "is promoted" in fb.json()["error"]["message"]
    back = httpx.post(f"{url}/challenger/rollback", timeout=30)
    assert back.status_code == 200 and back.json()["changed"] and not back.json()["promoted"]
    time.sleep(1.2)
    body = httpx.post(f"{url}/predict", json={"instances": x[:2].tolist()}, timeout=30).json()
    assert body["challenger"]["status"] == "shadow"
    assert "xgb_v2" not in body["members"]["counted"]
    fb = httpx.post(
        f"{url}/feedback",
        timeout=30,
        json={"prediction_id": body["prediction_id"], "labels": [int(v) for v in y[:2]]},
    )
    assert fb.status_code in (200, 202), fb.text  # shadowed again, so feedback counts again


# One mode through Serve; test_flow.py checks all three over the same code in-process.
@pytest.mark.parametrize("mode", ["weighted"])
def test_vote_matches_member_outputs(apps, split, mode) -> None:
    url = apps.url("weighted")  # rolled back above: the challenger does not vote
    r = httpx.post(f"{url}/predict", json={"instances": split.x_test[:40].tolist()}, timeout=30)
    assert r.status_code == 200, r.text
    assert_votes_decide(r.json(), mode)


def test_quorum_lost_is_a_fast_503(apps, split) -> None:
    with apps.faulty("weighted", xgb={"error_rate": 1.0}, mlp={"delay_s": 15.0}) as url:
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/predict", json={"instances": split.x_test[:2].tolist()}, timeout=30)
        elapsed = time.perf_counter() - t0
    assert r.status_code == 503
    msg = r.json()["error"]["message"]
    assert "Only 1 of 3" in msg and "quorum is 2" in msg
    assert elapsed < 5.0


def test_slow_shadow_neither_changes_nor_delays_the_answer(apps, split) -> None:
    """The same rows and the same vote, without a challenger and with a 10 s one."""
    rows = split.x_test[:20].tolist()
    plain = httpx.post(
        f"{apps.url('quorum_one')}/predict", json={"instances": rows}, timeout=30
    ).json()
    assert plain["challenger"]["status"] == "none"
    with apps.faulty("weighted", xgb_v2={"delay_s": 10.0}) as url:
        t0 = time.perf_counter()
        shadowed = httpx.post(f"{url}/predict", json={"instances": rows}, timeout=30).json()
        elapsed = time.perf_counter() - t0
    assert elapsed < 5.0  # the 10 s challenger is not on the request path
    assert shadowed["challenger"]["status"] == "shadow"
    assert plain["voting"] == shadowed["voting"] == "weighted"
    strip = lambda b: [(p["label"], p["p_benign"]) for p in b["predictions"]]  # noqa: E731
    assert strip(shadowed) == strip(plain)


def test_slow_and_failing_members_give_a_degraded_answer_within_deadline(apps, split) -> None:
    """One member 10x slower than the deadline, another failing every call; with a quorum of 1
    the third member's vote is the answer, marked degraded, in the deadline's time."""
    with apps.faulty("quorum_one", mlp={"delay_s": 15.0}, xgb={"error_rate": 1.0}) as url:
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/predict", json={"instances": split.x_test[:3].tolist()}, timeout=30)
        elapsed = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["degraded"] and body["members"]["late"] == ["mlp"]
    assert "injected fault" in body["members"]["failed"]["xgb"]
    assert body["members"]["counted"] == ["logreg"]
    assert elapsed < 5.0  # bounded by the 1.5 s deadline, not the member's 15 s
    assert "Traceback" not in r.text


def test_non_finite_member_output_never_reaches_the_vote(apps) -> None:
    # With the input bound lifted to float32's largest value, -3e38 reaches the members:
    # logreg raises on it and the MLP answers NaN. Only XGBoost's answer may be counted.
    # (A generous deadline so that no member is merely late on a loaded machine.)
    url = apps.url("quorum_one")
    row = [1.0] * 5 + [-3e38] + [1.0] * 24
    r = httpx.post(f"{url}/predict", json={"instances": [row]}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["members"]["counted"] == ["xgb"] and body["degraded"]
    assert body["members"]["failed"]["mlp"] == "error: non-finite probabilities"
    assert "ValueError" in body["members"]["failed"]["logreg"]
    pred = body["predictions"][0]
    assert set(pred["votes"]) == {"xgb"} and math.isfinite(pred["p_benign"])


# Last: the default app's MLP replica is killed (Serve starts another meanwhile).
def test_killed_member_replica_gives_degraded_answer_never_a_hang(apps, split) -> None:
    import ray

    url = apps.url("default")
    # Rows the cascade's gate is unsure about, so that every member is asked for them.
    probe = httpx.post(
        f"{url}/predict", json={"instances": split.x_test[:40].tolist()}, timeout=30
    ).json()
    rows = [
        split.x_test[i].tolist()
        for i, p in enumerate(probe["predictions"])
        if p["decided_by"] == "ensemble"
    ][:3]
    assert rows
    replicas = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if f"::{APPS['default'][0]}#member_mlp#" in a["name"]
    ]
    assert len(replicas) == 1, replicas
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]))
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/predict", json={"instances": rows}, timeout=30)
    assert time.perf_counter() - t0 < 2.0  # the 250 ms deadline, not a hang
    assert r.status_code == 200, r.text
    body = r.json()
    # Serve notices the dead replica and starts another within seconds; until then the
    # member is either refused (failed) or never answers (late): either way it does not count.
    assert body["degraded"] and body["members"]["counted"] == ["logreg", "xgb"]
    assert "mlp" in body["members"]["late"] or "mlp" in body["members"]["failed"]
    assert "Traceback" not in r.text

"""The ensemble's request flow without Serve: ``VotingEnsemble`` over the real members loaded
from the store and the real ShadowRecorder, called in-process (plain asyncio)."""

import asyncio
import math
import time
from typing import Any

import numpy as np
import pytest

from core.errors import Conflict, NotFound, PayloadTooLarge, ServiceUnavailable, Unprocessable
from core.model_store import ModelStore
from patterns.ensemble.artifacts import ensure_artifacts, evaluate
from patterns.ensemble.data import N_FEATURES, load_split
from patterns.ensemble.flow import FLOAT32_MAX, EnsembleArgs, VotingEnsemble
from patterns.ensemble.members import Member
from patterns.ensemble.shadow import ShadowRecorder
from tests.ensemble.local import LocalHandle, assert_votes_decide


@pytest.fixture(scope="module")
def store() -> ModelStore:
    ensure_artifacts()
    return ModelStore.open()


@pytest.fixture(scope="module")
def split():
    return load_split()


def _args(**overrides: Any) -> EnsembleArgs:
    return EnsembleArgs(**{**EnsembleArgs().model_dump(), **overrides})


def _flow(store: ModelStore, args: EnsembleArgs) -> VotingEnsemble:
    """The flow as the app builds it, over the real members and recorder in this process."""
    members = {m.name: LocalHandle(Member(m, store)) for m in args.members}
    ch = args.challenger.member
    challenger = LocalHandle(Member(ch, store)) if ch else None
    recorder = ShadowRecorder.func_or_class(
        args.challenger.gate.model_dump(), ch.name if ch else None, args.max_instances
    )
    return VotingEnsemble.from_args(args, members, challenger, LocalHandle(recorder))


def _members(**faults: dict[str, float]) -> list[dict[str, Any]]:
    out = []
    for m in EnsembleArgs().members:
        d = m.model_dump()
        if m.name in faults:
            d["fault"] = faults[m.name]
        out.append(d)
    return out


def _predict(flow: VotingEnsemble, rows: Any, pid: str = "t") -> dict[str, Any]:
    rows = rows.tolist() if isinstance(rows, np.ndarray) else rows
    return asyncio.run(flow.predict(rows, pid))


def test_served_cascade_is_the_evaluated_cascade(store, split) -> None:
    """The flow's answers on the held-out split are exactly what artifacts.py evaluates."""
    args = _args(challenger={"member": None})
    flow = _flow(store, args)
    probs = {
        m.name: Member(m, store).predict_proba(split.x_test) for m in args.members
    }  # independent of the flow: each member's own probabilities

    async def all_rows() -> list[dict[str, Any]]:
        out = []
        for start in range(0, len(split.x_test), args.max_instances):
            chunk = split.x_test[start : start + args.max_instances].tolist()
            out += (await flow.predict(chunk, "t"))["predictions"]
        return out

    preds = asyncio.run(all_rows())
    labels = np.array([p["label"] for p in preds])
    report = evaluate(store, args)["cascade"]
    assert float((labels == split.y_test).mean()) == pytest.approx(report["accuracy"], abs=1e-4)
    by_gate = [p["decided_by"] == "gate:logreg" for p in preds]
    assert np.mean(by_gate) == pytest.approx(report["share_answered_by_gate"], abs=1e-4)
    for i, p in enumerate(preds):
        if by_gate[i]:
            expected = probs["logreg"][i]
            assert expected <= 0.02 or expected >= 0.98
        else:  # soft vote: the mean of the three members' probabilities
            expected = np.mean([probs[k][i] for k in ("logreg", "xgb", "mlp")])
        assert p["p_benign"] == pytest.approx(expected, abs=1e-4)
        assert p["label"] == int(expected >= 0.5)


@pytest.mark.parametrize("mode", ["soft", "hard", "weighted"])
def test_vote_matches_member_outputs(store, split, mode) -> None:
    flow = _flow(store, _args(voting=mode, selection={"mode": "all"}))
    body = _predict(flow, split.x_test[:40])
    assert_votes_decide(body, mode)
    assert set(body["members"]["elapsed_ms"]) == {"logreg", "mlp", "xgb"}
    assert set(body["timings_ms"]) == {"fan_out", "total"}  # no gate in mode "all"


def test_answer_shape_and_timings(store, split) -> None:
    body = _predict(_flow(store, _args()), split.x_test[:40], pid="req-1")
    assert body["prediction_id"] == "req-1" and not body["degraded"]
    assert set(body["timings_ms"]) == {"gate", "fan_out", "total"}
    assert body["timings_ms"]["total"] >= body["timings_ms"]["gate"] > 0
    assert body["model_versions"] == {"logreg": "v1", "xgb": "v1", "mlp": "v1"}
    assert body["challenger"] == {"name": "xgb_v2", "status": "shadow"}
    decided = {p["decided_by"] for p in body["predictions"]}
    assert decided == {"ensemble", "gate:logreg"}


def test_confident_rows_only_ask_the_gate(store, split) -> None:
    flow = _flow(store, _args(challenger={"member": None}))
    gate = Member(EnsembleArgs().members[0], store).predict_proba(split.x_test)
    sure = split.x_test[(gate <= 0.02) | (gate >= 0.98)][:5]
    body = _predict(flow, sure)
    assert body["members"]["counted"] == ["logreg"]
    assert set(body["timings_ms"]) == {"gate", "total"}  # nobody else was asked
    assert {p["decided_by"] for p in body["predictions"]} == {"gate:logreg"}


def test_slow_member_is_late_and_the_answer_keeps_the_deadline(store, split) -> None:
    flow = _flow(store, _args(members=_members(mlp={"delay_s": 5.0}), selection={"mode": "all"}))
    t0 = time.perf_counter()
    body = _predict(flow, split.x_test[:3])
    assert time.perf_counter() - t0 < 1.5  # the 250 ms deadline, not the member's 5 s
    assert body["degraded"] and body["members"]["late"] == ["mlp"]
    assert body["members"]["counted"] == ["logreg", "xgb"]
    assert body["members"]["elapsed_ms"]["mlp"] == 250.0


def test_failing_member_is_listed_and_left_out(store, split) -> None:
    flow = _flow(store, _args(members=_members(xgb={"error_rate": 1.0}), selection={"mode": "all"}))
    body = _predict(flow, split.x_test[:3])
    assert body["degraded"] and "injected fault" in body["members"]["failed"]["xgb"]
    assert body["members"]["counted"] == ["logreg", "mlp"]


def test_late_gate_sends_every_row_to_the_vote(store, split) -> None:
    flow = _flow(store, _args(members=_members(logreg={"delay_s": 5.0})))
    body = _predict(flow, split.x_test[:5])
    assert body["members"]["late"] == ["logreg"] and body["members"]["counted"] == ["mlp", "xgb"]
    assert {p["decided_by"] for p in body["predictions"]} == {"ensemble"}
    assert body["members"]["elapsed_ms"]["logreg"] == 150.0  # the gate's own deadline


def test_quorum_lost_is_one_503_naming_each_failure(store, split) -> None:
    flow = _flow(
        store,
        _args(
            members=_members(xgb={"error_rate": 1.0}, mlp={"delay_s": 5.0}),
            selection={"mode": "all"},
        ),
    )
    with pytest.raises(ServiceUnavailable) as err:
        _predict(flow, split.x_test[:2])
    msg = err.value.message
    assert "Only 1 of 3 ensemble members" in msg and "quorum is 2" in msg
    assert "mlp: timeout" in msg and "xgb: error: RuntimeError: injected fault" in msg


def test_the_gates_vote_counts_towards_the_quorum(store, split) -> None:
    # Cascade on: the gate answered, both others failed; two uncertain rows need a vote.
    gate = Member(EnsembleArgs().members[0], store).predict_proba(split.x_test)
    unsure = split.x_test[(gate > 0.02) & (gate < 0.98)][:2]
    flow = _flow(store, _args(members=_members(xgb={"error_rate": 1.0}, mlp={"delay_s": 5.0})))
    with pytest.raises(ServiceUnavailable, match="Only 1 of 3 ensemble members"):
        _predict(flow, unsure)
    flow = _flow(store, _args(members=_members(xgb={"error_rate": 1.0}), quorum=2))
    body = _predict(flow, unsure)
    assert body["members"]["counted"] == ["logreg", "mlp"]


def test_non_finite_member_output_never_reaches_the_vote(store) -> None:
    # With the input bound lifted to float32's largest value, -3e38 reaches the members:
    # logreg raises on it and the MLP answers NaN. Only XGBoost's answer may be counted.
    flow = _flow(
        store,
        _args(max_abs_feature=FLOAT32_MAX, quorum=1, selection={"mode": "all"}, deadline_ms=1500),
    )
    body = _predict(flow, [[1.0] * 5 + [-3e38] + [1.0] * 24])
    assert body["members"]["counted"] == ["xgb"] and body["degraded"]
    assert body["members"]["failed"]["mlp"] == "error: non-finite probabilities"
    assert "ValueError" in body["members"]["failed"]["logreg"]
    pred = body["predictions"][0]
    assert set(pred["votes"]) == {"xgb"} and math.isfinite(pred["p_benign"])


@pytest.mark.parametrize(
    ("rows", "error", "phrase"),
    [
        ([[1.0] * 29], Unprocessable, "Row 0 has 29 features"),
        ([[1e300] + [1.0] * 29], Unprocessable, "Row 0, column 0 (mean radius) is 1e+300"),
        ([[float("nan")] + [1.0] * 29], Unprocessable, "finite number"),
        ([[1.0] * N_FEATURES] * 65, PayloadTooLarge, "at most 64"),
    ],
)
def test_bad_rows_are_refused_before_any_member_is_asked(store, rows, error, phrase) -> None:
    flow = _flow(store, _args(members=_members(logreg={"error_rate": 1.0})))
    with pytest.raises(error) as err:
        _predict(flow, rows)
    assert phrase in err.value.message


def test_shadow_neither_changes_nor_delays_the_answer_and_is_recorded(store, split) -> None:
    rows = split.x_test[:20].tolist()
    plain = _predict(
        _flow(store, _args(selection={"mode": "all"}, challenger={"member": None})), rows
    )
    assert plain["challenger"]["status"] == "none"
    slow_ch = {
        "name": "xgb_v2",
        "family": "xgboost",
        "model": "ensemble-xgb",
        "version": "v2",
        "fault": {"delay_s": 0.5},
    }
    flow = _flow(store, _args(selection={"mode": "all"}, challenger={"member": slow_ch}))

    async def run() -> tuple[dict[str, Any], float, dict[str, Any]]:
        t0 = time.perf_counter()
        shadowed = await flow.predict(rows, "p1")
        elapsed = time.perf_counter() - t0
        await flow.shadows_settled()  # the copy lands after the answer
        return shadowed, elapsed, await flow.challenger_stats()

    shadowed, elapsed, stats = asyncio.run(run())
    assert elapsed < 0.45  # the 0.5 s challenger is not on the request path
    strip = lambda b: [(p["label"], p["p_benign"]) for p in b["predictions"]]  # noqa: E731
    assert strip(shadowed) == strip(plain) and shadowed["challenger"]["status"] == "shadow"
    assert stats["shadowed_predictions"] == 1 and stats["agreement"] >= 0.9


def test_feedback_promotion_and_rollback(store, split) -> None:
    gate = {"min_samples": 5, "min_labeled": 10, "min_agreement": 0.8, "max_accuracy_drop": 0.1}
    challenger = {**EnsembleArgs().challenger.model_dump(), "gate": gate}
    flow = _flow(store, _args(selection={"mode": "all"}, challenger=challenger))
    x, y = split.x_test, split.y_test

    async def run() -> None:
        with pytest.raises(Conflict, match="shadowed predictions"):
            await flow.promote()
        for i in range(6):
            body = await flow.predict(x[i * 4 : i * 4 + 4].tolist(), f"p{i}")
            await flow.shadows_settled()
            with pytest.raises(Unprocessable, match="had 4 rows; got 1 labels"):
                await flow.feedback(body["prediction_id"], [1])
            with pytest.raises(Unprocessable, match="65 labels, but a prediction has at most 64"):
                await flow.feedback(body["prediction_id"], [1] * 65)
            labels = [int(v) for v in y[i * 4 : i * 4 + 4]]
            fb = await flow.feedback(body["prediction_id"], labels)
            assert fb == {"status": "recorded", "rows": 4}
        assert (await flow.feedback("unknown", [1]))["status"] == "held"
        promoted = await flow.promote()
        assert promoted["promoted"]
        body = await flow.predict(x[:2].tolist(), "after")
        assert body["challenger"]["status"] == "voting" and "xgb_v2" in body["members"]["counted"]
        with pytest.raises(Conflict, match="is promoted"):
            await flow.feedback("after", [int(v) for v in y[:2]])
        back = await flow.rollback()
        assert back["changed"] and not back["promoted"]
        body = await flow.predict(x[:2].tolist(), "again")
        assert body["challenger"]["status"] == "shadow"
        assert "xgb_v2" not in body["members"]["counted"]

    asyncio.run(run())


def test_without_a_challenger_feedback_and_promotion_are_404(store) -> None:
    flow = _flow(store, _args(challenger={"member": None}))
    with pytest.raises(NotFound, match="feedback is not collected"):
        asyncio.run(flow.feedback("p", [1]))
    with pytest.raises(NotFound, match="No challenger is configured"):
        asyncio.run(flow.promote())


def test_model_reports_versions_devices_and_held_out_accuracy(store) -> None:
    info = asyncio.run(_flow(store, _args()).model())
    assert set(info["members"]) == {"logreg", "xgb", "mlp"}
    for name, member in info["members"].items():
        assert member["device"] == "cpu" and member["version"] == "v1"
        assert 0.9 < member["held_out"]["accuracy"] <= 1.0, name
        assert member["held_out"]["n_test"] == 171
    assert info["members"]["xgb"]["weight"] == 1.5
    assert info["challenger_model"]["version"] == "v2"
    assert info["challenger"]["challenger"] == "xgb_v2"


class _LateFirst:
    """A real member whose first ``n`` predictions are late (a replica warming up, a starved
    core), then on time."""

    def __init__(self, member: Member, n: int) -> None:
        self.member, self.n = member, n

    async def predict(self, rows: Any) -> dict[str, Any]:
        if self.n > 0:
            self.n -= 1
            await asyncio.sleep(5.0)
        return await self.member.predict(rows)

    def info(self) -> dict[str, Any]:
        return self.member.info()


def _flow_late_first(store: ModelStore, args: EnsembleArgs, late: dict[str, int]) -> Any:
    members = {
        m.name: LocalHandle(_LateFirst(Member(m, store), late.get(m.name, 0))) for m in args.members
    }
    recorder = ShadowRecorder.func_or_class(args.challenger.gate.model_dump(), None, 64)
    return VotingEnsemble.from_args(args, members, None, LocalHandle(recorder))


def test_a_quorum_missed_only_by_late_members_gets_the_fan_out_once_more(store, split) -> None:
    args = _args(selection={"mode": "all"}, challenger={"member": None})
    flow = _flow_late_first(store, args, {"xgb": 1, "mlp": 1})
    body = _predict(flow, split.x_test[:3])
    assert not body["degraded"] and body["members"]["counted"] == ["logreg", "mlp", "xgb"]
    assert {"fan_out", "fan_out_2"} <= set(body["timings_ms"])


def test_late_members_twice_and_no_retry_configured_are_503s(store, split) -> None:
    args = _args(selection={"mode": "all"}, challenger={"member": None})
    with pytest.raises(ServiceUnavailable):  # late on every try
        _predict(_flow_late_first(store, args, {"xgb": 3, "mlp": 3}), split.x_test[:2])
    no_retry = _args(selection={"mode": "all"}, challenger={"member": None}, late_retries=0)
    with pytest.raises(ServiceUnavailable):
        _predict(_flow_late_first(store, no_retry, {"xgb": 1, "mlp": 1}), split.x_test[:2])


class _LostFirst(_LateFirst):
    """A member whose replica is lost on the first call (raises Ray's ActorDiedError), then
    answers from its replacement."""

    async def predict(self, rows: Any) -> dict[str, Any]:
        if self.n > 0:
            from ray.exceptions import ActorDiedError

            self.n -= 1
            raise ActorDiedError()
        return await self.member.predict(rows)


def test_a_quorum_missed_by_a_lost_replica_is_tried_again_but_not_by_an_error(store, split):
    args = _args(selection={"mode": "all"}, challenger={"member": None})
    members = {
        m.name: LocalHandle(
            (_LostFirst if m.name == "xgb" else _LateFirst)(
                Member(m, store), 1 if m.name in ("xgb", "mlp") else 0
            )
        )
        for m in args.members
    }
    recorder = ShadowRecorder.func_or_class(args.challenger.gate.model_dump(), None, 64)
    body = _predict(
        VotingEnsemble.from_args(args, members, None, LocalHandle(recorder)), split.x_test[:2]
    )
    assert not body["degraded"] and "fan_out_2" in body["timings_ms"]


def test_user_config_switches_a_member_fault_live(store) -> None:
    """``EnsembleMember.reconfigure`` (what Serve calls for a new user_config): ``fault`` turns
    the chaos knob on or off on the loaded member; a user_config without it keeps the fault;
    a bad one is refused and changes nothing. (Through Serve: test_app.py's fault tests.)"""
    from patterns.ensemble.deployments import EnsembleMember

    spec = EnsembleArgs().members[1]
    deployment = EnsembleMember.func_or_class(spec.model_dump(), None, False)
    knobs = dict(EnsembleMember.user_config)
    deployment.reconfigure(knobs)
    assert deployment.info()["fault"] == {"delay_s": 0.0, "error_rate": 0.0}
    deployment.reconfigure({**knobs, "fault": {"error_rate": 1.0}})
    with pytest.raises(RuntimeError, match="injected fault in member xgb"):
        asyncio.run(deployment.member.inject_fault())
    deployment.reconfigure({**knobs, "max_batch_size": 8})
    assert (
        deployment.info()["fault"]["error_rate"] == 1.0 and deployment.batching.max_batch_size == 8
    )
    with pytest.raises(ValueError):
        deployment.reconfigure({"fault": {"delay_s": -1}})
    assert deployment.info()["fault"]["error_rate"] == 1.0
    deployment.reconfigure({"fault": {}})
    asyncio.run(deployment.member.inject_fault())  # off again: no error
    assert deployment.info()["fault"] == {"delay_s": 0.0, "error_rate": 0.0}

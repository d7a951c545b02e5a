"""The ensemble's guards without Serve: args validation, member-answer checks, the recorder,
the promotion state read in the background."""

import asyncio
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from patterns.ensemble.app import build_app
from patterns.ensemble.artifacts import configured_args
from patterns.ensemble.flow import EnsembleArgs, VotingEnsemble, usable_proba
from patterns.ensemble.members import MemberSpec
from patterns.ensemble.shadow import ShadowRecorder


def test_weights_must_be_positive() -> None:
    # A zero weight could leave weighted voting with nothing to divide by.
    with pytest.raises(ValidationError, match="greater than 0"):
        MemberSpec(name="a", family="sklearn", model="m", weight=0)


def test_family_is_the_members_module_literal() -> None:
    with pytest.raises(ValidationError, match="sklearn"):
        MemberSpec(name="a", family="lightgbm", model="m")


def test_usable_proba_refuses_what_cannot_be_voted_on() -> None:
    proba, problem = usable_proba({"proba": [0.1, 0.9]}, 2)
    assert problem is None and proba is not None and proba.tolist() == [0.1, 0.9]
    assert usable_proba({"proba": [0.1, float("nan")]}, 2) == (
        None,
        "error: non-finite probabilities",
    )
    assert usable_proba({"proba": [np.inf, 0.5]}, 2)[1] == "error: non-finite probabilities"
    assert usable_proba({"proba": [0.5]}, 2)[1] == "error: 1 probabilities for 2 rows"
    assert usable_proba({"proba": [[0.5, 0.5]]}, 2)[1] == "error: 2 probabilities for 2 rows"
    assert usable_proba({"version": "v1"}, 1)[1] == "error: malformed answer"
    assert usable_proba({"proba": "abc"}, 1)[1] == "error: malformed answer"


def _recorder(**kw: Any) -> Any:
    return ShadowRecorder.func_or_class({"min_samples": 1, "min_labeled": 0}, "ch", **kw)


def test_early_labels_are_bounded_in_number_and_size() -> None:
    rec = _recorder(max_rows=4, keep_early=3)
    for i in range(10):
        assert rec.feedback(f"id{i}", [1, 0]) == {"status": "held"}
    assert list(rec._early) == ["id7", "id8", "id9"]
    assert rec.feedback("big", [1] * 5) == {"status": "too_many", "max_rows": 4}
    assert "big" not in rec._early


def test_early_labels_are_scored_when_the_shadow_copy_arrives() -> None:
    rec = _recorder()
    assert rec.feedback("p", [1, 0])["status"] == "held"
    rec.record("p", [1, 0], [1, 1], 5.0)
    stats = rec.stats()
    assert stats["labeled_rows"] == 2 and stats["challenger_accuracy"] == 0.5


def test_feedback_while_promoted_is_refused_not_held() -> None:
    rec = _recorder()
    rec.record("before", [1], [1], 5.0)
    assert rec.promote()["promoted"]
    assert rec.feedback("before", [1])["status"] == "recorded"  # recorded earlier: scored
    assert rec.feedback("after", [1]) == {"status": "promoted"}
    assert not rec._early
    rec.rollback()
    assert rec.feedback("after", [1]) == {"status": "held"}


def test_report_reads_config_yaml() -> None:
    args = configured_args()
    assert isinstance(args, EnsembleArgs)
    assert [m.name for m in args.members] == ["logreg", "xgb", "mlp"]
    assert args.challenger.member is not None and args.challenger.member.version == "v2"
    assert (args.selection.low, args.selection.high) == (0.02, 0.98)


class _FakeRecorder:
    """Stands in for the ShadowRecorder handle: ``state.remote()`` answers ``reply``, raises
    it when it is an exception, or never answers when it is None; with ``hold`` set, it
    answers only once ``release`` is set."""

    def __init__(self, reply: Any, hold: bool = False) -> None:
        self.reply = reply
        self.reads = 0
        self.release = asyncio.Event()
        if not hold:
            self.release.set()
        self.state = self  # recorder.state.remote()

    def remote(self) -> Any:
        self.reads += 1

        async def answer() -> Any:
            await self.release.wait()
            if self.reply is None:
                await asyncio.Event().wait()  # never answers
            if isinstance(self.reply, Exception):
                raise self.reply
            return self.reply

        return answer()


def _flow_reading(recorder: _FakeRecorder) -> Any:
    """The app's request flow with no members and a challenger that is never called."""
    return VotingEnsemble.from_args(EnsembleArgs(), {}, object(), recorder)


def test_promotion_state_is_read_in_the_background() -> None:
    async def scenario() -> None:
        # A recorder that never answers: requests keep the last known state, one read at most.
        hung = _FakeRecorder(None)
        flow = _flow_reading(hung)
        flow._promoted = True
        for _ in range(50):
            assert flow._challenger_promoted() is True
            await asyncio.sleep(0)
        assert hung.reads == 1
        flow._promotion_task.cancel()

        # A failing recorder: the last known state stays.
        failing = _FakeRecorder(RuntimeError("recorder down"))
        flow = _flow_reading(failing)
        flow._promoted = True
        flow._challenger_promoted()
        for _ in range(5):
            await asyncio.sleep(0)
        assert failing.reads == 1 and flow._challenger_promoted() is True
        flow._promotion_task.cancel()

        # A working recorder: its state is applied...
        ok = _FakeRecorder({"challenger": "xgb_v2", "promoted": True})
        flow = _flow_reading(ok)
        assert flow._challenger_promoted() is False  # nothing read yet
        for _ in range(5):
            await asyncio.sleep(0)
        assert flow._challenger_promoted() is True
        flow._promotion_task.cancel()

        # ...unless this replica promoted or rolled back while the read was in flight.
        stale = _FakeRecorder({"challenger": "xgb_v2", "promoted": False}, hold=True)
        flow = _flow_reading(stale)
        flow._challenger_promoted()
        await asyncio.sleep(0)
        assert stale.reads == 1  # the read is in flight...
        flow._set_promoted(True)  # ...when POST /challenger/promote lands here
        stale.release.set()  # and it answers the state from before the promotion
        for _ in range(5):
            await asyncio.sleep(0)
        assert stale.reads == 1 and flow._challenger_promoted() is True
        flow._promotion_task.cancel()

    asyncio.run(scenario())


def test_builder_refuses_rosters_that_cannot_vote() -> None:
    with pytest.raises(ValueError, match="quorum 4 is larger than the roster"):
        build_app(EnsembleArgs(quorum=4))
    with pytest.raises(ValueError, match="must be unique"):
        build_app({"members": [m.model_dump() for m in EnsembleArgs().members * 2]})
    with pytest.raises(ValueError, match="cascade gate 'nope' is not a member"):
        build_app({"selection": {"gate_member": "nope"}})
    clash = {"member": {"name": "xgb", "family": "xgboost", "model": "ensemble-xgb"}}
    with pytest.raises(ValueError, match="also a member's"):
        build_app({"challenger": clash})


def test_builder_without_args_builds_the_defaults() -> None:
    """``build_app()`` (None) is the app config.yaml describes: args, a dict or nothing."""

    def ingress_args(app: object) -> dict:
        return app._bound_deployment.init_args[-1]  # type: ignore[attr-defined]

    defaults = EnsembleArgs().model_dump()
    assert ingress_args(build_app()) == ingress_args(build_app(None)) == defaults
    assert ingress_args(build_app({})) == ingress_args(build_app(EnsembleArgs())) == defaults


def test_readme_example_block_parses() -> None:
    """The README's example (checked against a live answer in test_app.py) is where the
    client writes it, and is a whole answer."""
    from patterns.ensemble import client

    shown = client.readme_answer(client.README.read_text())
    assert len(shown["predictions"]) == 3 and set(shown["timings_ms"]) >= {"total"}
    assert client.stable_fields(shown)["members"]["counted"] == ["logreg", "mlp", "xgb"]

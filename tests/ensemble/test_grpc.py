"""gRPC for the ensemble without Serve: the committed stubs are what ensemble.proto generates,
and ``grpc_service.predict`` answers over a real gRPC channel (an in-process grpc.aio server
around the real request flow) with the HTTP answer's values or the right status code.

(The same through Serve's gRPC proxy, configured by config.yaml's grpc_options, is in
tests/ops/test_grpc.py.)
"""

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from core.model_store import ModelStore
from patterns.ensemble import ensemble_pb2 as pb
from patterns.ensemble import ensemble_pb2_grpc as pb_grpc
from patterns.ensemble import grpc_service
from patterns.ensemble.artifacts import ensure_artifacts
from patterns.ensemble.data import N_FEATURES, load_split
from patterns.ensemble.flow import EnsembleArgs, VotingEnsemble
from patterns.ensemble.grpc_client import request_of
from patterns.ensemble.members import Member
from patterns.ensemble.shadow import ShadowRecorder
from tests.ensemble.local import LocalHandle

ROOT = Path(__file__).resolve().parents[2]
PROTO = "patterns/ensemble/ensemble.proto"
STUBS = ("patterns/ensemble/ensemble_pb2.py", "patterns/ensemble/ensemble_pb2_grpc.py")


def test_committed_stubs_are_what_the_proto_generates(tmp_path: Path) -> None:
    """Regenerate with grpcio-tools (the pinned version) from the same relative path, as the
    proto's header says, and compare byte for byte."""
    (tmp_path / PROTO).parent.mkdir(parents=True)
    shutil.copy(ROOT / PROTO, tmp_path / PROTO)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            "--python_out=.",
            "--grpc_python_out=.",
            PROTO,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    for stub in STUBS:
        assert (tmp_path / stub).read_bytes() == (ROOT / stub).read_bytes(), (
            f"{stub} is stale: regenerate it with the command in {PROTO}"
        )


@pytest.fixture(scope="module")
def flow():
    ensure_artifacts()
    store = ModelStore.open()
    args = EnsembleArgs(challenger={"member": None})
    members = {m.name: LocalHandle(Member(m, store)) for m in args.members}
    recorder = ShadowRecorder.func_or_class(args.challenger.gate.model_dump(), None)
    return VotingEnsemble.from_args(args, members, None, LocalHandle(recorder))


class _Servicer(pb_grpc.EnsembleServiceServicer):
    def __init__(self, flow: Any) -> None:
        self.flow = flow

    async def Predict(self, request: pb.PredictRequest, context: Any) -> pb.PredictReply:
        return await grpc_service.predict(self.flow, request, context, "grpc-test")


def _call(flow: Any, requests: list[pb.PredictRequest]) -> list[Any]:
    """Each request over a loopback channel to a grpc.aio server around ``flow``: the reply,
    or the ``grpc.aio.AioRpcError`` it raised."""

    async def run() -> list[Any]:
        server = grpc.aio.server()
        pb_grpc.add_EnsembleServiceServicer_to_server(_Servicer(flow), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        out: list[Any] = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.EnsembleServiceStub(channel)
                for request in requests:
                    try:
                        out.append(await stub.Predict(request, timeout=30))
                    except grpc.aio.AioRpcError as err:
                        out.append(err)
        finally:
            await server.stop(None)
        return out

    return asyncio.run(run())


def test_reply_carries_the_http_answer(flow) -> None:
    rows = load_split().x_test[:5].tolist()
    (reply,) = _call(flow, [request_of(rows)])
    answer = asyncio.run(flow.predict(rows, "grpc-test"))
    assert reply.prediction_id == "grpc-test"
    got = [(p.label, p.class_name, round(p.p_benign, 4), p.decided_by) for p in reply.predictions]
    want = [(p["label"], p["class"], p["p_benign"], p["decided_by"]) for p in answer["predictions"]]
    assert got == want
    assert [dict(p.votes) for p in reply.predictions] == [p["votes"] for p in answer["predictions"]]
    assert list(reply.members.counted) == answer["members"]["counted"]
    assert dict(reply.model_versions) == answer["model_versions"]
    assert not reply.degraded and reply.challenger_status == "none"
    assert set(reply.timings_ms) == set(answer["timings_ms"])


def test_refusals_are_status_codes_with_the_http_sentence(flow) -> None:
    good = [1.0] * N_FEATURES
    cases = [
        (request_of([[1.0] * 29]), "Row 0 has 29 features"),
        (request_of([good, [float("nan"), *good[1:]]]), "Row 1, column 0 (mean radius) is nan"),
        (request_of([[float("inf"), *good[1:]]]), "must be a finite number"),
        (request_of([[1e300, *good[1:]]]), "is 1e+300"),
        (pb.PredictRequest(), "instances is empty"),
        (request_of([good] * 65), "at most 64 per request"),
    ]
    errors = _call(flow, [req for req, _ in cases])
    for err, (_, phrase) in zip(errors, cases, strict=True):
        assert isinstance(err, grpc.aio.AioRpcError), err
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        assert phrase in err.details(), err.details()


def test_no_quorum_is_unavailable(flow) -> None:
    store = ModelStore.open()
    args = EnsembleArgs(
        members=[{**m.model_dump(), "fault": {"error_rate": 1.0}} for m in EnsembleArgs().members],
        selection={"mode": "all"},
        challenger={"member": None},
    )
    members = {m.name: LocalHandle(Member(m, store)) for m in args.members}
    recorder = ShadowRecorder.func_or_class(args.challenger.gate.model_dump(), None)
    broken = VotingEnsemble.from_args(args, members, None, LocalHandle(recorder))
    (err,) = _call(broken, [request_of([[1.0] * N_FEATURES])])
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "Only 0 of 3" in err.details() and "quorum is 2" in err.details()


def test_every_core_error_has_a_grpc_code() -> None:
    import core.errors as errors

    classes = [c for c in vars(errors).values() if isinstance(c, type)]
    statuses = {c.status_code for c in classes if issubclass(c, errors.HTTPError)} - {500}
    assert statuses <= set(grpc_service.GRPC_CODE_FOR_HTTP), statuses
    assert grpc_service.grpc_code(500) == grpc.StatusCode.INTERNAL

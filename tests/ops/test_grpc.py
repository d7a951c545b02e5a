"""The ensemble's Predict over a real gRPC channel through Serve's gRPC proxy, beside HTTP, on
the port the config gives (``grpc_options``), in the production-profile cluster of conftest.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import httpx
import pytest

from patterns.ensemble.data import N_FEATURES, load_split
from patterns.ensemble.grpc_client import predict
from patterns.ensemble.grpc_service import reply_of
from tests.ops.conftest import NOQUORUM

pytestmark = pytest.mark.slow  # starts the ops cluster (`make serve` on three apps): ~1-2 min

GOOD = [1.0] * N_FEATURES


@pytest.fixture(scope="module")
def channel(ops_cluster):
    with grpc.insecure_channel(ops_cluster.grpc_target) as ch:
        yield ch


def test_grpc_answers_what_http_answers(ops_cluster, channel) -> None:
    rows = load_split().x_test[:6].tolist()
    # The gate member has a deadline (gate_deadline_ms): on a busy box one call's gate can be
    # late, and then that call's vote decides every row. That is the ensemble's policy, not a
    # gRPC difference, so a pair that disagrees on who decided is sent again (up to 3 times).
    for _ in range(3):
        reply, request_id = predict(channel, rows)
        http = httpx.post(f"{ops_cluster.http_url}/ensemble/predict", json={"instances": rows})
        assert http.status_code == 200, http.text
        answer = http.json()
        # The request id Serve gave the call is the prediction id, as over HTTP.
        assert request_id and reply.prediction_id == request_id
        want = reply_of({**answer, "prediction_id": request_id})
        if [p.decided_by for p in reply.predictions] == [p.decided_by for p in want.predictions]:
            break
    assert [(p.label, p.decided_by) for p in reply.predictions] == [
        (p.label, p.decided_by) for p in want.predictions
    ]
    assert [round(p.p_benign, 4) for p in reply.predictions] == [
        p.p_benign for p in want.predictions
    ]
    assert dict(reply.model_versions) == answer["model_versions"]
    assert reply.challenger_name == "xgb_v2" and reply.challenger_status == "shadow"
    assert set(reply.timings_ms) >= {"total"}


@pytest.mark.parametrize(
    ("rows", "phrase"),
    [
        ([[1.0] * 29], "Row 0 has 29 features; every row needs 30"),
        ([GOOD, [float("nan"), *GOOD[1:]]], "Row 1, column 0 (mean radius) is nan"),
        ([[float("-inf"), *GOOD[1:]]], "must be a finite number"),
        ([[1e300, *GOOD[1:]]], "is 1e+300"),
        ([], "instances is empty"),
        ([GOOD] * 65, "send at most 64 per request"),
    ],
)
def test_bad_input_is_invalid_argument_with_a_sentence(channel, rows, phrase) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        predict(channel, rows)
    err = caught.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert phrase in err.details() and "Traceback" not in err.details()


def test_no_quorum_is_unavailable(channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        predict(channel, [GOOD], app=NOQUORUM)
    err = caught.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert "Only 0 of 1 ensemble members answered" in err.details()
    assert "quorum is 1" in err.details()


def test_unknown_app_is_not_found(channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        predict(channel, [GOOD], app="no-such-app")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_an_app_without_the_method_is_refused(channel) -> None:
    """business_logic serves HTTP only: the proxy cannot call Predict on it."""
    with pytest.raises(grpc.RpcError) as caught:
        predict(channel, [GOOD], app="business_logic")
    assert caught.value.code() != grpc.StatusCode.OK


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as the kernel lists them) with a socket in LISTEN on ``port``."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":
                out.add(address)
    return out


def test_grpc_listens_on_every_interface_http_on_loopback(ops_cluster) -> None:
    """In HAProxy mode (the default) HAProxy answers gRPC on the HTTP host (loopback here).
    With COOKBOOK_INGRESS_MODE=default, Serve 2.60's own gRPC proxy binds [::]:<port> and has
    no host option: ops/README.md says so; this fails the day that changes."""
    any_address = {"0" * 32, "0" * 8}
    grpc_bound = _listening(ops_cluster.grpc_port)
    from cluster.ingress_mode import DEFAULT_MODE

    if os.environ.get("COOKBOOK_INGRESS_MODE", DEFAULT_MODE).lower() == "haproxy":
        assert grpc_bound == {"0100007F"}, grpc_bound
    else:
        assert grpc_bound and grpc_bound <= any_address, grpc_bound
    assert _listening(ops_cluster.http_port) == {"0100007F"}  # 127.0.0.1

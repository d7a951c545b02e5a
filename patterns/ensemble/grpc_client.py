"""Call the ensemble's Predict over gRPC (ensemble.proto), beside the HTTP client.

    python -m patterns.ensemble.grpc_client [--target 127.0.0.1:9000] [--rows 3]
    python -m patterns.ensemble.grpc_client --compare 200 [--clients 4] [--url URL]

Needs the app served with ``grpc_options`` (``serve run patterns/ensemble/config.yaml`` or
``make serve``: port 9000). Serve's gRPC proxy finds the app by the ``application`` metadata
key; the answer is the HTTP answer's fields as protobuf, errors are gRPC status codes.
``--compare N`` sends N one-row requests over each transport with ``--clients`` callers at
once, alternating so both see the same machine, and prints p50/p95 latency per transport.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from typing import Any

import grpc
import httpx
from google.protobuf import json_format

from patterns.ensemble import ensemble_pb2 as pb
from patterns.ensemble import ensemble_pb2_grpc as pb_grpc
from patterns.ensemble.data import load_split

APP = "ensemble"  # the app's name in the serve config: gRPC requests are routed by it


def request_of(rows: list[list[float]]) -> pb.PredictRequest:
    return pb.PredictRequest(instances=[pb.Row(features=row) for row in rows])


def predict(
    channel: grpc.Channel, rows: list[list[float]], app: str = APP, timeout_s: float = 30.0
) -> tuple[pb.PredictReply, str]:
    """The reply and the request id Serve gave the call (trailing metadata ``request_id``,
    the reply's ``prediction_id``). A refusal raises ``grpc.RpcError`` with its code and
    sentence (``err.code()``, ``err.details()``)."""
    stub = pb_grpc.EnsembleServiceStub(channel)
    reply, call = stub.Predict.with_call(
        request_of(rows), metadata=(("application", app),), timeout=timeout_s
    )
    trailing = dict(call.trailing_metadata() or ())
    return reply, str(trailing.get("request_id", ""))


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def compare(target: str, url: str, n: int, clients: int) -> dict[str, dict[str, float]]:
    """p50/p95 ms of one-row predictions over HTTP and gRPC, ``clients`` callers at once."""
    rows = [r.tolist() for r in load_split().x_test]
    latencies: dict[str, list[float]] = {"http": [], "grpc": []}
    errors: dict[str, int] = {"http": 0, "grpc": 0}
    lock = threading.Lock()
    counter = iter(range(2 * n))

    def worker() -> None:
        with grpc.insecure_channel(target) as channel, httpx.Client(timeout=30) as http:
            stub = pb_grpc.EnsembleServiceStub(channel)
            for i in counter:
                row = [rows[(i // 2) % len(rows)]]
                transport = "grpc" if i % 2 else "http"
                t0 = time.perf_counter()
                try:
                    if transport == "grpc":
                        stub.Predict(request_of(row), metadata=(("application", APP),), timeout=30)
                    else:
                        http.post(f"{url}/predict", json={"instances": row}).raise_for_status()
                except (grpc.RpcError, httpx.HTTPError):
                    with lock:
                        errors[transport] += 1
                    continue
                with lock:
                    latencies[transport].append((time.perf_counter() - t0) * 1000)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        k: {
            "n": len(v),
            "errors": errors[k],
            "p50_ms": round(statistics.median(v), 2) if v else float("nan"),
            "p95_ms": round(_pct(v, 0.95), 2) if v else float("nan"),
        }
        for k, v in latencies.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:9000", help="Serve's gRPC host:port")
    parser.add_argument("--rows", type=int, default=3)
    parser.add_argument("--compare", type=int, metavar="N", help="latency: N requests each")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--url", default="http://127.0.0.1:8000/ensemble", help="for --compare")
    args = parser.parse_args()
    if args.compare:
        for transport, s in compare(args.target, args.url, args.compare, args.clients).items():
            print(
                f"{transport:<5} {s['n']} requests, {args.clients} clients: "
                f"p50 {s['p50_ms']} ms, p95 {s['p95_ms']} ms, errors {s['errors']}"
            )
        return 0
    split = load_split()
    rows = split.x_test[: args.rows].tolist()
    with grpc.insecure_channel(args.target) as channel:
        try:
            reply, request_id = predict(channel, rows)
        except grpc.RpcError as err:
            print(f"gRPC {err.code().name}: {err.details()}")
            return 1
    print(f"gRPC OK (request id {request_id})")
    answer: dict[str, Any] = json_format.MessageToDict(
        reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    print(json.dumps(answer, indent=2))
    print("true labels:", [int(v) for v in split.y_test[: args.rows]], "(1 = benign)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

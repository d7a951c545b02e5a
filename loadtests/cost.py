"""Cost per 1M requests from a measured rps, and a cluster extrapolation (a model).

Prices come from ``loadtests/prices.yaml`` (list prices, named with their date). Two parts:

- measured: cost per 1M requests on this box = the measured node's hourly price / requests
  served per hour at the SLO;
- modelled: for a target rps, CPU nodes each architecture needs if a node like this box
  serves what it served here, and, on GPUs, how many GPUs microservices (each model service
  its own whole GPUs) and composition (the models share GPUs by fractions) need, from a
  per-GPU capacity given in the YAML. Nothing in the model part was measured here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

PRICES = Path(__file__).resolve().parent / "prices.yaml"


def load_prices(path: str | Path | None = None) -> dict[str, Any]:
    import yaml

    prices = yaml.safe_load(Path(path or PRICES).read_text())
    for key in ("source", "nodes", "measured_node", "cluster"):
        if key not in prices:
            raise SystemExit(f"{path or PRICES}: the key {key!r} is missing")
    return prices


def cost_per_million(rps: float, hourly_usd: float) -> float:
    return float("inf") if rps <= 0 else hourly_usd / (rps * 3600) * 1e6


def cpu_nodes(target_rps: float, rps_per_node: float) -> int | None:
    """Nodes like the measured one for ``target_rps``; None when a node held no rps."""
    return math.ceil(target_rps / rps_per_node) if rps_per_node > 0 else None


def gpu_counts(target_rps: float, per_gpu_rps: float, share: dict[str, float]) -> dict[str, int]:
    """GPUs needed at ``target_rps`` (a model): microservices give each model service whole
    GPUs (sum of ceilings), composition packs the models' fractions onto shared GPUs
    (ceiling of the sum). Monolith: each replica holds all models on one GPU; its count
    equals composition's only if it batches as well, which this study did not measure."""
    load = {m: target_rps * f / per_gpu_rps for m, f in share.items()}
    micro = sum(max(1, math.ceil(v)) for v in load.values())
    comp = max(1, math.ceil(sum(load.values())))
    return {"microservices": micro, "serve": comp}


def gpu_curve(prices: dict[str, Any], rps_points: list[float]) -> list[dict[str, float]]:
    c = prices["cluster"]
    hourly = prices["nodes"][c["gpu_node"]]["usd_per_hour"]
    rows = []
    for r in rps_points:
        n = gpu_counts(r, c["gpu_rps_per_gpu"], c["gpu_share"])
        rows.append({"rps": r, **{k: v * hourly for k, v in n.items()}})
    return rows

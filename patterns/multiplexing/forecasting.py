"""One small demand forecaster per store: ridge regression on calendar features.

Each store sells a few product lines; each line's daily demand has a level, a trend, a weekly
and a yearly rhythm, and noise. A store's model is one weight matrix ``[lines, features]``
over the same calendar features (intercept, trend, Fourier terms for the week and the year),
so forecasting any future day is one small matrix product. This is the shape of Ray's own
multiplexing example (a forecaster per store); what differs between stores is only data.

Everything is deterministic: a store's series come from a seed derived with ``hashlib`` from
its id, so every machine trains the same 1,000 models bit for bit.

Artifacts (safe formats only): ``model.safetensors`` holds the weights (float32), and
``forecaster.json`` the line names, the feature spec and the holdout error.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

EPOCH = dt.date(2024, 1, 1)  # day 0 of the feature calendar
TRAIN_DAYS = 731  # 2024-01-01 .. 2025-12-31
HOLDOUT_DAYS = 28  # the last four weeks of the training window, scored before the refit
FIRST_FORECAST_DAY = EPOCH + dt.timedelta(days=TRAIN_DAYS)  # 2026-01-01
WEEKLY_TERMS = 3
YEARLY_TERMS = 2
N_FEATURES = 2 + 2 * WEEKLY_TERMS + 2 * YEARLY_TERMS  # intercept, trend, sin/cos pairs
RIDGE_ALPHA = 1.0
LINE_NAMES = (
    "produce", "dairy", "bakery", "meat", "seafood", "frozen", "pantry", "beverages",
    "snacks", "household", "personal-care", "baby", "pet", "deli", "flowers", "pharmacy",
)  # fmt: skip
FORMAT_VERSION = 1


def store_seed(model_id: str) -> int:
    """A 64-bit seed from the id (``hash()`` is salted per process: never use it for this)."""
    return int.from_bytes(hashlib.sha256(f"forecast:{model_id}".encode()).digest()[:8], "big")


def calendar_features(days: np.ndarray) -> np.ndarray:
    """``[len(days), N_FEATURES]`` float64 features for day numbers counted from EPOCH."""
    t = days.astype(np.float64)
    cols = [np.ones_like(t), t / 365.25]
    for k in range(1, WEEKLY_TERMS + 1):
        cols += [np.sin(2 * np.pi * k * t / 7), np.cos(2 * np.pi * k * t / 7)]
    for k in range(1, YEARLY_TERMS + 1):
        cols += [np.sin(2 * np.pi * k * t / 365.25), np.cos(2 * np.pi * k * t / 365.25)]
    return np.stack(cols, axis=1)


def store_lines(model_id: str) -> list[str]:
    """The product lines this store sells: 2 to 16 of them, depending on the store."""
    rng = np.random.default_rng(store_seed(model_id))
    n = int(rng.integers(2, len(LINE_NAMES) + 1))
    return sorted(rng.choice(LINE_NAMES, size=n, replace=False).tolist())


def generate_history(model_id: str, days: int = TRAIN_DAYS) -> tuple[list[str], np.ndarray]:
    """The store's daily demand, ``[days, lines]``, from its seed."""
    lines = store_lines(model_id)
    rng = np.random.default_rng(store_seed(model_id) + 1)
    t = np.arange(days, dtype=np.float64)
    n = len(lines)
    level = rng.lognormal(mean=4.0, sigma=0.8, size=n)  # ~55 units a day, widely spread
    trend = rng.normal(0.08, 0.15, size=n)  # yearly growth, -22% .. +38%
    weekly_amp = rng.uniform(0.05, 0.35, size=n)
    weekend_peak = rng.uniform(4.5, 6.5, size=n)  # which day of the week sells most
    yearly_amp = rng.uniform(0.0, 0.3, size=n)
    yearly_phase = rng.uniform(0, 2 * np.pi, size=n)
    noise = rng.normal(0, 0.08, size=(days, n))
    weekly = weekly_amp * np.cos(2 * np.pi * (t[:, None] - weekend_peak) / 7)
    yearly = yearly_amp * np.sin(2 * np.pi * t[:, None] / 365.25 + yearly_phase)
    demand = level * (1 + trend * t[:, None] / 365.25) * (1 + weekly + yearly + noise)
    return lines, np.maximum(demand, 0.0)


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float = RIDGE_ALPHA) -> np.ndarray:
    """Weights ``[targets, features]`` for ``y ~ x`` (intercept not penalised)."""
    penalty = alpha * np.eye(x.shape[1])
    penalty[0, 0] = 0.0
    return np.linalg.solve(x.T @ x + penalty, x.T @ y).T


@dataclass
class Forecaster:
    """A store's demand model: predict any day from the calendar alone."""

    model_id: str
    lines: list[str]
    weights: np.ndarray  # float32 [lines, N_FEATURES]
    holdout_mape: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Memory the cache charges for this model (weights plus its small JSON side)."""
        return int(self.weights.nbytes) + 64 * len(self.lines) + 512

    def predict_days(self, days: np.ndarray) -> np.ndarray:
        """``[len(days), lines]`` demand, never negative."""
        x = calendar_features(days).astype(np.float32)
        return np.maximum(x @ self.weights.T, 0.0)

    def to_files(self) -> dict[str, bytes]:
        from safetensors.numpy import save

        spec = {
            "format_version": FORMAT_VERSION,
            "model_id": self.model_id,
            "lines": self.lines,
            "features": {
                "epoch": EPOCH.isoformat(),
                "weekly_terms": WEEKLY_TERMS,
                "yearly_terms": YEARLY_TERMS,
            },
            "holdout_mape": self.holdout_mape,
            **self.meta,
        }
        return {
            "model.safetensors": save({"weights": np.ascontiguousarray(self.weights)}),
            "forecaster.json": json.dumps(spec, sort_keys=True).encode(),
        }

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> Forecaster:
        from safetensors.numpy import load

        spec = json.loads(files["forecaster.json"])
        weights = load(files["model.safetensors"])["weights"]
        if spec.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"forecaster format {spec.get('format_version')} is not supported")
        if weights.shape != (len(spec["lines"]), N_FEATURES) or weights.dtype != np.float32:
            raise ValueError(f"forecaster weights have shape {weights.shape}, {weights.dtype}")
        return cls(spec["model_id"], list(spec["lines"]), weights, spec["holdout_mape"])


def train_store(model_id: str, x_all: np.ndarray | None = None) -> Forecaster:
    """Fit one store: score on the last four weeks, then refit on the whole window."""
    lines, y = generate_history(model_id)
    x = calendar_features(np.arange(TRAIN_DAYS)) if x_all is None else x_all
    cut = TRAIN_DAYS - HOLDOUT_DAYS
    w_fit = _ridge(x[:cut], y[:cut])
    pred = np.maximum(x[cut:] @ w_fit.T, 0.0)
    actual = y[cut:]
    mape = float(np.mean(np.abs(pred - actual) / np.maximum(actual, 1.0)))
    weights = _ridge(x, y).astype(np.float32)
    return Forecaster(model_id, lines, weights, round(mape, 4))


def forecast_answer(model: Forecaster, start: dt.date, horizon_days: int) -> dict[str, Any]:
    """The JSON body of one forecast: dates, total demand and demand per line."""
    first = (start - EPOCH).days
    days = np.arange(first, first + horizon_days)
    demand = model.predict_days(days)
    return {
        "dates": [(start + dt.timedelta(days=i)).isoformat() for i in range(horizon_days)],
        "total": [round(float(v), 1) for v in demand.sum(axis=1)],
        "by_line": {
            line: [round(float(v), 1) for v in demand[:, j]] for j, line in enumerate(model.lines)
        },
    }

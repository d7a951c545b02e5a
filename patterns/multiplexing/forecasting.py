"""One demand forecaster per store: a seasonal ridge base plus a random-feature network.

Each store sells a few product lines; each line's daily demand has a level, a trend, a weekly
and a yearly rhythm that scale with the trend, and noise. A store's model has two parts over
the same calendar features (intercept, trend, Fourier terms for the week and the year):

- a ridge regression, ``base [lines, features]``: level, trend and the seasonal shapes;
- a one-hidden-layer network on what the base leaves (the interactions: a weekly swing that
  grows with the trend, a year that shifts the week): ``tanh(x @ hidden)`` with ``HIDDEN``
  units and a readout ``[lines, HIDDEN]``. The hidden layer is drawn per store from its seed
  and the readout is fitted in closed form (kernel ridge over the 731 training days), which is
  what keeps building 1,000 of them to well under a minute on two cores (gradient training
  of the same network would take hours).

The network is what makes a model about 100 KB on disk instead of 2 KB, and, with the
calendar it computes when loaded (``materialize``), about 200 KB in a replica's memory: the
size of a realistic per-tenant model, large enough that a replica's cache holds a fifth of
the 1,000 stores and loading one is a real cost. ``holdout_mape`` scores the whole model on
the last four weeks before the refit, and ``base_holdout_mape`` the ridge base alone (the
model before the network was added), so the gain is recorded with each model.

Everything is deterministic: a store's series come from a seed derived with ``hashlib`` from
its id, so every machine trains the same 1,000 models bit for bit.

Artifacts (safe formats only): ``model.safetensors`` holds the three weight matrices
(float32), and ``forecaster.json`` the line names, the feature spec and the holdout errors.
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
# Hidden units per store: the model's size (about 4 bytes x HIDDEN x (features + lines)) and
# its build time (one [days, days] kernel per store) both grow with it.
HIDDEN = 1024
HIDDEN_SCALE = 0.3  # std of the hidden weights: larger overfits the training years
READOUT_ALPHA = 50.0  # the network's ridge penalty: 5 overfits, 500 learns little
LINE_NAMES = (
    "produce", "dairy", "bakery", "meat", "seafood", "frozen", "pantry", "beverages",
    "snacks", "household", "personal-care", "baby", "pet", "deli", "flowers", "pharmacy",
)  # fmt: skip
FORMAT_VERSION = 2


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


def hidden_layer(model_id: str) -> np.ndarray:
    """The store's hidden weights ``[N_FEATURES, HIDDEN]`` (row 0, on the intercept, is the
    bias): random features drawn from the store's seed, stored with the model."""
    rng = np.random.default_rng(store_seed(model_id) + 2)
    hidden = rng.normal(0.0, HIDDEN_SCALE, size=(N_FEATURES, HIDDEN))
    hidden[0] = rng.uniform(-np.pi, np.pi, size=HIDDEN)
    return hidden.astype(np.float32)


@dataclass
class Forecaster:
    """A store's demand model: predict any day from the calendar alone."""

    model_id: str
    lines: list[str]
    base: np.ndarray  # float32 [lines, N_FEATURES]: the ridge part
    hidden: np.ndarray  # float32 [N_FEATURES, HIDDEN]
    readout: np.ndarray  # float32 [lines, HIDDEN]
    holdout_mape: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    table: np.ndarray | None = None  # float32 [days, lines] from `materialize`
    table_first_day: int = 0

    @property
    def nbytes(self) -> int:
        """Memory the cache charges for this model (weights, table, its small JSON side)."""
        arrays = self.base.nbytes + self.hidden.nbytes + self.readout.nbytes
        table = 0 if self.table is None else self.table.nbytes
        return int(arrays + table) + 64 * len(self.lines) + 512

    def _network(self, days: np.ndarray) -> np.ndarray:
        x = calendar_features(days).astype(np.float32)
        y = x @ self.base.T + np.tanh(x @ self.hidden) @ self.readout.T
        return np.maximum(y, 0.0)

    def materialize(self, first_day: int, n_days: int) -> Forecaster:
        """Compute every day of a bounded calendar once (at load), so a forecast is a slice.

        The API's calendar is finite (see forecast_service), so a replica pays the network
        over all of it when it loads the model, and nothing per request after that: the
        trade a cache makes worth it. Returns ``self``.
        """
        self.table = self._network(np.arange(first_day, first_day + n_days))
        self.table_first_day = first_day
        return self

    def predict_days(self, days: np.ndarray) -> np.ndarray:
        """``[len(days), lines]`` demand, never negative (from the table where it covers)."""
        t = self.table
        if t is not None and len(days):
            lo, hi = int(days.min()) - self.table_first_day, int(days.max()) - self.table_first_day
            if lo >= 0 and hi < len(t):
                return t[days - self.table_first_day]
        return self._network(days)

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
                "hidden": HIDDEN,
            },
            "holdout_mape": self.holdout_mape,
            **self.meta,
        }
        arrays = {"base": self.base, "hidden": self.hidden, "readout": self.readout}
        return {
            "model.safetensors": save({k: np.ascontiguousarray(v) for k, v in arrays.items()}),
            "forecaster.json": json.dumps(spec, sort_keys=True).encode(),
        }

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> Forecaster:
        from safetensors.numpy import load

        spec = json.loads(files["forecaster.json"])
        if spec.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"forecaster format {spec.get('format_version')} is not supported")
        arrays = load(files["model.safetensors"])
        n, h = len(spec["lines"]), spec["features"]["hidden"]
        shapes = {"base": (n, N_FEATURES), "hidden": (N_FEATURES, h), "readout": (n, h)}
        for name, shape in shapes.items():
            a = arrays.get(name)
            if a is None or a.shape != shape or a.dtype != np.float32:
                got = None if a is None else (a.shape, a.dtype)
                raise ValueError(f"forecaster {name} should be float32 {shape}, not {got}")
        meta = {k: spec[k] for k in ("base_holdout_mape",) if k in spec}
        return cls(
            spec["model_id"], list(spec["lines"]), arrays["base"], arrays["hidden"],
            arrays["readout"], spec["holdout_mape"], meta,
        )  # fmt: skip


def _mape(pred: np.ndarray, actual: np.ndarray) -> float:
    return round(float(np.mean(np.abs(pred - actual) / np.maximum(actual, 1.0))), 4)


def train_store(model_id: str, x_all: np.ndarray | None = None) -> Forecaster:
    """Fit one store: score on the last four weeks, then refit on the whole window.

    The readout is solved in its dual form (``[days, days]``, not ``[HIDDEN, HIDDEN]``): with
    731 days and 1,024 units that is the cheaper system, and the kernel of all days serves
    both the holdout fit (its top-left block) and the refit.
    """
    lines, y = generate_history(model_id)
    x = calendar_features(np.arange(TRAIN_DAYS)) if x_all is None else x_all
    hidden = hidden_layer(model_id)
    phi = np.tanh(x.astype(np.float32) @ hidden)
    kernel = (phi @ phi.T).astype(np.float64)
    cut = TRAIN_DAYS - HOLDOUT_DAYS

    def fit(n: int) -> tuple[np.ndarray, np.ndarray]:  # base weights, dual coefficients
        base = _ridge(x[:n], y[:n])
        residual = y[:n] - x[:n] @ base.T
        dual = np.linalg.solve(kernel[:n, :n] + READOUT_ALPHA * np.eye(n), residual)
        return base, dual

    base, dual = fit(cut)
    base_pred = x[cut:] @ base.T
    actual = y[cut:]
    base_mape = _mape(np.maximum(base_pred, 0.0), actual)
    mape = _mape(np.maximum(base_pred + kernel[cut:, :cut] @ dual, 0.0), actual)
    base, dual = fit(TRAIN_DAYS)
    readout = (phi.T.astype(np.float64) @ dual).T.astype(np.float32)
    return Forecaster(
        model_id, lines, base.astype(np.float32), hidden, readout, mape,
        {"base_holdout_mape": base_mape},
    )  # fmt: skip


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

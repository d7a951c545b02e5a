"""Ensemble members: three model families behind one ``predict_proba`` interface.

Every member answers P(benign) for a 2-D float array. Loading goes through the core model
store only (skops for scikit-learn, UBJ for XGBoost, safetensors for PyTorch): no pickle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from core.model_store import ModelRef, ModelStore
from patterns.ensemble.data import N_FEATURES, seed_of

Family = Literal["sklearn", "xgboost", "torch"]


class Predictor(Protocol):
    def predict_proba(self, x: np.ndarray) -> np.ndarray: ...


def build_mlp(hidden: int = 32) -> Any:
    """A small MLP whose input standardisation lives in buffers, so one safetensors file
    carries the whole model (no side scaler to lose or mismatch)."""
    import torch
    from torch import nn

    class TabularMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.zeros(N_FEATURES))
            self.register_buffer("std", torch.ones(N_FEATURES))
            self.net = nn.Sequential(
                nn.Linear(N_FEATURES, hidden),
                nn.ReLU(),
                nn.Dropout(0.1),
                nn.Linear(hidden, hidden // 2),
                nn.ReLU(),
                nn.Linear(hidden // 2, 1),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net((x - self.mean) / self.std).squeeze(-1)

    return TabularMLP()


@dataclass
class SklearnMember:
    model: Any

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_proba(x)[:, 1], dtype=np.float64)


@dataclass
class XGBoostMember:
    booster: Any

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        import xgboost

        return np.asarray(self.booster.predict(xgboost.DMatrix(x)), dtype=np.float64)


@dataclass
class TorchMember:
    net: Any
    device: str = "cpu"

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            logits = self.net(torch.as_tensor(x, dtype=torch.float32, device=self.device))
            return torch.sigmoid(logits).double().cpu().numpy()


def load_member(
    store: ModelStore, family: Family, model: str, version: str = "latest", device: str = "cpu"
) -> tuple[Predictor, ModelRef]:
    if family == "sklearn":
        est, ref = store.load_sklearn(model, version)
        return SklearnMember(est), ref
    if family == "xgboost":
        booster, ref = store.load_xgboost(model, version)
        return XGBoostMember(booster), ref
    if family == "torch":
        state, ref = store.load_torch(model, version)
        net = build_mlp(int(ref.metadata.get("hidden", 32)))
        net.load_state_dict(state)
        net.eval().to(device)
        return TorchMember(net, device), ref
    raise ValueError(f"unknown model family {family!r}")


# ---------------------------------------------------------------- training (make setup)
def train_logreg(x: np.ndarray, y: np.ndarray) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000)).fit(x, y)


def train_xgboost(x: np.ndarray, y: np.ndarray, *, n_estimators: int, max_depth: int) -> Any:
    import xgboost

    return xgboost.XGBClassifier(
        n_estimators=n_estimators,
        max_depth=max_depth,
        learning_rate=0.1,
        subsample=0.9,
        colsample_bytree=0.8,
        random_state=seed_of(f"ensemble/xgb/{n_estimators}/{max_depth}") % (2**31),
        n_jobs=1,
    ).fit(x, y)


def train_mlp(x: np.ndarray, y: np.ndarray, *, hidden: int = 32, epochs: int = 300) -> Any:
    import torch

    torch.manual_seed(seed_of("ensemble/mlp"))
    net = build_mlp(hidden)
    net.mean.copy_(torch.as_tensor(x.mean(0)))
    net.std.copy_(torch.as_tensor(x.std(0) + 1e-6))
    xt, yt = torch.as_tensor(x), torch.as_tensor(y, dtype=torch.float32)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    net.train()
    for _ in range(epochs):  # full batch: 398 rows
        opt.zero_grad()
        loss_fn(net(xt), yt).backward()
        opt.step()
    return net.eval()

"""Ensemble members: three model families behind one ``predict_proba`` interface.

Every member answers P(benign) for a 2-D float array. Loading goes through the core model
store only (skops for scikit-learn, UBJ for XGBoost, safetensors for PyTorch): no pickle.

``Member`` is one loaded model with its chaos knob, as plain Python: the ``EnsembleMember``
deployment (deployments.py) serves it with batching, and the flow's tests call it in-process.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, Field

from core.model_store import ModelRef, ModelStore
from core.resources import StageResources
from patterns.ensemble.data import N_FEATURES

Family = Literal["sklearn", "xgboost", "torch"]
NAME_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"


class FaultInjection(BaseModel):
    """Chaos knob, off by default: make a member slow or failing to see the ensemble degrade
    instead of hang (the tests and benchmark use it; so can a game day). Set in the roster
    (``MemberSpec.fault``) or live, without a restart, through the member deployment's
    ``user_config`` (``EnsembleMember.reconfigure``)."""

    delay_s: float = Field(default=0.0, ge=0, le=60)
    error_rate: float = Field(default=0.0, ge=0, le=1)


class MemberSpec(BaseModel):
    name: str = Field(pattern=NAME_PATTERN)
    family: Family  # a new family: add it to Family and to load_member below
    model: str  # model id in the store
    version: str = "latest"
    weight: float = Field(default=1.0, gt=0)  # used by voting: weighted
    resources: StageResources = StageResources(num_cpus=0.1)
    fault: FaultInjection = FaultInjection()


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


class Member:
    """One member loaded from the store, warmed up, with its fault knob.

    ``device`` matters for the torch family only (the others run on the CPU whatever they
    are given). ``predict`` is the in-process answer; the deployment splits it into
    ``inject_fault``, a batched ``predict_proba`` and ``answer``. ``fault`` starts as the
    spec's and may be replaced while the member serves (``set_fault``).
    """

    def __init__(self, spec: MemberSpec, store: ModelStore, device: str = "cpu") -> None:
        self.spec = spec
        self.device = device if spec.family == "torch" else "cpu"
        self.model, self.ref = load_member(
            store, spec.family, spec.model, spec.version, self.device
        )
        # One throwaway call so the first live request does not pay for lazy initialisation
        # (torch kernels, XGBoost's DMatrix path) and blow the ensemble's deadline.
        self.model.predict_proba(np.zeros((1, N_FEATURES), dtype=np.float32))
        seed = hashlib.sha256(f"fault/{spec.name}".encode()).digest()
        self._rng = random.Random(int.from_bytes(seed[:8], "little"))
        self.fault = spec.fault

    def set_fault(self, fault: FaultInjection | dict[str, Any]) -> None:
        """Switch the chaos knob on or off for the calls that start from now on."""
        self.fault = FaultInjection.model_validate(fault)

    async def inject_fault(self) -> None:
        fault = self.fault
        if fault.delay_s:
            await asyncio.sleep(fault.delay_s)
        if fault.error_rate and self._rng.random() < fault.error_rate:
            raise RuntimeError(f"injected fault in member {self.spec.name}")

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict_proba(x)

    def answer(self, proba: np.ndarray) -> dict[str, Any]:
        return {"proba": np.asarray(proba).tolist(), "version": self.ref.version}

    async def predict(self, rows: np.ndarray | list[list[float]]) -> dict[str, Any]:
        await self.inject_fault()
        return self.answer(self.predict_proba(np.asarray(rows, dtype=np.float32)))

    def info(self) -> dict[str, Any]:
        ref = self.ref.public()
        return {
            "member": self.spec.name,
            "model": ref["name"],
            "version": ref["version"],
            "sha256": ref["sha256"],
            "family": self.spec.family,
            "device": self.device,
            # accuracy on the held-out split, written by artifacts.py into the manifest
            "held_out": self.ref.metadata.get("held_out"),
            "fault": self.fault.model_dump(),  # chaos on? (all zeros: off)
        }

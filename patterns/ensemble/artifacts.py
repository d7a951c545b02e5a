"""Train the ensemble's members (and the challenger) and report held-out accuracy.

    python -m patterns.ensemble.artifacts [--force] [--report]

Writes to the core model store: ensemble-logreg/v1 (skops), ensemble-xgb/v1 and the challenger
ensemble-xgb/v2 (XGBoost UBJ), ensemble-mlp/v1 (safetensors), and ensemble-report/v1 (JSON:
accuracy of every member, of each voting mode and of the cascade on the held-out 30%).
Under a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from core.model_store import ModelStore
from patterns.ensemble.data import load_split
from patterns.ensemble.members import (
    load_member,
    train_logreg,
    train_mlp,
    train_xgboost,
)
from patterns.ensemble.voting import aggregate, confident_mask

# name -> (family, model id, version): the default roster, the challenger last.
MEMBERS: dict[str, tuple[str, str, str]] = {
    "logreg": ("sklearn", "ensemble-logreg", "v1"),
    "xgb": ("xgboost", "ensemble-xgb", "v1"),
    "mlp": ("torch", "ensemble-mlp", "v1"),
}
CHALLENGER = ("xgboost", "ensemble-xgb", "v2")
REPORT = ("ensemble-report", "v1")
# The weights and cascade band the default config uses (evaluated here with them).
DEFAULT_WEIGHTS = {"logreg": 1.0, "xgb": 1.5, "mlp": 1.0}
DEFAULT_BAND = (0.02, 0.98)


def _log(msg: str) -> None:
    print(f"[ensemble] {msg}", flush=True)


def _accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    return round(float((pred == y).mean()), 4)


def evaluate(store: ModelStore) -> dict[str, Any]:
    split = load_split()
    x, y = split.x_test, split.y_test
    probs = {}
    for name, (family, model, version) in MEMBERS.items():
        member, _ = load_member(store, family, model, version)  # type: ignore[arg-type]
        probs[name] = member.predict_proba(x)
    challenger, _ = load_member(store, *CHALLENGER)  # type: ignore[arg-type]
    p_ch = challenger.predict_proba(x)
    report: dict[str, Any] = {
        "dataset": "sklearn breast_cancer, stratified 70/30 split",
        "n_test": len(y),
        "members": {n: _accuracy((p >= 0.5).astype(int), y) for n, p in probs.items()},
        "challenger_xgb_v2": _accuracy((p_ch >= 0.5).astype(int), y),
        "voting": {},
    }
    for mode in ("hard", "soft", "weighted"):
        cls, _ = aggregate(probs, mode, DEFAULT_WEIGHTS)  # type: ignore[arg-type]
        report["voting"][mode] = _accuracy(cls, y)
    confident = confident_mask(probs["logreg"], *DEFAULT_BAND)
    soft_cls, _ = aggregate(probs, "soft")
    cascade = np.where(confident, (probs["logreg"] >= 0.5).astype(int), soft_cls)
    report["cascade"] = {
        "gate": "logreg",
        "band": list(DEFAULT_BAND),
        "share_answered_by_gate": round(float(confident.mean()), 4),
        "accuracy": _accuracy(cascade, y),
        "gate_accuracy_on_its_share": _accuracy(
            (probs["logreg"][confident] >= 0.5).astype(int), y[confident]
        ),
    }
    return report


def ensure_artifacts(store: ModelStore | None = None, *, force: bool = False) -> None:
    store = store or ModelStore.from_settings()
    wanted = [*MEMBERS.values(), CHALLENGER, ("json", *REPORT)]
    if not force and all(store.exists(m, v) for _, m, v in wanted):
        _log("artifacts present; nothing to do")
        return
    split = load_split()
    x, y = split.x_train, split.y_train
    kw = {"overwrite": force}
    meta = {"dataset": "sklearn.datasets.load_breast_cancer", "n_train": len(y)}
    t0 = time.perf_counter()
    _log("training logreg (scikit-learn, skops)")
    store.save_sklearn("ensemble-logreg", "v1", train_logreg(x, y), meta, **kw)
    _log("training xgb v1 (XGBoost, UBJ)")
    xgb1 = train_xgboost(x, y, n_estimators=120, max_depth=3)
    store.save_xgboost("ensemble-xgb", "v1", xgb1, meta, **kw)
    _log("training xgb v2, the challenger (deeper, more trees)")
    xgb2 = train_xgboost(x, y, n_estimators=300, max_depth=5)
    store.save_xgboost("ensemble-xgb", "v2", xgb2, meta, **kw)
    _log("training mlp (PyTorch, safetensors)")
    store.save_torch(
        "ensemble-mlp", "v1", train_mlp(x, y).state_dict(), {**meta, "hidden": 32}, **kw
    )
    _log(f"trained in {time.perf_counter() - t0:.1f}s; evaluating on the held-out 30%")
    report = evaluate(store)
    store.save_files(
        *REPORT, {"report.json": json.dumps(report, indent=2).encode()}, "json", report, **kw
    )
    _log(json.dumps(report, indent=2))


def print_report(store: ModelStore | None = None) -> dict[str, Any]:
    """Re-evaluate the stored models on the held-out split and print the accuracy table."""
    store = store or ModelStore.from_settings()
    report = evaluate(store)
    print(f"held-out accuracy, {report['dataset']}, n={report['n_test']}")
    lines = [(f"member {n}", acc) for n, acc in report["members"].items()]
    lines.append(("challenger xgb v2 (shadow)", report["challenger_xgb_v2"]))
    lines += [(f"ensemble, {mode} vote", acc) for mode, acc in report["voting"].items()]
    c = report["cascade"]
    lines.append((f"cascade, gate {c['gate']} + soft vote", c["accuracy"]))
    for label, acc in lines:
        print(f"  {label:<34} {acc:.4f}")
    print(
        f"  (the cascade's gate answered {c['share_answered_by_gate']:.0%} of rows alone, "
        f"{c['gate_accuracy_on_its_share']:.4f} correct on those)"
    )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the ensemble pattern's models.")
    parser.add_argument("--force", action="store_true", help="retrain even if present")
    parser.add_argument("--report", action="store_true", help="print held-out accuracy")
    opts = parser.parse_args()
    ensure_artifacts(force=opts.force)
    if opts.report:
        print_report()


if __name__ == "__main__":
    main()

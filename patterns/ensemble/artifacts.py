"""Train the ensemble's members (and the challenger) and report held-out accuracy.

    python -m patterns.ensemble.artifacts [--force] [--report]

Writes to the core model store: ensemble-logreg/v1 (skops), ensemble-xgb/v1 and the challenger
ensemble-xgb/v2 (XGBoost UBJ), ensemble-mlp/v1 (safetensors), and ensemble-report/v1 (JSON:
accuracy of every member, of each voting mode and of the cascade on the held-out 30%).
Under a minute on 2 CPU cores.

``--report`` evaluates what ``patterns/ensemble/config.yaml`` configures: its roster, weights,
challenger, voting mode and cascade band (read through the app's own args model). The stored
report, written right after training, evaluates the app's default args (the roster trained here).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
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

CONFIG = Path(__file__).with_name("config.yaml")
# (model id, version) of everything trained here: the default roster and the challenger.
TRAINED = [
    ("ensemble-logreg", "v1"),
    ("ensemble-xgb", "v1"),
    ("ensemble-xgb", "v2"),
    ("ensemble-mlp", "v1"),
]
REPORT = ("ensemble-report", "v1")


def _log(msg: str) -> None:
    print(f"[ensemble] {msg}", flush=True)


def _accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    return round(float((pred == y).mean()), 4)


def default_args() -> Any:
    """The app's default args (an ``EnsembleArgs``). Imported here, not at the top: the app
    module imports Ray Serve, which training alone does not need."""
    from patterns.ensemble.app import EnsembleArgs

    return EnsembleArgs()


def configured_args(path: Path = CONFIG) -> Any:
    """The ``args:`` of the ensemble application in ``path``, validated as ``EnsembleArgs``."""
    import yaml

    from patterns.ensemble.app import EnsembleArgs

    doc = yaml.safe_load(path.read_text())
    apps = [a for a in doc["applications"] if a["import_path"].startswith("patterns.ensemble.")]
    if len(apps) != 1:
        raise ValueError(f"{path}: expected one ensemble application, found {len(apps)}")
    return EnsembleArgs(**(apps[0].get("args") or {}))


def evaluate(store: ModelStore, args: Any = None) -> dict[str, Any]:
    """Accuracy on the held-out split of ``args``' members, challenger, voting modes and
    cascade (``args``: an ``EnsembleArgs``; default: the app's defaults)."""
    args = args if args is not None else default_args()
    split = load_split()
    x, y = split.x_test, split.y_test
    probs = {}
    for m in args.members:
        member, _ = load_member(store, m.family, m.model, m.version)
        probs[m.name] = member.predict_proba(x)
    weights = {m.name: m.weight for m in args.members}
    report: dict[str, Any] = {
        "dataset": "sklearn breast_cancer, stratified 70/30 split",
        "n_test": len(y),
        "members": {n: _accuracy((p >= 0.5).astype(int), y) for n, p in probs.items()},
        "challenger": None,
        "voting": {},
    }
    ch = args.challenger.member
    if ch is not None:
        challenger, _ = load_member(store, ch.family, ch.model, ch.version)
        p_ch = challenger.predict_proba(x)
        report["challenger"] = {
            "name": ch.name,
            "accuracy": _accuracy((p_ch >= 0.5).astype(int), y),
        }
    for mode in ("hard", "soft", "weighted"):
        cls, _ = aggregate(probs, mode, weights)
        report["voting"][mode] = _accuracy(cls, y)
    sel = args.selection
    if sel.gate_member in probs:
        # What the app does: the gate answers its confident rows alone, the configured vote
        # (over every member, the gate included) answers the rest. Voting is per row, so
        # voting over all rows and keeping the uncertain ones is the same as the app's split.
        gate_p = probs[sel.gate_member]
        confident = confident_mask(gate_p, sel.low, sel.high)
        vote_cls, _ = aggregate(probs, args.voting, weights)
        cascade = np.where(confident, (gate_p >= 0.5).astype(int), vote_cls)
        report["cascade"] = {
            "gate": sel.gate_member,
            "band": [sel.low, sel.high],
            "voting": args.voting,
            "served": sel.mode == "cascade",
            "share_answered_by_gate": round(float(confident.mean()), 4),
            "accuracy": _accuracy(cascade, y),
            "gate_accuracy_on_its_share": _accuracy(
                (gate_p[confident] >= 0.5).astype(int), y[confident]
            )
            if confident.any()
            else None,
        }
    return report


def ensure_artifacts(
    store: ModelStore | None = None, *, force: bool = False, args: Any = None
) -> dict[str, Any] | None:
    """Train and save the models when missing (or ``force``). Returns the held-out report of
    ``args`` (default: the app's defaults) when it trained, None when there was nothing to do."""
    store = store or ModelStore.from_settings()
    if not force and all(store.exists(m, v) for m, v in [*TRAINED, REPORT]):
        _log("artifacts present; nothing to do")
        return None
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
    report = evaluate(store, args)
    store.save_files(
        *REPORT, {"report.json": json.dumps(report, indent=2).encode()}, "json", report, **kw
    )
    _log(json.dumps(report, indent=2))
    return report


def print_report(
    store: ModelStore | None = None, *, args: Any = None, report: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Print the held-out accuracy table of ``args`` (default: config.yaml's), evaluating the
    stored models unless ``report`` (from ``evaluate`` with the same args) is given."""
    if report is None:
        args = args if args is not None else configured_args()
        report = evaluate(store or ModelStore.from_settings(), args)
    print(f"held-out accuracy, {report['dataset']}, n={report['n_test']}")
    lines = [(f"member {n}", acc) for n, acc in report["members"].items()]
    if report["challenger"] is not None:
        ch = report["challenger"]
        lines.append((f"challenger {ch['name']} (shadow)", ch["accuracy"]))
    lines += [(f"ensemble, {mode} vote", acc) for mode, acc in report["voting"].items()]
    c = report.get("cascade")
    if c is not None:
        off = "" if c["served"] else " (selection.mode: all)"
        lines.append((f"cascade, gate {c['gate']} + {c['voting']} vote{off}", c["accuracy"]))
    for label, acc in lines:
        print(f"  {label:<34} {acc:.4f}")
    if c is not None and c["gate_accuracy_on_its_share"] is not None:
        print(
            f"  (the cascade's gate answered {c['share_answered_by_gate']:.0%} of rows alone, "
            f"{c['gate_accuracy_on_its_share']:.4f} correct on those; band {c['band']})"
        )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the ensemble pattern's models.")
    parser.add_argument("--force", action="store_true", help="retrain even if present")
    parser.add_argument(
        "--report", action="store_true", help="print held-out accuracy of config.yaml's setup"
    )
    opts = parser.parse_args()
    args = configured_args() if opts.report else None
    report = ensure_artifacts(force=opts.force, args=args)  # None: nothing was trained
    if opts.report:
        print_report(args=args, report=report)


if __name__ == "__main__":
    main()

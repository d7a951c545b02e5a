"""Train the ensemble's members (and the challenger) and report held-out accuracy.

    python -m patterns.ensemble.artifacts [--force] [--report]

Writes to the core model store: ensemble-logreg/v1 (skops), ensemble-xgb/v1 and the challenger
ensemble-xgb/v2 (XGBoost UBJ), ensemble-mlp/v1 (safetensors), each with its held-out accuracy in
its manifest (``held_out``, shown by ``GET /ensemble/model``), and ensemble-report/v1 (JSON:
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

from core.errors import ModelNotFound
from core.model_store import ModelStore
from patterns.ensemble.data import load_split, seed_of
from patterns.ensemble.flow import EnsembleArgs
from patterns.ensemble.members import (
    SklearnMember,
    TorchMember,
    XGBoostMember,
    build_mlp,
    load_member,
)
from patterns.ensemble.voting import aggregate, cascade, uncertain_rows

CONFIG = Path(__file__).with_name("config.yaml")
# (model id, version) of everything trained here: the default roster and the challenger.
TRAINED = [
    ("ensemble-logreg", "v1"),
    ("ensemble-xgb", "v1"),
    ("ensemble-xgb", "v2"),
    ("ensemble-mlp", "v1"),
]
REPORT = ("ensemble-report", "v1")
SPLIT = "sklearn breast_cancer, stratified 70/30 split"


def _log(msg: str) -> None:
    print(f"[ensemble] {msg}", flush=True)


def _accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    return round(float((pred == y).mean()), 4)


def default_args() -> EnsembleArgs:
    """The app's default args (what ``serve run patterns.ensemble.app:app`` serves)."""
    return EnsembleArgs()


def configured_args(path: Path = CONFIG) -> EnsembleArgs:
    """The ``args:`` of the ensemble application in ``path``, validated as ``EnsembleArgs``."""
    import yaml

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
        "dataset": SPLIT,
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
        # What the app does, with the app's own functions (flow.py calls the same two): the
        # gate answers its confident rows alone, the configured vote over every member (the
        # gate included) answers the rest.
        gate = sel.gate_member
        uncertain = uncertain_rows(probs[gate], sel.low, sel.high)
        vote = cascade(
            len(y),
            gate=gate,
            gate_proba=probs[gate],
            uncertain=uncertain,
            votes={name: p[uncertain] for name, p in probs.items()},
            mode=args.voting,
            weights=weights,
        )
        confident = np.ones(len(y), dtype=bool)
        confident[uncertain] = False
        report["cascade"] = {
            "gate": gate,
            "band": [sel.low, sel.high],
            "voting": args.voting,
            "served": sel.mode == "cascade",
            "share_answered_by_gate": round(float(confident.mean()), 4),
            "accuracy": _accuracy(vote.labels, y),
            "gate_accuracy_on_its_share": _accuracy(vote.labels[confident], y[confident])
            if confident.any()
            else None,
        }
    return report


def member_accuracy(predictor: Any, x: np.ndarray, y: np.ndarray) -> float:
    return _accuracy((predictor.predict_proba(x) >= 0.5).astype(int), y)


# ---------------------------------------------------------------- training
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


def _present(store: ModelStore) -> bool:
    """Everything trained here is stored, each member with its held-out figures."""
    if not all(store.exists(m, v) for m, v in [*TRAINED, REPORT]):
        return False
    return all("held_out" in store.read_manifest(m, v)[0]["metadata"] for m, v in TRAINED)


def ensure_artifacts(
    store: ModelStore | None = None, *, force: bool = False, args: Any = None
) -> dict[str, Any] | None:
    """Train and save the models when missing (or ``force``). Returns the held-out report of
    ``args`` (default: the app's defaults) when it trained, None when there was nothing to do."""
    store = store or ModelStore.open()
    if not force and _present(store):
        _log("artifacts present; nothing to do")
        return None
    # Overwrite what is there when forced, or when it predates the held-out figures in the
    # manifests (the same seeds train the same models, so nothing else changes).
    kw = {"overwrite": force or any(store.exists(m, v) for m, v in [*TRAINED, REPORT])}
    split = load_split()
    x, y = split.x_train, split.y_train
    meta = {"dataset": "sklearn.datasets.load_breast_cancer", "n_train": len(y)}

    def held_out(predictor: Any) -> dict[str, Any]:
        acc = member_accuracy(predictor, split.x_test, split.y_test)
        return {"held_out": {"accuracy": acc, "n_test": len(split.y_test), "split": SPLIT}}

    t0 = time.perf_counter()
    _log("training logreg (scikit-learn, skops)")
    logreg = train_logreg(x, y)
    scored = SklearnMember(logreg)
    store.save_sklearn("ensemble-logreg", "v1", logreg, {**meta, **held_out(scored)}, **kw)
    _log("training xgb v1 (XGBoost, UBJ)")
    xgb1 = train_xgboost(x, y, n_estimators=120, max_depth=3)
    scored_x1 = XGBoostMember(xgb1.get_booster())
    store.save_xgboost("ensemble-xgb", "v1", xgb1, {**meta, **held_out(scored_x1)}, **kw)
    _log("training xgb v2, the challenger (deeper, more trees)")
    xgb2 = train_xgboost(x, y, n_estimators=300, max_depth=5)
    scored_x2 = XGBoostMember(xgb2.get_booster())
    store.save_xgboost("ensemble-xgb", "v2", xgb2, {**meta, **held_out(scored_x2)}, **kw)
    _log("training mlp (PyTorch, safetensors)")
    mlp = train_mlp(x, y)
    mlp_meta = {**meta, "hidden": 32, **held_out(TorchMember(mlp))}
    store.save_torch("ensemble-mlp", "v1", mlp.state_dict(), mlp_meta, **kw)
    _log(f"trained in {time.perf_counter() - t0:.1f}s; evaluating on the held-out 30%")
    report = evaluate(store, args)
    store.save_files(
        *REPORT, {"report.json": json.dumps(report, indent=2).encode()}, "json", report, **kw
    )
    _log(json.dumps(report, indent=2))
    return report


def stored_report(store_uri: str | None = None) -> dict[str, Any] | None:
    """The held-out report ``ensure_artifacts`` stored (for the default args, which
    config.yaml repeats), with the artifact it came from; None when it is not there. The
    ingress shows it in ``GET /model`` as ``held_out``."""
    try:
        files, ref = ModelStore.open(store_uri).read_verified(*REPORT)
    except ModelNotFound:
        return None
    return {"artifact": ref.public(), **json.loads(files["report.json"])}


def print_report(
    store: ModelStore | None = None, *, args: Any = None, report: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Print the held-out accuracy table of ``args`` (default: config.yaml's), evaluating the
    stored models unless ``report`` (from ``evaluate`` with the same args) is given."""
    if report is None:
        args = args if args is not None else configured_args()
        report = evaluate(store or ModelStore.open(), args)
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

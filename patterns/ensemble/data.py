"""The tabular task: scikit-learn's bundled Wisconsin breast-cancer data (no download).

569 tumours, 30 numeric features, target 1 = benign, 0 = malignant. One fixed stratified split
(seeded from a string through hashlib, so every process and replica agrees on it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

N_FEATURES = 30
CLASS_NAMES = ("malignant", "benign")


def seed_of(label: str) -> int:
    return int.from_bytes(hashlib.sha256(label.encode()).digest()[:4], "little")


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    feature_names: tuple[str, ...]


@lru_cache(maxsize=1)
def load_split(test_size: float = 0.3) -> Split:
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    ds = load_breast_cancer()
    x_tr, x_te, y_tr, y_te = train_test_split(
        ds.data.astype(np.float32),
        ds.target.astype(np.int64),
        test_size=test_size,
        stratify=ds.target,
        random_state=seed_of("ensemble/split/v1") % (2**31),
    )
    return Split(x_tr, y_tr, x_te, y_te, tuple(str(n) for n in ds.feature_names))


def feature_names() -> tuple[str, ...]:
    from sklearn.datasets import load_breast_cancer

    return tuple(str(n) for n in load_breast_cancer().feature_names)

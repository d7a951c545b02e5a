"""Voting rules on hand-made member outputs."""

import numpy as np
import pytest

from patterns.ensemble.voting import aggregate, confident_mask

PROBS = {
    "a": np.array([0.9, 0.2, 0.6, 0.4]),
    "b": np.array([0.8, 0.4, 0.3, 0.45]),
    "c": np.array([0.1, 0.3, 0.9, 0.9]),
}


def test_soft_is_the_mean_probability() -> None:
    cls, p = aggregate(PROBS, "soft")
    np.testing.assert_allclose(p, [0.6, 0.3, 0.6, 0.5833333])
    assert cls.tolist() == [1, 0, 1, 1]


def test_hard_is_the_majority_of_member_classes() -> None:
    cls, share = aggregate(PROBS, "hard")
    assert cls.tolist() == [1, 0, 1, 0]  # row 3: only c says benign
    np.testing.assert_allclose(share, [2 / 3, 0, 2 / 3, 1 / 3])


def test_hard_tie_falls_back_to_soft() -> None:
    cls, _ = aggregate({"a": np.array([0.9]), "b": np.array([0.3])}, "hard")
    assert cls.tolist() == [1]  # mean 0.6
    cls, _ = aggregate({"a": np.array([0.55]), "b": np.array([0.1])}, "hard")
    assert cls.tolist() == [0]  # mean 0.325


def test_weighted_follows_the_weights() -> None:
    _, p = aggregate(PROBS, "weighted", {"a": 0.0, "b": 0.0, "c": 1.0})
    np.testing.assert_allclose(p, PROBS["c"])
    cls2, _ = aggregate(PROBS, "weighted", {"a": 1, "b": 1, "c": 1})
    np.testing.assert_array_equal(cls2, aggregate(PROBS, "soft")[0])
    with pytest.raises(ValueError):
        aggregate(PROBS, "weighted", {"a": 0, "b": 0, "c": 0})


def test_no_members_is_an_error() -> None:
    with pytest.raises(ValueError):
        aggregate({}, "soft")


def test_confident_mask() -> None:
    assert confident_mask(np.array([0.01, 0.5, 0.99]), 0.02, 0.98).tolist() == [True, False, True]

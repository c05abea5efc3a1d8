"""DINO's weighted k-NN vote and the recognition metrics (issue 12's statistics), on answers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score

from dagman.errors import DataError
from dagman.tasks.knn import knn_predict, knn_scores, recognition_metrics


def test_vote_weights_by_hand():
    # unit vectors at angles 0, 10, 80, 90 degrees (classes 0, 0, 1, 1); the query at 30 degrees
    angles = np.deg2rad([0.0, 10.0, 80.0, 90.0])
    train = np.stack([np.cos(angles), np.sin(angles)], axis=1) * np.array([[1.0], [3.0], [0.5], [2.0]])  # norms ignored
    y = np.array([0, 0, 1, 1])
    q = np.array([[np.cos(np.deg2rad(30.0)), np.sin(np.deg2rad(30.0))]])
    t = 0.07
    cos = np.cos(np.deg2rad([30.0, 20.0, 50.0, 60.0]))
    # k = 3: the neighbours are train 1 (cos 20), train 0 (cos 30), train 2 (cos 50)
    expected = [math.exp(cos[0] / t) + math.exp(cos[1] / t), math.exp(cos[2] / t)]
    np.testing.assert_allclose(knn_scores(train, y, q, k=3, temperature=t)[0], expected, rtol=1e-12)
    assert knn_predict(train, y, q, k=3).tolist() == [0]
    # k = 1 near class 1: the query at 85 degrees
    q2 = np.array([[np.cos(np.deg2rad(85.0)), np.sin(np.deg2rad(85.0))]])
    assert knn_predict(train, y, q2, k=1).tolist() == [1]
    # a large temperature makes the vote a plain count: 2 of class 1 against 1 of class 0 with k = 3 at 70 degrees
    q3 = np.array([[np.cos(np.deg2rad(70.0)), np.sin(np.deg2rad(70.0))]])
    s = knn_scores(train, y, q3, k=3, temperature=1e6)[0]
    np.testing.assert_allclose(s, [1.0, 2.0], rtol=1e-5)
    # k larger than the training set is capped; blocks give the same answer
    many = np.random.default_rng(0).normal(size=(7, 2))
    np.testing.assert_allclose(knn_scores(train, y, many, k=99, block=2), knn_scores(train, y, many, k=4))


def test_separable_classes_are_recognised_perfectly_and_identical_ones_at_chance():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 16)) * 10
    y_train, y_test = np.repeat(np.arange(3), 40), np.repeat(np.arange(3), 30)
    x_train = centres[y_train] + rng.normal(size=(120, 16))
    x_test = centres[y_test] + rng.normal(size=(90, 16))
    m = recognition_metrics(y_test, knn_predict(x_train, y_train, x_test, k=20), ["a", "b", "c"], n_boot=200)
    assert m["balanced_accuracy"]["value"] == 1.0 and m["macro_f1"]["value"] == 1.0
    assert m["confusion"] == [[30, 0, 0], [0, 30, 0], [0, 0, 30]]
    # the same distribution for every class: balanced accuracy near chance (1/3), its interval covering it
    x_train = rng.normal(size=(600, 16))
    x_test = rng.normal(size=(600, 16))
    y_train, y_test = rng.integers(0, 3, 600), rng.integers(0, 3, 600)
    m = recognition_metrics(y_test, knn_predict(x_train, y_train, x_test, k=20), n_boot=300)
    lo, hi = m["balanced_accuracy"]["ci"]
    assert abs(m["balanced_accuracy"]["value"] - 1 / 3) < 0.07 and lo < 1 / 3 < hi and m["chance"] == 1 / 3


def test_metrics_agree_with_scikit_learn_and_the_interval_holds_the_point():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 200)
    p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 4, 200))
    m = recognition_metrics(y, p, ["w", "x", "y", "z"], n_boot=300, seed=3)
    assert m["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(y, p))
    assert m["macro_f1"]["value"] == pytest.approx(f1_score(y, p, average="macro"))
    for key in ("balanced_accuracy", "macro_f1"):
        lo, hi = m[key]["ci"]
        assert lo <= m[key]["value"] <= hi and hi - lo < 0.3
    assert recognition_metrics(y, p, ["w", "x", "y", "z"], n_boot=300, seed=3) == m  # seeded
    cm = np.array(m["confusion"])
    assert cm.sum() == 200 and m["per_class_recall"]["w"] == pytest.approx(cm[0, 0] / cm[0].sum())


def test_bad_inputs_are_one_line_errors():
    x = np.ones((3, 2))
    with pytest.raises(DataError, match="training labels"):
        knn_scores(x, [0, 1], x)
    with pytest.raises(DataError, match="dimensions"):
        knn_scores(x, [0, 1, 1], np.ones((2, 3)))
    with pytest.raises(DataError, match="2D array"):
        knn_scores(np.ones(3), [0, 1, 1], x)
    with pytest.raises(DataError, match="as many predictions"):
        recognition_metrics([0, 1], [0])

"""Frozen-feature probes for multi-class recognition: DINO's weighted k-NN vote, and the metrics that go with it.

:func:`knn_predict` is the k-NN classifier DINO evaluates frozen features with (Caron et al. 2021): features
L2-normalised, the ``k`` training samples of highest cosine similarity vote for their class with weight
``exp(similarity / T)`` (``T = 0.07``), the class with the largest summed weight wins. It needs no training and
no hyper-parameter search, so it measures the features themselves.

:func:`recognition_metrics`: balanced accuracy (mean per-class recall) and macro-F1 (scikit-learn), each with a
percentile bootstrap 95% interval over the test samples (:func:`dagman.tasks.metrics.bootstrap_ci`, stratified
by the true class), and the confusion matrix.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dagman.errors import DataError

#: DINO's temperature of the k-NN vote
KNN_TEMPERATURE = 0.07
KNN_K = (10, 20)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """``x`` (samples x dimensions) as float64 rows of unit L2 norm (the k-NN's cosine geometry)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise DataError(f"features must be a 2D array (samples x dimensions), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def knn_scores(train_x, train_y, test_x, *, k: int = 20, temperature: float = KNN_TEMPERATURE,
               num_classes: int | None = None, block: int = 1024) -> np.ndarray:
    """``(n_test, num_classes)`` summed vote weights of DINO's weighted k-NN (see the module docstring).

    ``train_y``: integer classes ``0 .. num_classes - 1`` (default: ``max + 1``). ``k`` is capped at the number
    of training samples. Test rows are processed ``block`` at a time (memory ``block x n_train``)."""
    train = unit_rows(train_x)
    test = unit_rows(test_x)
    y = np.asarray(train_y).astype(np.int64).reshape(-1)
    if train.shape[0] != y.shape[0]:
        raise DataError(f"{train.shape[0]} training features but {y.shape[0]} training labels")
    if train.shape[0] == 0 or test.shape[0] == 0:
        raise DataError("k-NN needs at least one training and one test sample")
    if train.shape[1] != test.shape[1]:
        raise DataError(f"training features have {train.shape[1]} dimensions, test features {test.shape[1]}")
    if y.min() < 0:
        raise DataError("k-NN classes must be non-negative integers")
    if int(k) < 1 or not temperature > 0:
        raise DataError(f"k must be >= 1 and the temperature > 0, got k={k}, T={temperature}")
    n_classes = int(num_classes) if num_classes is not None else int(y.max()) + 1
    k = min(int(k), train.shape[0])
    out = np.zeros((test.shape[0], n_classes), dtype=np.float64)
    for start in range(0, test.shape[0], int(block)):
        sim = test[start:start + block] @ train.T
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        top_sim = np.take_along_axis(sim, top, axis=1)
        weights = np.exp(top_sim / float(temperature))
        rows = np.repeat(np.arange(top.shape[0]), k)
        np.add.at(out[start:start + block], (rows, y[top].reshape(-1)), weights.reshape(-1))
    return out


def knn_predict(train_x, train_y, test_x, *, k: int = 20, temperature: float = KNN_TEMPERATURE,
                num_classes: int | None = None) -> np.ndarray:
    """The class of the largest summed vote per test sample (ties: the lowest class index)."""
    return np.argmax(knn_scores(train_x, train_y, test_x, k=k, temperature=temperature, num_classes=num_classes),
                     axis=1)


def recognition_metrics(y_true, y_pred, classes: Sequence[str] | None = None, *, n_boot: int = 1000,
                        seed: int = 0) -> dict:
    """Balanced accuracy and macro-F1 with bootstrap 95% intervals, chance level, and the confusion matrix.

    Classes are the integers ``0 .. len(classes) - 1`` (``classes`` names them; default: those present).
    Returns ``{"balanced_accuracy": {"value", "ci"}, "macro_f1": {...}, "chance": 1 / n_classes, "n",
    "classes", "confusion": [[...]] (rows true, columns predicted), "per_class_recall": {name: value}}``;
    ``n_boot=0`` skips the bootstrap (each ``ci`` is None)."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score

    from dagman.tasks.metrics import bootstrap_ci

    y_true = np.asarray(y_true).astype(np.int64).reshape(-1)
    y_pred = np.asarray(y_pred).astype(np.int64).reshape(-1)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise DataError(f"need as many predictions as labels (> 0), got {y_true.size} and {y_pred.size}")
    labels = list(range(len(classes))) if classes is not None else sorted(set(y_true.tolist()))
    names = list(classes) if classes is not None else [str(c) for c in labels]
    present = sorted(set(y_true.tolist()))

    def bacc(t, p):
        return float(balanced_accuracy_score(t, p))

    def mf1(t, p):
        return float(f1_score(t, p, labels=present, average="macro", zero_division=0))

    out = {"n": int(y_true.size), "classes": names, "chance": 1.0 / len(present)}
    for key, fn in (("balanced_accuracy", bacc), ("macro_f1", mf1)):
        if n_boot == 0:
            out[key] = {"value": fn(y_true, y_pred), "ci": None}
            continue
        value, lo, hi = bootstrap_ci(fn, y_true, y_pred, n_boot=n_boot, seed=seed, stratify=y_true)
        out[key] = {"value": value, "ci": [lo, hi]}
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    out["confusion"] = cm.tolist()
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.diag(cm) / cm.sum(axis=1)
    out["per_class_recall"] = {names[i]: (float(recall[i]) if cm[i].sum() else None) for i in range(len(labels))}
    return out

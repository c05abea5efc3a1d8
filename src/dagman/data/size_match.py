"""Size-controlled nodule sets: benign and malignant nodules with the same diameter distribution.

In LIDC-IDRI malignancy follows size (a diameter-only logistic model reaches AUC ~0.9), so a malignancy probe on
the raw set mostly measures whether an encoder sees size. :func:`match_by_diameter` keeps, in every diameter
bin, as many benign as malignant nodules (drawn at random, seeded), so the two classes have identical
histograms at the bin width and a diameter-only model is near chance; :func:`diameter_only_auc` measures that
(cross-validated logistic regression on the diameter, scikit-learn).
"""

from __future__ import annotations

import math
from typing import Sequence, TypeVar

import numpy as np

from dagman.errors import ConfigError

T = TypeVar("T")

#: default width of the diameter bins (mm): LIDC outlines are drawn on ~0.7 mm pixels
BIN_MM = 1.0


def diameter_bins(diameters: Sequence[float], bin_mm: float = BIN_MM) -> np.ndarray:
    """Bin index ``floor(d / bin_mm)`` of each diameter."""
    if not (math.isfinite(bin_mm) and bin_mm > 0):
        raise ConfigError(f"match_bin_mm must be a positive number of mm, got {bin_mm}", option="match_bin_mm")
    return np.floor(np.asarray(diameters, dtype=np.float64) / float(bin_mm)).astype(np.int64)


def match_by_diameter(items: Sequence[T], diameters: Sequence[float], labels: Sequence[int], *, seed: int = 0,
                      bin_mm: float = BIN_MM, limit: int | None = None) -> list[T]:
    """The subset of ``items`` in which each diameter bin holds as many label-0 as label-1 items.

    Per bin, ``min(n0, n1)`` items of each label are drawn at random (``seed``); with ``limit``, at most
    ``limit // 2`` of those benign/malignant pairs are kept, drawn at random across bins, so the histograms stay
    equal. Returned in the input order."""
    labels = np.asarray(labels)
    if len(items) != len(diameters) or len(items) != len(labels):
        raise ValueError("items, diameters and labels differ in length")
    if not set(np.unique(labels).tolist()) <= {0, 1}:
        raise ValueError("labels must be 0 or 1")
    bins = diameter_bins(diameters, bin_mm)
    rng = np.random.default_rng([int(seed), 11])
    pairs: list[tuple[int, int]] = []
    for b in np.unique(bins):
        neg = np.flatnonzero((bins == b) & (labels == 0))
        pos = np.flatnonzero((bins == b) & (labels == 1))
        k = min(len(neg), len(pos))
        pairs.extend(zip(rng.permutation(neg)[:k].tolist(), rng.permutation(pos)[:k].tolist()))
    if limit is not None and limit // 2 < len(pairs):
        order = rng.permutation(len(pairs))[: max(0, int(limit)) // 2]
        pairs = [pairs[i] for i in sorted(order)]
    keep = sorted(i for pair in pairs for i in pair)
    return [items[i] for i in keep]


def diameter_only_auc(diameters: Sequence[float], labels: Sequence[int], *, folds: int = 5, seed: int = 0) -> float:
    """Out-of-fold AUC of a logistic regression on the diameter alone (stratified ``folds``-fold CV); NaN when a
    class has fewer than ``folds`` members."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(diameters, dtype=np.float64).reshape(-1, 1)
    y = np.asarray(labels, dtype=np.int64)
    if min(int((y == 0).sum()), int((y == 1).sum())) < folds:
        return float("nan")
    model = make_pipeline(StandardScaler(), LogisticRegression())
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=int(seed))
    scores = cross_val_predict(model, x, y, cv=cv, method="decision_function")
    return float(roc_auc_score(y, scores))

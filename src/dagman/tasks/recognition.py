"""Organ recognition across patients: frozen encoder features of structure crops, probed on a patient never seen.

Crops come from :func:`dagman.tasks.cluster.make_structure_crops` (one :class:`~dagman.tasks.cluster.Crops` per
CT + label map, classes named, e.g. the ``totalseg`` organ groups). Training crops are those of some patients, test
crops those of another; only the classes present on both sides are scored. Three probes on the same features:

* k-NN (:func:`dagman.tasks.knn.knn_predict`, DINO's weighted vote, k = 10 and 20): no training, no tuning;
* a linear probe: multinomial logistic regression on standardised features (scikit-learn, C = 1);
* the supervised ceiling: the same linear probe trained on the *test patient's own* crops, stratified K-fold
  out-of-fold predictions (crops of one structure are correlated, so this is an optimistic upper reference).

Each with balanced accuracy and macro-F1 and their bootstrap 95% intervals (:func:`dagman.tasks.knn.recognition_metrics`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dagman.errors import DataError
from dagman.tasks.knn import KNN_K, knn_predict, recognition_metrics


def _linear_probe():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))


def shared_classes(train_names: Sequence[Sequence[str]], test_names: Sequence[str]) -> list[str]:
    """Class names present in the test set and in at least one training set, in the test set's order."""
    seen = {n for names in train_names for n in names}
    return [n for n in test_names if n in seen]


def recognise(train_features: Sequence[np.ndarray], train_classes: Sequence[Sequence[str]],
              test_features: np.ndarray, test_classes: Sequence[str], *, ks: Sequence[int] = KNN_K,
              n_boot: int = 1000, seed: int = 0, ceiling_folds: int = 5, fraction: float = 1.0,
              subset_seed: int = 0) -> dict:
    """Score frozen features: k-NN and linear probe trained on ``train_*``, tested on ``test_*``; and the ceiling.

    ``train_features[i]`` ``(N_i, D)`` with ``train_classes[i]`` the class name of each row; ``test_features``
    ``(M, D)`` with ``test_classes``. Rows of classes absent from training are left out of the test (counted
    in ``"test_rows_dropped"``). ``fraction`` < 1 keeps a seeded (``subset_seed``), class-stratified share of
    the training crops, at least one per class (a label-fraction curve point; the ceiling is unchanged).
    ``n_boot=0`` skips the bootstrap intervals and ``ceiling_folds=0`` the ceiling (``None``): a caller that scores
    many subsets of one split computes those once. Returns ``{"classes", "n_train", "n_test", "knn": {k: metrics},
    "linear_probe": metrics, "ceiling": metrics | None, "y_test": test class indices, "predictions": {"knn_10",
    "knn_20", "linear_probe": predicted indices}, ...}`` (metrics: :func:`recognition_metrics`)."""
    classes = shared_classes([list(c) for c in train_classes], list(dict.fromkeys(test_classes)))
    if len(classes) < 2:
        raise DataError(f"the test patient shares {len(classes)} class{'' if len(classes) == 1 else 'es'} with the "
                        "training patients; recognition needs at least 2")
    index = {name: i for i, name in enumerate(classes)}
    xs, ys = [], []
    for feats, names in zip(train_features, train_classes):
        keep = [i for i, n in enumerate(names) if n in index]
        xs.append(np.asarray(feats)[keep])
        ys.append(np.array([index[names[i]] for i in keep], dtype=np.int64))
    x_train, y_train = np.concatenate(xs), np.concatenate(ys)
    if fraction != 1.0:
        from dagman.tasks.splits import fewshot_subset

        rows = fewshot_subset(np.arange(len(y_train)), y_train, None, fraction, seed=subset_seed)
        x_train, y_train = x_train[rows], y_train[rows]
    keep = [i for i, n in enumerate(test_classes) if n in index]
    x_test = np.asarray(test_features)[keep]
    y_test = np.array([index[test_classes[i]] for i in keep], dtype=np.int64)
    out: dict = {"classes": classes, "n_train": int(len(y_train)), "n_test": int(len(y_test)),
                 "fraction": float(fraction),
                 "test_rows_dropped": int(len(test_classes) - len(keep)), "knn": {},
                 "y_test": y_test.tolist(), "predictions": {}}
    for k in ks:
        pred = knn_predict(x_train, y_train, x_test, k=int(k), num_classes=len(classes))
        out["knn"][int(k)] = recognition_metrics(y_test, pred, classes, n_boot=n_boot, seed=seed)
        out["predictions"][f"knn_{int(k)}"] = np.asarray(pred).tolist()
    if len(np.unique(y_train)) >= 2:
        pred = _linear_probe().fit(x_train, y_train).predict(x_test)
        out["linear_probe"] = recognition_metrics(y_test, pred, classes, n_boot=n_boot, seed=seed)
        out["predictions"]["linear_probe"] = np.asarray(pred).tolist()
    out["ceiling"] = (ceiling(x_test, y_test, classes, folds=ceiling_folds, n_boot=n_boot, seed=seed)
                      if ceiling_folds else None)
    return out


def ceiling(features: np.ndarray, classes_of_rows: np.ndarray, classes: Sequence[str], *, folds: int = 5,
            n_boot: int = 1000, seed: int = 0) -> dict | None:
    """The linear probe trained and tested on one patient's crops: stratified K-fold out-of-fold predictions
    (K = ``folds``, or fewer when a class has fewer crops); None when a class has fewer than 2 crops."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    y = np.asarray(classes_of_rows, dtype=np.int64)
    counts = np.bincount(y, minlength=len(classes))
    present = counts[counts > 0]
    k = int(min(folds, present.min())) if present.size else 0
    if k < 2 or present.size < 2:
        return None
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=int(seed))
    pred = cross_val_predict(_linear_probe(), np.asarray(features), y, cv=cv)
    result = recognition_metrics(y, pred, classes, n_boot=n_boot, seed=seed)
    result["folds"] = k
    return result


def organ_recognition(encoder, train_cases: Sequence[tuple], test_case: tuple, *, size: int = 32,
                      spacing: float | None = None, crops_per_structure: int = 8, min_voxels: int | None = None,
                      mode: str = "crop", names=None, groups=None, ks: Sequence[int] = KNN_K, n_boot: int = 1000,
                      seed: int = 0, batch_size: int = 16, progress: bool = True, fraction: float = 1.0) -> dict:
    """Crops of every structure of each ``(image, labels)`` case (:func:`~dagman.tasks.cluster.make_structure_crops`
    with the encoder's HU window and, unless given, spacing), their frozen features (:func:`encode_crops`), and
    :func:`recognise` with ``train_cases`` against ``test_case`` (``fraction``: the share of the training crops
    kept, class-stratified, seeded by ``seed``). Adds per-case crop counts and classes."""
    from dagman.tasks.cluster import DEFAULT_MIN_VOXELS, encode_crops, make_structure_crops

    data_cfg = encoder.source.cfg.data
    spacing = float(spacing if spacing is not None else data_cfg.spacing_mm)

    def crops_of(case):
        image, labels = case
        return make_structure_crops(image, labels, spacing=spacing, hu_window=tuple(data_cfg.hu_window), size=size,
                                    crops_per_structure=crops_per_structure,
                                    min_voxels=min_voxels or DEFAULT_MIN_VOXELS, mode=mode, names=names,
                                    groups=groups, seed=seed, progress=progress)

    if not train_cases:
        raise DataError("organ recognition needs at least one training case (CT + label map)")
    train = [crops_of(c) for c in train_cases]
    test = crops_of(test_case)
    feats = [encode_crops(encoder, c, batch_size=batch_size, progress=progress) for c in train]
    test_feats = encode_crops(encoder, test, batch_size=batch_size, progress=progress)
    result = recognise(feats, [[c.class_names[i] for i in c.class_ids] for c in train], test_feats,
                       [test.class_names[i] for i in test.class_ids], ks=ks, n_boot=n_boot, seed=seed,
                       fraction=fraction, subset_seed=seed)
    result["cases"] = {"train": [{"image": c.image, "labels": c.labels, "crops": len(c.class_ids),
                                  "classes": c.class_names} for c in train],
                       "test": {"image": test.image, "labels": test.labels, "crops": len(test.class_ids),
                                "classes": test.class_names}}
    result.update({"encoder": encoder.source.description, "encoder_label": encoder.source.label,
                   "feature_source": encoder.feature_source, "crop_size": size, "spacing_mm": spacing, "mode": mode,
                   "crops_per_structure": crops_per_structure, "seed": seed})
    return result

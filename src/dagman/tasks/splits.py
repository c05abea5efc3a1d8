"""Data splits for the downstream protocols: stratified, patient-grouped k-fold cross-validation, few-shot
subsets of a training part, and the train/validation split inside it.

Every function works on row indices of one label table: ``labels`` ``(N,)`` are class labels (0/1 for the
binary tasks, the event indicator for survival), ``groups`` ``(N,)`` are patient ids (any hashable values;
``None`` = every row is its own patient). Rows of one patient always stay on one side of a split, so that
nodules of one patient never sit in both the training and the test part.

All functions are deterministic under ``seed`` and raise :class:`~dagman.errors.DataError` with a one-line
message when the data cannot be split as asked (too few patients of a class, a bad fraction).
"""

from __future__ import annotations

import numpy as np

from dagman.errors import DataError

#: Patient orders tried by :func:`stratified_group_folds` before it gives up.
FOLD_ATTEMPTS = 20

__all__ = ["stratified_group_folds", "fewshot_subset", "train_val_split", "min_groups_per_class"]


def _as_arrays(labels, groups) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).reshape(-1)
    g = np.arange(y.shape[0]) if groups is None else np.asarray(groups).reshape(-1)
    if g.shape[0] != y.shape[0]:
        raise DataError(f"labels have {y.shape[0]} rows but groups have {g.shape[0]}")
    return y, g


def _groups_per_class(y: np.ndarray, g: np.ndarray) -> dict:
    """``{class: number of distinct groups holding at least one row of that class}``."""
    return {c: int(np.unique(g[y == c]).shape[0]) for c in np.unique(y)}


def _class_name(c) -> str:
    return str(c.item() if hasattr(c, "item") else c)


def min_groups_per_class(k: int, min_train: int = 2) -> int:
    """The fewest patients a class needs so that ``k``-fold CV leaves every test fold at least one and every
    training part (the other folds, when folds are as even as possible) at least ``min_train``."""
    n = max(k, 1)
    while n - -(-n // k) < min_train:  # n minus the largest fold's share ceil(n / k)
        n += 1
    return n


def stratified_group_folds(labels, groups=None, k: int = 3, seed: int = 0) -> np.ndarray:
    """Assign every row to one of ``k`` folds: no patient in two folds, each fold's label balance as close to
    the whole table's as the patients allow (scikit-learn's ``StratifiedGroupKFold``, groups shuffled with
    ``seed``).

    Args:
        labels: ``(N,)`` class labels.
        groups: ``(N,)`` patient ids, or None (each row its own patient).
        k: number of folds, >= 2.
        seed: shuffling seed.
    Returns:
        ``(N,)`` int64 fold index in ``0..k-1`` per row.
    Raises:
        DataError: ``k < 2``, length mismatch, a single class, a class with fewer than ``k`` patients, or a
            fold left without one of the classes.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    y, g = _as_arrays(labels, groups)
    if int(k) != k or k < 2:
        raise DataError(f"the number of folds must be an integer >= 2, got {k}")
    k = int(k)
    counts = _groups_per_class(y, g)
    if len(counts) < 2:
        only = _class_name(next(iter(counts))) if counts else "none"
        raise DataError(f"cannot stratify {k} folds: all {y.shape[0]} rows have label {only}")
    for c, n in counts.items():
        if n < k:
            raise DataError(f"too few samples per class for {k} folds: label {_class_name(c)} has {n} "
                            f"patient(s); every fold needs at least one")
    # sklearn wants integer-like groups and labels; map both to codes
    _, y_codes = np.unique(y, return_inverse=True)
    _, g_codes = np.unique(g, return_inverse=True)
    # With patients of mixed labels the greedy assignment can leave a fold without a class; then redraw the
    # patient order (deterministically) a few times before giving up.
    for attempt in range(FOLD_ATTEMPTS):
        state = (int(seed) + attempt * 1_000_003) % (2**32)
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=state)
        fold = np.full(y.shape[0], -1, dtype=np.int64)
        for f, (_, test_idx) in enumerate(splitter.split(np.zeros(y.shape[0]), y_codes, g_codes)):
            fold[test_idx] = f
        lacking = [(f, c) for f in range(k) for c in counts if not np.any(y[fold == f] == c)]
        if not lacking:
            return fold
    f, c = lacking[0]
    raise DataError(f"fold {f} has no row with label {_class_name(c)} after {FOLD_ATTEMPTS} draws (patients with "
                    "mixed labels leave too little room); use fewer folds")


def _select_groups(idx: np.ndarray, y: np.ndarray, g: np.ndarray, fraction: float, rng: np.random.Generator,
                   min_per_class: int, what: str) -> np.ndarray:
    """Rows of ``idx`` whose patients were picked: per class (a patient counts for its majority label, ties to
    the larger label), ``round(fraction * patients)`` patients at random, at least ``min_per_class``; then
    patients holding a still under-represented class are added until every class is held by at least
    ``min_per_class`` picked patients. Returns sorted row indices."""
    idx = np.asarray(idx, dtype=np.int64)
    gi, yi = g[idx], y[idx]
    ug, inv = np.unique(gi, return_inverse=True)
    classes = np.unique(y)
    # (groups, classes) row counts -> majority label per group
    table = np.zeros((ug.shape[0], classes.shape[0]), dtype=np.int64)
    np.add.at(table, (inv, np.searchsorted(classes, yi)), 1)
    major = table.shape[1] - 1 - np.argmax(table[:, ::-1], axis=1)  # ties -> the larger label
    picked = np.zeros(ug.shape[0], dtype=bool)
    for ci in range(classes.shape[0]):
        members = np.flatnonzero(major == ci)
        if members.shape[0] == 0:
            continue
        members = rng.permutation(members)
        n_take = int(np.floor(fraction * members.shape[0] + 0.5))
        n_take = min(members.shape[0], max(min_per_class, n_take))
        picked[members[:n_take]] = True
    for ci, c in enumerate(classes):
        holders = np.flatnonzero(table[:, ci] > 0)
        have = int(picked[holders].sum())
        if have >= min_per_class:
            continue
        spare = rng.permutation(holders[~picked[holders]])
        need = min_per_class - have
        if spare.shape[0] < need:
            raise DataError(f"{what}: only {holders.shape[0]} patient(s) with label {_class_name(c)}; need at "
                            f"least {min_per_class}")
        picked[spare[:need]] = True
    return np.sort(idx[picked[inv]])


def fewshot_subset(train_idx, labels, groups=None, fraction: float = 1.0, seed: int = 0,
                   min_per_class: int = 1) -> np.ndarray:
    """The few-shot part of a training fold: about ``fraction`` of its patients, drawn per class (stratified
    by label), whole patients only, at least ``min_per_class`` patients holding each class.

    Args:
        train_idx: ``(M,)`` row indices of the training part.
        labels: ``(N,)`` class labels of the whole table.
        groups: ``(N,)`` patient ids of the whole table, or None.
        fraction: in (0, 1]; 1.0 keeps every row.
        seed: sampling seed.
        min_per_class: patients of each class that must be kept (1 by default; 2 when the subset is split
            again into train and validation).
    Returns:
        Sorted ``(M',)`` int64 row indices, a subset of ``train_idx``.
    Raises:
        DataError: fraction outside (0, 1], or a class with fewer than ``min_per_class`` patients.
    """
    y, g = _as_arrays(labels, groups)
    if not (isinstance(fraction, (int, float, np.floating)) and 0.0 < float(fraction) <= 1.0):
        raise DataError(f"fraction must be in (0, 1] (e.g. 0.25, 0.5, 1.0), got {fraction}", option="fraction")
    rng = np.random.default_rng(seed)
    return _select_groups(np.asarray(train_idx), y, g, float(fraction), rng, min_per_class,
                          f"{float(fraction):.0%} few-shot subset")


def train_val_split(idx, labels, groups=None, val_fraction: float = 0.2,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split rows ``idx`` by patient into a training and a validation part, stratified by label: about
    ``val_fraction`` of each class's patients (at least one) go to validation; both parts hold every class.

    Returns:
        ``(train (M1,), val (M2,))`` sorted int64 row indices; disjoint, union = ``idx``.
    Raises:
        DataError: ``val_fraction`` outside (0, 1), or a class held by fewer than two patients.
    """
    y, g = _as_arrays(labels, groups)
    if not 0.0 < float(val_fraction) < 1.0:
        raise DataError(f"the validation fraction must be in (0, 1), got {val_fraction}")
    idx = np.asarray(idx, dtype=np.int64)
    for c, n in _groups_per_class(y[idx], g[idx]).items():
        if n < 2:
            raise DataError(f"cannot split off a validation part: label {_class_name(c)} has only {n} patient "
                            "in this training part (need 2: one to train, one to validate)")
    rng = np.random.default_rng(seed)
    val = _select_groups(idx, y, g, float(val_fraction), rng, 1, "validation part")
    train = np.setdiff1d(idx, val)
    missing = set(np.unique(y[idx]).tolist()) - set(np.unique(y[train]).tolist())
    if missing:
        raise DataError(f"validation split left no training row with label {_class_name(sorted(missing)[0])} "
                        "(patients with mixed labels); use a larger <<fraction>>")
    return train, val

"""Splits for the downstream protocols: patient-grouped stratified folds, few-shot subsets, train/val split."""

from __future__ import annotations

import numpy as np
import pytest

from dagman.errors import DataError
from dagman.tasks.splits import fewshot_subset, min_groups_per_class, stratified_group_folds, train_val_split


def _cohort(n_patients=60, seed=0, mixed=False):
    """Patients with 1-3 rows each; ~35% positive patients; with ``mixed`` some patients hold both labels."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for p in range(n_patients):
        lab = int(rng.random() < 0.35)
        for _ in range(int(rng.integers(1, 4))):
            labels.append(1 - lab if mixed and rng.random() < 0.2 else lab)
            groups.append(f"p{p}")
    return np.array(labels), np.array(groups)


def _no_group_on_two_sides(fold, groups):
    for g in np.unique(groups):
        assert np.unique(fold[groups == g]).shape[0] == 1, g


@pytest.mark.parametrize("k", [2, 3, 5])
def test_folds_keep_patients_together_and_balance_labels(k):
    y, g = _cohort(90, seed=k)
    fold = stratified_group_folds(y, g, k, seed=3)
    assert fold.shape == y.shape and fold.dtype == np.int64
    assert set(fold.tolist()) == set(range(k))
    _no_group_on_two_sides(fold, g)
    overall = y.mean()
    for f in range(k):
        part = y[fold == f]
        assert 0 < part.sum() < part.shape[0]
        # whole patients of 1-3 rows: balance within a few percentage points of the whole table
        assert abs(part.mean() - overall) < 0.08, (f, part.mean(), overall)
        assert abs(part.shape[0] - y.shape[0] / k) <= 0.2 * y.shape[0] / k + 3


def test_folds_without_groups_are_exactly_stratified():
    y = np.array([1] * 12 + [0] * 30)
    fold = stratified_group_folds(y, None, 3, seed=0)
    assert [int(y[fold == f].sum()) for f in range(3)] == [4, 4, 4]
    assert [int((fold == f).sum()) for f in range(3)] == [14, 14, 14]


def test_folds_are_deterministic_and_depend_on_seed():
    y, g = _cohort(60, seed=1)
    a = stratified_group_folds(y, g, 3, seed=7)
    b = stratified_group_folds(y, g, 3, seed=7)
    c = stratified_group_folds(y, g, 3, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_folds_with_mixed_label_patients_still_hold_both_classes():
    for seed in range(5):
        y, g = _cohort(40, seed=seed, mixed=True)
        fold = stratified_group_folds(y, g, 3, seed=seed)
        _no_group_on_two_sides(fold, g)
        for f in range(3):
            assert set(y[fold == f].tolist()) == {0, 1}


def test_string_labels_and_groups_are_accepted():
    y = np.array(["benign", "malignant"] * 9)
    g = np.array([f"pt{i // 2}" for i in range(18)])  # each patient one benign + one malignant
    fold = stratified_group_folds(y, g, 3, seed=0)
    _no_group_on_two_sides(fold, g)
    assert [int((fold == f).sum()) for f in range(3)] == [6, 6, 6]


def test_fold_errors():
    y = np.array([1, 1, 0, 0, 0, 0])
    with pytest.raises(DataError, match=r"too few samples per class for 3 folds: label 1 has 2 patient"):
        stratified_group_folds(y, None, 3)
    # four rows of label 1 but only two patients
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    g = np.array(["a", "a", "b", "b", "c", "d", "e", "f", "g", "h"])
    with pytest.raises(DataError, match="label 1 has 2 patient"):
        stratified_group_folds(y, g, 3)
    with pytest.raises(DataError, match="all 4 rows have label 1"):
        stratified_group_folds(np.ones(4, int), None, 2)
    with pytest.raises(DataError, match="integer >= 2"):
        stratified_group_folds(np.array([0, 1] * 5), None, 1)
    with pytest.raises(DataError, match="groups have 3"):
        stratified_group_folds(np.array([0, 1] * 5), np.arange(3), 2)


def test_min_groups_per_class():
    # every test fold one patient, every training part two (train + validation)
    assert min_groups_per_class(3) == 3
    assert min_groups_per_class(2) == 4
    assert min_groups_per_class(5) == 5
    for k in range(2, 8):
        n = min_groups_per_class(k)
        assert n >= k and n - -(-n // k) >= 2 and (n - 1 < k or (n - 1) - -(-(n - 1) // k) < 2)


def test_fewshot_subset_is_stratified_by_patient_and_deterministic():
    y, g = _cohort(80, seed=2)
    train = np.flatnonzero(stratified_group_folds(y, g, 3, seed=0) != 0)
    pats = {c: {p for p in np.unique(g[train]) if y[train][g[train] == p][0] == c} for c in (0, 1)}
    for frac in (0.25, 0.5):
        sub = fewshot_subset(train, y, g, frac, seed=5)
        assert np.all(np.isin(sub, train)) and np.all(np.diff(sub) > 0)
        kept = set(g[sub].tolist())
        # whole patients: every row of a kept patient (within the training part) is kept
        in_train = np.isin(np.arange(len(y)), train)
        assert set(np.flatnonzero(np.isin(g, list(kept)) & in_train).tolist()) == set(sub.tolist())
        for c in (0, 1):
            n_c = len(pats[c] & kept)
            assert n_c == int(np.floor(frac * len(pats[c]) + 0.5)), (frac, c, n_c, len(pats[c]))
        np.testing.assert_array_equal(sub, fewshot_subset(train, y, g, frac, seed=5))
        assert not np.array_equal(sub, fewshot_subset(train, y, g, frac, seed=6))
    np.testing.assert_array_equal(fewshot_subset(train, y, g, 1.0, seed=1), np.sort(train))


def test_fewshot_subset_keeps_at_least_min_per_class():
    y = np.array([1] * 3 + [0] * 40)
    idx = np.arange(43)
    sub = fewshot_subset(idx, y, None, 0.05, seed=0)
    assert int(y[sub].sum()) == 1 and int((y[sub] == 0).sum()) == 2  # round(0.15)=0 -> 1; round(2.0) = 2
    sub = fewshot_subset(idx, y, None, 0.05, seed=0, min_per_class=2)
    assert int(y[sub].sum()) == 2 and int((y[sub] == 0).sum()) == 2
    with pytest.raises(DataError, match="only 3 patient"):
        fewshot_subset(idx, y, None, 0.05, seed=0, min_per_class=4)


@pytest.mark.parametrize("bad", [0.0, -0.25, 1.5])
def test_fewshot_subset_rejects_bad_fraction(bad):
    with pytest.raises(DataError, match=r"^fraction must be in \(0, 1\]"):
        fewshot_subset(np.arange(10), np.array([0, 1] * 5), None, bad)


def test_train_val_split_by_patient():
    y, g = _cohort(50, seed=4)
    idx = np.arange(len(y))
    tr, va = train_val_split(idx, y, g, 0.2, seed=0)
    assert np.intersect1d(tr, va).size == 0
    np.testing.assert_array_equal(np.union1d(tr, va), idx)
    assert not set(g[tr]) & set(g[va])
    assert set(y[tr].tolist()) == {0, 1} and set(y[va].tolist()) == {0, 1}
    share = np.unique(g[va]).shape[0] / np.unique(g).shape[0]
    assert 0.12 < share < 0.3
    tr2, va2 = train_val_split(idx, y, g, 0.2, seed=0)
    np.testing.assert_array_equal(va, va2)
    # two patients of a class: one each side
    y = np.array([1, 1, 0, 0, 0, 0])
    tr, va = train_val_split(np.arange(6), y, None, 0.2, seed=0)
    assert y[tr].sum() == 1 and y[va].sum() == 1
    with pytest.raises(DataError, match="label 1 has only 1 patient"):
        train_val_split(np.arange(5), np.array([1, 0, 0, 0, 0]), None, 0.2)

"""Task metrics against reference implementations: scikit-learn AUC, brute-force C-index, MONAI / scipy Dice and
HD95 on spheres, bootstrap CI behaviour, one-line errors."""

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from dagman.errors import DataError
from dagman.tasks.metrics import (
    bootstrap_ci,
    concordance_index,
    dice_score,
    hd95,
    roc_auc,
    sensitivity_specificity,
    threshold_at_youden,
)


# ---------------------------------------------------------------- AUC, Youden, sensitivity / specificity


@pytest.mark.parametrize("case", range(12))
def test_roc_auc_matches_sklearn_on_random_cases_with_ties(case):
    rng = np.random.default_rng(case)
    n = int(rng.integers(5, 400))
    y = rng.integers(0, 2, size=n)
    y[0], y[1] = 0, 1  # both classes present
    score = rng.normal(size=n) + 0.8 * y
    if case % 2:  # heavy ties: round the scores to a few levels
        score = np.round(score, 0)
    assert roc_auc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)


def test_roc_auc_extremes_bool_labels_and_torch_input():
    y = np.array([False, False, True, True])
    assert roc_auc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert roc_auc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert roc_auc(torch.tensor([0, 1, 0, 1]), torch.tensor([0.1, 0.7, 0.4, 0.3])) == 0.75


def test_roc_auc_one_class_error_is_one_line():
    with pytest.raises(DataError) as err:
        roc_auc([1, 1, 1], [0.2, 0.5, 0.9])
    msg = str(err.value)
    assert "\n" not in msg and "one class" in msg and "roc_auc" in msg


@pytest.mark.parametrize(
    "y, score, needle",
    [
        ([0, 1, 0], [0.1, 0.2], "3 samples but score has 2"),
        ([0, 1, 0], [0.1, np.nan, 0.3], "NaN"),
        ([0, 2, 1], [0.1, 0.2, 0.3], "binary"),
    ],
)
def test_roc_auc_bad_input_errors(y, score, needle):
    with pytest.raises(DataError, match=needle) as err:
        roc_auc(y, score)
    assert "\n" not in str(err.value)


def test_youden_threshold_matches_brute_force_search():
    rng = np.random.default_rng(3)
    for _ in range(10):
        n = int(rng.integers(10, 200))
        y = rng.integers(0, 2, size=n)
        y[:2] = [0, 1]
        score = np.round(rng.normal(size=n) + y, 1)
        t = threshold_at_youden(y, score)
        assert t in score
        best = max(sum(sensitivity_specificity(y, score, c)) - 1.0 for c in np.unique(score))
        assert sum(sensitivity_specificity(y, score, t)) - 1.0 == pytest.approx(best, abs=1e-12)
        # ties in J resolve to the highest threshold
        higher = [c for c in np.unique(score) if c > t]
        assert all(sum(sensitivity_specificity(y, score, c)) - 1.0 < best - 1e-12 for c in higher)


def test_sensitivity_specificity_by_hand():
    y = [0, 0, 0, 1, 1, 1, 1]
    score = [0.1, 0.4, 0.6, 0.3, 0.6, 0.8, 0.9]
    sens, spec = sensitivity_specificity(y, score, 0.6)  # score >= 0.6 -> positive
    assert sens == pytest.approx(3 / 4) and spec == pytest.approx(2 / 3)
    assert threshold_at_youden([0, 0, 1, 1], [0.1, 0.3, 0.35, 0.9]) == 0.35


# ---------------------------------------------------------------- bootstrap


def _auc_data(n, seed):
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(n // 2, int), np.ones(n - n // 2, int)]
    return y, rng.normal(size=n) + 1.0 * y


def test_bootstrap_ci_contains_point_and_narrows_with_n():
    widths = []
    for n in (60, 600):
        y, s = _auc_data(n, seed=1)
        point, low, high = bootstrap_ci(roc_auc, y, s, n_boot=400, seed=0, stratify=y)
        assert point == pytest.approx(roc_auc(y, s))
        assert low < point < high
        assert 0.0 <= low and high <= 1.0
        widths.append(high - low)
    assert widths[1] < 0.6 * widths[0]  # ~1/sqrt(10) in theory


def test_bootstrap_ci_is_deterministic_under_seed_and_matches_normal_theory_for_mean():
    x = np.random.default_rng(0).normal(loc=2.0, scale=1.0, size=400)
    a = bootstrap_ci(np.mean, x, n_boot=2000, seed=7)
    assert a == bootstrap_ci(np.mean, x, n_boot=2000, seed=7)
    assert a != bootstrap_ci(np.mean, x, n_boot=2000, seed=8)
    point, low, high = a
    se = x.std() / np.sqrt(x.size)
    assert (high - low) == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_bootstrap_skips_one_class_resamples_without_stratify():
    y = np.array([0] * 9 + [1])  # one positive: ~35% of resamples lack it
    s = np.linspace(0.0, 1.0, 10)
    with pytest.warns(RuntimeWarning, match="skipped"):
        point, low, high = bootstrap_ci(roc_auc, y, s, n_boot=200, seed=0)
    assert point == 1.0 and low == 1.0 and high == 1.0
    # stratified resampling keeps one positive in every replicate: no warning, nothing skipped
    assert bootstrap_ci(roc_auc, y, s, n_boot=200, seed=0, stratify=y) == (1.0, 1.0, 1.0)


def test_bootstrap_all_replicates_undefined_and_length_mismatch_errors():
    def distinct_count(a):  # defined only without repeats: fails on (almost) every resample of 10
        if len(np.unique(a)) < len(a):
            raise DataError("repeats")
        return float(len(a))

    with pytest.raises(DataError, match="undefined on all 50"):
        bootstrap_ci(distinct_count, np.arange(10), n_boot=50)
    with pytest.raises(DataError, match="different numbers of samples"):
        bootstrap_ci(roc_auc, np.zeros(5), np.zeros(4))


# ---------------------------------------------------------------- C-index


def _brute_force_c_index(time, event, risk):
    num = den = 0.0
    n = len(time)
    for i in range(n):
        if not event[i]:
            continue
        for j in range(n):
            if i == j:
                continue
            if time[i] < time[j] or (time[i] == time[j] and not event[j]):
                den += 1
                if risk[i] > risk[j]:
                    num += 1
                elif risk[i] == risk[j]:
                    num += 0.5
    return num / den


@pytest.mark.parametrize("case", range(10))
def test_concordance_index_matches_brute_force_with_ties_and_censoring(case):
    rng = np.random.default_rng(100 + case)
    n = int(rng.integers(5, 120))
    time = rng.integers(1, 30, size=n).astype(float)  # tied times on purpose
    event = rng.random(n) < 0.6
    event[0] = True
    risk = np.round(-time / 10 + rng.normal(scale=1.0, size=n), 0)  # tied risks on purpose
    expected = _brute_force_c_index(time, event, risk)
    assert concordance_index(time, event, risk) == pytest.approx(expected, abs=1e-12)
    assert concordance_index(time, event, risk, block_rows=7) == pytest.approx(expected, abs=1e-12)


def test_concordance_index_perfect_reverse_and_errors():
    time = np.array([1.0, 2.0, 3.0, 4.0])
    event = np.array([1, 1, 1, 0])
    assert concordance_index(time, event, -time) == 1.0
    assert concordance_index(time, event, time) == 0.0
    assert concordance_index(time, event, np.zeros(4)) == 0.5
    with pytest.raises(DataError, match="no comparable pairs"):
        concordance_index(time, np.zeros(4), -time)
    with pytest.raises(DataError, match="4, 4, 3 samples"):
        concordance_index(time, event, time[:3])


# ---------------------------------------------------------------- Dice / HD95


def _sphere(shape, centre_mm, radius_mm, spacing):
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre_mm)) <= radius_mm**2


def _scipy_hd95(a, b, spacing):
    """Independent reference: surface voxels by 6-neighbour erosion, EDT in mm, 95th percentile each way."""
    ea = a ^ ndimage.binary_erosion(a)
    eb = b ^ ndimage.binary_erosion(b)
    d_ab = ndimage.distance_transform_edt(~eb, sampling=spacing)[ea]
    d_ba = ndimage.distance_transform_edt(~ea, sampling=spacing)[eb]
    return max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))


SPACING = (1.0, 1.0, 2.0)
SHAPE = (40, 40, 20)
CENTRE = (20.0, 20.0, 20.0)


def test_dice_and_hd95_concentric_spheres_known_values():
    inner = _sphere(SHAPE, CENTRE, 10.0, SPACING)
    outer = _sphere(SHAPE, CENTRE, 14.0, SPACING)
    # Dice: exact voxel count, and close to the continuous 2 r^3 / (r^3 + R^3)
    exact = 2 * inner.sum() / (inner.sum() + outer.sum())
    assert dice_score(inner, outer) == pytest.approx(exact, abs=1e-6)
    assert dice_score(inner, outer) == pytest.approx(2 * 10**3 / (10**3 + 14**3), abs=0.03)
    # HD95: every surface point is 4 mm from the other surface
    h = hd95(inner, outer, SPACING)
    assert h == pytest.approx(_scipy_hd95(inner, outer, SPACING), abs=1e-4)
    assert h == pytest.approx(4.0, abs=1.0)
    assert hd95(outer, inner, SPACING) == pytest.approx(h, abs=1e-6)  # symmetric


def test_dice_and_hd95_shifted_spheres_match_references():
    a = _sphere(SHAPE, CENTRE, 9.0, SPACING)
    b = _sphere(SHAPE, (23.0, 20.0, 22.0), 9.0, SPACING)
    inter = (a & b).sum()
    assert dice_score(torch.from_numpy(a), torch.from_numpy(b.astype(np.uint8))) == pytest.approx(
        2 * inter / (a.sum() + b.sum()), abs=1e-6
    )
    h = hd95(a, b, SPACING)
    assert h == pytest.approx(_scipy_hd95(a, b, SPACING), abs=1e-4)
    assert 0.0 < h <= np.hypot(3.0, 2.0) + 1.0  # bounded by the centre shift (plus a voxel)
    assert hd95(a, a, SPACING) == 0.0 and dice_score(a, a) == 1.0


def test_empty_mask_conventions():
    empty = np.zeros(SHAPE, bool)
    ball = _sphere(SHAPE, CENTRE, 5.0, SPACING)
    assert dice_score(empty, empty) == 1.0 and hd95(empty, empty, SPACING) == 0.0
    assert dice_score(ball, empty) == 0.0 and dice_score(empty, ball) == 0.0
    assert hd95(ball, empty, SPACING) == np.inf and hd95(empty, ball, SPACING) == np.inf


def test_mask_errors_are_one_line():
    ball = _sphere(SHAPE, CENTRE, 5.0, SPACING)
    for call, needle in [
        (lambda: dice_score(ball, ball[:-1]), "differs from target shape"),
        (lambda: dice_score(ball * 2.0, ball), "binary mask"),
        (lambda: hd95(ball, ball, (1.0, 1.0)), "spacing must be 3 positive"),
    ]:
        with pytest.raises(DataError, match=needle) as err:
            call()
        assert "\n" not in str(err.value)

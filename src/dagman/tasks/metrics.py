"""Evaluation metrics for the downstream tasks: ROC AUC (by hand: scikit-learn's value, faster in the bootstrap),
the Youden threshold (scikit-learn's ROC curve), sensitivity/specificity, percentile bootstrap confidence intervals
(stratified resampling, which ``scipy.stats.bootstrap`` does not offer), Harrell's C-index (by hand: lifelines'
value, faster in the bootstrap), and Dice / HD95 for binary segmentation masks (MONAI).

All functions are pure (array in, number out), take numpy arrays or anything ``np.asarray`` accepts (torch tensors
included), and raise :class:`dagman.errors.DataError` with a one-line message for input they cannot score (one
class only, mismatched lengths, NaN scores, no comparable pairs, non-binary masks).

Conventions:

* Binary labels ``y_true`` are ``(N,)`` with values in {0, 1} (or bool); 1 is the positive class.
* Scores ``score`` are ``(N,)`` floats; a higher score means "more likely positive". A sample is called positive
  at threshold ``t`` when ``score >= t``.
* Survival: ``time`` ``(N,)`` in any unit (days, months), ``event`` ``(N,)`` 1 = event observed, 0 = censored;
  ``risk`` ``(N,)`` where a higher risk means an earlier expected event.
* Masks: ``pred`` and ``target`` are binary volumes of the same spatial shape ``(X, Y, Z)`` (or 2D ``(X, Y)``);
  ``spacing`` is the voxel size in mm per axis, so HD95 is in mm.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import rankdata

from dagman.errors import DataError

__all__ = [
    "roc_auc",
    "threshold_at_youden",
    "sensitivity_specificity",
    "bootstrap_ci",
    "concordance_index",
    "dice_score",
    "hd95",
]


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_binary_scores(y_true, score, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``(N,)`` labels in {0, 1} and ``(N,)`` finite scores; return (bool labels, float64 scores)."""
    y = _to_numpy(y_true).reshape(-1)
    s = _to_numpy(score).astype(np.float64).reshape(-1)
    if y.shape[0] != s.shape[0]:
        raise DataError(f"{what}: y_true has {y.shape[0]} samples but score has {s.shape[0]}")
    if y.shape[0] == 0:
        raise DataError(f"{what}: no samples")
    if np.isnan(s).any():
        raise DataError(f"{what}: score contains {int(np.isnan(s).sum())} NaN value(s)")
    if y.dtype != bool:
        yf = y.astype(np.float64)
        if not np.isin(yf, (0.0, 1.0)).all():
            bad = np.unique(yf[~np.isin(yf, (0.0, 1.0))])[:5].tolist()
            raise DataError(f"{what}: y_true must be binary 0/1, found value(s) {bad}")
        y = yf == 1.0
    return y, s


def _require_both_classes(y: np.ndarray, what: str) -> tuple[int, int]:
    n_pos = int(y.sum())
    n_neg = int(y.shape[0] - n_pos)
    if n_pos == 0 or n_neg == 0:
        only = "negative (0)" if n_pos == 0 else "positive (1)"
        raise DataError(f"{what}: y_true has only one class ({y.shape[0]} {only} samples); need both 0 and 1")
    return n_pos, n_neg


def roc_auc(y_true, score) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic, O(N log N).

    Equals P(score_pos > score_neg) + 0.5 * P(score_pos == score_neg) over all positive/negative pairs, i.e. tied
    scores count one half: ``sklearn.metrics.roc_auc_score``'s value (tests/test_task_metrics.py), 14x faster
    inside the bootstrap that calls it a thousand times per interval (benchmarks/metrics_speed.py).

    Args:
        y_true: ``(N,)`` labels in {0, 1}.
        score: ``(N,)`` float scores, higher = more likely positive; no NaN.
    Returns:
        AUC in [0, 1].
    Raises:
        DataError: lengths differ, NaN scores, non-binary labels, or only one class present.
    """
    y, s = _check_binary_scores(y_true, score, "roc_auc")
    n_pos, n_neg = _require_both_classes(y, "roc_auc")
    ranks = rankdata(s, method="average")  # ties get their mean rank -> they count one half
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def threshold_at_youden(y_true, score) -> float:
    """Score threshold maximising Youden's J = sensitivity + specificity - 1 (choose it on validation data).

    Candidate thresholds are the observed scores (``sklearn.metrics.roc_curve`` without dropping any); the rule is
    ``score >= threshold`` -> positive. When several thresholds reach the same maximal J the highest one (the most
    specific) is returned.

    Args:
        y_true: ``(N,)`` labels in {0, 1} with both classes present.
        score: ``(N,)`` float scores, no NaN.
    Returns:
        The threshold, one of the values in ``score``.
    """
    from sklearn.metrics import roc_curve

    y, s = _check_binary_scores(y_true, score, "threshold_at_youden")
    _require_both_classes(y, "threshold_at_youden")
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    j = (tpr - fpr)[1:]  # point 0 is roc_curve's "nothing called positive" (threshold +inf)
    return float(thresholds[1:][int(np.argmax(j))])  # argmax: the first (highest-threshold) maximum


def sensitivity_specificity(y_true, score, threshold: float) -> tuple[float, float]:
    """Sensitivity (TP / P) and specificity (TN / N) of the rule ``score >= threshold`` -> positive.

    Args:
        y_true: ``(N,)`` labels in {0, 1} with both classes present.
        score: ``(N,)`` float scores, no NaN.
        threshold: decision threshold, e.g. from :func:`threshold_at_youden` on validation data.
    Returns:
        ``(sensitivity, specificity)``, each in [0, 1].
    """
    y, s = _check_binary_scores(y_true, score, "sensitivity_specificity")
    n_pos, n_neg = _require_both_classes(y, "sensitivity_specificity")
    called = s >= threshold
    sens = float((called & y).sum() / n_pos)
    spec = float((~called & ~y).sum() / n_neg)
    return sens, spec


def bootstrap_ci(
    metric_fn: Callable[..., float],
    *arrays,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    stratify=None,
) -> tuple[float, float, float]:
    """Percentile bootstrap confidence interval of ``metric_fn(*arrays)`` over samples.

    Each replicate draws N sample indices with replacement (all ``n_boot`` index sets are drawn at once from
    ``np.random.default_rng(seed)``, so the result is deterministic under the seed) and evaluates ``metric_fn`` on
    the same indices of every array. With ``stratify`` (an ``(N,)`` array of group labels, typically ``y_true``)
    indices are drawn within each group keeping the group sizes, so every replicate contains every class — use
    this for AUC, sensitivity and specificity.

    Replicates on which the metric is undefined — ``metric_fn`` raises :class:`DataError` (e.g. a resample
    without positives for AUC) or returns NaN — are skipped, not redrawn; the interval comes from the remaining
    replicates, and a ``RuntimeWarning`` reports how many were skipped when any were.

    Args:
        metric_fn: ``metric_fn(*resampled_arrays) -> float``.
        *arrays: one or more arrays sharing their first dimension N (samples).
        n_boot: number of bootstrap replicates.
        alpha: the interval is the ``[alpha/2, 1 - alpha/2]`` quantile range of the replicates.
        seed: seed of the resampling generator.
        stratify: optional ``(N,)`` group labels for stratified resampling.
    Returns:
        ``(point, low, high)``: ``point = metric_fn(*arrays)`` on the full data, and the interval bounds.
    Raises:
        DataError: no arrays, different lengths, bad ``n_boot``/``alpha``, or no replicate where the metric is
            defined.
    """
    if not arrays:
        raise DataError("bootstrap_ci: no arrays given")
    if n_boot < 1:
        raise DataError(f"bootstrap_ci: n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise DataError(f"bootstrap_ci: alpha must be in (0, 1), got {alpha}")
    arrs = [_to_numpy(a) for a in arrays]
    n = arrs[0].shape[0]
    lengths = [a.shape[0] for a in arrs]
    if any(length != n for length in lengths):
        raise DataError(f"bootstrap_ci: arrays have different numbers of samples {lengths}")
    if n == 0:
        raise DataError("bootstrap_ci: no samples")

    point = float(metric_fn(*arrs))
    rng = np.random.default_rng(seed)
    if stratify is None:
        idx = rng.integers(0, n, size=(n_boot, n))
    else:
        groups = _to_numpy(stratify).reshape(-1)
        if groups.shape[0] != n:
            raise DataError(f"bootstrap_ci: stratify has {groups.shape[0]} samples but the arrays have {n}")
        parts = []
        for g in np.unique(groups):
            members = np.flatnonzero(groups == g)
            parts.append(members[rng.integers(0, members.shape[0], size=(n_boot, members.shape[0]))])
        idx = np.concatenate(parts, axis=1)

    values = np.empty(n_boot, dtype=np.float64)
    for b in range(n_boot):
        try:
            values[b] = metric_fn(*(a[idx[b]] for a in arrs))
        except DataError:
            values[b] = np.nan
    valid = values[~np.isnan(values)]
    if valid.size == 0:
        raise DataError(f"bootstrap_ci: the metric was undefined on all {n_boot} bootstrap replicates")
    if valid.size < n_boot:
        warnings.warn(
            f"bootstrap_ci: skipped {n_boot - valid.size} of {n_boot} replicates where the metric is undefined",
            RuntimeWarning,
            stacklevel=2,
        )
    low, high = np.quantile(valid, [alpha / 2.0, 1.0 - alpha / 2.0])
    return point, float(low), float(high)


def concordance_index(time, event, risk, *, block_rows: int = 1024) -> float:
    """Harrell's concordance index for right-censored survival data; O(N^2) vectorised in row blocks: the value of
    ``lifelines.utils.concordance_index`` (tests/test_outcome.py), 5x faster inside the bootstrap
    (benchmarks/metrics_speed.py).

    A pair (i, j) is comparable when sample i had an observed event (``event[i] == 1``) and either
    ``time[i] < time[j]``, or ``time[i] == time[j]`` and j is censored (j was still event-free at that time; the
    same convention as lifelines and scikit-survival). Two events at the same time are not comparable. A
    comparable pair is concordant when ``risk[i] > risk[j]`` (higher risk, earlier event) and counts 0.5 when the
    risks tie.

    Args:
        time: ``(N,)`` follow-up times (any unit), finite.
        event: ``(N,)`` 1/True = event observed, 0/False = censored.
        risk: ``(N,)`` predicted risk, higher = earlier event; no NaN.
        block_rows: rows of the pair matrix processed at once (bounds memory to ``block_rows * N`` booleans).
    Returns:
        C in [0, 1]; 0.5 is random ordering.
    Raises:
        DataError: lengths differ, NaN/inf values, non-binary events, or no comparable pair.
    """
    t = _to_numpy(time).astype(np.float64).reshape(-1)
    e = _to_numpy(event).reshape(-1)
    r = _to_numpy(risk).astype(np.float64).reshape(-1)
    if not (t.shape[0] == e.shape[0] == r.shape[0]):
        raise DataError(
            f"concordance_index: time, event, risk have {t.shape[0]}, {e.shape[0]}, {r.shape[0]} samples"
        )
    if not np.isfinite(t).all():
        raise DataError("concordance_index: time contains NaN or infinite values")
    if np.isnan(r).any():
        raise DataError(f"concordance_index: risk contains {int(np.isnan(r).sum())} NaN value(s)")
    ef = e.astype(np.float64)
    if not np.isin(ef, (0.0, 1.0)).all():
        raise DataError("concordance_index: event must be binary 0/1")
    e = ef == 1.0

    concordant = 0.0
    comparable = 0
    events = np.flatnonzero(e)  # only rows with an event can start a comparable pair
    for start in range(0, events.shape[0], block_rows):
        rows = events[start : start + block_rows]
        ti, ri = t[rows, None], r[rows, None]
        comp = (ti < t[None, :]) | ((ti == t[None, :]) & ~e[None, :])
        comparable += int(comp.sum())
        concordant += float((comp & (ri > r[None, :])).sum()) + 0.5 * float((comp & (ri == r[None, :])).sum())
    if comparable == 0:
        raise DataError("concordance_index: no comparable pairs (need an event before another sample's time)")
    return concordant / comparable


def _binary_volume(x, name: str, what: str) -> np.ndarray:
    v = _to_numpy(x)
    if v.dtype != bool:
        vf = v.astype(np.float64)
        if not np.isin(vf, (0.0, 1.0)).all():
            raise DataError(f"{what}: {name} must be a binary mask (0/1 or bool)")
        v = vf == 1.0
    return v


def _mask_pair(pred, target, what: str):
    import torch

    p = _binary_volume(pred, "pred", what)
    t = _binary_volume(target, "target", what)
    if p.shape != t.shape:
        raise DataError(f"{what}: pred shape {p.shape} differs from target shape {t.shape}")
    if p.ndim not in (2, 3):
        raise DataError(f"{what}: masks must be 2D (X, Y) or 3D (X, Y, Z), got shape {p.shape}")
    # MONAI expects (B, C, *spatial)
    return p, t, torch.from_numpy(p[None, None].astype(np.float32)), torch.from_numpy(t[None, None].astype(np.float32))


def dice_score(pred, target) -> float:
    """Dice overlap 2|P ∩ T| / (|P| + |T|) of two binary masks, computed with ``monai.metrics.DiceMetric``.

    Empty masks: both empty -> 1.0 (perfect agreement that there is nothing); exactly one empty -> 0.0.

    Args:
        pred: ``(X, Y, Z)`` or ``(X, Y)`` binary mask (numpy or torch; bool or 0/1).
        target: binary mask of the same shape.
    Returns:
        Dice in [0, 1].
    """
    from monai.metrics import DiceMetric

    p, t, p_t, t_t = _mask_pair(pred, target, "dice_score")
    p_any, t_any = bool(p.any()), bool(t.any())
    if not p_any and not t_any:
        return 1.0
    if p_any != t_any:
        return 0.0
    metric = DiceMetric(include_background=True, reduction="mean", ignore_empty=False)
    return float(metric(p_t, t_t).item())


def hd95(pred, target, spacing: float | Sequence[float] = 1.0) -> float:
    """Symmetric 95th-percentile Hausdorff distance between the mask surfaces, in mm, via
    ``monai.metrics.compute_hausdorff_distance(percentile=95, spacing=spacing)``.

    It is the larger of the two directed 95th percentiles of surface-voxel distances (pred -> target and
    target -> pred), measured in physical units using ``spacing``.

    Empty masks: both empty -> 0.0; exactly one empty -> ``inf`` (no surface to measure to; ``inf`` ranks as the
    worst possible value and, unlike NaN, is not silently dropped by ``nanmean``; report the count of such cases).

    Args:
        pred: ``(X, Y, Z)`` or ``(X, Y)`` binary mask (numpy or torch; bool or 0/1).
        target: binary mask of the same shape.
        spacing: voxel size in mm, one number or one per spatial axis (e.g. ``(0.7, 0.7, 2.5)``).
    Returns:
        HD95 in mm (``>= 0``), or ``inf`` when exactly one mask is empty.
    """
    from monai.metrics import compute_hausdorff_distance

    p, t, p_t, t_t = _mask_pair(pred, target, "hd95")
    sp = np.atleast_1d(np.asarray(spacing, dtype=np.float64))
    if sp.shape[0] == 1:
        sp = np.repeat(sp, p.ndim)
    if sp.shape[0] != p.ndim or not (np.isfinite(sp).all() and (sp > 0).all()):
        raise DataError(f"hd95: spacing must be {p.ndim} positive numbers (mm), got {np.asarray(spacing).tolist()}")
    p_any, t_any = bool(p.any()), bool(t.any())
    if not p_any and not t_any:
        return 0.0
    if p_any != t_any:
        return float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's internal deprecation notice for get_mask_edges
        value = compute_hausdorff_distance(
            p_t, t_t, include_background=True, percentile=95, spacing=sp.tolist()
        )
    return float(value.item())

"""The learning monitor: numbers that say whether the distillation targets carry information, and if not,
which way they collapsed.

Per distillation term (``aitd``, ``gitd``, ``ampd``; ``K`` prototypes), from one step's teacher targets
``P_t`` (the rows of the batch: both views' samples, or their masked patch tokens):

- ``{term}_uniform_ratio``: the term's loss over its value for a uniform teacher and student, ``2 ln K``
  (each term sums two view pairs). ~1 means the term teaches nothing.
- ``teacher_{term}_entropy``: the mean over rows of ``H(P_t) / ln K``. ~1: uniform targets (*uniform
  collapse*); low: sharp targets.
- ``teacher_{term}_mean_entropy``: ``H(mean over rows of P_t) / ln K``. ~0 together with a low row entropy:
  every input gets the same prototype (*one-prototype collapse*). A healthy teacher has a low row entropy
  and a high mean entropy (bounded by ``ln(rows) / ln K`` for a batch of ``rows`` sharp targets).
- ``center_{term}_norm``: the L2 norm of the term's centre.

For the SA importance map ``S`` (``N`` mask units): ``importance_entropy``, the mean over samples of
``H(S) / ln N`` (1: flat, the map does not look anywhere).

:func:`collapse_kind` reads these and names the collapse; :func:`collapse_advice` says what to try.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["entropy_ratio", "teacher_monitor", "collapse_kind", "collapse_advice", "COLLAPSE_KINDS",
           "learning_summary"]

# thresholds of the collapse kinds (fractions of ln K)
UNIFORM_ENTROPY = 0.95
ONE_PROTOTYPE_ENTROPY = 0.1
COLLAPSE_KINDS = ("uniform", "one-prototype")
TERMS = ("aitd", "gitd", "ampd")


def entropy_ratio(probs: torch.Tensor) -> torch.Tensor:
    """``H(p) / ln K`` of each distribution along the last axis (``K`` entries, each row sums to 1); 0-dim
    tensors stay 0-dim per row, float32. ``K = 1`` gives 0."""
    p = probs.float()
    k = p.shape[-1]
    h = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
    return h / math.log(k) if k > 1 else torch.zeros_like(h)


@torch.no_grad()
def teacher_monitor(probs: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """``teacher_{prefix}_entropy`` and ``teacher_{prefix}_mean_entropy`` of ``(..., K)`` teacher targets
    (every leading index is one row), as 0-dim tensors (no host sync)."""
    rows = probs.detach().float().reshape(-1, probs.shape[-1])
    if rows.shape[0] == 0:
        return {}
    return {f"teacher_{prefix}_entropy": entropy_ratio(rows).mean(),
            f"teacher_{prefix}_mean_entropy": entropy_ratio(rows.mean(0))}


def collapse_kind(metrics: dict, term: str) -> str | None:
    """``"uniform"``, ``"one-prototype"`` or None (neither) for one term's monitor numbers in ``metrics``."""
    h = metrics.get(f"teacher_{term}_entropy")
    hm = metrics.get(f"teacher_{term}_mean_entropy")
    if h is None or hm is None:
        return None
    if h >= UNIFORM_ENTROPY:
        return "uniform"
    if h <= ONE_PROTOTYPE_ENTROPY and hm <= ONE_PROTOTYPE_ENTROPY:
        return "one-prototype"
    return None


SINKHORN = "loss.teacher_norm=sinkhorn_knopp"
_ADVICE = {  # kind -> (what it means, what to try)
    "uniform": ("the teacher's targets are uniform, so the term sits at 2 ln K and teaches nothing",
                (SINKHORN, "loss.koleo_head_weight=0.01 for gitd/aitd (at length their projection outputs can turn "
                 "away from every prototype: docs/RESULTS.md, 'Where the collapse at length sits')",
                 "a larger batch")),
    "one-prototype": ("every input gets the same prototype",
                      (SINKHORN, "a lower loss.center_momentum (faster centring)", "a higher teacher temperature")),
    "no-input": ("the distillation terms on them teach nothing", (SINKHORN, "a larger batch", "more data")),
}


def collapse_advice(kind: str, teacher_norm: str | None = None) -> str:
    """One sentence: what the collapse ``kind`` (or ``"no-input"``: the teacher's outputs do not depend on the
    input) means and what to try. ``teacher_norm``: the run's ``loss.teacher_norm``; Sinkhorn-Knopp is not
    suggested to a run that already uses it, and the sentence says it is on."""
    meaning, tries = _ADVICE[kind]
    on = teacher_norm == "sinkhorn_knopp"
    tries = [t for t in tries if not (on and t == SINKHORN)]
    return (f"{meaning}{' under Sinkhorn-Knopp' if on else ''}; try {', '.join(tries[:-1])}"
            f"{',' if len(tries) > 2 else ''} or {tries[-1]}")


def learning_summary(metrics: dict) -> str:
    """One line from a step's metrics: per term the uniform ratio, the teacher entropies and the collapse kind,
    the importance-map entropy, and the last k-NN probe (``probe/*``, :mod:`dagman.train.probe`); '' when the
    metrics hold none of them."""
    parts = []
    for term in TERMS:
        ratio = metrics.get(f"{term}_uniform_ratio")
        if ratio is None:
            continue
        h, hm = metrics.get(f"teacher_{term}_entropy"), metrics.get(f"teacher_{term}_mean_entropy")
        kind = collapse_kind(metrics, term)
        text = f"{term} {ratio:.3f}x uniform"
        if h is not None and hm is not None:
            text += f", teacher H {h:.2f} / mean H {hm:.2f} of ln K"
        parts.append(text + (f" ({kind} collapse)" if kind else ""))
    if metrics.get("importance_entropy") is not None:
        parts.append(f"S entropy {metrics['importance_entropy']:.3f} of ln N")
    if metrics.get("probe/knn_mean") is not None:
        sa = f", SA [CLS] {metrics['probe/knn_sa']:.3f}" if metrics.get("probe/knn_sa") is not None else ""
        parts.append(f"k-NN probe balanced accuracy {metrics['probe/knn_mean']:.3f} (mean tokens){sa}, chance "
                     f"{metrics.get('probe/chance', float('nan')):.3f}")
        if metrics.get("probe/rank_mean") is not None:
            parts.append(f"effective rank of the probe's mean tokens {metrics['probe/rank_mean']:.1f} of "
                         f"{metrics.get('probe/dim_mean', float('nan')):.0f}")
    return "; ".join(parts)


def mean_predictor_l1(crop, masked) -> float | None:
    """The L1 a reconstruction must beat: every masked voxel of ``crop`` predicted as the mean of its visible
    (unmasked) voxels; ``masked`` a bool array of the crop's shape. None when nothing is masked or nothing is
    visible."""
    masked = np.asarray(masked, dtype=bool)
    if not masked.any() or masked.all():
        return None
    return float(np.abs(crop[masked] - crop[~masked].mean()).mean())

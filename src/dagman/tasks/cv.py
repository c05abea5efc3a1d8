"""The cross-validation protocol every downstream prediction task shares (classify, outcome): patient-grouped
stratified folds, few-shot fractions of the training part, a train / validation split that picks the model and
its cut-off, pooled out-of-fold scores, an optional held-out test set scored by every fold's model, repeated
over seeds (see :mod:`dagman.tasks.classify` for the protocol in words).

A task plugs into :func:`run_cv` through a :class:`CVHead`: how to fit a frozen-feature model, the fine-tuning
objective, the cut-off rule, the per-fold metric, the pooled metrics and the prediction records. The engine
owns everything else (folds, subsets, feature extraction, fine-tuning, pooling), so the tasks cannot drift apart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dagman.errors import ConfigError, DataError
from dagman.tasks.splits import fewshot_subset, min_groups_per_class, stratified_group_folds, train_val_split

__all__ = ["MODES", "Cohort", "CVHead", "CVRun", "Protocol", "describe_run", "features_for", "finish_result", "fold_parts",
           "fold_plan", "mean_std", "run_cv"]

MODES = ("lp", "ft")


@dataclass
class Cohort:
    """The rows of one labelled task.

    ``images``: ``N`` paths; ``groups``: ``(N,)`` patient ids (str; one per row when the table has no patient
    column); ``labels``: ``(N,)`` int64 0/1 or None (survival tables); ``class_names``: (negative, positive);
    ``fold``: ``(N,)`` int64 predefined folds or None; ``time`` ``(N,)`` float64 and ``event`` ``(N,)`` int64 for
    survival; ``inputs``: ``(N, D, H, W)`` float32 network inputs once loaded; ``source``: the table's path."""

    images: list[Path]
    groups: np.ndarray
    labels: np.ndarray | None = None
    class_names: tuple[str, str] = ("0", "1")
    fold: np.ndarray | None = None
    time: np.ndarray | None = None
    event: np.ndarray | None = None
    inputs: np.ndarray | None = None
    source: str = ""
    has_patients: bool = False

    def __len__(self) -> int:
        return len(self.images)

    @property
    def n_patients(self) -> int:
        return int(np.unique(self.groups).shape[0])


@dataclass
class Protocol:
    """Settings of the evaluation protocol (see the module docstring). ``lr``, ``epochs``, ``batch_size``,
    ``weight_decay``, ``grad_clip`` apply to ``ft`` (:class:`dagman.tasks.finetune.Tuner`); ``c_grid`` (inverse L2 strengths) to ``lp``."""

    mode: str = "lp"
    fraction: float = 1.0
    folds: int = 3
    seeds: int = 1
    seed: int = 0
    n_boot: int = 1000
    val_fraction: float = 0.2
    epochs: int = 20
    lr: float = 1e-4
    batch_size: int = 8
    weight_decay: float = 0.05
    grad_clip: float = 3.0
    c_grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)

    def check(self) -> "Protocol":
        """Raise a one-line ConfigError for a bad setting; returns self."""
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}", option="mode")
        if not (isinstance(self.fraction, (int, float)) and 0.0 < float(self.fraction) <= 1.0):
            raise ConfigError(f"fraction must be in (0, 1] (e.g. 0.25, 0.5, 1.0), got {self.fraction}",
                              option="fraction")
        if int(self.folds) != self.folds or self.folds < 2:
            raise ConfigError(f"folds must be an integer >= 2, got {self.folds}", option="folds")
        if self.seeds < 1:
            raise ConfigError(f"seeds must be >= 1, got {self.seeds}", option="seeds")
        if self.n_boot < 1:
            raise ConfigError(f"n_boot must be >= 1, got {self.n_boot}", option="n_boot")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}", option="val_fraction")
        if self.mode == "ft":
            if self.epochs < 1:
                raise ConfigError(f"epochs must be >= 1, got {self.epochs}", option="epochs")
            if not self.lr > 0:
                raise ConfigError(f"lr must be > 0, got {self.lr}", option="lr")
            if self.batch_size < 1:
                raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}", option="batch_size")
            if not self.grad_clip > 0:
                raise ConfigError(f"the gradient clip must be > 0, got {self.grad_clip}")
        if not self.c_grid or any(not c > 0 for c in self.c_grid):
            raise ConfigError(f"the C grid must hold positive values, got {self.c_grid}")
        return self

    @property
    def seed_values(self) -> list[int]:
        return [int(self.seed) + i for i in range(int(self.seeds))]


def fold_plan(cohort: Cohort, strata: np.ndarray, protocol: Protocol, seed: int,
              what: str = "label") -> tuple[np.ndarray, str]:
    """Fold index per row ``(N,)`` and how it was made: the table's fold column when it has one, else
    stratified (by ``strata`` ``(N,)`` 0/1, e.g. the labels or the event indicator, named ``what`` in messages)
    patient-grouped folds."""
    if cohort.fold is not None:
        k = int(cohort.fold.max()) + 1
        if k < 2:
            raise DataError(f"{cohort.source}: the fold column holds a single fold; need at least 2")
        for f in range(k):
            present = np.unique(strata[cohort.fold == f])
            if present.shape[0] < np.unique(strata).shape[0]:
                raise DataError(f"{cohort.source}: fold {f} of the fold column lacks a class of {what} (every "
                                "fold needs both)")
        return cohort.fold, f"the table's fold column ({k} folds)"
    need = min_groups_per_class(protocol.folds)
    unit = "patient" if cohort.has_patients else "sample"
    for c in (0, 1):
        n = int(np.unique(cohort.groups[strata == c]).shape[0])
        if n < need:
            name = cohort.class_names[c] if what == "label" else str(c)
            raise DataError(f"{cohort.source}: too few samples per class for {protocol.folds}-fold CV: {what} "
                            f"{name} has {n} {unit}(s); need at least {need} (every test fold one, every "
                            "training part two: train + validation)")
    folds = stratified_group_folds(strata, cohort.groups, protocol.folds, seed)
    return folds, f"stratified {protocol.folds}-fold, grouped by {'patient' if cohort.has_patients else 'row'}"


def fold_parts(folds: np.ndarray, strata: np.ndarray, groups: np.ndarray, fold: int, protocol: Protocol,
               seed: int) -> dict[str, np.ndarray]:
    """Row indices ``{"train", "val", "test"}`` of one fold: the test fold; the other folds reduced to
    ``protocol.fraction`` of their patients, split by patient into train / validation. Deterministic under
    ``(seed, fold)``."""
    test = np.flatnonzero(folds == fold)
    rest = np.flatnonzero(folds != fold)
    sub_seed = int(seed) * 1009 + int(fold)
    subset = fewshot_subset(rest, strata, groups, protocol.fraction, sub_seed, min_per_class=2)
    train, val = train_val_split(subset, strata, groups, protocol.val_fraction, sub_seed + 500_009)
    return {"train": train, "val": val, "test": test}


def mean_std(values: Sequence[float]) -> dict:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.shape[0] > 1 else 0.0,
            "values": [float(x) for x in v]}


def features_for(cohort: Cohort, encoder, features, device, progress, desc) -> np.ndarray:
    if features is not None:
        features = np.asarray(features, np.float32)
        if features.shape[0] != len(cohort):
            raise DataError(f"{cohort.source}: {features.shape[0]} feature rows for {len(cohort)} table rows")
        return features
    if encoder is None or cohort.inputs is None:
        raise DataError(f"{cohort.source}: the linear probe needs features, or an encoder and loaded inputs")
    from dagman.tasks.encoder import extract_features

    return extract_features(encoder, cohort.inputs, batch_size=16, device=device, progress=progress)


class CVHead:
    """What a task plugs into :func:`run_cv` (see :class:`dagman.tasks.classify.BinaryHead` and
    :class:`dagman.tasks.outcome.SurvivalHead`). ``strata`` ``(N,)`` 0/1 stratify the folds (named
    ``what`` in messages); ``metric`` names the per-fold metric (``auc``, ``c_index``) and ``fold_keys`` the
    pooled per-fold entries (``("fold_aucs", "fold_auc")`` -> ``fold_aucs``, ``fold_auc_mean``,
    ``fold_auc_std``)."""

    strata: np.ndarray
    what: str = "label"
    metric: str = "score"
    fold_keys: tuple[str, str] = ("fold_scores", "fold_score")

    def counts(self, tr: np.ndarray, va: np.ndarray, te: np.ndarray) -> dict:
        """Per-fold counts beside the sizes (e.g. positives or events of each part)."""
        return {}

    def fit_frozen(self, feats: np.ndarray, tr: np.ndarray, va: np.ndarray, protocol) -> tuple[Callable, dict]:
        """A model on frozen features: ``(scores(features (M, F)) -> (M,), fold info entries)``."""
        raise NotImplementedError

    def objective(self, tr: np.ndarray, va: np.ndarray) -> tuple[Callable, Callable, Callable, str]:
        """Fine-tuning: ``(loss_fn, val_key, transform of the network's outputs into scores, name of the
        validation entry)`` (see :func:`dagman.tasks.finetune.fine_tune`)."""
        raise NotImplementedError

    def cut(self, predict: Callable[[np.ndarray], np.ndarray], tr: np.ndarray, va: np.ndarray) -> tuple[float, dict]:
        """The fold's cut-off from the training part (``predict(rows) -> scores``), and its fold info entries."""
        raise NotImplementedError

    def fold_metric(self, te: np.ndarray, scores: np.ndarray) -> float:
        raise NotImplementedError

    def pooled(self, oof: np.ndarray, cut: np.ndarray, seed: int, protocol) -> dict:
        """Metrics of the pooled out-of-fold scores (``cut`` ``(N,)``: each row's fold cut-off)."""
        raise NotImplementedError

    def finish_pooled(self, cv: dict, oof: np.ndarray, cut: np.ndarray) -> None:
        """Entries added after the per-fold ones (e.g. the ROC, the risk groups)."""

    def record(self, i: int, seed: int, fold: int, score: float, cut: float) -> dict:
        raise NotImplementedError

    def test_metrics(self, test, score: np.ndarray, cut: float, seed: int, protocol, models: int) -> dict:
        raise NotImplementedError

    def test_record(self, test, i: int, seed: int, score: float, cut: float) -> dict:
        raise NotImplementedError


@dataclass
class CVRun:
    """What :func:`run_cv` returns: one dict per seed (``seed``, ``cv``, ``test``), the row-level
    ``predictions`` / ``test_predictions`` records, how the folds were made, the frozen features used (lp) and
    the time spent extracting features and fitting."""

    per_seed: list[dict]
    predictions: list[dict]
    test_predictions: list[dict]
    fold_source: str
    features: np.ndarray | None
    timing: dict = field(default_factory=dict)


def run_cv(cohort: Cohort, head: CVHead, protocol, encoder=None, *, test: Cohort | None = None,
           features: np.ndarray | None = None, test_features: np.ndarray | None = None, device=None,
           progress: bool = True) -> CVRun:
    """The shared protocol (module docstring) for one task ``head``: every seed, every fold."""
    from dagman.tasks.finetune import fine_tune, predict_network

    timing = {"features_s": 0.0, "fit_s": 0.0}
    feats = test_feats = None
    if protocol.mode == "lp":
        t0 = time.perf_counter()
        feats = features_for(cohort, encoder, features, device, progress, "features")
        if test is not None:
            test_feats = features_for(test, encoder, test_features, device, progress, "test features")
        timing["features_s"] = time.perf_counter() - t0
    else:
        if encoder is None:
            raise DataError("fine-tuning (<<mode>> ft) needs an encoder")
        for c in (cohort, test):
            if c is not None and c.inputs is None:
                raise DataError(f"{c.source}: fine-tuning needs the images loaded (cohort.inputs)")

    t_fit = time.perf_counter()
    per_seed, predictions, test_predictions = [], [], []
    fold_source = ""
    bs = protocol.batch_size * 2
    for s in protocol.seed_values:
        folds, fold_source = fold_plan(cohort, head.strata, protocol, s, what=head.what)
        k = int(folds.max()) + 1
        oof = np.full(len(cohort), np.nan)
        oof_cut = np.full(len(cohort), np.nan)
        fold_info, test_scores, test_cuts = [], [], []
        for f in range(k):
            parts = fold_parts(folds, head.strata, cohort.groups, f, protocol, s)
            tr, va, te = parts["train"], parts["val"], parts["test"]
            info = {"fold": f, "n_train": int(tr.shape[0]), "n_val": int(va.shape[0]), "n_test": int(te.shape[0]),
                    **head.counts(tr, va, te)}
            net = None
            if protocol.mode == "lp":
                model, extra = head.fit_frozen(feats, tr, va, protocol)

                def predict(rows, model=model):
                    return model(feats[rows])

                def predict_test(model=model):
                    return model(test_feats)
            else:
                loss_fn, val_key, transform, val_name = head.objective(tr, va)
                net, fit = fine_tune(encoder, cohort.inputs[tr], cohort.inputs[va], loss_fn, val_key, protocol,
                                     seed=s * 1009 + f, device=device, progress=progress, desc=f"seed {s} fold {f}")
                extra = {"best_epoch": fit["best_epoch"], val_name: float(fit["val_key"][0]),
                         "skipped_steps": fit["skipped_steps"]}

                def predict(rows, net=net, transform=transform):
                    return transform(predict_network(net, cohort.inputs[rows], bs, device))

                def predict_test(net=net, transform=transform):
                    return transform(predict_network(net, test.inputs, bs, device))
            info.update(extra)
            cut, cut_info = head.cut(predict, tr, va)
            info.update(cut_info)
            te_scores = predict(te)
            info[head.metric] = head.fold_metric(te, te_scores)
            oof[te] = te_scores
            oof_cut[te] = cut
            if test is not None:
                test_scores.append(predict_test())
                test_cuts.append(cut)
            del net, predict, predict_test
            fold_info.append(info)
        cv = head.pooled(oof, oof_cut, s, protocol)
        values = [fi[head.metric] for fi in fold_info]
        plural, singular = head.fold_keys
        cv.update({plural: values, f"{singular}_mean": float(np.mean(values)),
                   f"{singular}_std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                   "folds": fold_info})
        head.finish_pooled(cv, oof, oof_cut)
        seed_result = {"seed": s, "cv": cv, "test": None}
        for i in range(len(cohort)):
            predictions.append(head.record(i, s, int(folds[i]), float(oof[i]), float(oof_cut[i])))
        if test is not None:
            t_score = np.mean(test_scores, axis=0)
            t_cut = float(np.mean(test_cuts))
            seed_result["test"] = head.test_metrics(test, t_score, t_cut, s, protocol, len(test_scores))
            for i in range(len(test)):
                test_predictions.append(head.test_record(test, i, s, float(t_score[i]), t_cut))
        per_seed.append(seed_result)
    timing["fit_s"] = time.perf_counter() - t_fit
    return CVRun(per_seed, predictions, test_predictions, fold_source, feats, timing)


def describe_run(run: CVRun, cohort: Cohort, encoder, protocol) -> dict:
    """The entries every CV task's result holds about the encoder and the protocol run: ``checkpoint, encoder,
    feature_source, mode, fraction, folds, fold_source, seeds, n, n_patients``."""
    source = getattr(encoder, "source", None)
    feats = run.features
    return {
        "checkpoint": source.description if source is not None else "precomputed features",
        "encoder": ({"kind": source.kind, "method": source.method, "size": source.cfg.size, "step": source.step,
                     "feature_dim": int(encoder.feature_dim)} if source is not None else
                    {"kind": "features", "feature_dim": int(feats.shape[1]) if feats is not None else None}),
        "feature_source": getattr(encoder, "feature_source", "precomputed features"),
        "mode": protocol.mode,
        "fraction": float(protocol.fraction),
        "folds": len(run.per_seed[0]["cv"]["folds"]),
        "fold_source": run.fold_source,
        "seeds": protocol.seed_values,
        "n": len(cohort),
        "n_patients": cohort.n_patients if cohort.has_patients else None,
    }


def finish_result(result: dict, run: CVRun, test: Cohort | None, meta: dict | None, t_start: float) -> dict:
    """Add the timing, the row-level predictions (``_predictions``, ``_test_predictions``, for the task's
    writer), the held-out set's size and source, and the caller's ``meta``; returns ``result``."""
    result.update({"timing": run.timing, "_predictions": run.predictions, "_test_predictions": run.test_predictions})
    if test is not None:
        result["test_n"] = len(test)
        result["test_source"] = test.source
    if meta:
        result.update(meta)
    run.timing["total_s"] = time.perf_counter() - t_start
    return result

"""Binary image classification on a (pretrained) encoder: linear probe or full fine-tune, few-shot fractions,
stratified patient-grouped k-fold cross-validation, AUC / sensitivity / specificity with bootstrap CIs, ROC plot.

Protocol (method notes section 9; one *seed* of it):

1. rows -> ``K`` folds, stratified by label, whole patients per fold
   (:func:`~dagman.tasks.splits.stratified_group_folds`; or the table's own ``fold`` column);
2. for each fold: the other folds are the training part; it is reduced to ``fraction`` of its patients
   (:func:`~dagman.tasks.splits.fewshot_subset`, stratified) and split by patient into train / validation
   (:func:`~dagman.tasks.splits.train_val_split`, ``val_fraction`` of the patients);
3. a model is trained on train; the validation part picks its hyper-parameter (LP: the L2 strength ``C``; FT: the
   epoch) and the decision threshold (Youden's J on the validation scores) -- never the test fold;
4. the test fold is scored; every row gets exactly one out-of-fold score and its fold's threshold;
5. pooled out-of-fold AUC, sensitivity, specificity with percentile bootstrap 95% CIs (stratified by label), and
   the per-fold AUCs; an optional held-out test table is scored by every fold's model (scores averaged, threshold =
   mean of the fold thresholds).

``seeds`` repeats 1-5 with seeds ``seed .. seed + seeds - 1`` (new folds, subsets and initialisations) and reports
the mean and standard deviation across seeds.

Modes:

* ``lp`` (linear probe): features of the frozen encoder computed once per image (kept in memory across folds and
  seeds), standardised on the training rows, scikit-learn ``LogisticRegression`` (L2, lbfgs, balanced class
  weights) with ``C`` from :attr:`Protocol.c_grid` chosen by validation AUC (ties: lower validation log-loss).
* ``ft`` (fine-tune): the whole encoder plus a linear head through the shared :class:`~dagman.tasks.finetune.Tuner`
  (AdamW with the pretraining weight-decay rule, warm-up + cosine learning rate), random flips of each axis, binary
  cross-entropy (positive class weighted by the negative/positive ratio), the epoch with the best validation AUC
  kept; CUDA when available (bf16 autocast there), else CPU.

Library entry points: :func:`classify_table` (``dagman classify``: label CSV + encoder -> results and files, all
of the below), :func:`read_label_table` + :func:`cohort_from_table` (CSV -> :class:`Cohort`),
:func:`open_encoder_and_inputs` / :func:`load_inputs` (images -> network inputs), :func:`encode` (inputs ->
features), :func:`run_classification` (the protocol; accepts precomputed ``features`` so several encoders can be
compared on the same inputs) and :func:`write_outputs` (``metrics.json``, ``predictions.csv``, ``roc.png``).
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from dagman.errors import DataError
from dagman.tasks.cv import (Cohort, CVHead, Protocol, describe_run, finish_result, fold_parts, fold_plan, mean_std,
                             run_cv)
from dagman.tasks.finetune import ScoringNetwork, fine_tune, predict_network
from dagman.tasks.metrics import bootstrap_ci, roc_auc, sensitivity_specificity, threshold_at_youden

__all__ = [
    "LabelTable",
    "Cohort",
    "Protocol",
    "read_label_table",
    "cohort_from_table",
    "parse_binary_labels",
    "load_inputs",
    "encode",
    "fold_plan",
    "fold_parts",
    "fit_linear_probe",
    "ScoringNetwork",
    "fine_tune",
    "predict_network",
    "binary_metrics",
    "run_classification",
    "write_outputs",
    "roc_points",
    "roc_figure",
    "format_table",
    "summary_line",
    "summary_lines",
    "classify_table",
    "open_encoder_and_inputs",
]

# ----------------------------------------------------------------------------------------------------------
# Label tables
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LabelTable:
    """A CSV label table: ``path``, its ``columns`` (header, in order) and ``rows`` (one dict per data row,
    values as stripped strings). Row ``i`` is data line ``i + 2`` of the file."""

    path: Path
    columns: list[str]
    rows: list[dict[str, str]]

    @property
    def name(self) -> str:
        return str(self.path)

    def require(self, *columns: str) -> None:
        """One-line DataError naming every missing column."""
        missing = [c for c in columns if c not in self.columns]
        if missing:
            raise DataError(f"{self.path}: missing column(s) {', '.join(repr(c) for c in missing)} "
                            f"(has: {', '.join(self.columns) or 'no header'})")

    def column(self, name: str) -> list[str]:
        self.require(name)
        return [r[name] for r in self.rows]


def read_label_table(path: str | os.PathLike) -> LabelTable:
    """Read a label CSV (header line first; extra columns kept but ignored by the tasks). One-line DataError
    when the file is missing, unreadable, empty or has no data rows."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such label table (a CSV with columns image,label[,patient,fold,time,event])")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the label table ({err})") from None
    reader = csv.DictReader(io.StringIO(text))
    try:
        columns = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = columns
        rows = []
        for i, raw in enumerate(reader):
            if raw.get(None):  # more cells than header columns
                raise DataError(f"{path} line {i + 2}: {len(columns) + len(raw[None])} cells but the header has "
                                f"{len(columns)} columns")
            row = {k: (v or "").strip() for k, v in raw.items()}
            if any(row.values()):  # skip blank lines
                rows.append(row)
    except csv.Error as err:
        raise DataError(f"{path}: not a valid CSV ({err})") from None
    if not columns:
        raise DataError(f"{path}: empty label table (no header)")
    if not rows:
        raise DataError(f"{path}: the label table has a header but no rows")
    return LabelTable(path=path, columns=columns, rows=rows)


def parse_binary_labels(values: Sequence[str], where: str, column: str = "label", positive: str | None = None,
                        class_names: tuple[str, str] | None = None) -> tuple[np.ndarray, tuple[str, str]]:
    """Cell strings -> ``(N,)`` int64 labels in {0, 1} and ``(negative name, positive name)``.

    0/1 (also ``0.0``/``1.0``) map to themselves. Any other two distinct values are sorted (numerically when
    both are numbers) and the larger one is positive, unless ``positive`` names it. With ``class_names`` (from
    the training table) the values must be those two names. One class only, more than two, or an empty cell
    -> one-line DataError."""
    vals = [v.strip() for v in values]
    for i, v in enumerate(vals):
        if v == "":
            raise DataError(f"{where} line {i + 2}: empty {column!r} cell")

    def _num(v: str) -> float | None:
        try:
            x = float(v)
        except ValueError:
            return None
        return x if math.isfinite(x) else None

    nums = [_num(v) for v in vals]
    numeric = all(x is not None for x in nums)
    keys = [float(x) for x in nums] if numeric else vals  # type: ignore[arg-type]
    distinct = sorted(set(keys))
    name_of = {}
    for k, v in zip(keys, vals):
        name_of.setdefault(k, (str(int(k)) if numeric and float(k).is_integer() else v))
    if class_names is not None:
        lookup = {}
        for idx, nm in enumerate(class_names):
            lookup[nm] = idx
            x = _num(nm)
            if x is not None:
                lookup[x] = idx
        y = np.empty(len(vals), dtype=np.int64)
        for i, (k, v) in enumerate(zip(keys, vals)):
            hit = lookup.get(k, lookup.get(v))
            if hit is None:
                raise DataError(f"{where} line {i + 2}: {column} {v!r} is not one of the training classes "
                                f"{class_names[0]!r} / {class_names[1]!r}")
            y[i] = hit
        return y, class_names
    if len(distinct) == 1:
        raise DataError(f"{where}: AUC needs both classes: all {len(vals)} rows have {column} {name_of[distinct[0]]}")
    if len(distinct) > 2:
        shown = ", ".join(name_of[k] for k in distinct[:6]) + (", ..." if len(distinct) > 6 else "")
        raise DataError(f"{where}: {column!r} must have two classes, found {len(distinct)}: {shown}")
    neg, pos = distinct
    if positive is not None:
        p = _num(positive) if numeric else positive
        if p == neg:
            neg, pos = pos, neg
        elif p != pos:
            raise DataError(f"{where}: <<positive>> {positive!r} is not one of the {column} values "
                            f"{name_of[neg]!r} / {name_of[pos]!r}")
    y = np.array([1 if k == pos else 0 for k in keys], dtype=np.int64)
    return y, (name_of[neg], name_of[pos])


def _resolve_images(table: LabelTable, column: str = "image") -> list[Path]:
    base = table.path.parent
    paths, missing = [], []
    for i, v in enumerate(table.column(column)):
        if not v:
            raise DataError(f"{table.path} line {i + 2}: empty {column!r} cell")
        p = Path(v).expanduser()
        p = p if p.is_absolute() else base / p
        if not p.exists():
            missing.append((i, v, p))
        paths.append(p)
    if missing:
        i, v, p = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{table.path} line {i + 2}: image {v} not found ({p}){more}")
    seen: dict[Path, int] = {}
    for i, p in enumerate(paths):  # one scan twice could sit in a training and a test fold at once
        first = seen.setdefault(p.resolve(), i)
        if first != i:
            raise DataError(f"{table.path} line {i + 2}: duplicate image {p.name} (the same file as line {first + 2})")
    return paths


def cohort_from_table(table: LabelTable, label_col: str | None = "label", patient_col: str = "patient",
                      fold_col: str = "fold", positive: str | None = None,
                      class_names: tuple[str, str] | None = None) -> Cohort:
    """Build a :class:`Cohort` from a label table: image paths (relative to the CSV's folder, or absolute; each
    must exist), binary labels from ``label_col`` (None: no labels, for survival tables), patients from
    ``patient_col`` when present, predefined folds from ``fold_col`` when present."""
    needed = ["image"] + ([label_col] if label_col else [])
    table.require(*needed)
    images = _resolve_images(table)
    labels, names = None, ("0", "1")
    if label_col:
        labels, names = parse_binary_labels(table.column(label_col), table.name, label_col, positive, class_names)
    has_patients = patient_col in table.columns
    if has_patients:
        groups = np.array([v if v else f"row{i}" for i, v in enumerate(table.column(patient_col))], dtype=object)
    else:
        groups = np.array([f"row{i}" for i in range(len(images))], dtype=object)
    fold = None
    if fold_col in table.columns:
        vals = table.column(fold_col)
        try:
            fold_raw = np.array([int(float(v)) for v in vals], dtype=np.int64)
        except ValueError:
            bad = next(i for i, v in enumerate(vals) if not _is_int(v))
            raise DataError(f"{table.path} line {bad + 2}: {fold_col!r} must be an integer, "
                            f"got {vals[bad]!r}") from None
        _, fold = np.unique(fold_raw, return_inverse=True)
        fold = fold.astype(np.int64)
        for g in np.unique(groups):
            fs = np.unique(fold_raw[groups == g])
            if fs.shape[0] > 1:
                raise DataError(f"{table.path}: patient {g} appears in folds {', '.join(map(str, fs))} (a patient "
                                "must stay in one fold)")
    return Cohort(images=images, groups=groups, labels=labels, class_names=names, fold=fold,
                  source=str(table.path), has_patients=has_patients)


#: reference models printed beside every encoder: name -> (the label-table column they need, description)
REFERENCES = {
    "diameter-only": ("diameter_mm", "logistic regression on the diameter_mm column"),
    "shape-only": ("mask", "logistic regression on 9 shape features of the mask (dagman.data.shape)"),
}


def reference_features(table: LabelTable) -> dict[str, np.ndarray]:
    """The reference rows' features for the rows of ``table``, for each reference whose column it has with every
    cell filled: ``{"diameter-only": (N, 1), "shape-only": (N, 9)}`` (the row order of :func:`cohort_from_table`)."""
    from dagman.data.shape import mask_file_features

    out: dict[str, np.ndarray] = {}

    def filled(name: str) -> str | None:  # a column with an empty cell (no mask for that row) gives no reference
        column = REFERENCES[name][0]
        return column if column in table.columns and all(v.strip() for v in table.column(column)) else None

    if column := filled("diameter-only"):
        out["diameter-only"] = numeric_column(table, column)[:, None]
    if column := filled("shape-only"):
        out["shape-only"] = np.stack([mask_file_features(p) for p in _resolve_images(table, column=column)])
    for name, x in out.items():
        if not np.isfinite(x).all():
            raise DataError(f"{table.path}: the {name} reference has a non-finite feature (an empty mask?)")
    return out


def reference_rows(cohort: Cohort, table: LabelTable, protocol: Protocol, *, test: Cohort | None = None,
                   test_table: LabelTable | None = None) -> dict:
    """The reference models (:data:`REFERENCES`) run through the same linear-probe protocol, folds and seeds as
    the encoder (the folds depend only on the cohort, the protocol and the seed), on the columns the table has.
    Returns ``{name: {"features", "cv", "test", "across_seeds"}}``."""
    import dataclasses

    feats = reference_features(table)
    test_feats = reference_features(test_table) if test is not None and test_table is not None else {}
    lp = dataclasses.replace(protocol, mode="lp")
    out = {}
    for name, x in feats.items():
        held_out = test if name in test_feats else None
        r = run_classification(cohort, None, lp, test=held_out, features=x, test_features=test_feats.get(name),
                               progress=False)
        out[name] = {"features": REFERENCES[name][1], "cv": {k: v for k, v in r["cv"].items() if k != "folds"},
                     "test": r["test"], "across_seeds": r["across_seeds"]}
    return out


def reference_lines(references: dict) -> list[str]:
    """One line per reference row for the printed table."""
    lines = []
    for name, r in references.items():
        line = f"reference {name} ({r['features']}): CV AUC {_ci(r['cv'], 'auc')}"
        if r.get("test"):
            line += f"; test AUC {_ci(r['test'], 'auc')}"
        lines.append(line)
    return lines


def numeric_column(table: LabelTable, column: str) -> np.ndarray:
    """``(N,) float64`` of a column; a one-line DataError names the line of the first cell that is not a number."""
    values = table.column(column)
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        try:
            out[i] = float(v)
        except ValueError:
            raise DataError(f"{table.path} line {i + 2}: {column!r} must be a number, got {v!r}") from None
    return out


def _is_int(v: str) -> bool:
    try:
        int(float(v))
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------------------------------------------------
# Images -> inputs -> features
# ----------------------------------------------------------------------------------------------------------


def load_inputs(images: Sequence[str | os.PathLike], spacing: float, hu_window: tuple[float, float], size: int,
                progress: bool = True) -> np.ndarray:
    """Network inputs ``(N, size, size, size)`` float32 in [0, 1]: each image read (any format
    :func:`dagman.data.io.read_ct` reads), resampled to ``spacing`` mm, HU-windowed and centre-cropped/padded
    (:func:`dagman.tasks.encoder.image_to_input`)."""
    from tqdm import tqdm

    from dagman.tasks.encoder import image_to_input

    out = np.empty((len(images), size, size, size), dtype=np.float32)
    for i, p in enumerate(tqdm(images, desc="images", unit="img", disable=None if progress else True, leave=False)):
        out[i] = image_to_input(p, spacing, tuple(hu_window), size)
    return out


FEATURE_CHOICES = {"mean": False, "sa": True}  # the image feature -> build_task_encoder's use_sa


def open_encoder_and_inputs(checkpoint: str | os.PathLike, cohorts: Sequence[Cohort | None], *, size: str = "tiny",
                            features: str = "mean", spacing: float | None = None,
                            hu_window: Sequence[float] | None = None, crop_size: int | None = None,
                            seed: int = 0, progress: bool = True) -> tuple[object, dict]:
    """Build the encoder (``checkpoint``: run folder, checkpoint ``.pt``, encoder ``.safetensors`` or ``"none"``:
    random init of the ``size`` architecture, weights from ``seed``), settle the input settings (``spacing`` mm and
    ``hu_window`` default to the encoder's ``data.spacing_mm`` / ``data.hu_window``; ``crop_size`` to the smallest
    valid edge covering 64 mm) and load every cohort's ``inputs`` (None entries are skipped). ``features``:
    ``mean`` (the mean of the last stage's tokens, default) or ``sa`` (the SA [CLS] token of an encoder pretrained
    with an SA block). Returns ``(encoder, {"spacing_mm", "hu_window", "crop_size"})``; shared by
    :func:`classify_table` and ``dagman outcome``."""
    from dagman.errors import ConfigError
    from dagman.tasks.encoder import build_task_encoder, default_input_size

    if features not in FEATURE_CHOICES:
        raise ConfigError(f"features must be one of {', '.join(FEATURE_CHOICES)}, got {features!r}",
                          option="features")
    torch.manual_seed(int(seed))
    encoder = build_task_encoder(checkpoint, size=size, use_sa=FEATURE_CHOICES[features])
    data_cfg = encoder.source.cfg.data
    chosen_spacing = float(spacing) if spacing is not None else float(data_cfg.spacing_mm)
    if not chosen_spacing > 0:
        raise ConfigError(f"spacing must be > 0 mm, got {spacing}", option="spacing")
    window = tuple(float(v) for v in (hu_window or data_cfg.hu_window))
    if not window[1] > window[0]:
        raise ConfigError(f"hu_window LO HI needs LO < HI, got {window[0]:g} {window[1]:g}", option="hu_window")
    edge = default_input_size(encoder, crop_size)
    for c in cohorts:
        if c is not None:
            c.inputs = load_inputs(c.images, chosen_spacing, window, edge, progress=progress)
    return encoder, {"spacing_mm": chosen_spacing, "hu_window": list(window), "crop_size": edge}


def encode(encoder, inputs: np.ndarray, batch_size: int = 16, device=None, progress: bool = True) -> np.ndarray:
    """Frozen-encoder features ``(N, F)`` float32 of inputs ``(N, D, H, W)``."""
    from dagman.tasks.encoder import extract_features

    return extract_features(encoder, inputs, batch_size=batch_size, device=device, progress=progress)


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


@dataclass
class LinearProbe:
    """A fitted linear probe: ``scores(features (M, F)) -> (M,)`` positive-class probabilities."""

    mean: np.ndarray
    scale: np.ndarray
    model: object
    C: float
    val_auc: float

    def scores(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, np.float64) - self.mean) / self.scale
        return self.model.predict_proba(z)[:, 1]


def fit_linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                     c_grid: Sequence[float] = Protocol.c_grid) -> LinearProbe:
    """Logistic regression on standardised features (mean/std of ``x_train`` ``(M, F)``), one fit per ``C`` in
    ``c_grid``; the ``C`` with the best validation AUC wins (ties: lower validation log-loss, then smaller C)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x_train = np.asarray(x_train, np.float64)
    mean = x_train.mean(0)
    scale = x_train.std(0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    z_tr = (x_train - mean) / scale
    z_val = (np.asarray(x_val, np.float64) - mean) / scale
    best, best_key = None, None
    for c in sorted(c_grid):
        model = LogisticRegression(C=float(c), max_iter=2000, class_weight="balanced")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(z_tr, y_train)
        p = model.predict_proba(z_val)[:, 1]
        key = (roc_auc(y_val, p), -_log_loss(y_val, p))
        if best_key is None or key > best_key:
            best, best_key = (model, float(c)), key
    return LinearProbe(mean=mean, scale=scale, model=best[0], C=best[1], val_auc=float(best_key[0]))


def _bce_loss(y_train: np.ndarray):
    n_pos = max(int(y_train.sum()), 1)
    pos_weight = torch.tensor((y_train.shape[0] - n_pos) / n_pos, dtype=torch.float32)
    target = torch.from_numpy(y_train.astype(np.float32))

    def loss(out, rows):
        return torch.nn.functional.binary_cross_entropy_with_logits(
            out, target[rows].to(out.device), pos_weight=pos_weight.to(out.device))

    return loss


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------


def _sensitivity(y, margin) -> float:
    return sensitivity_specificity(y, margin, 0.0)[0]


def _specificity(y, margin) -> float:
    return sensitivity_specificity(y, margin, 0.0)[1]


def binary_metrics(y: np.ndarray, score: np.ndarray, threshold: np.ndarray | float, n_boot: int = 1000,
                   seed: int = 0) -> dict:
    """AUC, sensitivity, specificity with stratified percentile bootstrap 95% CIs.

    ``y`` ``(N,)`` 0/1; ``score`` ``(N,)``; ``threshold``: one value or ``(N,)`` per row (each row is called
    positive when ``score >= its threshold``). Returns ``{"n", "positives", "auc", "auc_ci", "sensitivity",
    "sensitivity_ci", "specificity", "specificity_ci"}`` (CIs as ``[low, high]``)."""
    y = np.asarray(y).astype(np.int64)
    score = np.asarray(score, np.float64)
    margin = score - np.broadcast_to(np.asarray(threshold, np.float64), score.shape)
    out = {"n": int(y.shape[0]), "positives": int(y.sum())}
    for name, fn, arr in (("auc", roc_auc, score), ("sensitivity", _sensitivity, margin),
                          ("specificity", _specificity, margin)):
        point, lo, hi = bootstrap_ci(fn, y, arr, n_boot=n_boot, seed=seed, stratify=y)
        out[name] = point
        out[f"{name}_ci"] = [lo, hi]
    return out


def roc_points(y: np.ndarray, score: np.ndarray) -> dict:
    """ROC curve ``{"fpr": [...], "tpr": [...], "thresholds": [...]}`` (scikit-learn's ``roc_curve``; the first
    point is (0, 0) at threshold +inf, written as null)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(np.asarray(y), np.asarray(score, np.float64), drop_intermediate=True)
    return {"fpr": [float(v) for v in fpr], "tpr": [float(v) for v in tpr],
            "thresholds": [float(v) if np.isfinite(v) else None for v in thr]}


# ----------------------------------------------------------------------------------------------------------
# The protocol
# ----------------------------------------------------------------------------------------------------------


def _check_cohort(cohort: Cohort) -> None:
    if cohort.labels is None:
        raise DataError(f"{cohort.source}: no labels")
    y = cohort.labels
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.shape[0]:
        name = cohort.class_names[1 if n_pos else 0]
        raise DataError(f"{cohort.source}: AUC needs both classes: all {y.shape[0]} rows have label {name}")


def _sigmoid(out: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-out))


class BinaryHead(CVHead):
    """Binary classification in the shared protocol: a logistic-regression probe or a fine-tuned logit, the
    threshold by Youden's J on the validation part, AUC per fold and pooled (with sensitivity / specificity)."""

    what = "label"
    metric = "auc"
    fold_keys = ("fold_aucs", "fold_auc")

    def __init__(self, cohort: Cohort) -> None:
        self.cohort = cohort
        self.y = cohort.labels
        self.strata = cohort.labels

    def counts(self, tr, va, te) -> dict:
        y = self.y
        return {"train_positives": int(y[tr].sum()), "val_positives": int(y[va].sum()),
                "test_positives": int(y[te].sum())}

    def fit_frozen(self, feats, tr, va, protocol):
        probe = fit_linear_probe(feats[tr], self.y[tr], feats[va], self.y[va], protocol.c_grid)
        return probe.scores, {"C": probe.C, "val_auc": probe.val_auc}

    def objective(self, tr, va):
        y_val = self.y[va]

        def val_key(out):
            p = _sigmoid(out)
            return (roc_auc(y_val, p), -_log_loss(y_val, p))

        return _bce_loss(self.y[tr]), val_key, _sigmoid, "val_auc"

    def cut(self, predict, tr, va):
        thr = threshold_at_youden(self.y[va], predict(va))
        return thr, {"threshold": float(thr)}

    def fold_metric(self, te, scores) -> float:
        return roc_auc(self.y[te], scores)

    def pooled(self, oof, cut, seed, protocol) -> dict:
        return binary_metrics(self.y, oof, cut, protocol.n_boot, seed=seed)

    def finish_pooled(self, cv, oof, cut) -> None:
        cv["roc"] = roc_points(self.y, oof)

    def record(self, i, seed, fold, score, cut) -> dict:
        c = self.cohort
        return {"row": i, "image": str(c.images[i]), "patient": str(c.groups[i]), "label": int(self.y[i]),
                "seed": seed, "fold": fold, "score": score, "threshold": cut, "called": int(score >= cut)}

    def test_metrics(self, test, score, cut, seed, protocol, models) -> dict:
        tm = binary_metrics(test.labels, score, cut, protocol.n_boot, seed=seed)
        tm.update({"threshold": cut, "models": models, "roc": roc_points(test.labels, score)})
        return tm

    def test_record(self, test, i, seed, score, cut) -> dict:
        return {"row": i, "image": str(test.images[i]), "patient": str(test.groups[i]),
                "label": int(test.labels[i]), "seed": seed, "score": score, "threshold": cut,
                "called": int(score >= cut)}


def run_classification(cohort: Cohort, encoder=None, protocol: Protocol | None = None, *, test: Cohort | None = None,
                       features: np.ndarray | None = None, test_features: np.ndarray | None = None,
                       device=None, progress: bool = True, out_dir: str | os.PathLike | None = None,
                       task: str = "classify", meta: dict | None = None) -> dict:
    """Run the cross-validation protocol (module docstring) and return the results; with ``out_dir`` also write
    them (:func:`write_outputs`).

    Args:
        cohort: the labelled rows; ``cohort.inputs`` ``(N, D, H, W)`` must be loaded unless ``features`` are given
            (lp only).
        encoder: a :class:`~dagman.tasks.encoder.TaskEncoder` (None allowed with precomputed ``features`` in lp).
        protocol: :class:`Protocol` (defaults: lp, 100%, 3 folds, 1 seed).
        test: an optional held-out cohort with the same class names (inputs loaded, or ``test_features``).
        features / test_features: precomputed frozen features ``(N, F)`` / ``(T, F)`` (lp): compute them once with
            :func:`encode` to compare probes, seeds or fractions without re-running the encoder.
        device: torch device for the encoder (default: cuda when available).
        task: the name written into the results (``classify`` or ``outcome``).
        meta: extra entries merged into the results (e.g. the label CSV, the input settings).
    Returns:
        A dict with ``task, checkpoint, feature_source, mode, fraction, folds, fold_source, seeds, n, n_patients,
        label_balance, protocol, cv, test (or None), across_seeds, per_seed, roc, timing`` and, internally,
        ``_predictions`` / ``_test_predictions`` (row-level records for :func:`write_outputs`).
    """
    t_start = time.perf_counter()
    protocol = (protocol or Protocol()).check()
    _check_cohort(cohort)
    y = cohort.labels
    if test is not None:
        _check_cohort(test)
    run = run_cv(cohort, BinaryHead(cohort), protocol, encoder, test=test, features=features,
                 test_features=test_features, device=device, progress=progress)
    per_seed = run.per_seed

    across = {"cv": {m: mean_std([r["cv"][m] for r in per_seed]) for m in
                     ("auc", "sensitivity", "specificity", "fold_auc_mean")}}
    if test is not None:
        across["test"] = {m: mean_std([r["test"][m] for r in per_seed]) for m in ("auc", "sensitivity", "specificity")}
    first = per_seed[0]
    result = {
        "task": task,
        **describe_run(run, cohort, encoder, protocol),
        "label_balance": {"positives": int(y.sum()), "negatives": int(len(y) - y.sum()),
                          "positive_fraction": float(y.mean()), "positive_label": cohort.class_names[1],
                          "negative_label": cohort.class_names[0]},
        "protocol": {
            "val_fraction": protocol.val_fraction, "n_boot": protocol.n_boot, "ci": "95% percentile bootstrap, "
            "stratified by label", "threshold": "Youden's J on each fold's validation part",
            "model": ("logistic regression on standardised frozen features (scikit-learn, L2, balanced), C from "
                      f"{list(protocol.c_grid)} by validation AUC") if protocol.mode == "lp" else
                     (f"encoder + linear head fine-tuned end-to-end (AdamW lr {protocol.lr} with warm-up + cosine, "
                      f"weight decay {protocol.weight_decay} (not on norms, biases, tokens), clip {protocol.grad_clip}, batch {protocol.batch_size}, {protocol.epochs} epochs, random "
                      "flips), best epoch by validation AUC"),
            "pooling": "out-of-fold scores pooled over folds; test set: fold models' scores averaged, threshold = "
                       "mean of the fold thresholds",
        },
        "cv": {k: v for k, v in first["cv"].items() if k != "roc"},
        "test": ({k: v for k, v in first["test"].items() if k != "roc"} if first["test"] is not None else None),
        "across_seeds": across,
        "per_seed": [{"seed": r["seed"], "cv": {k: v for k, v in r["cv"].items() if k not in ("roc", "folds")},
                      "test": ({k: v for k, v in r["test"].items() if k != "roc"} if r["test"] else None)}
                     for r in per_seed],
        "roc": {"cv": first["cv"]["roc"], "test": first["test"]["roc"] if first["test"] is not None else None},
    }
    finish_result(result, run, test, meta, t_start)
    if out_dir is not None:
        write_outputs(result, out_dir)
    return result


def classify_table(labels: str | os.PathLike, checkpoint: str | os.PathLike, out: str | os.PathLike, *,
                   protocol: Protocol | None = None, label_col: str = "label", positive: str | None = None,
                   test: str | os.PathLike | None = None, size: str = "tiny", features: str = "mean",
                   spacing: float | None = None, hu_window: Sequence[float] | None = None,
                   crop_size: int | None = None, device=None, progress: bool = True) -> dict:
    """``dagman classify`` from Python: the label CSV ``labels`` (columns image,label; optional patient, fold;
    :func:`read_label_table`) -> the encoder ``checkpoint`` (:func:`open_encoder_and_inputs`, which also takes
    ``size``, ``features``, ``spacing``, ``hu_window``, ``crop_size``; seeded by ``protocol.seed``) -> the
    protocol (:func:`run_classification`) with the diameter-only / shape-only reference rows on the same folds
    and seeds when the table has the columns (:func:`reference_rows`). ``test``: a held-out label CSV scored by
    every fold's model. Writes ``metrics.json``, ``predictions.csv``, ``roc.png`` (and ``test_predictions.csv``)
    into ``out`` and returns the results (:func:`run_classification`, with ``references`` and ``input``)."""
    protocol = (protocol or Protocol()).check()
    table = read_label_table(labels)
    cohort = cohort_from_table(table, label_col=label_col, positive=positive)
    held_out = test_table = None
    if test:
        test_table = read_label_table(test)
        held_out = cohort_from_table(test_table, label_col=label_col, class_names=cohort.class_names)
    # diameter-only / shape-only references on the same folds and seeds, when the table has the columns
    references = reference_rows(cohort, table, protocol, test=held_out, test_table=test_table)
    encoder, inputs = open_encoder_and_inputs(checkpoint, [cohort, held_out], size=size, features=features,
                                              spacing=spacing, hu_window=hu_window, crop_size=crop_size,
                                              seed=protocol.seed, progress=progress)
    meta = {"labels_csv": str(Path(labels)), "label_column": label_col, "input": inputs, "references": references}
    return run_classification(cohort, encoder, protocol, test=held_out, device=device, progress=progress, out_dir=out,
                              task="classify", meta=meta)


# ----------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------


def _write_csv(path: Path, records: list[dict]) -> None:
    from dagman.fileio import atomic_write

    def write(fh):
        if not records:
            return
        w = csv.DictWriter(fh, fieldnames=list(records[0].keys()), lineterminator="\n")
        w.writeheader()
        for r in records:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})

    atomic_write(path, write, text=True)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_outputs(result: dict, out_dir: str | os.PathLike, *, figure: bool = True,
                  figure_fn: Callable[[dict, Path], object] | None = None, figure_name: str = "roc") -> dict:
    """Write ``metrics.json`` (``result`` without its ``_``-keys), ``predictions.csv`` (out-of-fold rows: row,
    image, patient, label, seed, fold, score, threshold, called), ``test_predictions.csv`` (when a test set was
    scored) and ``<figure_name>.png`` (``figure_fn``, default :func:`roc_figure`) into ``out_dir``; records the
    paths under ``result["files"]`` and returns them. Shared by ``dagman outcome`` (Kaplan-Meier figure)."""
    from dagman.data.cache import atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"metrics": str(out / "metrics.json"), "predictions": str(out / "predictions.csv")}
    _write_csv(out / "predictions.csv", result.get("_predictions", []))
    if result.get("_test_predictions"):
        _write_csv(out / "test_predictions.csv", result["_test_predictions"])
        files["test_predictions"] = str(out / "test_predictions.csv")
    if figure:
        (figure_fn or roc_figure)(result, out / f"{figure_name}.png")
        files[figure_name] = str(out / f"{figure_name}.png")
    result["files"] = files
    atomic_write_json(out / "metrics.json", _jsonable(result))
    return files


def roc_figure(result: dict, path: str | os.PathLike, title: str | None = None) -> Path:
    """ROC curves (pooled out-of-fold CV, and the test set when scored) of the first seed, each with its AUC and
    95% CI in the legend and its operating point (pooled sensitivity / specificity at the validation thresholds)
    as a dot. Returns the path."""
    from matplotlib.figure import Figure

    from dagman.fileio import atomic_write

    fig = Figure(figsize=(4.8, 4.6), dpi=100)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--", label="chance")
    for key, colour, name in (("cv", "#1f77b4", f"{result['folds']}-fold CV (out-of-fold)"),
                              ("test", "#d62728", "held-out test")):
        curve = result["roc"].get(key)
        m = result.get(key)
        if not curve or not m:
            continue
        ax.step(curve["fpr"], curve["tpr"], where="post", color=colour, lw=1.6,
                label=f"{name}: AUC {m['auc']:.3f} [{m['auc_ci'][0]:.2f}, {m['auc_ci'][1]:.2f}]")
        ax.plot([1 - m["specificity"]], [m["sensitivity"]], "o", color=colour, ms=5,
                label=f"  sens {m['sensitivity']:.2f}, spec {m['specificity']:.2f}")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("1 - specificity (false-positive rate)", fontsize=9)
    ax.set_ylabel("sensitivity (true-positive rate)", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_aspect("equal")
    heading = title or (f"{result['task']}: {result['mode']}, {result['fraction']:.0%} of training folds\n"
                        f"{result['feature_source']}")
    ax.set_title(heading, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda fh: fig.savefig(fh, format="png"))
    return path


def _ci(m: dict, key: str, digits: int = 3) -> str:
    lo, hi = m[f"{key}_ci"]
    return f"{m[key]:.{digits}f} [{lo:.2f}, {hi:.2f}]"


def format_table(result: dict) -> str:
    """A short fixed-width table of the first seed: one row per fold, the pooled CV line, the test line, and the
    mean ± std across seeds."""
    cv = result["cv"]
    lp = result["mode"] == "lp"
    lines = [f"{'fold':>4} {'train':>6} {'val':>5} {'test':>5} {'C' if lp else 'epoch':>7} {'val AUC':>8} "
             f"{'thresh':>7} {'AUC':>6}"]
    for fi in cv["folds"]:
        hp = f"{fi['C']:g}" if lp else str(fi["best_epoch"])
        lines.append(f"{fi['fold']:>4} {fi['n_train']:>6} {fi['n_val']:>5} {fi['n_test']:>5} {hp:>7} "
                     f"{fi['val_auc']:>8.3f} {fi['threshold']:>7.3f} {fi['auc']:>6.3f}")
    lines.append(f"CV pooled ({cv['n']} rows, {cv['positives']} positive): AUC {_ci(cv, 'auc')}, sensitivity "
                 f"{_ci(cv, 'sensitivity', 2)}, specificity {_ci(cv, 'specificity', 2)}; per-fold AUC "
                 f"{cv['fold_auc_mean']:.3f} ± {cv['fold_auc_std']:.3f}")
    t = result.get("test")
    if t:
        lines.append(f"test ({t['n']} rows, mean of {t['models']} fold models): AUC {_ci(t, 'auc')}, sensitivity "
                     f"{_ci(t, 'sensitivity', 2)}, specificity {_ci(t, 'specificity', 2)}")
    if len(result["seeds"]) > 1:
        a = result["across_seeds"]["cv"]
        line = (f"across {len(result['seeds'])} seeds: CV AUC {a['auc']['mean']:.3f} ± {a['auc']['std']:.3f}, "
                f"sensitivity {a['sensitivity']['mean']:.2f} ± {a['sensitivity']['std']:.2f}, specificity "
                f"{a['specificity']['mean']:.2f} ± {a['specificity']['std']:.2f}")
        if "test" in result["across_seeds"]:
            at = result["across_seeds"]["test"]
            line += f"; test AUC {at['auc']['mean']:.3f} ± {at['auc']['std']:.3f}"
        lines.append(line)
    return "\n".join(lines)


def summary_line(result: dict, out_dir: str | os.PathLike | None = None) -> str:
    """One line: ``dagman <task>: AUC 0.712 [0.65, 0.77] (3-fold CV, lp, 25% of training folds, <features>)
    -> OUT/metrics.json``."""
    cv = result["cv"]
    lo, hi = cv["auc_ci"]
    text = (f"dagman {result['task']}: AUC {cv['auc']:.3f} [{lo:.2f}, {hi:.2f}] ({result['folds']}-fold CV, "
            f"{result['mode']}, {result['fraction']:.0%} of training folds, {result['feature_source']}")
    if len(result["seeds"]) > 1:
        a = result["across_seeds"]["cv"]["auc"]
        text += f"; {len(result['seeds'])} seeds {a['mean']:.3f} ± {a['std']:.3f}"
    text += ")"
    if result.get("test"):
        t = result["test"]
        text += f"; test AUC {t['auc']:.3f} [{t['auc_ci'][0]:.2f}, {t['auc_ci'][1]:.2f}]"
    if out_dir is not None:
        text += f" -> {Path(out_dir) / 'metrics.json'}"
    return text


def summary_lines(result: dict) -> list[str]:
    """What ``dagman classify`` prints for a :func:`classify_table` result: the encoder and the rows, the
    per-fold table (:func:`format_table`), the reference rows and the summary line (:func:`summary_line`)."""
    balance = result["label_balance"]
    return [f"{result['checkpoint']}; {result['feature_source']}; {result['n']} rows ({balance['positives']} "
            f"positive = {balance['positive_label']!r}); folds: {result['fold_source']}",
            *format_table(result).splitlines(), *reference_lines(result.get("references") or {}),
            summary_line(result, Path(result["files"]["metrics"]).parent)]

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
* ``ft`` (fine-tune): the whole encoder plus a linear head, AdamW, random flips of each axis, binary
  cross-entropy (positive class weighted by the negative/positive ratio), the epoch with the best validation AUC
  kept; CUDA when available (bf16 autocast there), else CPU.

Library entry points: :func:`read_label_table` + :func:`cohort_from_table` (CSV -> :class:`Cohort`),
:func:`load_inputs` (images -> network inputs), :func:`encode` (inputs -> features), :func:`run_classification`
(the protocol; accepts precomputed ``features`` so several encoders can be compared on the same inputs) and
:func:`write_outputs` (``metrics.json``, ``predictions.csv``, ``roc.png``).
"""

from __future__ import annotations

import copy
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
from torch import nn

from dagman.errors import ConfigError, DataError
from dagman.tasks.metrics import bootstrap_ci, roc_auc, sensitivity_specificity, threshold_at_youden
from dagman.tasks.splits import fewshot_subset, min_groups_per_class, stratified_group_folds, train_val_split

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
]

MODES = ("lp", "ft")


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
            raise DataError(f"{where}: --positive {positive!r} is not one of the {column} values "
                            f"{name_of[neg]!r} / {name_of[pos]!r}")
    y = np.array([1 if k == pos else 0 for k in keys], dtype=np.int64)
    return y, (name_of[neg], name_of[pos])


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


def encode(encoder, inputs: np.ndarray, batch_size: int = 16, device=None, progress: bool = True) -> np.ndarray:
    """Frozen-encoder features ``(N, F)`` float32 of inputs ``(N, D, H, W)``."""
    from dagman.tasks.encoder import extract_features

    return extract_features(encoder, inputs, batch_size=batch_size, device=device, progress=progress)


# ----------------------------------------------------------------------------------------------------------
# Protocol and splits
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Protocol:
    """Settings of the evaluation protocol (see the module docstring). ``lr``, ``epochs``, ``batch_size``,
    ``weight_decay`` apply to ``ft``; ``c_grid`` (inverse L2 strengths) to ``lp``."""

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
    c_grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)

    def check(self) -> "Protocol":
        """Raise a one-line ConfigError for a bad setting; returns self."""
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not (isinstance(self.fraction, (int, float)) and 0.0 < float(self.fraction) <= 1.0):
            raise ConfigError(f"--fraction must be in (0, 1] (e.g. 0.25, 0.5, 1.0), got {self.fraction}")
        if int(self.folds) != self.folds or self.folds < 2:
            raise ConfigError(f"--folds must be an integer >= 2, got {self.folds}")
        if self.seeds < 1:
            raise ConfigError(f"--seeds must be >= 1, got {self.seeds}")
        if self.n_boot < 1:
            raise ConfigError(f"--n-boot must be >= 1, got {self.n_boot}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.mode == "ft":
            if self.epochs < 1:
                raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
            if not self.lr > 0:
                raise ConfigError(f"--lr must be > 0, got {self.lr}")
            if self.batch_size < 1:
                raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
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


class ScoringNetwork(nn.Module):
    """Encoder + one linear layer: ``forward(x (B, 1, D, H, W)) -> (B,)`` logit (classification) or log-risk
    (Cox). The encoder is used as given (copy it first to keep the original)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.feature_dim, 1)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)).squeeze(-1)


def _device(device=None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _random_flips(x, generator):
    """Flip each sample of ``x (B, 1, D, H, W)`` along each spatial axis with probability 1/2."""
    flips = torch.rand(x.shape[0], 3, generator=generator) < 0.5
    out = []
    for i in range(x.shape[0]):
        dims = [2 + a for a in range(3) if flips[i, a]]
        out.append(torch.flip(x[i:i + 1], dims) if dims else x[i:i + 1])
    return torch.cat(out)


def predict_network(net, inputs: np.ndarray, batch_size: int = 16, device=None) -> np.ndarray:
    """Outputs ``(N,)`` float64 of a scoring network on inputs ``(N, D, H, W)`` (eval mode, no grad, bf16
    autocast on CUDA)."""
    device = _device(device)
    net.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, inputs.shape[0], batch_size):
            x = torch.from_numpy(np.ascontiguousarray(inputs[i:i + batch_size]))[:, None].float().to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                o = net(x)
            outs.append(o.float().cpu().numpy().astype(np.float64))
    return np.concatenate(outs) if outs else np.zeros(0)


def fine_tune(encoder, x_train: np.ndarray, x_val: np.ndarray, loss_fn: Callable, val_key: Callable,
              protocol: Protocol, seed: int, device=None, progress: bool = True, desc: str = "fine-tune"):
    """Train a copy of ``encoder`` + a linear head end-to-end; keep the epoch whose validation outputs score best.

    Args:
        encoder: a :class:`~dagman.tasks.encoder.TaskEncoder` (copied, never modified).
        x_train: ``(M, D, H, W)`` float32 training inputs; x_val: ``(V, D, H, W)`` validation inputs.
        loss_fn: ``loss_fn(outputs (B,) float tensor, rows (B,) int64 numpy indices into x_train) -> scalar
            tensor`` (or None to skip the batch, e.g. a Cox batch without events).
        val_key: ``val_key(val_outputs (V,) numpy) -> comparable`` (higher is better, e.g. ``(auc, -loss)``).
        protocol: ``epochs``, ``lr``, ``weight_decay``, ``batch_size``.
        seed: seeds the head, the batch order and the flips.
    Returns:
        ``(network in eval mode with the best epoch's weights, {"best_epoch": int (1-based), "val_key": ...,
        "skipped_steps": batches whose loss or gradient was not finite (skipped, never applied)})``.
    """
    from tqdm import tqdm

    device = _device(device)
    torch.manual_seed(int(seed))
    net = ScoringNetwork(copy.deepcopy(encoder).float()).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=protocol.lr, weight_decay=protocol.weight_decay)
    gen = torch.Generator().manual_seed(int(seed))
    n = x_train.shape[0]
    best_state, best_key, best_epoch, skipped = None, None, 0, 0
    bar = tqdm(total=protocol.epochs, desc=desc, unit="epoch", disable=None if progress else True, leave=False)
    for epoch in range(protocol.epochs):
        net.train()
        order = torch.randperm(n, generator=gen).numpy()
        for i in range(0, n, protocol.batch_size):
            rows = order[i:i + protocol.batch_size]
            x = torch.from_numpy(np.ascontiguousarray(x_train[rows]))[:, None].float()
            x = _random_flips(x, gen).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = net(x)
            loss = loss_fn(out.float(), rows)
            if loss is None:
                continue
            opt.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):  # skipped and counted, never applied
                skipped += 1
                continue
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(net.parameters(), 3.0)
            if not torch.isfinite(norm):  # finite loss, non-finite gradient: the weights must not see it
                opt.zero_grad(set_to_none=True)
                skipped += 1
                continue
            opt.step()
        key = val_key(predict_network(net, x_val, protocol.batch_size * 2, device))
        if best_key is None or key > best_key:
            best_key, best_epoch = key, epoch + 1
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        bar.update(1)
    bar.close()
    net.load_state_dict(best_state)
    net.eval()
    return net, {"best_epoch": best_epoch, "val_key": best_key, "skipped_steps": skipped}


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


def _mean_std(values: Sequence[float]) -> dict:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.shape[0] > 1 else 0.0,
            "values": [float(x) for x in v]}


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


def _features_for(cohort: Cohort, encoder, features, device, progress, desc) -> np.ndarray:
    if features is not None:
        features = np.asarray(features, np.float32)
        if features.shape[0] != len(cohort):
            raise DataError(f"{cohort.source}: {features.shape[0]} feature rows for {len(cohort)} table rows")
        return features
    if encoder is None or cohort.inputs is None:
        raise DataError(f"{cohort.source}: the linear probe needs features, or an encoder and loaded inputs")
    return encode(encoder, cohort.inputs, device=device, progress=progress)


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
    timing = {"features_s": 0.0, "fit_s": 0.0}

    feats = test_feats = None
    if protocol.mode == "lp":
        t0 = time.perf_counter()
        feats = _features_for(cohort, encoder, features, device, progress, "features")
        if test is not None:
            test_feats = _features_for(test, encoder, test_features, device, progress, "test features")
        timing["features_s"] = time.perf_counter() - t0
    else:
        if encoder is None:
            raise DataError("fine-tuning (--mode ft) needs an encoder")
        for c in (cohort, test):
            if c is not None and c.inputs is None:
                raise DataError(f"{c.source}: fine-tuning needs the images loaded (cohort.inputs)")

    t_fit = time.perf_counter()
    per_seed, predictions, test_predictions = [], [], []
    fold_source = ""
    for s in protocol.seed_values:
        folds, fold_source = fold_plan(cohort, y, protocol, s)
        k = int(folds.max()) + 1
        oof_score = np.full(len(cohort), np.nan)
        oof_thr = np.full(len(cohort), np.nan)
        fold_info, test_scores, test_thresholds = [], [], []
        for f in range(k):
            parts = fold_parts(folds, y, cohort.groups, f, protocol, s)
            tr, va, te = parts["train"], parts["val"], parts["test"]
            info = {"fold": f, "n_train": int(tr.shape[0]), "n_val": int(va.shape[0]), "n_test": int(te.shape[0]),
                    "train_positives": int(y[tr].sum()), "val_positives": int(y[va].sum()),
                    "test_positives": int(y[te].sum())}
            if protocol.mode == "lp":
                probe = fit_linear_probe(feats[tr], y[tr], feats[va], y[va], protocol.c_grid)
                val_scores = probe.scores(feats[va])
                te_scores = probe.scores(feats[te])
                tt_scores = probe.scores(test_feats) if test is not None else None
                info.update({"C": probe.C, "val_auc": probe.val_auc})
            else:
                y_val = y[va]

                def val_key(out, y_val=y_val):
                    p = 1.0 / (1.0 + np.exp(-out))
                    return (roc_auc(y_val, p), -_log_loss(y_val, p))

                net, fit = fine_tune(encoder, cohort.inputs[tr], cohort.inputs[va], _bce_loss(y[tr]), val_key,
                                     protocol, seed=s * 1009 + f, device=device, progress=progress,
                                     desc=f"seed {s} fold {f}")
                sig = lambda o: 1.0 / (1.0 + np.exp(-o))  # noqa: E731
                val_scores = sig(predict_network(net, cohort.inputs[va], protocol.batch_size * 2, device))
                te_scores = sig(predict_network(net, cohort.inputs[te], protocol.batch_size * 2, device))
                tt_scores = (sig(predict_network(net, test.inputs, protocol.batch_size * 2, device))
                             if test is not None else None)
                info.update({"best_epoch": fit["best_epoch"], "val_auc": float(fit["val_key"][0]),
                             "skipped_steps": fit["skipped_steps"]})
                del net
            thr = threshold_at_youden(y[va], val_scores)
            info["threshold"] = float(thr)
            info["auc"] = roc_auc(y[te], te_scores)
            oof_score[te] = te_scores
            oof_thr[te] = thr
            if tt_scores is not None:
                test_scores.append(tt_scores)
                test_thresholds.append(thr)
            fold_info.append(info)
        cv = binary_metrics(y, oof_score, oof_thr, protocol.n_boot, seed=s)
        fold_aucs = [fi["auc"] for fi in fold_info]
        cv.update({"fold_aucs": fold_aucs, "fold_auc_mean": float(np.mean(fold_aucs)),
                   "fold_auc_std": float(np.std(fold_aucs, ddof=1)) if len(fold_aucs) > 1 else 0.0,
                   "folds": fold_info, "roc": roc_points(y, oof_score)})
        seed_result = {"seed": s, "cv": cv, "test": None}
        for i in range(len(cohort)):
            predictions.append({"row": i, "image": str(cohort.images[i]), "patient": str(cohort.groups[i]),
                                "label": int(y[i]), "seed": s, "fold": int(folds[i]), "score": float(oof_score[i]),
                                "threshold": float(oof_thr[i]), "called": int(oof_score[i] >= oof_thr[i])})
        if test is not None:
            t_score = np.mean(test_scores, axis=0)
            t_thr = float(np.mean(test_thresholds))
            tm = binary_metrics(test.labels, t_score, t_thr, protocol.n_boot, seed=s)
            tm.update({"threshold": t_thr, "models": len(test_scores), "roc": roc_points(test.labels, t_score)})
            seed_result["test"] = tm
            for i in range(len(test)):
                test_predictions.append({"row": i, "image": str(test.images[i]), "patient": str(test.groups[i]),
                                         "label": int(test.labels[i]), "seed": s, "score": float(t_score[i]),
                                         "threshold": t_thr, "called": int(t_score[i] >= t_thr)})
        per_seed.append(seed_result)
    timing["fit_s"] = time.perf_counter() - t_fit

    across = {"cv": {m: _mean_std([r["cv"][m] for r in per_seed]) for m in
                     ("auc", "sensitivity", "specificity", "fold_auc_mean")}}
    if test is not None:
        across["test"] = {m: _mean_std([r["test"][m] for r in per_seed]) for m in ("auc", "sensitivity", "specificity")}
    first = per_seed[0]
    source = getattr(encoder, "source", None)
    result = {
        "task": task,
        "checkpoint": source.description if source is not None else "precomputed features",
        "encoder": ({"kind": source.kind, "method": source.method, "size": source.cfg.size,
                     "step": source.step, "feature_dim": int(encoder.feature_dim)} if source is not None else
                    {"kind": "features", "feature_dim": int(feats.shape[1]) if feats is not None else None}),
        "feature_source": getattr(encoder, "feature_source", "precomputed features"),
        "mode": protocol.mode,
        "fraction": float(protocol.fraction),
        "folds": int(per_seed[0]["cv"]["folds"][-1]["fold"]) + 1,
        "fold_source": fold_source,
        "seeds": protocol.seed_values,
        "n": len(cohort),
        "n_patients": cohort.n_patients if cohort.has_patients else None,
        "label_balance": {"positives": int(y.sum()), "negatives": int(len(y) - y.sum()),
                          "positive_fraction": float(y.mean()), "positive_label": cohort.class_names[1],
                          "negative_label": cohort.class_names[0]},
        "protocol": {
            "val_fraction": protocol.val_fraction, "n_boot": protocol.n_boot, "ci": "95% percentile bootstrap, "
            "stratified by label", "threshold": "Youden's J on each fold's validation part",
            "model": ("logistic regression on standardised frozen features (scikit-learn, L2, balanced), C from "
                      f"{list(protocol.c_grid)} by validation AUC") if protocol.mode == "lp" else
                     (f"encoder + linear head fine-tuned end-to-end (AdamW lr {protocol.lr}, weight decay "
                      f"{protocol.weight_decay}, batch {protocol.batch_size}, {protocol.epochs} epochs, random "
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
        "timing": timing,
        "_predictions": predictions,
        "_test_predictions": test_predictions,
    }
    if test is not None:
        result["test_n"] = len(test)
        result["test_source"] = test.source
    if meta:
        result.update(meta)
    timing["total_s"] = time.perf_counter() - t_start
    if out_dir is not None:
        write_outputs(result, out_dir)
    return result


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

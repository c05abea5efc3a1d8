"""Shape-only malignancy baseline on a nodule set from ``dagman data nodules``.

Usage::

    python benchmarks/shape_baseline.py --nodules DIR            # a built set (labels.csv + masks/)
    python benchmarks/shape_baseline.py --workers 2              # build the full semi-synthetic set first
    python benchmarks/shape_baseline.py --nodules DIR --test-fraction 0.25 --seed 0 --n-boot 2000

Only the consensus masks are used (the HU images are ignored), so on the semi-synthetic LIDC-shape set this
measures how much the *real* LIDC shapes alone say about the *real* malignancy ratings. Features per mask
(isotropic spacing from the NIfTI header):

- volume (mm^3, log), equivalent-sphere diameter (mm), largest axial extent (mm);
- surface area from exposed voxel faces (mm^2) -> surface-to-volume ratio and sphericity
  (pi^(1/3) (6 V)^(2/3) / A; voxel faces overestimate A, consistently across nodules);
- principal axes of the voxel coordinates: elongation sqrt(l2 / l1) and flatness sqrt(l3 / l1);
- solidity (volume / convex-hull volume) and bounding-box extent (volume / box volume).

Split: patients are grouped (no patient on both sides) and stratified by label
(sklearn ``StratifiedGroupKFold``, one fold of ``round(1 / test_fraction)`` held out). Model: standardised
features -> ``LogisticRegression`` (class-balanced). Reported: the test ROC AUC with a label-stratified
percentile bootstrap 95 % CI (``dagman.tasks.metrics``), the label balance, a Markdown table row and the
exact command.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dagman.data.shape import FEATURES, mask_file_features


def load_set(folder: Path):
    """Features ``(N, F)``, labels ``(N,)``, patients ``(N,)`` of a nodule set folder."""
    from dagman.data.nodules import read_labels_csv

    rows = read_labels_csv(folder / "labels.csv")
    feats, labels, patients = [], [], []
    for r in rows:
        feats.append(mask_file_features(folder / r["mask"]))
        labels.append(r["label"])
        patients.append(r["patient"])
    return np.array(feats), np.array(labels), np.array(patients), rows


def grouped_split(labels: np.ndarray, patients: np.ndarray, test_fraction: float, seed: int):
    """Train and test indices with no patient on both sides, label-stratified."""
    from sklearn.model_selection import StratifiedGroupKFold

    k = max(2, int(round(1.0 / test_fraction)))
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    train, test = next(splitter.split(np.zeros(len(labels)), labels, groups=patients))
    return train, test


def evaluate(features, labels, patients, *, test_fraction=0.25, seed=0, n_boot=2000) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from dagman.tasks.metrics import bootstrap_ci, roc_auc

    ok = np.all(np.isfinite(features), axis=1)
    features, labels, patients = features[ok], labels[ok], patients[ok]
    train, test = grouped_split(labels, patients, test_fraction, seed)
    assert not set(patients[train]) & set(patients[test])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
    model.fit(features[train], labels[train])
    score = model.predict_proba(features[test])[:, 1]
    auc, lo, hi = bootstrap_ci(roc_auc, labels[test], score, n_boot=n_boot, seed=seed, stratify=labels[test])
    train_auc = roc_auc(labels[train], model.predict_proba(features[train])[:, 1])
    coefs = dict(zip(FEATURES, model[-1].coef_[0].round(3).tolist()))
    return {
        "n": int(len(labels)),
        "n_train": int(len(train)),
        "n_test": int(len(test)),
        "patients_train": int(len(set(patients[train]))),
        "patients_test": int(len(set(patients[test]))),
        "malignant_train": int(labels[train].sum()),
        "malignant_test": int(labels[test].sum()),
        "auc": auc,
        "ci": (lo, hi),
        "train_auc": train_auc,
        "coefficients": coefs,
        "dropped_nonfinite": int((~ok).sum()),
    }


def build_set(out: Path, workers: int, seed: int) -> Path:
    """The full semi-synthetic set (default DB and example backgrounds) into ``out``."""
    from dagman.data.nodules import make_nodule_set

    report = make_nodule_set(out, workers=workers, seed=seed, say=lambda m: print(m, file=sys.stderr))
    print(report.summary_line(), file=sys.stderr)
    return out


def build_command(folder: Path, manifest: dict) -> str:
    """The ``dagman data nodules`` command that rebuilds the set in ``folder`` (from its manifest)."""
    parts = ["dagman", "data", "nodules", "--out", str(folder)]
    if manifest.get("dicom_root"):
        parts += ["--lidc-dicom", manifest["dicom_root"]]
    parts += ["--label-rule", str(manifest.get("label_rule")), "--min-readers", str(manifest.get("min_readers"))]
    if manifest.get("spacing_mm") not in (None, 1.0):
        parts += ["--spacing", f"{manifest['spacing_mm']:g}"]
    if manifest.get("crop_mm") not in (None, 64.0):
        parts += ["--crop-mm", f"{manifest['crop_mm']:g}"]
    if manifest.get("limit"):
        parts += ["--limit", str(manifest["limit"])]
    parts += ["--seed", str(manifest.get("seed", 0))]
    return " ".join(shlex.quote(p) for p in parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--nodules",
        metavar="DIR",
        help="a nodule set from 'dagman data nodules' (default: build the full semi-synthetic set)",
    )
    parser.add_argument(
        "--build-into", metavar="DIR", help="where to build when --nodules is not given (default: a temporary folder)"
    )
    parser.add_argument("--workers", type=int, default=2, help="build workers (default 2)")
    parser.add_argument(
        "--test-fraction", type=float, default=0.25, help="held-out fraction, by patient (default 0.25)"
    )
    parser.add_argument("--seed", type=int, default=0, help="split and bootstrap seed (default 0)")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates (default 2000)")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    if args.nodules:
        folder = Path(args.nodules).expanduser()
    else:
        folder = (
            Path(args.build_into).expanduser() if args.build_into else Path(tempfile.mkdtemp(prefix="dagman_nodules_"))
        )
        build_set(folder, args.workers, args.seed)
    import json

    manifest = json.loads((folder / "manifest.json").read_text())
    kind = manifest.get("kind", "?")
    features, labels, patients, _ = load_set(folder)
    res = evaluate(features, labels, patients, test_fraction=args.test_fraction, seed=args.seed, n_boot=args.n_boot)
    seconds = time.perf_counter() - t0
    n_mal = int(labels.sum())
    print(f"set: {folder} ({kind}; rule {manifest.get('label_rule')}, >= {manifest.get('min_readers')} readers)")
    print(
        f"label balance: {len(labels)} nodules, benign {len(labels) - n_mal}, malignant {n_mal} "
        f"({n_mal / len(labels):.1%} malignant)"
    )
    print(
        f"split (patient-grouped, stratified): train {res['n_train']} nodules / {res['patients_train']} patients "
        f"({res['malignant_train']} malignant), test {res['n_test']} / {res['patients_test']} "
        f"({res['malignant_test']} malignant); "
        "no patient on both sides"
    )
    print(
        f"logistic regression on {len(FEATURES)} shape features; train AUC {res['train_auc']:.3f}; "
        f"coefficients {res['coefficients']}"
    )
    print(
        f"test AUC {res['auc']:.3f} (95% CI {res['ci'][0]:.3f}-{res['ci'][1]:.3f}, "
        f"{args.n_boot} stratified bootstrap replicates); {seconds:.0f} s"
    )
    command = (
        build_command(folder, manifest)
        + " && python benchmarks/shape_baseline.py "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    )
    what = "semi-synthetic LIDC-shape" if "semi" in kind else kind
    print()
    print("| data | label rule | nodules (benign/malignant) | features | model | test AUC (95% CI) | command |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {what} ({manifest.get('min_readers')}+ readers) | {manifest.get('label_rule')} | "
        f"{len(labels)} ({len(labels) - n_mal}/{n_mal}), "
        f"test {res['n_test']} | {len(FEATURES)} mask shape features | logistic regression | "
        f"{res['auc']:.3f} ({res['ci'][0]:.3f}-{res['ci'][1]:.3f}) | `{command.strip()}` |"
    )
    return 0 if res["auc"] > 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())

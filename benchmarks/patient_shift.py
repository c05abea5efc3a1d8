"""Where cross-patient organ recognition is lost: the same organ in two patients against two organs in one.

    python benchmarks/patient_shift.py none RUN_A RUN_B ...      # 'none' = random init of --size
    python benchmarks/patient_shift.py --random-seeds 3 none RUN  # random init drawn from torch seeds 0, 1, 2

``compare_methods.py``'s organ recognition trains a k-NN on the structure crops of one patient
(``totalseg_abdomen``) and tests it on another (``totalseg_dicom_abdomen``). This script encodes the same crops
(``compare_methods.recognition_crops``) with each encoder and prints, on the structures the two patients share:

- ``cross``: the evaluation's k-NN10 at 100% of the training crops (the same ``knn_predict``, so the same
  number as the comparison table);
- ``within``: leave-one-out k-NN10 among the test patient's own crops: does the feature tell the organs apart
  inside the unseen patient at all?
- ``shift``: the mean over shared organs of the distance between the organ's mean feature in the two patients,
  divided by the mean distance between the mean features of two different organs of the training patient.
  Above 1: the same organ in the other patient lies farther away than a different organ of the same patient,
  and a nearest-neighbour vote across patients has little to go on;
- ``cross/shift centred``: the same after each patient's mean feature is subtracted (how much of the shift is
  one offset per scan).

Features are L2-normalised before the distances (the k-NN's cosine geometry). The script reads the test
patient: it explains a result already reported, and is never a tool for choosing a recipe (DEVELOPERS.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

K = 10


def shift_ratio(fa: np.ndarray, ya: np.ndarray, fb: np.ndarray, yb: np.ndarray) -> float:
    """Mean over the classes of both ``ya`` and ``yb`` of ||mean_a(c) - mean_b(c)||, over the mean over pairs of
    those classes of ||mean_a(c) - mean_a(c')|| (patient a's between-class distance)."""
    classes = sorted(set(np.asarray(ya).tolist()) & set(np.asarray(yb).tolist()))
    if len(classes) < 2:
        raise ValueError("the two patients share fewer than 2 classes")
    ma = {c: fa[ya == c].mean(0) for c in classes}
    mb = {c: fb[yb == c].mean(0) for c in classes}
    across = np.mean([np.linalg.norm(ma[c] - mb[c]) for c in classes])
    within = np.mean([np.linalg.norm(ma[c] - ma[d]) for i, c in enumerate(classes) for d in classes[i + 1:]])
    return float(across / within)


def loo_knn(x: np.ndarray, y: np.ndarray, k: int, num_classes: int) -> np.ndarray:
    """Leave-one-out predictions of ``knn_predict`` within one set of rows."""
    from dagman.tasks.knn import knn_predict

    rows = np.arange(len(y))
    return np.array([knn_predict(x[rows != i], y[rows != i], x[i:i + 1], k=k, num_classes=num_classes)[0]
                     for i in rows])


def measure(fa: np.ndarray, ya: np.ndarray, fb: np.ndarray, yb: np.ndarray, k: int = K) -> dict:
    """The four numbers of the module docstring for training-patient rows ``fa`` (labels ``ya``) and test-patient
    rows ``fb`` (``yb``); integer labels; rows of classes the other patient lacks are left out."""
    from sklearn.metrics import balanced_accuracy_score

    from dagman.tasks.knn import knn_predict, unit_rows

    shared = np.intersect1d(ya, yb)
    keep_a, keep_b = np.isin(ya, shared), np.isin(yb, shared)
    fa, ya, fb, yb = unit_rows(fa[keep_a]), ya[keep_a], unit_rows(fb[keep_b]), yb[keep_b]
    n = int(max(ya.max(), yb.max())) + 1

    def cross(a, b):
        return float(balanced_accuracy_score(yb, knn_predict(a, ya, b, k=k, num_classes=n)))

    ca, cb = fa - fa.mean(0), fb - fb.mean(0)
    return {"classes": int(len(shared)), "cross": cross(fa, fb),
            "within": float(balanced_accuracy_score(yb, loo_knn(fb, yb, k, n))),
            "shift": shift_ratio(fa, ya, fb, yb), "cross_centred": cross(ca, cb),
            "shift_centred": shift_ratio(ca, ya, cb, yb)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("encoders", nargs="+", help="'none' (random init of --size), a run folder or an encoder file")
    p.add_argument("--size", default="cpu", help="the size preset of the encoders (default cpu)")
    p.add_argument("--random-seeds", type=int, default=1, help="random init drawn from torch seeds 0..N-1")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args(argv)

    import torch

    import compare_methods as cm
    from dagman.data import examples
    from dagman.tasks.cluster import encode_crops

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.random_seeds < 1:
        p.error("--random-seeds must be at least 1")
    for e in args.encoders:
        if e != "none" and not Path(e).exists():
            p.error(f"no such run folder or encoder file: {e}")
    root = examples.default_examples_dir()
    manifest = examples.load_examples_manifest(examples.fetch_examples(root, progress=False).parent)
    crops = cm.recognition_crops(manifest, cm.Budget(size=args.size))
    names = sorted(set(crops[0].class_names[i] for i in crops[0].class_ids)
                   | set(crops[1].class_names[i] for i in crops[1].class_ids))
    labels = [np.array([names.index(c.class_names[i]) for i in c.class_ids]) for c in crops]
    todo = [(f"random init (seed {s})", "none", s) for e in args.encoders if e == "none"
            for s in range(args.random_seeds)] + [(e, e, 0) for e in args.encoders if e != "none"]
    rows = []
    print(f"{'encoder':60s} classes  cross  within  shift  cross centred  shift centred")
    for label, ckpt, seed in todo:
        enc = cm.open_encoder(ckpt, args.size, seed=seed)
        fa, fb = (encode_crops(enc, c, batch_size=16, progress=False) for c in crops)
        m = measure(fa, labels[0], fb, labels[1])
        rows.append({"encoder": label, **m})
        print(f"{label[-60:]:60s} {m['classes']:7d}  {m['cross']:.3f}  {m['within']:.3f}  {m['shift']:.3f}  "
              f"{m['cross_centred']:13.3f}  {m['shift_centred']:13.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A no-learning reference for cross-patient organ recognition: what do plain intensity statistics score?

    python benchmarks/organ_intensity_reference.py          # the example CTs (dagman data fetch-examples)

The same structure crops as ``dagman recognize`` (``make_structure_crops``: 8 crops per structure, 32^3 voxels at
2 mm, HU window -750..1750, TotalSegmentator organ groups; train ``totalseg_abdomen``, test
``totalseg_dicom_abdomen``), but each crop described by 34 numbers instead of an encoder: a 32-bin histogram of
its [0, 1] intensities over 0.2..0.5 (-250..500 HU, soft tissue and contrast), its mean and its standard
deviation -- on the whole crop and on the central 8^3 voxels. Scored by ``recognise`` (the k-NN vote, the
linear probe, the ceiling: the same code and intervals as the encoders' rows). Also prints how much of each
patient's crops is exactly 0 (air below -750 HU, or zero padding beyond the image: the test patient is 20
slices of 2 mm, thinner than a 64 mm crop), and the mean HU of the organs both patients have, which says
how far apart the two acquisitions are before any encoder sees them.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

BINS, LO, HI = 32, 0.2, 0.5


def histogram_features(inputs: np.ndarray, centre: int | None = None) -> np.ndarray:
    """``(N, S, S, S)`` crops -> ``(N, BINS + 2)``: normalised histogram, 10 x mean, 10 x std (of the central
    ``centre``^3 voxels when given)."""
    a = np.asarray(inputs, dtype=np.float32)
    if centre:
        s, h = a.shape[-1] // 2, centre // 2
        a = a[:, s - h:s + h, s - h:s + h, s - h:s + h]
    a = a.reshape(len(a), -1)
    hist = np.stack([np.histogram(r, bins=BINS, range=(LO, HI))[0] for r in a]).astype(np.float64)
    hist /= hist.sum(1, keepdims=True) + 1e-9
    return np.concatenate([hist, 10 * a.mean(1, keepdims=True), 10 * a.std(1, keepdims=True)], 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", default=os.path.expanduser("~/.cache/dagman/examples"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import nibabel as nib

    from dagman.tasks.cluster import make_structure_crops
    from dagman.tasks.recognition import recognise

    E = args.examples
    kw = dict(spacing=2.0, size=32, crops_per_structure=8, groups="totalseg", seed=args.seed, progress=False)
    cases = {"train": "totalseg_abdomen", "test": "totalseg_dicom_abdomen"}
    crops = {k: make_structure_crops(f"{E}/ct/{v}.nii.gz", f"{E}/labels/{v}.nii.gz", **kw) for k, v in cases.items()}
    for k, c in crops.items():
        print(f"{k} ({cases[k]}): {len(c)} crops, share of voxels exactly 0: {(c.inputs == 0).mean():.3f}")
    for value, organ in ((1, "spleen"), (5, "liver")):
        means = []
        for v in cases.values():
            ct = nib.load(f"{E}/ct/{v}.nii.gz").get_fdata()
            lab = np.asarray(nib.load(f"{E}/labels/{v}.nii.gz").dataobj)
            means.append(f"{v} {ct[lab == value].mean():.0f} HU")
        print(f"mean HU of the {organ}: " + ", ".join(means))

    def cls(c):
        return [c.class_names[i] for i in c.class_ids]

    def cell(m):
        return f"{m['balanced_accuracy']['value']:.3f} [{m['balanced_accuracy']['ci'][0]:.3f}, " \
               f"{m['balanced_accuracy']['ci'][1]:.3f}]"

    for centre in (None, 8):
        r = recognise([histogram_features(crops["train"].inputs, centre)], [cls(crops["train"])],
                      histogram_features(crops["test"].inputs, centre), cls(crops["test"]), n_boot=1000,
                      seed=args.seed, ceiling_folds=5)
        print(f"{'central 8^3' if centre else 'whole crop'} ({len(r['classes'])} classes, chance "
              f"{1 / len(r['classes']):.3f}): k-NN10 {cell(r['knn'][10])}  k-NN20 {cell(r['knn'][20])}  "
              f"linear {cell(r['linear_probe'])}  ceiling {cell(r['ceiling'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

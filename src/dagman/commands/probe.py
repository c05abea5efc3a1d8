"""``dagman data probe``: a k-NN probe set (labelled structure crops) for the trainer's learning monitor."""

from __future__ import annotations

import argparse

HELP = "labelled structure crops for the k-NN probe of pretraining (train.probe)"

DESCRIPTION = """\
Build the probe set that `dagman pretrain` scores its teacher on while it trains (config keys train.probe and
train.probe_every_steps): crops of every labelled structure of the --train and --test CTs, cut at the run's
spacing and HU window and grouped into classes (--groups totalseg: liver, spleen, kidney, ...), saved as one
.npz. Every train.probe_every_steps steps the trainer embeds them with the teacher and logs the balanced
accuracy of DINO's k-NN vote (k = 20) of the test crops against the training crops (probe/knn_mean: mean of
the last stage's tokens; probe/knn_sa: the SA [CLS] token), beside chance (probe/chance). A curve that rises
above chance says the features learn what the labels separate; one that stays at chance says they do not.
It also logs the effective rank of those features over all the crops (probe/rank_mean of probe/dim_mean
dimensions): a rank falling below the untrained network's is dimensional collapse.

Build it from training volumes or a separate validation patient, not from the patients you will evaluate on:
a recipe chosen by its probe curve is tuned on the probe's patients.

--test-slab N keeps, in every test crop, only N z planes around its centre (the rest 0): a thin series, as a
20-slice scan is padded when a 32-plane crop is cut from it. Features that find the organ only in a fully scanned
crop fall towards chance on it (docs/RESULTS.md: random init 0.30 -> 0.12 at N = 20).

examples:
  E=~/.cache/dagman/examples
  dagman data probe --train $E/ct/totalseg_abdomen.nii.gz $E/labels/totalseg_abdomen.nii.gz \\
      --test $E/ct/totalseg_abdomen_crop.nii.gz $E/labels/totalseg_abdomen_crop.nii.gz --groups totalseg \\
      --out probe.npz
  `dagman pretrain --data CACHE --size cpu --out run train.probe=probe.npz train.probe_every_steps=500`
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dagman.tasks.cluster import DEFAULT_MIN_VOXELS

    parser.add_argument("--train", nargs=2, action="append", required=True, metavar=("CT", "LABELMAP"),
                        help="a CT and its label map whose crops the k-NN votes with (repeat for more)")
    parser.add_argument("--test", nargs=2, required=True, metavar=("CT", "LABELMAP"),
                        help="a CT and its label map whose crops are scored")
    parser.add_argument("--out", required=True, metavar="FILE", help="output .npz")
    parser.add_argument("--names", metavar="JSON", help="label names: JSON value -> name, MSD dataset.json or "
                        "fetch-examples manifest (default: the manifest listing the label map, if any)")
    parser.add_argument("--groups", metavar="JSON", help="organ classes: 'totalseg', a JSON file or inline JSON "
                        "{class: [label names/values/patterns]} (default: one class per structure)")
    parser.add_argument("--spacing", type=float, default=2.0, metavar="MM",
                        help="isotropic spacing of the crops: the run's data.spacing_mm (default 2)")
    parser.add_argument("--hu-window", type=float, nargs=2, default=(-750.0, 1750.0), metavar=("LO", "HI"),
                        help="HU window: the run's data.hu_window (default -750 1750)")
    parser.add_argument("--crop-size", type=int, default=32, metavar="S",
                        help="crop edge in voxels; a multiple of patch size * 16 (default 32)")
    parser.add_argument("--crops-per-structure", type=int, default=8, metavar="N", help="(default 8)")
    parser.add_argument("--min-voxels", type=int, default=DEFAULT_MIN_VOXELS, metavar="N",
                        help=f"smallest structure, in label-map voxels (default {DEFAULT_MIN_VOXELS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the crop centres (default 0)")
    parser.add_argument("--test-slab", type=int, metavar="N",
                        help="thin every test crop to N contiguous z planes around its centre, the rest 0 (a thin "
                             "series); default: the crops as cut")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from dagman.errors import DagmanError
    from dagman.train.probe import build_probe_set

    for flag, value in (("--crops-per-structure", args.crops_per_structure), ("--min-voxels", args.min_voxels),
                        ("--crop-size", args.crop_size)):
        if value < 1:
            raise DagmanError(f"{flag} {value}: must be >= 1")
    if not args.spacing > 0 or not args.hu_window[0] < args.hu_window[1]:
        raise DagmanError(f"--spacing {args.spacing:g} must be > 0 and --hu-window LO < HI, got "
                          f"{args.hu_window[0]:g} {args.hu_window[1]:g}")
    if args.test_slab is not None and not 1 <= args.test_slab <= args.crop_size:
        raise DagmanError(f"--test-slab {args.test_slab}: must be in 1..{args.crop_size} (the crop edge)")
    for pair in [*args.train, args.test]:
        for p in pair:
            if not Path(p).exists():
                raise DagmanError(f"{p}: no such file or folder")
    probe = build_probe_set([tuple(p) for p in args.train], tuple(args.test), spacing=args.spacing,
                            hu_window=tuple(args.hu_window), size=args.crop_size,
                            crops_per_structure=args.crops_per_structure, min_voxels=args.min_voxels,
                            names=args.names, groups=args.groups, seed=args.seed)
    if args.test_slab is not None:
        from dagman.train.probe import thin_crops

        probe = thin_crops(probe, args.test_slab, seed=args.seed)
    out = probe.save(args.out)
    test = np.asarray(probe.is_test)
    thin = f" (test crops thinned to {args.test_slab} z planes)" if args.test_slab is not None else ""
    print(f"dagman data probe: {int((~test).sum())} training and {int(test.sum())} test crops{thin} of "
          f"{probe.inputs.shape[1]}^3 voxels at {probe.spacing_mm:g} mm, {len(probe.class_names)} classes "
          f"({', '.join(probe.class_names)}; chance {1 / len(probe.class_names):.3f}) -> {out}")
    return 0

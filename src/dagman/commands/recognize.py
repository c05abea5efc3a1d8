"""``dagman recognize``: organ recognition across patients with frozen encoder features (k-NN, linear probe)."""

from __future__ import annotations

import argparse

HELP = "organ recognition on a patient never seen: k-NN and linear probe on frozen features of structure crops"

DESCRIPTION = """\
Can an encoder's frozen features tell organs apart on a patient it has not seen? From CTs with label maps
(same voxel grid each), take --crops-per-structure crops of --crop-size voxels around random voxels of every
structure (at the encoder's spacing and HU window, as `dagman cluster` does), group them into classes
(--groups totalseg: liver, spleen, kidney, ...; or one class per structure), and embed them with the encoder.
The --train patients' crops train, the --test patient's crops test; classes missing from training are left
out of the test. Probes:

  k-NN      DINO's weighted vote (cosine similarity, weights exp(sim / 0.07)), k = 10 and 20: no training
  linear    multinomial logistic regression on standardised features (C = 1)
  ceiling   the same linear probe trained on the test patient's own crops (stratified 5-fold out-of-fold):
            a supervised upper reference (optimistic: crops of one structure are alike)

Each with balanced accuracy (mean recall per class) and macro-F1, with 95% bootstrap intervals over the test
crops (stratified by class), beside the chance level 1 / classes. Writes OUT/metrics.json and OUT/confusion.png
(k-NN, k = 20), and prints the table. Use it to compare encoders on your own labelled CTs: run it once per
--checkpoint (and once with --checkpoint none, the random-init reference).

examples:
  E=~/.cache/dagman/examples
  dagman recognize --train $E/ct/totalseg_abdomen.nii.gz $E/labels/totalseg_abdomen.nii.gz \\
      --test $E/ct/totalseg_dicom_abdomen.nii.gz $E/labels/totalseg_dicom_abdomen.nii.gz \\
      --groups totalseg --checkpoint none --out rec/random
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dagman.commands.cluster import add_structure_crop_arguments

    parser.add_argument("--train", nargs=2, action="append", required=True, metavar=("CT", "LABELMAP"),
                        help="a training patient: CT and its label map (repeat for more patients)")
    parser.add_argument("--test", nargs=2, required=True, metavar=("CT", "LABELMAP"),
                        help="the held-out patient: CT and its label map")
    add_structure_crop_arguments(parser)
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap replicates of the "
                        "intervals (default 1000)")
    parser.add_argument("--fraction", type=float, default=1.0, metavar="F",
                        help="share of the training crops the probes see, in (0, 1] (class-stratified, at least one "
                        "crop per class; default 1): one point of a label-fraction curve")
    parser.add_argument("--seed", type=int, default=0, help="seed of the crop centres, random init, the --fraction "
                        "subset and bootstrap")


def format_table(result: dict) -> str:
    rows = [("k-NN, k = 10", result["knn"][10] if 10 in result["knn"] else None),
            ("k-NN, k = 20", result["knn"][20] if 20 in result["knn"] else None),
            ("linear probe", result.get("linear_probe")),
            ("ceiling (test patient's own crops, CV)", result.get("ceiling"))]
    lines = [f"{'probe':<40}  {'balanced accuracy [95% CI]':<28}  {'macro-F1 [95% CI]':<28}"]
    for name, m in rows:
        if m is None:
            lines.append(f"{name:<40}  n/a (too few crops per class)")
            continue
        cells = [f"{m[k]['value']:.3f} [{m[k]['ci'][0]:.3f}, {m[k]['ci'][1]:.3f}]" for k in ("balanced_accuracy",
                                                                                             "macro_f1")]
        lines.append(f"{name:<40}  {cells[0]:<28}  {cells[1]:<28}")
    lines.append(f"chance: {1 / len(result['classes']):.3f} ({len(result['classes'])} classes: "
                 f"{', '.join(result['classes'])}); {result['n_train']} training crops"
                 + (f" ({result['fraction']:.0%} of them)" if result.get("fraction", 1.0) < 1.0 else "")
                 + f", {result['n_test']} test crops")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from dagman.data.cache import atomic_write_text
    from dagman.errors import DagmanError
    from dagman.report.plots import confusion_figure
    from dagman.tasks.cluster import check_crop_counts
    from dagman.tasks.encoder import build_task_encoder, default_input_size
    from dagman.tasks.recognition import organ_recognition

    check_crop_counts(args.crops_per_structure, args.min_voxels, args.batch_size)
    if args.bootstrap < 1:
        raise DagmanError(f"--bootstrap {args.bootstrap}: must be >= 1")
    if not 0.0 < args.fraction <= 1.0:
        raise DagmanError(f"--fraction {args.fraction:g}: must be in (0, 1]")
    for pair in [*args.train, args.test]:
        for p in pair:
            if not Path(p).exists():
                raise DagmanError(f"{p}: no such file or folder")
    torch.manual_seed(args.seed)  # the weights of a random-init encoder ('none')
    encoder = build_task_encoder(args.checkpoint, size=args.size)
    size = default_input_size(encoder, args.crop_size)
    result = organ_recognition(encoder, [tuple(p) for p in args.train], tuple(args.test), size=size,
                               crops_per_structure=args.crops_per_structure, min_voxels=args.min_voxels,
                               mode=args.mode, names=args.names, groups=args.groups, n_boot=args.bootstrap,
                               seed=args.seed, batch_size=args.batch_size, fraction=args.fraction)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"format": "dagman-recognize", "format_version": 1, "checkpoint": str(args.checkpoint),
              "groups": args.groups or "one class per structure", **result,
              "knn": {str(k): v for k, v in result["knn"].items()}}
    atomic_write_text(out / "metrics.json", json.dumps(report, indent=2) + "\n")
    knn = result["knn"].get(20) or next(iter(result["knn"].values()))
    confusion_figure(knn["confusion"], result["classes"], out / "confusion.png",
                     title=f"{result['encoder_label']}: k-NN (k = 20) on the test patient, balanced accuracy "
                           f"{knn['balanced_accuracy']['value']:.3f}")
    print(format_table(result))
    print(f"dagman recognize: {result['encoder_label']} -> {out / 'metrics.json'}, {out / 'confusion.png'}")
    return 0

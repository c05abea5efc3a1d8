"""``dagman classify``: binary classification on a pretrained encoder (linear probe or fine-tune), few-shot
fractions, stratified patient-grouped k-fold CV, AUC / sensitivity / specificity with bootstrap CIs, ROC plot.

The protocol lives in :mod:`dagman.tasks.classify`; this module parses the options, opens the label table and
the encoder, loads the images and prints the result. :func:`add_encoder_arguments`, :func:`add_protocol_arguments`
and :func:`open_task` are shared with ``dagman outcome``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dagman.config import SIZES

HELP = "binary classification with a pretrained encoder: linear probe or fine-tune, k-fold CV, AUC with CIs"

DESCRIPTION = """\
Evaluate an encoder on a binary task from a label CSV (columns image,label; optional patient, fold; extra
columns are ignored; image paths relative to the CSV's folder or absolute, any CT format dagman reads).

Protocol: --folds K stratified cross-validation with whole patients per fold (or the CSV's fold column). In
each fold the other folds are reduced to --fraction of their patients (few-shot: 0.25, 0.5, 1.0) and split by
patient into train and validation (--val-fraction). The model is trained on train; the validation part picks
its hyper-parameter (lp: the L2 strength; ft: the epoch) and the sensitivity/specificity threshold (Youden's
J) -- the test fold is only scored. Out-of-fold scores are pooled: AUC, sensitivity, specificity with 95%
bootstrap CIs, plus the per-fold AUC mean and std. --test CSV scores a held-out set with every fold's model
(averaged). --seeds N repeats everything with seeds --seed .. --seed+N-1 and adds mean +- std across seeds.

Modes: lp = frozen encoder, features computed once per image, logistic regression; ft = the whole encoder and
a linear head trained end-to-end with AdamW and random flips (CUDA when available).

Images are resampled to --spacing mm (default: the encoder's pretraining spacing), HU-windowed (default: the
encoder's window) and centre-cropped to --crop-size voxels (a multiple of patch size * 16).
Labels: 0/1, or any two values (sorted; the larger is positive unless --positive names it).

Reference rows: when the CSV has a diameter_mm column (as `dagman data nodules` writes), a logistic regression
on the diameter alone runs through the same folds and seeds and is printed below the encoder's table
("reference diameter-only"); with a mask column, the same for 9 shape features of each mask ("reference
shape-only"). An encoder that does not beat them has learned nothing the size or the outline does not say.
They are stored under "references" in metrics.json.

Writes into OUT: metrics.json, predictions.csv (row, image, patient, label, seed, fold, score, threshold,
called), test_predictions.csv (with --test) and roc.png.

examples:
  dagman classify --labels nodules/labels.csv --checkpoint runs/dagman --spacing 1 --crop-size 32 \\
      --fraction 0.25 --out results/nodules_lp25
  dagman classify --labels labels.csv --checkpoint none --mode ft --epochs 30 --out results/random_ft
"""


def add_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    """Encoder and image options shared by classify and outcome."""
    parser.add_argument("--checkpoint", required=True, metavar="C",
                        help="run folder, checkpoint .pt, encoder .safetensors, or 'none' (random init)")
    parser.add_argument("--size", default="tiny", choices=SIZES,
                        help="architecture of a random-init encoder (and of an encoder file without config); "
                             "default tiny")
    parser.add_argument("--features", default="auto", choices=("auto", "sa", "mean"),
                        help="image feature: the SA [CLS] token (sa), the mean of the last stage's tokens (mean), "
                             "or sa when the encoder has an SA block (auto, default)")
    parser.add_argument("--spacing", type=float, metavar="MM",
                        help="resample images to this isotropic spacing (default: the encoder's data.spacing_mm)")
    parser.add_argument("--hu-window", type=float, nargs=2, metavar=("LO", "HI"),
                        help="HU window mapped to [0, 1] (default: the encoder's data.hu_window)")
    parser.add_argument("--crop-size", type=int, metavar="S",
                        help="centre crop edge in voxels, a multiple of patch size * 16 (default: covers 64 mm)")
    parser.add_argument("--device", metavar="DEV", help="torch device (default: cuda when available, else cpu)")


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """Protocol options shared by classify and outcome."""
    parser.add_argument("--mode", default="lp", choices=("lp", "ft"),
                        help="lp: linear probe on frozen features (default); ft: fine-tune the whole encoder")
    parser.add_argument("--fraction", type=float, default=1.0, metavar="F",
                        help="share of the training folds' patients used (few-shot), in (0, 1]; default 1.0")
    parser.add_argument("--folds", type=int, default=3, metavar="K", help="cross-validation folds (default 3)")
    parser.add_argument("--val-fraction", type=float, default=0.2, metavar="F",
                        help="share of the training patients held out for validation (default 0.2)")
    parser.add_argument("--seeds", type=int, default=1, metavar="N",
                        help="repeat the protocol with N seeds and report mean +- std (default 1)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="base seed (default 0)")
    parser.add_argument("--n-boot", type=int, default=1000, metavar="N", help="bootstrap replicates for the CIs "
                        "(default 1000)")
    parser.add_argument("--test", metavar="CSV", help="held-out label table scored by every fold's model")
    parser.add_argument("--epochs", type=int, default=20, metavar="N", help="ft: training epochs (default 20)")
    parser.add_argument("--lr", type=float, default=1e-4, metavar="LR", help="ft: AdamW learning rate (default 1e-4)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B", help="ft: batch size (default 8)")
    parser.add_argument("--weight-decay", type=float, default=0.05, metavar="W",
                        help="ft: AdamW weight decay (default 0.05)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", required=True, metavar="CSV", help="label table (image,label[,patient,fold])")
    parser.add_argument("--label-col", default="label", metavar="NAME", help="label column (default label)")
    parser.add_argument("--positive", metavar="VALUE", help="the label value of the positive class (default: the "
                        "larger of the two)")
    add_encoder_arguments(parser)
    add_protocol_arguments(parser)


def protocol_from_args(args: argparse.Namespace):
    from dagman.tasks.classify import Protocol

    return Protocol(mode=args.mode, fraction=args.fraction, folds=args.folds, seeds=args.seeds, seed=args.seed,
                    n_boot=args.n_boot, val_fraction=args.val_fraction, epochs=args.epochs, lr=args.lr,
                    batch_size=args.batch_size, weight_decay=args.weight_decay).check()


def open_encoder_and_inputs(args: argparse.Namespace, cohorts: list) -> tuple[object, dict]:
    """Build the encoder (seeded by ``--seed``), settle the input settings and load every cohort's inputs.
    Returns ``(encoder, input settings dict)``."""
    import torch

    from dagman.tasks.classify import load_inputs
    from dagman.tasks.encoder import build_task_encoder, default_input_size
    from dagman.errors import ConfigError

    torch.manual_seed(int(args.seed))
    use_sa = {"auto": None, "sa": True, "mean": False}[args.features]
    encoder = build_task_encoder(args.checkpoint, size=args.size, use_sa=use_sa)
    data_cfg = encoder.source.cfg.data
    spacing = float(args.spacing) if args.spacing is not None else float(data_cfg.spacing_mm)
    if not spacing > 0:
        raise ConfigError(f"--spacing must be > 0 mm, got {args.spacing}")
    window = tuple(float(v) for v in (args.hu_window or data_cfg.hu_window))
    if not window[1] > window[0]:
        raise ConfigError(f"--hu-window LO HI needs LO < HI, got {window[0]:g} {window[1]:g}")
    size = default_input_size(encoder, args.crop_size)
    for c in cohorts:
        if c is not None:
            c.inputs = load_inputs(c.images, spacing, window, size)
    return encoder, {"spacing_mm": spacing, "hu_window": list(window), "crop_size": size}


def run(args: argparse.Namespace) -> int:
    from dagman.tasks.classify import (cohort_from_table, format_table, read_label_table, reference_lines,
                                       reference_rows, run_classification, summary_line)

    protocol = protocol_from_args(args)
    table = read_label_table(args.labels)
    cohort = cohort_from_table(table, label_col=args.label_col, positive=args.positive)
    test = test_table = None
    if args.test:
        test_table = read_label_table(args.test)
        test = cohort_from_table(test_table, label_col=args.label_col, class_names=cohort.class_names)
    # diameter-only / shape-only references on the same folds and seeds, when the table has the columns
    references = reference_rows(cohort, table, protocol, test=test, test_table=test_table)
    encoder, inputs = open_encoder_and_inputs(args, [cohort, test])
    meta = {"labels_csv": str(Path(args.labels)), "label_column": args.label_col, "input": inputs,
            "references": references}
    result = run_classification(cohort, encoder, protocol, test=test, device=args.device, out_dir=args.out,
                                task="classify", meta=meta)
    print(f"{result['checkpoint']}; {result['feature_source']}; {result['n']} rows "
          f"({result['label_balance']['positives']} positive = {result['label_balance']['positive_label']!r}); "
          f"folds: {result['fold_source']}")
    print(format_table(result))
    for line in reference_lines(references):
        print(line)
    print(summary_line(result, args.out))
    return 0

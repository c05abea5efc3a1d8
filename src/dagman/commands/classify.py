"""``dagman classify``: binary classification on a pretrained encoder (linear probe or fine-tune), few-shot
fractions, stratified patient-grouped k-fold CV, AUC / sensitivity / specificity with bootstrap CIs, ROC plot.

The work is :func:`dagman.tasks.classify.classify_table`; this module parses the options, calls it and prints
its :func:`~dagman.tasks.classify.summary_lines`. :func:`add_encoder_arguments`,
:func:`add_protocol_arguments`, :func:`protocol_from_args` and :func:`encoder_options` are shared with
``dagman outcome``.
"""

from __future__ import annotations

import argparse

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
    parser.add_argument("--features", default="mean", choices=("mean", "sa"),
                        help="image feature: the mean of the last stage's tokens (mean, default, for every encoder) "
                             "or the SA [CLS] token of an encoder pretrained with an SA block (sa)")
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


def encoder_options(args: argparse.Namespace) -> dict:
    """The encoder and image options of :func:`add_encoder_arguments` as keyword arguments of
    :func:`dagman.tasks.classify.open_encoder_and_inputs` (shared with outcome)."""
    return {"size": args.size, "features": args.features, "spacing": args.spacing, "hu_window": args.hu_window,
            "crop_size": args.crop_size}


def run(args: argparse.Namespace) -> int:
    from dagman.tasks.classify import classify_table, summary_lines

    result = classify_table(args.labels, args.checkpoint, args.out, protocol=protocol_from_args(args),
                            label_col=args.label_col, positive=args.positive, test=args.test, device=args.device,
                            **encoder_options(args))
    for line in summary_lines(result):
        print(line)
    return 0

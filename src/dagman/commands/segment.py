"""``dagman segment``: fine-tune a SwinUNETR on a pretrained encoder, evaluate Dice / HD95, write predictions."""

from __future__ import annotations

import argparse
import sys

from dagman.config import SIZES

HELP = "tumour/organ segmentation: SwinUNETR on a pretrained encoder, Dice and HD95, predictions as NIfTI"

DESCRIPTION = """\
Segmentation downstream task (method notes, section 9, item 3): MONAI SwinUNETR whose Swin encoder is the
pretrained backbone (loaded strictly), with a randomly initialised U-Net-style decoder; the whole network is
fine-tuned (--freeze-encoder: the decoder only) with Dice + cross-entropy on random ROI crops (half centred
on foreground), random flips, AdamW with warm-up + cosine learning rate, bf16 autocast on CUDA.

DATA is an MSD dataset.json ("training": [{"image", "label"}], optional "test", "labels": {"0": ...}) or a
CSV with columns image,label (label = label-map path); paths are relative to the file. Images are read in any
CT format (NIfTI, NRRD, MetaImage, DICOM folder), reoriented to RAS, resampled to isotropic --spacing mm
(default: the encoder's; image linear, label nearest) and HU-windowed as in pretraining. The labels to
segment are those declared by dataset.json, or --labels 1,2 (for a CSV: the declaration; for MSD: a subset,
other labels count as background), or --num-classes N (values 1..N-1), else those found in the training maps.

A seeded --val-fraction of the cases is held out by case; --fraction keeps a seeded few-shot subset of the
rest for training. The held-out cases (and labelled MSD test cases) are segmented by sliding-window inference
(ROI windows, overlap 0.5) and scored per class: Dice and HD95 (mm, at the resampled spacing).
--eval-train also scores the training cases (a sanity check on training data, reported as such).

CHECKPOINT: a pretraining run folder, a checkpoint .pt, an encoder .safetensors, or 'none' (random init of
--size). An epoch is one crop of every training case; --steps overrides --epochs (default 100 epochs).

Writes OUT/metrics.json (per case and class, mean/std per class, settings, encoder), OUT/model.safetensors
(the whole network) and OUT/predictions/<name>.nii.gz: label maps with the same shape and affine as the
source image file. --model OUT/model.safetensors --predict IMAGES... predicts with a saved model, no training.

examples:
  dagman segment --data Task06_Lung/dataset.json --checkpoint runs/dagman --out seg/dagman
  dagman segment --data Task06_Lung/dataset.json --checkpoint none --size small --out seg/random
  dagman segment --data labels.csv --checkpoint runs/dagman/encoder.safetensors --labels 1 --fraction 0.25 \\
      --epochs 200 --roi 96 --out seg/fewshot25
  dagman segment --model seg/dagman/model.safetensors --predict new_ct.nii.gz dicom_folder/ --out seg/new
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", metavar="D", help="MSD dataset.json or CSV with columns image,label")
    parser.add_argument("--checkpoint", metavar="C", help="run folder, checkpoint .pt, encoder .safetensors, or "
                        "'none' (random init)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--size", default="tiny", choices=SIZES,
                        help="architecture of a random-init encoder or of an encoder file without a config "
                        "(default tiny)")
    parser.add_argument("--fraction", type=float, default=1.0, metavar="F",
                        help="few-shot: share of the (non-held-out) training cases used, seeded, at least 1 "
                        "(default 1.0)")
    parser.add_argument("--val-fraction", type=float, default=0.2, metavar="F",
                        help="share of the cases held out for evaluation, by case (default 0.2)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, metavar="N", help="training epochs: one crop per training case each "
                        "(default 100)")
    length.add_argument("--steps", type=int, metavar="N", help="training steps (overrides --epochs)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of AdamW (default 1e-4)")
    parser.add_argument("--weight-decay", type=float, default=1e-5, help="AdamW weight decay (default 1e-5)")
    parser.add_argument("--batch-size", type=int, default=2, metavar="B", help="crops per step (default 2)")
    parser.add_argument("--roi", type=int, default=64, metavar="R",
                        help="crop / sliding-window edge in voxels, a multiple of patch size x 16, >= 2x that "
                        "(default 64)")
    parser.add_argument("--spacing", type=float, metavar="MM",
                        help="isotropic voxel size in mm (default: the encoder's data.spacing_mm)")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--labels", metavar="1,2", help="foreground label values to segment")
    labels.add_argument("--num-classes", type=int, metavar="N", help="classes incl. background (values 0..N-1)")
    parser.add_argument("--predict", nargs="+", default=[], metavar="IMAGE",
                        help="also predict these images (no labels needed) -> OUT/predictions/")
    parser.add_argument("--model", metavar="M", help="a saved OUT/model.safetensors: predict --predict images with "
                        "it, no training")
    parser.add_argument("--loss", default="dicece", choices=("dicece", "dicece-batch"),
                        help="dicece: Dice (per crop, background included) + cross-entropy, as in MONAI's SwinUNETR "
                        "recipes; dicece-batch: Dice over the batch on the foreground classes only + cross-entropy "
                        "(learns small targets such as nodules in far fewer steps) (default dicece)")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                        help="auto: bf16 autocast on CUDA, fp32 on CPU; bf16: autocast on any device (faster on "
                        "CPUs with AMX / AVX512-BF16); fp32: never (default auto)")
    parser.add_argument("--freeze-encoder", action="store_true", help="train the decoder only")
    parser.add_argument("--eval-train", action="store_true",
                        help="also score the training cases (sanity check on training data)")
    parser.add_argument("--device", metavar="DEV", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of splits, crops and init (default 0)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dagman.errors import DagmanError
    from dagman.tasks import segment as seg

    out = Path(args.out)
    if args.model:
        if not args.predict:
            raise DagmanError("--model needs --predict IMAGES... (it predicts with a saved model, no training)")
        if args.data or args.checkpoint:
            raise DagmanError("--model predicts with a saved model: drop --data/--checkpoint (or drop --model to "
                              "train)")
        done = seg.predict_images(args.model, args.predict, out, device=args.device, batch_size=args.batch_size)
        for image, pred in done:
            print(f"{image} -> {pred}")
        print(f"dagman segment: {len(done)} prediction(s) with {args.model} -> {out / 'predictions'}")
        return 0
    if not args.data:
        raise DagmanError("--data is required (an MSD dataset.json or an image,label CSV)")
    if args.checkpoint is None:
        raise DagmanError("--checkpoint is required (a run folder, checkpoint .pt, encoder .safetensors, or 'none')")
    opts = seg.SegmentOptions(
        data=Path(args.data), checkpoint=args.checkpoint, out=out, size=args.size, fraction=args.fraction,
        val_fraction=args.val_fraction, epochs=args.epochs, steps=args.steps, lr=args.lr,
        weight_decay=args.weight_decay, batch_size=args.batch_size, roi=args.roi, spacing=args.spacing,
        labels=args.labels, num_classes=args.num_classes, predict=tuple(Path(p) for p in args.predict),
        freeze_encoder=args.freeze_encoder, eval_train=args.eval_train, seed=args.seed, device=args.device,
        loss=args.loss, precision=args.precision,
    )
    result = seg.run_segmentation(opts, log=lambda msg: print(msg, file=sys.stderr))
    table = seg.format_table(result.metrics)
    if table:
        print(table)
    print(seg.summary_line(result))
    return 0

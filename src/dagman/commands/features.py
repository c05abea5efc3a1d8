"""``dagman features``: one feature vector per row of a table of images and points or masks."""

from __future__ import annotations

import argparse

HELP = "features of your own lesions: a CSV of images and points (mm or voxel) or masks in, one feature row each out"

DESCRIPTION = """\
Embed the places a table names with a pretrained encoder, one feature vector per row, input columns kept.

The table (CSV, header row) has an image column -- `image`, or `image_path` as in FMCIB's CSVs -- holding any CT
dagman reads (NIfTI, NRRD, MetaImage, a DICOM series folder; relative paths are relative to the table's
folder), and per row one place:

  x,y,z               a point in mm, LPS (DICOM / ITK / SimpleITK, FMCIB) -- or RAS with --space ras;
                      FMCIB's coordX,coordY,coordZ work unchanged
  i,j,k               a voxel of the file's own grid (nibabel / ITK index order)
  mask [,label]       a mask file: the crop is centred at the mask's centroid (voxels == label, else > 0);
                      --pool masked averages the tokens inside the mask

Each image is read once, resampled to the encoder's spacing and HU window (stored with its weights), and a
--crop-size cube around each place is embedded. Features: the mean of the last stage's tokens (--pool default
or mean; every encoder, DAGMaN's included: its SA [CLS] token was the weaker feature on validation data,
docs/RESULTS.md); --pool masked: the mean of the tokens of the deepest stage with >= 4 tokens per side, each
weighted by its share inside the mask.

A row that cannot be used (missing or unreadable image, point outside the image, empty mask, a cell that is
not a number) is reported in one line and written with its `error`; the other rows go on and the exit status is
0. --strict stops at the first bad row (exit 2, nothing written).

Writes OUT/features.csv (input columns, error, feature_0..feature_{D-1}) and OUT/features.npz (features with
NaN rows for errors, ok, row, error, and the preprocessing used).

examples:
  dagman features --checkpoint runs/cpu --table lesions.csv --out feats/
  dagman features --checkpoint none --size cpu --table fmcib_style.csv --out feats-random/
  dagman features --checkpoint runs/cpu/encoder.safetensors --table masks.csv --pool masked --out feats-m/
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dagman.config import SIZES
    from dagman.tasks.features import POOLS, SPACES

    parser.add_argument("--checkpoint", required=True, metavar="C", help="run folder, checkpoint .pt, encoder "
                        ".safetensors, or 'none' (random init of --size)")
    parser.add_argument("--table", required=True, metavar="CSV", help="the table of images and places (see above)")
    parser.add_argument("--out", required=True, metavar="OUT", help="output folder")
    parser.add_argument("--space", choices=SPACES, default="lps", help="frame of x,y,z points (default lps)")
    parser.add_argument("--pool", choices=POOLS, default="default", help="which feature (default and mean: the "
                        "mean of the last stage's tokens; masked: the tokens inside each row's mask)")
    parser.add_argument("--crop-size", type=int, default=None, metavar="S", help="crop edge in voxels at the "
                        "encoder's spacing, a multiple of patch size * 16 (default: the smallest covering 64 mm)")
    parser.add_argument("--size", choices=SIZES, default="tiny", help="architecture of a random-init encoder and "
                        "of an encoder file without a stored config (default tiny)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B", help="crops per forward pass (default 8)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad row (exit 2, nothing written)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a random-init encoder's weights")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import sys

    import torch

    from dagman.errors import DagmanError
    from dagman.tasks.encoder import build_task_encoder
    from dagman.tasks.features import compute_features, read_feature_table, write_feature_outputs

    if args.batch_size < 1:
        raise DagmanError(f"--batch-size {args.batch_size}: must be >= 1")
    table = read_feature_table(args.table, space=args.space)
    torch.manual_seed(args.seed)  # the weights of a random-init encoder ('none')
    encoder = build_task_encoder(args.checkpoint, size=args.size)

    def report(i: int, message: str) -> None:
        print(f"dagman features: row {i + 1}: {message}", file=sys.stderr)

    try:
        result = compute_features(encoder, table, pool=args.pool, crop_size=args.crop_size,
                                  batch_size=args.batch_size, strict=args.strict, progress=not args.quiet,
                                  on_error=report)
    except DagmanError as err:
        if "--crop-size" in str(err) or not args.strict:
            raise
        raise DagmanError(f"{err} (--strict: nothing written)") from None
    csv_path, npz_path = write_feature_outputs(result, args.out)
    bad = len(result.errors) - result.n_ok
    print(f"dagman features: {len(result.errors)} rows, {result.n_ok} with features ({result.features.shape[1]}-d, "
          f"{result.feature_source}; {result.crop_size}^3 crops at {result.spacing_mm:g} mm), {bad} with an error "
          f"-> {csv_path}, {npz_path}")
    return 0

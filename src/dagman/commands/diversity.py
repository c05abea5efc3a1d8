"""``dagman diversity``: per-stage, per-head attention entropy and distance of a pretrained network.

Thin: parse, :func:`dagman.ssl.diversity.run_head_diversity` (measure, write ``diversity.json`` and ``.png``),
print its result's table per stage.
"""

from __future__ import annotations

import argparse

HELP = "per-stage, per-head attention entropy and distance of a pretrained encoder"

DESCRIPTION = """\
Measure attention-head diversity (method notes, section 7) of a pretrained network on fixed crops of a
prepared cache: for every Swin stage and head, the mean entropy (nats) of the window attention rows and
the mean attention-weighted distance (voxels of the input) from each query token to the keys, averaged
over the stage's blocks; per stage the heads' mean and spread (std across heads). Low spread and low
entropy mean collapsed heads.

CHECKPOINT is a run folder (its newest loadable checkpoint is used) or a checkpoint .pt file; the run's
config inside it rebuilds the network. Crops are deterministic: crop i is the centre crop of volume
i mod V (later crops of the same volume at origins seeded by --seed).

Writes OUT/diversity.json and OUT/diversity.png and prints a table per stage.

examples:
  dagman diversity --checkpoint runs/dagman --data CACHE
  dagman diversity --checkpoint runs/dagman/checkpoints/step_00010000.pt --data CACHE --crops 8 --which student
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="C", help="run folder or checkpoint .pt")
    parser.add_argument("--data", required=True, metavar="CACHE", help="prepared cache (dagman data prepare)")
    parser.add_argument("--crops", type=int, metavar="N", help="number of fixed crops (default: the run's "
                        "train.diversity_crops)")
    parser.add_argument("--crop-size", type=int, metavar="S", help="crop edge in voxels (default: the run's "
                        "data.crop_size)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the origins of repeated "
                        "crops of one volume (default 0)")
    parser.add_argument("--which", choices=("teacher", "student"), default="teacher",
                        help="network to measure (default: teacher, the exported encoder)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: RUN/figures/diversity)")


def run(args: argparse.Namespace) -> int:
    from dagman.ssl.diversity import run_head_diversity

    measured = run_head_diversity(args.checkpoint, args.data, out=args.out, crops=args.crops,
                                  crop_size=args.crop_size, seed=args.seed, which=args.which)
    for line in measured.summary_lines():
        print(line)
    return 0

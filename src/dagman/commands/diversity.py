"""``dagman diversity``: per-stage, per-head attention entropy and distance of a pretrained network.

Thin: parse, :func:`dagman.ssl.diversity.run_head_diversity` (measure, write ``diversity.json`` and ``.png``),
print a table per stage (:func:`print_result`, also used by ``dagman demo``).
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


def format_table(result: dict) -> str:
    """A fixed-width table: one row per stage with heads, window tokens, entropy and distance mean ± std."""
    lines = [f"{'stage':>5}  {'heads':>5}  {'L':>4}  {'entropy (nats)':>17}  {'max':>5}  {'distance (voxels)':>17}"]
    for st in result["stages"]:
        ent = f"{st['entropy_mean']:.3f} ± {st['entropy_std']:.3f}"
        dst = f"{st['distance_mean']:.2f} ± {st['distance_std']:.2f}"
        lines.append(f"{st['stage']:>5}  {st['heads']:>5}  {st.get('tokens_per_window', ''):>4}  {ent:>17}  "
                     f"{st.get('entropy_max', float('nan')):>5.2f}  {dst:>17}")
    return "\n".join(lines)


def print_result(measured) -> None:
    """The command's lines for a :class:`~dagman.ssl.diversity.RunDiversity`: the title, the table, one summary."""
    result = measured.result
    print(f"head diversity of the {measured.title}")
    print(format_table(result))
    mean_std = sum(st["entropy_std"] for st in result["stages"]) / len(result["stages"])
    print(f"dagman diversity: {len(result['stages'])} stages, mean entropy spread across heads "
          f"{mean_std:.3f} nats -> {measured.json_path}, {measured.figure_path}")


def run(args: argparse.Namespace) -> int:
    from dagman.ssl.diversity import run_head_diversity

    print_result(run_head_diversity(args.checkpoint, args.data, out=args.out, crops=args.crops,
                                    crop_size=args.crop_size, seed=args.seed, which=args.which))
    return 0

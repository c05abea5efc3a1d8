"""``dagman diversity``: per-stage, per-head attention entropy and distance of a pretrained network.

Also home of the CLI helpers both "looking inside" commands use (:func:`check_crop_size`, :func:`default_device`);
runs are opened with :mod:`dagman.train.runs`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

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


# ----------------------------------------------------------------------------------------------------------
# Opening a pretraining run (shared with `dagman attention`)
# ----------------------------------------------------------------------------------------------------------


def check_crop_size(cfg, size: int, option: str = "--crop-size") -> int:
    """``size`` if it is a positive multiple of ``patch_size * 2**4`` on every axis, else a one-line error."""
    from dagman.config import NUM_STAGES
    from dagman.errors import DagmanError

    unit = max(p * 2**NUM_STAGES for p in cfg.model.patch_size)
    if size < 1 or any(size % (p * 2**NUM_STAGES) for p in cfg.model.patch_size):
        raise DagmanError(f"{option} {size} must be a positive multiple of {unit} (model.patch_size * 2**4)")
    return size


def default_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------


def format_table(result: dict) -> str:
    """A fixed-width table: one row per stage with heads, window tokens, entropy and distance mean ± std."""
    lines = [f"{'stage':>5}  {'heads':>5}  {'L':>4}  {'entropy (nats)':>17}  {'max':>5}  {'distance (voxels)':>17}"]
    for st in result["stages"]:
        ent = f"{st['entropy_mean']:.3f} ± {st['entropy_std']:.3f}"
        dst = f"{st['distance_mean']:.2f} ± {st['distance_std']:.2f}"
        lines.append(f"{st['stage']:>5}  {st['heads']:>5}  {st.get('tokens_per_window', ''):>4}  {ent:>17}  "
                     f"{st.get('entropy_max', float('nan')):>5.2f}  {dst:>17}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from dagman.data.cache import atomic_write_json
    from dagman.errors import DagmanError
    from dagman.report.plots import diversity_figure
    from dagman.ssl.diversity import eval_crops, head_diversity
    from dagman.train.runs import build_networks, load_pretrained

    pre = load_pretrained(args.checkpoint)
    cfg = pre.cfg
    n = args.crops if args.crops is not None else cfg.train.diversity_crops
    if n < 1:
        raise DagmanError(f"--crops must be >= 1, got {n}")
    size = check_crop_size(cfg, args.crop_size if args.crop_size is not None else cfg.data.crop_size)
    out = Path(args.out) if args.out else pre.run / "figures" / "diversity"
    crops = eval_crops(args.data, n, size, seed=args.seed)
    net = build_networks(pre, (args.which,), default_device())[args.which]
    result = head_diversity(net, crops, progress=True)
    result = {
        "checkpoint": str(pre.path),
        "step": pre.step,
        "method": cfg.method,
        "size": cfg.size,
        "network": args.which,
        "data": str(args.data),
        "seed": args.seed,
        "units": {"entropy": "nats", "distance": "voxels of the input crop",
                  "voxel_mm": float(cfg.data.spacing_mm)},
        **result,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "diversity.json", result)
    title = f"{cfg.method}/{cfg.size} {args.which}, step {pre.step}: {n} crop(s) of {size}^3"
    diversity_figure(result, out / "diversity.png", title=title)
    print(f"head diversity of the {title}")
    print(format_table(result))
    mean_std = sum(st["entropy_std"] for st in result["stages"]) / len(result["stages"])
    print(f"dagman diversity: {len(result['stages'])} stages, mean entropy spread across heads "
          f"{mean_std:.3f} nats -> {out / 'diversity.json'}, {out / 'diversity.png'}")
    return 0

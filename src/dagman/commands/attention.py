"""``dagman attention``: what a pretrained DAGMaN network attends to and masks, on one CT.

Thin: parse, :func:`dagman.ssl.attention_maps.attention_maps` (the pictures and ``attention.json``; the method is
described there), print its result's one line.
"""

from __future__ import annotations

import argparse

HELP = "SA attention map, student mask, teacher drop mask and reconstruction as PNG overlays on a CT"

DESCRIPTION = """\
Show what a pretrained network does with one CT: the semantic-attention importance map S of the teacher
(on its patch-dropped view, as in training), the student mask built from it (or the run's random /
blockwise mask), the noisy teacher's drop mask, and the student's reconstruction (masked voxels from the
prediction, the rest from the input). Methods without the SA block (smit, ibot, dagman-no-sa) have no S;
the figures and the JSON say so and the masks are still drawn.

The CT (NIfTI, NRRD, MetaImage or a DICOM series folder) is prepared like the training cache with the
run's spacing and HU window, and its centre crop of the run's crop size is used. --seed fixes the random
masks.

Writes into OUT: overview.png (every panel), ct.png, importance.png, student_mask.png, teacher_drop.png,
reconstruction.png, and attention.json (mask fractions, S entropy, the share of S under the student
mask, the most attended tokens with their positions, and the masked reconstruction L1 beside the L1 of the
mean-of-visible predictor: every masked voxel predicted as the mean of the crop's visible voxels, the
baseline a reconstruction that learned anything beats). The printed line and the pictures' title carry S
entropy and the two L1s.

example:
  dagman attention --checkpoint runs/dagman --image scan.nii.gz --out figures/attention
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="C", help="run folder or checkpoint .pt")
    parser.add_argument("--image", required=True, metavar="CT", help="CT file or DICOM series folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder for the PNGs and attention.json")
    parser.add_argument("--crop-size", type=int, metavar="S", help="centre-crop edge in voxels (default: the run's "
                        "data.crop_size)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the random masks (default 0)")


def run(args: argparse.Namespace) -> int:
    from dagman.ssl.attention_maps import attention_maps

    result = attention_maps(args.checkpoint, args.image, args.out, crop_size=args.crop_size, seed=args.seed)
    for line in result.summary_lines():
        print(line)
    return 0

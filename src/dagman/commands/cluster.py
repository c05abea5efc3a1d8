"""``dagman cluster``: unsupervised organ clustering of encoder features (method notes, section 9, item 4).

Thin: parse, :func:`dagman.tasks.cluster.cluster_structures` (crops -> features -> metrics; writes ``metrics.json``,
``umap.png``, ``features.npz``), print its result's table.
"""

from __future__ import annotations

import argparse

from dagman.config import SIZES

HELP = "cluster encoder features of organ crops: UMAP, intra/inter-cluster distances, k-means NMI/ARI"

DESCRIPTION = """\
Unsupervised organ clustering (the paper's fourth downstream task). From a CT and its label map (same voxel
grid), take --crops-per-structure cubic crops of --crop-size voxels at the encoder's spacing around random
voxels of every structure with at least --min-voxels voxels, window them as in pretraining (--mode masked:
voxels outside the structure set to 0), and embed them with the encoder (the mean of the last stage's tokens,
for every encoder).

Classes: one per structure, or the organ classes of --groups: 'totalseg' (built-in grouping of
TotalSegmentator names: liver, spleen, kidney, stomach, pancreas, gallbladder, bowel, bladder, lung, heart,
vessels, vertebrae, ribs, pelvis_femur, shoulder_bones, muscle), a JSON file or inline JSON
{"class": ["label name", 5, "glob_*", ...]}. Label names come from --names (JSON value -> name, an MSD
dataset.json or a fetch-examples manifest); by default from the fetch-examples manifest that lists the
label map, if any.

Metrics, on the 2-D UMAP embedding (seeded) and on the standardised features:
  intra  mean over classes of the mean distance between pairs of points of the class (lower is better)
  inter  mean distance between pairs of class centroids (higher is better); ratio = inter / intra
plus k-means (k = classes, n_init 10, seeded; standardised features) NMI and ARI against the classes, and
the silhouette score of the classes.

Writes OUT/metrics.json, OUT/umap.png (scatter coloured by class) and OUT/features.npz (features,
embedding, class ids and names, structure of each crop, crop centres in mm).

examples:
  dagman cluster --image ct.nii.gz --labels seg.nii.gz --checkpoint runs/dagman --groups totalseg --out out/cl
  dagman cluster --image ct.nii.gz --labels seg.nii.gz --checkpoint none --names labels.json --out out/random
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", required=True, metavar="CT", help="CT file or DICOM series folder")
    parser.add_argument("--labels", required=True, metavar="LABELMAP", help="label map on the CT's voxel grid")
    add_structure_crop_arguments(parser)
    parser.add_argument("--spacing", type=float, metavar="MM", help="crop spacing in mm (default: the encoder's "
                        "data.spacing_mm)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of crop centres, UMAP and k-means "
                        "(default 0)")


def add_structure_crop_arguments(parser: argparse.ArgumentParser) -> None:
    """The encoder, output and structure-crop options shared by `dagman cluster` and `dagman recognize`."""
    from dagman.tasks.cluster import DEFAULT_MIN_VOXELS, MODES

    parser.add_argument("--checkpoint", required=True, metavar="C", help="run folder, checkpoint .pt, encoder "
                        ".safetensors, or 'none' (random init)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--names", metavar="JSON", help="label names: JSON value -> name, MSD dataset.json or "
                        "fetch-examples manifest (default: the manifest listing --labels, if any)")
    parser.add_argument("--groups", metavar="JSON", help="organ classes: 'totalseg', a JSON file or inline JSON "
                        "{class: [label names/values/patterns]} (default: one class per structure)")
    parser.add_argument("--crops-per-structure", type=int, default=8, metavar="N", help="crops per structure "
                        "(default 8)")
    parser.add_argument("--crop-size", type=int, default=32, metavar="S", help="crop edge in voxels at the "
                        "encoder's spacing; a multiple of patch size * 16 (default 32)")
    parser.add_argument("--min-voxels", type=int, default=DEFAULT_MIN_VOXELS, metavar="N", help="smallest "
                        f"structure, in label-map voxels (default {DEFAULT_MIN_VOXELS})")
    parser.add_argument("--mode", choices=MODES, default="crop", help="crop: plain crops; masked: voxels outside "
                        "the structure set to 0 (default crop)")
    parser.add_argument("--size", choices=SIZES, default="tiny", help="architecture of a "
                        "random-init encoder ('none') or of an encoder file without config (default tiny)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="B", help="crops per forward pass (default 16)")


def run(args: argparse.Namespace) -> int:
    from dagman.tasks.cluster import cluster_structures

    clustered = cluster_structures(
        args.image, args.labels, args.checkpoint, args.out, names=args.names, groups=args.groups,
        crops_per_structure=args.crops_per_structure, crop_size=args.crop_size, min_voxels=args.min_voxels,
        mode=args.mode, size=args.size, batch_size=args.batch_size, spacing=args.spacing, seed=args.seed)
    for line in clustered.summary_lines():
        print(line)
    return 0

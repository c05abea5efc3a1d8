"""``dagman cluster``: unsupervised organ clustering of encoder features (method notes, section 9, item 4).

Thin: parse, :func:`dagman.tasks.cluster.cluster_structures` (crops -> features -> metrics; writes ``metrics.json``,
``umap.png``, ``features.npz``), print a table (:func:`print_result`, also used by ``dagman demo``).
"""

from __future__ import annotations

import argparse
import math

from dagman.config import SIZES

HELP = "cluster encoder features of organ crops: UMAP, intra/inter-cluster distances, k-means NMI/ARI"

DESCRIPTION = """\
Unsupervised organ clustering (the paper's fourth downstream task). From a CT and its label map (same voxel
grid), take --crops-per-structure cubic crops of --crop-size voxels at the encoder's spacing around random
voxels of every structure with at least --min-voxels voxels, window them as in pretraining (--mode masked:
voxels outside the structure set to 0), and embed them with the encoder (SA [CLS] token when the checkpoint
has the SA block, else the mean of the last stage's tokens).

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


def _fmt(v: float, width: int = 7) -> str:
    return f"{v:{width}.3f}" if isinstance(v, float) and math.isfinite(v) else f"{'-':>{width}}"


def format_table(crops, evaluation) -> str:
    """Per-class rows (structures, crops, intra distance in UMAP and feature space) and the overall metrics."""
    name_w = max([len("class")] + [len(c) for c in crops.class_names])
    lines = [f"{'class':<{name_w}}  structures  crops  umap_intra  feature_intra"]
    for name, row in evaluation.per_class.items():
        lines.append(f"{name:<{name_w}}  {len(row['structures']):>10}  {row['crops']:>5}  "
                     f"{_fmt(row['umap_intra'], 10)}  {_fmt(row['feature_intra'], 13)}")
    m = evaluation.metrics
    lines.append("")
    lines.append(f"{'space':<9}{'intra':>8}{'inter':>8}{'ratio':>8}{'silhouette':>12}")
    lines.append(f"{'umap':<9}{_fmt(m['umap_intra'], 8)}{_fmt(m['umap_inter'], 8)}{_fmt(m['umap_ratio'], 8)}"
                 f"{_fmt(m['umap_silhouette'], 12)}")
    lines.append(f"{'features':<9}{_fmt(m['feature_intra'], 8)}{_fmt(m['feature_inter'], 8)}"
                 f"{_fmt(m['feature_ratio'], 8)}{_fmt(m['silhouette'], 12)}")
    lines.append(f"k-means (k={m['n_classes']}): NMI {m['kmeans_nmi']:.3f}  ARI {m['kmeans_ari']:.3f}")
    return "\n".join(lines)


def print_result(clustered) -> None:
    """The command's lines for a :class:`~dagman.tasks.cluster.ClusterRun`: the encoder, the crops, the table and
    one summary line."""
    crops, rep, m = clustered.crops, clustered.report, clustered.evaluation.metrics
    print(f"encoder: {rep['encoder']}; features: {rep['feature_source']} ({rep['feature_dim']})")
    print(f"crops: {len(crops)} of {crops.size}^3 voxels at {crops.spacing:g} mm ({crops.mode}), "
          f"{len(crops.structures)} structures, {len(crops.skipped)} below {crops.min_voxels} voxels, "
          f"{len(crops.ungrouped)} ungrouped")
    print(format_table(crops, clustered.evaluation))
    print(f"cluster: {rep['encoder_label']}: {len(crops.class_names)} classes, {len(crops)} crops; UMAP intra "
          f"{m['umap_intra']:.2f} inter {m['umap_inter']:.2f}; k-means NMI {m['kmeans_nmi']:.3f} ARI "
          f"{m['kmeans_ari']:.3f}; silhouette {m['silhouette']:.3f}; {rep['timing_s']['total']:.1f} s -> {clustered.out}")


def run(args: argparse.Namespace) -> int:
    from dagman.tasks.cluster import cluster_structures

    print_result(cluster_structures(
        args.image, args.labels, args.checkpoint, args.out, names=args.names, groups=args.groups,
        crops_per_structure=args.crops_per_structure, crop_size=args.crop_size, min_voxels=args.min_voxels,
        mode=args.mode, size=args.size, batch_size=args.batch_size, spacing=args.spacing, seed=args.seed))
    return 0

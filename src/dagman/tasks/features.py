"""Features for a user's own lesions: a table of images and points (or masks) in, one feature row per table row
out (``dagman features``).

A table row names an image (column ``image``, or ``image_path`` as in FMCIB's CSVs; any CT ``read_ct`` reads:
NIfTI, NRRD, MetaImage, a DICOM series folder; relative paths are relative to the table's folder) and a place in
it, one of:

* a world point ``x, y, z`` in mm (or FMCIB's ``coordX, coordY, coordZ``), in LPS (the DICOM / ITK / SimpleITK
  convention, FMCIB's) or RAS (nibabel's; ``space="ras"``);
* a voxel ``i, j, k`` of the file's own grid (the index order nibabel / ITK give for that file: for a DICOM series
  column, row, slice with slices sorted along their normal);
* a ``mask`` file (+ optional ``label``: the voxels equal to it, else every non-zero voxel): the crop is centred
  at the mask's centroid, and ``pool="masked"`` averages the tokens of the deepest stage with at least 4 tokens per
  side (:func:`masked_stage`), each weighted by the share of its voxels inside the mask.

Every image is read, resampled to the encoder's spacing and windowed once, however many rows name it; crops are
taken the way the downstream tasks take them (:func:`~dagman.tasks.encoder.fit_to_size`, zero = air beyond the
image). A row that cannot be used (missing or unreadable file, a point outside the image, an empty mask, a value
that is not a number) keeps its input columns, gets an ``error`` and no features; the others go on (``strict``:
the first such row raises instead).
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from dagman.errors import DagmanError, DataError

IMAGE_COLUMNS = ("image", "image_path")
POINT_COLUMNS = (("x", "y", "z"), ("coordX", "coordY", "coordZ"))
VOXEL_COLUMNS = ("i", "j", "k")
POOLS = ("default", "mean", "masked")
SPACES = ("lps", "ras")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


class RowError(DataError):
    """A table row that cannot be used; the message is one line without the row number."""


@dataclass(frozen=True)
class Place:
    """Where one row's crop is centred: ``kind`` ``"world" | "voxel" | "mask"``; ``values`` the three numbers
    (``world``: RAS mm after the space conversion; ``voxel``: the file's indices); ``mask`` and ``label`` for a
    mask row."""

    kind: str
    values: tuple[float, float, float] | None = None
    mask: Path | None = None
    label: int | None = None


@dataclass
class FeatureTable:
    """The parsed table: its ``columns`` and ``rows`` (dicts of the raw strings, in order), one ``image`` path
    and :class:`Place` (or the row's error) per row, and the ``space`` its x,y,z points were read in."""

    path: Path
    columns: list[str]
    rows: list[dict[str, str]]
    images: list[Path | None]
    places: list[Place | None]
    errors: list[str | None]
    space: str = "lps"


@dataclass
class FeatureResult:
    """Features of every row: ``features`` ``(rows, dim)`` float32, NaN on rows with an ``errors`` entry;
    ``feature_source``: what a feature vector is (e.g. ``"SA [CLS] token (stage 2)"``); ``encoder``: the weights'
    description; ``spacing_mm``, ``hu_window``, ``crop_size`` (voxels): the preprocessing used."""

    table: FeatureTable
    features: np.ndarray
    errors: list[str | None]
    feature_source: str
    encoder: str
    spacing_mm: float
    hu_window: tuple[float, float]
    crop_size: int
    pool: str

    @property
    def space(self) -> str:
        return self.table.space

    @property
    def n_ok(self) -> int:
        return sum(e is None for e in self.errors)


def _number(row: dict, column: str) -> float:
    text = (row.get(column) or "").strip()
    try:
        value = float(text)
    except ValueError:
        raise RowError(f"{column} is not a number ({text!r})") from None
    if not math.isfinite(value):
        raise RowError(f"{column} is not a finite number ({text!r})")
    return value


def _resolve(text: str, base: Path) -> Path:
    path = Path(text.strip()).expanduser()
    return path if path.is_absolute() else base / path


def read_feature_table(path: str | os.PathLike, space: str = "lps") -> FeatureTable:
    """Parse a feature table (module docstring). Problems of the whole table (no such file, no image column, no
    point / voxel / mask columns) raise one-line :class:`DagmanError`; a bad row is recorded in ``errors``."""
    if space not in SPACES:
        raise DagmanError(f"unknown point space {space!r} (choose from {', '.join(SPACES)})")
    path = Path(path)
    if not path.is_file():
        raise DagmanError(f"{path}: no such table")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v if isinstance(v, str) else "") for k, v in r.items()} for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DagmanError(f"{path}: cannot read the table ({err})") from None
    image_col = next((c for c in IMAGE_COLUMNS if c in columns), None)
    if image_col is None:
        raise DagmanError(f"{path}: no image column (expected one of {', '.join(IMAGE_COLUMNS)}; "
                          f"found {', '.join(columns) or 'none'})")
    point_cols = next((cols for cols in POINT_COLUMNS if all(c in columns for c in cols)), None)
    voxel = all(c in columns for c in VOXEL_COLUMNS)
    has_mask = "mask" in columns
    if point_cols is None and not voxel and not has_mask:
        raise DagmanError(f"{path}: no place columns (expected x,y,z or coordX,coordY,coordZ (mm), i,j,k (voxel), "
                          "or mask)")
    if "error" in columns or any(c.startswith("feature_") for c in columns):
        raise DagmanError(f"{path}: the table already has an 'error' or 'feature_*' column (is it an output of "
                          "dagman features?)")
    base = path.parent
    images, places, errors = [], [], []
    for row in rows:
        try:
            text = (row.get(image_col) or "").strip()
            if not text:
                raise RowError(f"empty {image_col}")
            image = _resolve(text, base)
            place = _row_place(row, point_cols, voxel, has_mask, space, base)
            images.append(image)
            places.append(place)
            errors.append(None)
        except RowError as err:
            images.append(None)
            places.append(None)
            errors.append(str(err))
    return FeatureTable(path, columns, rows, images, places, errors, space)


def _row_place(row, point_cols, voxel: bool, has_mask: bool, space: str, base: Path) -> Place:
    """The row's place: a mask when its cell is filled, else a world point, else a voxel."""
    if has_mask and (row.get("mask") or "").strip():
        label = None
        if (row.get("label") or "").strip():
            value = _number(row, "label")
            if value != int(value) or value < 0:
                raise RowError(f"label must be a non-negative integer ({row['label']!r})")
            label = int(value)
        return Place("mask", mask=_resolve(row["mask"], base), label=label)
    if point_cols is not None and any((row.get(c) or "").strip() for c in point_cols):
        p = np.array([_number(row, c) for c in point_cols])
        if space == "lps":
            p = LPS_TO_RAS @ p
        return Place("world", values=tuple(float(v) for v in p))
    if voxel and any((row.get(c) or "").strip() for c in VOXEL_COLUMNS):
        return Place("voxel", values=tuple(_number(row, c) for c in VOXEL_COLUMNS))
    raise RowError("no point, voxel or mask given")


# ----------------------------------------------------------------------------------------------------------
# One image: read once, every row's crop


@dataclass
class _Prepared:
    """An image on the encoder's grid: windowed ``x`` ``(X, Y, Z)`` float32 and its voxel -> RAS ``affine``,
    with the CT as read (for the bounds and the file's voxel grid)."""

    x: np.ndarray
    affine: np.ndarray
    volume: object


def _prepare_image(path: Path, spacing: float, hu_window) -> _Prepared:
    from dagman.data.io import read_ct
    from dagman.data.prepare import resample_isotropic, window_hu

    if not path.exists():
        raise RowError(f"{path}: no such image")
    vol = read_ct(path)  # ImageReadError (a DataError) names the file and the reason
    hu, affine = resample_isotropic(vol.array.astype(np.float32), vol.affine, spacing)
    return _Prepared(window_hu(hu, hu_window).astype(np.float32), affine, vol)


def _inside(vol, world: np.ndarray) -> bool:
    """Whether the RAS point lies within the image's voxels (half a voxel beyond the outer centres)."""
    ijk = (np.linalg.inv(vol.affine) @ np.r_[world, 1.0])[:3]
    return bool(np.all(ijk >= -0.5) and np.all(ijk <= np.asarray(vol.shape) - 0.5))


def _mask_on(prep: _Prepared, place: Place) -> tuple[np.ndarray, np.ndarray]:
    """The row's mask on the prepared grid (bool) and its centroid (RAS mm)."""
    from dagman.data.labels import read_label_map, resample_labels_nearest

    if not place.mask.exists():
        raise RowError(f"{place.mask}: no such mask")
    values, affine, _ = read_label_map(place.mask)
    inside = values == place.label if place.label is not None else values > 0
    if not inside.any():
        what = f"no voxel with label {place.label}" if place.label is not None else "no non-zero voxel"
        raise RowError(f"{place.mask}: empty mask ({what})")
    centroid = (affine @ np.r_[np.argwhere(inside).mean(0), 1.0])[:3]
    on_grid = resample_labels_nearest(inside.astype(np.uint8), affine, prep.affine, prep.x.shape) > 0
    return on_grid, centroid


def _row_crop(prep: _Prepared, place: Place, size: int, need_mask: bool):
    """``(crop (S, S, S) float32, mask crop (S, S, S) float32 or None, centre RAS mm)`` of one row."""
    from dagman.tasks.encoder import fit_to_size

    vol = prep.volume
    mask = None
    if place.kind == "world":
        world = np.asarray(place.values, float)
    elif place.kind == "voxel":
        ijk = np.asarray(place.values, float)
        shape = np.asarray(vol.source_shape if vol.source_shape is not None else vol.shape)
        if np.any(ijk < -0.5) or np.any(ijk > shape - 0.5):
            raise RowError(f"voxel ({', '.join(f'{v:g}' for v in ijk)}) is outside the image "
                           f"({' x '.join(str(int(n)) for n in shape)} voxels)")
        grid = vol.source_affine if vol.source_affine is not None else vol.affine
        world = (grid @ np.r_[ijk, 1.0])[:3]
    else:
        mask, world = _mask_on(prep, place)
    if place.kind == "world" and not _inside(vol, world):
        lps = LPS_TO_RAS @ world
        lo = (vol.affine @ np.r_[-0.5 * np.ones(3), 1.0])[:3]
        hi = (vol.affine @ np.r_[np.asarray(vol.shape) - 0.5, 1.0])[:3]
        box = ", ".join(f"{min(a, b):.1f}..{max(a, b):.1f}" for a, b in zip(LPS_TO_RAS @ lo, LPS_TO_RAS @ hi))
        raise RowError(f"point ({', '.join(f'{v:g}' for v in lps)}) mm LPS is outside the image (LPS extent {box})")
    centre = (np.linalg.inv(prep.affine) @ np.r_[world, 1.0])[:3]
    crop = fit_to_size(prep.x, (size,) * 3, centre)
    mask_crop = None
    if need_mask:
        if mask is None:
            raise RowError("pool 'masked' needs a mask on every row")
        mask_crop = fit_to_size(mask.astype(np.float32), (size,) * 3, centre)
        if not mask_crop.any():
            raise RowError(f"{place.mask}: no mask voxel inside the {size}^3 crop around its centroid")
    return crop, mask_crop, world


#: --pool masked reads the deepest stage whose map has at least this many tokens per side (a 32^3 crop: stage 2,
#: 4^3 tokens; 64^3: stage 3), fine enough for the mask's shape to matter
MASKED_MIN_TOKENS = 4


def masked_stage(crop_size: int, patch: int, stages: int = 4) -> int:
    """The map index (0 = patch embedding, 4 = last stage) ``pool="masked"`` reads for a ``crop_size`` crop."""
    best = 0
    for i in range(stages + 1):
        if crop_size // (patch * 2 ** i) >= MASKED_MIN_TOKENS:
            best = i
    return best


@torch.no_grad()
def _encode(encoder, crops: np.ndarray, masks: np.ndarray | None, pool: str, stage: int, device) -> np.ndarray:
    x = torch.from_numpy(crops[:, None]).float().to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        if pool == "default":
            f = encoder(x)
        else:
            maps = encoder.backbone.forward_features(x).maps  # layer-normed (B, C, d, h, w)
            if pool == "mean":
                f = maps[-1].float().mean(dim=(2, 3, 4))
            else:
                m = maps[stage].float()
                w = torch.nn.functional.adaptive_avg_pool3d(torch.from_numpy(masks[:, None]).float().to(device),
                                                            m.shape[2:])  # share of each token inside the mask
                f = (m * w).sum(dim=(2, 3, 4)) / w.sum(dim=(2, 3, 4)).clamp_min(1e-12)
    return f.float().cpu().numpy()


def compute_features(encoder, table: FeatureTable, *, pool: str = "default", crop_size: int | None = None,
                     batch_size: int = 8, strict: bool = False, device: str | torch.device | None = None,
                     progress: bool = True,
                     on_error: Callable[[int, str], None] | None = None) -> FeatureResult:
    """Features of every row of ``table`` with ``encoder`` (a :class:`~dagman.tasks.encoder.TaskEncoder`).
    ``pool``: ``default`` (the encoder's feature: the mean of the last stage's tokens, or the SA [CLS] token of a
    TaskEncoder built with ``use_sa=True``), ``mean`` (that mean for any encoder) or ``masked`` (mask rows only; see
    the module docstring).
    ``crop_size`` (voxels at the encoder's spacing): default the smallest valid size covering 64 mm.
    ``on_error(row_index, message)`` is called for each bad row; ``strict`` raises a one-line
    :class:`DagmanError` at the first instead."""
    from tqdm import tqdm

    from dagman.tasks.encoder import default_input_size

    if pool not in POOLS:
        raise DagmanError(f"unknown pool {pool!r} (choose from {', '.join(POOLS)})")
    cfg = encoder.source.cfg
    spacing, window = float(cfg.data.spacing_mm), tuple(float(v) for v in cfg.data.hu_window)
    size = default_input_size(encoder, crop_size)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder = encoder.to(device).eval()
    n = len(table.rows)
    stage = masked_stage(size, int(cfg.model.patch_size[0]))
    widths = encoder.backbone.stage_widths
    dim = {"default": encoder.feature_dim, "mean": widths[-1], "masked": widths[stage]}[pool]
    feats = np.full((n, dim), np.nan, np.float32)
    errors = list(table.errors)

    def fail(i: int, message: str) -> None:
        errors[i] = message
        if strict:
            raise DagmanError(f"{table.path}: row {i + 1}: {message}")
        if on_error is not None:
            on_error(i, message)

    for i, e in enumerate(errors):
        if e is not None:
            fail(i, e)
    by_image: dict[Path, list[int]] = {}
    for i, image in enumerate(table.images):
        if errors[i] is None:
            by_image.setdefault(image, []).append(i)
    bar = tqdm(total=n, desc="features", unit="row", disable=None if progress else True, leave=False)
    bar.update(n - sum(len(v) for v in by_image.values()))
    for image, rows in by_image.items():
        try:
            prep = _prepare_image(image, spacing, window)
        except DataError as err:
            for i in rows:
                fail(i, str(err))
            bar.update(len(rows))
            continue
        batch: list[tuple[int, np.ndarray, np.ndarray | None]] = []

        def flush() -> None:
            if batch:
                masks = np.stack([m for _, _, m in batch]) if pool == "masked" else None
                out = _encode(encoder, np.stack([c for _, c, _ in batch]), masks, pool, stage, device)
                for (i, _, _), f in zip(batch, out):
                    feats[i] = f
                batch.clear()

        for i in rows:
            try:
                crop, mask_crop, _ = _row_crop(prep, table.places[i], size, pool == "masked")
            except DataError as err:
                fail(i, str(err))
            else:
                batch.append((i, crop, mask_crop))
                if len(batch) >= batch_size:
                    flush()
            bar.update(1)
        flush()
        del prep
    bar.close()
    source = {"default": encoder.feature_source, "mean": "mean of the last stage's tokens",
              "masked": f"mask-weighted mean of the tokens of map {stage}"}[pool]
    return FeatureResult(table, feats, errors, source,
                         encoder.source.description, spacing, window, size, pool)


def write_feature_outputs(result: FeatureResult, out: str | os.PathLike) -> tuple[Path, Path]:
    """``OUT/features.csv`` (the input columns, ``error``, ``feature_0..``) and ``OUT/features.npz``
    (``features`` (rows, dim) with NaN rows for errors, ``ok``, ``row`` (1-based), ``error``, and the
    preprocessing). Written atomically. Returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = result.table
    dim = result.features.shape[1]
    names = [f"feature_{d}" for d in range(dim)]
    csv_path, npz_path = out / "features.csv", out / "features.npz"
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([*table.columns, "error", *names])
        for row, err, f in zip(table.rows, result.errors, result.features):
            values = [""] * dim if err is not None else [f"{v:.7g}" for v in f]
            writer.writerow([*(row.get(c, "") for c in table.columns), err or "", *values])
    os.replace(tmp, csv_path)
    tmp = npz_path.with_name("features.tmp.npz")
    np.savez(tmp, features=result.features, ok=np.array([e is None for e in result.errors]),
             row=np.arange(1, len(result.errors) + 1), error=np.array([e or "" for e in result.errors]),
             feature_source=result.feature_source, encoder=result.encoder, spacing_mm=result.spacing_mm,
             hu_window=np.asarray(result.hu_window), crop_size=result.crop_size, pool=result.pool,
             space=result.space)
    os.replace(tmp, npz_path)
    return csv_path, npz_path


__all__: Sequence[str] = ("FeatureResult", "FeatureTable", "Place", "RowError", "compute_features",
                          "read_feature_table", "write_feature_outputs")

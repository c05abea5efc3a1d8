"""How a semi-synthetic nodule is made (:mod:`dagman.data.nodules` builds the sets): chest-CT backgrounds with
their lung insertion candidates, the nodule's HU model (solid, ground-glass, calcification patterns, texture from
the readers' ratings), its insertion with matched noise, trilinear sampling of crops, and NIfTI writing."""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dagman.errors import DataError
from dagman.fileio import atomic_write

LUNG_AIR_HU = -400.0  # lung parenchyma and air are below this
LUNG_MEAN_HU = (-950.0, -600.0)  # accepted local mean (3 mm Gaussian) at an insertion point
LUNG_GRID_MM = 2.5  # lung masks are computed on a grid about this coarse
INSERT_MARGIN_MM = 2.0  # lung beyond the nodule's bounding sphere
MIN_LUNG_ML = 1000.0  # less is not a chest CT (e.g. lung bases at the top of an abdominal CT)
MAX_CANDIDATES = 50_000  # insertion candidates kept per background (a random subset when there are more)
OUTSIDE_HU = -1024.0  # value of crop voxels beyond the CT's field of view
GGO_HU = (-650.0, -450.0)
SOLID_HU = (0.0, 60.0)
CALCIFIED_HU = (300.0, 900.0)
CALCIFICATION_PATTERNS = {1: "popcorn", 2: "laminated", 3: "solid", 4: "non-central", 5: "central", 6: "absent"}
TEXTURE_NAMES = {
    1: "ground-glass",
    2: "mixed (mostly ground-glass)",
    3: "part-solid",
    4: "mixed (mostly solid)",
    5: "solid",
}

# ---------------------------------------------------------------------------------------------- backgrounds


@dataclass
class Background:
    """A chest CT that hosts semi-synthetic nodules.

    ``array``: ``(X, Y, Z) float32`` HU, canonical RAS+; ``affine``: ``(4, 4)`` voxel -> RAS mm.
    ``candidates``: ``(N, 3) float64`` RAS mm of lung points usable as insertion centres; ``depth_mm``: ``(N,)``
    their distance to the lung outline (mm). ``info``: provenance for the manifest (name, source, licence).
    """

    name: str
    array: np.ndarray
    affine: np.ndarray
    candidates: np.ndarray
    depth_mm: np.ndarray
    info: dict = field(default_factory=dict)

    @property
    def lung_ml(self) -> float:
        return float(self.info.get("lung_ml", 0.0))


def lung_candidates(
    array: np.ndarray, affine: np.ndarray, grid_mm: float = LUNG_GRID_MM
) -> tuple[np.ndarray, np.ndarray, float]:
    """Lung points of a CT and their depth inside the lung.

    ``array``: ``(X, Y, Z)`` HU (canonical, Z = slice axis); ``affine``: voxel -> RAS mm. Works on a subsampled
    grid (stride ``max(1, round(grid_mm / spacing))`` per axis). Returns ``(points (N, 3) RAS mm, depth (N,)
    mm, lung volume mL)`` for the lung voxels whose local mean HU is parenchyma-like (see module docstring).
    """
    from scipy import ndimage as ndi

    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
    stride = np.maximum(1, np.rint(grid_mm / spacing)).astype(int)
    sub = np.asarray(array[:: stride[0], :: stride[1], :: stride[2]], dtype=np.float32)
    step = spacing * stride
    air = sub < LUNG_AIR_HU
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[:, :, 1] = ndi.generate_binary_structure(2, 1)
    labels, _ = ndi.label(air, structure=in_plane)
    border = np.unique(
        np.concatenate([labels[0].ravel(), labels[-1].ravel(), labels[:, 0].ravel(), labels[:, -1].ravel()])
    )
    outside = np.isin(labels, border[border > 0])
    lung = air & ~outside
    disc = np.zeros((5, 5, 1), dtype=bool)
    yy, xx = np.mgrid[-2:3, -2:3]
    disc[..., 0] = xx**2 + yy**2 <= 4
    lung = ndi.binary_closing(np.pad(lung, ((2, 2), (2, 2), (0, 0))), structure=disc)[2:-2, 2:-2, :] & ~outside
    comp, n = ndi.label(lung)
    if n == 0:
        return np.zeros((0, 3)), np.zeros(0), 0.0
    sizes = np.bincount(comp.ravel())[1:]
    keep = np.flatnonzero(sizes >= max(0.05 * sizes.max(), 1.0)) + 1
    lung = np.isin(comp, keep)
    lung_ml = float(lung.sum() * np.prod(step) / 1000.0)
    depth = ndi.distance_transform_edt(np.pad(lung, 1), sampling=step)[1:-1, 1:-1, 1:-1]
    local_mean = ndi.gaussian_filter(sub, sigma=3.0 / step)
    ok = lung & (local_mean >= LUNG_MEAN_HU[0]) & (local_mean <= LUNG_MEAN_HU[1]) & (depth >= INSERT_MARGIN_MM + 1.0)
    idx = np.argwhere(ok)
    if len(idx) > MAX_CANDIDATES:  # plenty to choose from; keeps the per-nodule search cheap
        idx = idx[np.sort(np.random.default_rng(0).choice(len(idx), MAX_CANDIDATES, replace=False))]
    vox = idx * stride
    pts = vox @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    return pts, depth[tuple(idx.T)].astype(np.float64), lung_ml


def make_background(name: str, array: np.ndarray, affine: np.ndarray, info: dict | None = None) -> Background:
    """A :class:`Background` with its lung candidates computed (see :func:`lung_candidates`)."""
    array = np.asarray(array, dtype=np.float32)
    pts, depth, lung_ml = lung_candidates(array, affine)
    info = dict(info or {})
    info.update(
        name=name,
        shape=[int(s) for s in array.shape],
        spacing=[round(float(s), 4) for s in np.sqrt((affine[:3, :3] ** 2).sum(0))],
        lung_ml=round(lung_ml, 1),
        lung_points=int(len(pts)),
    )
    return Background(
        name=name, array=array, affine=np.asarray(affine, dtype=np.float64), candidates=pts, depth_mm=depth, info=info
    )


def _is_chest(entry: dict) -> bool:
    region = str(entry.get("region") or "").lower()
    return "chest" in region or "lung" in region or "thorax" in region


def example_chest_entries(manifest: dict) -> tuple[list[dict], bool]:
    """Chest volumes of a fetch-examples manifest: the real ones, or the phantoms when no real one is listed.
    Returns ``(entries, phantom_only)``."""
    from dagman.data.examples import PHANTOM_PACKAGE

    chest = [v for v in manifest.get("volumes", []) if _is_chest(v)]
    real = [v for v in chest if v.get("source_package") != PHANTOM_PACKAGE]
    return (real, False) if real else (chest, bool(chest))


def phantom_backgrounds(n: int = 2, seed: int = 0) -> list[Background]:
    """``n`` procedural chest phantoms (:func:`dagman.data.phantom.chest_phantom`, 160x160x128 at 2 mm) as
    backgrounds; the offline fallback."""
    from dagman.data.phantom import chest_phantom

    out = []
    for i in range(n):
        hu, _, affine = chest_phantom((160, 160, 128), (2.0, 2.0, 2.0), seed=seed + i)
        info = {
            "source": f"dagman.data.phantom.chest_phantom(seed={seed + i})",
            "licence": "Apache-2.0 (dagman procedural phantom, synthetic)",
            "region": "chest",
            "phantom": True,
        }
        out.append(make_background(f"phantom_{seed + i:03d}", hu, affine, info))
    return out


def _volumes_from_prepared_cache(path: Path, manifest: dict) -> list[tuple[str, np.ndarray, np.ndarray, dict]]:
    """Volumes of a ``dagman data prepare`` cache back in HU (values were clipped to its window)."""
    lo, hi = manifest.get("settings", {}).get("hu_window", (-750.0, 1750.0))
    out = []
    for e in manifest.get("volumes", []):
        arr = np.load(path / e["file"], mmap_mode="r").astype(np.float32) * (hi - lo) + lo
        affine = np.asarray(e.get("affine") or np.diag([*e["spacing"], 1.0]), dtype=np.float64)
        out.append(
            (
                e["id"],
                arr,
                affine,
                {
                    "source": e.get("source", str(path / e["file"])),
                    "note": f"from prepared cache {path}; HU clipped to [{lo:g}, {hi:g}]",
                },
            )
        )
    return out


def load_backgrounds(
    paths: Sequence[str | os.PathLike], say: Callable[[str], None] = lambda m: None
) -> list[Background]:
    """Backgrounds from user paths: image files, DICOM folders, folders, a fetch-examples folder or manifest
    (its chest volumes), or a prepared cache (back to HU). Unreadable inputs and volumes without enough lung
    are reported through ``say`` and skipped; :class:`DataError` when none is left."""
    from dagman.data.examples import load_examples_manifest
    from dagman.data.io import list_sources, read_ct

    loaded: list[tuple[str, np.ndarray, np.ndarray, dict]] = []
    plain: list[str] = []
    for p in paths:
        p = Path(p).expanduser()
        folder = p if p.is_dir() else p.parent if p.name == "manifest.json" else None
        man = None
        if folder is not None and (folder / "manifest.json").is_file():
            try:
                man = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                man = None
        if isinstance(man, dict) and "settings" in man and isinstance(man.get("volumes"), list):
            loaded.extend(_volumes_from_prepared_cache(folder, man))
        elif isinstance(man, dict) and man.get("format") == "dagman-examples":
            entries, phantom_only = example_chest_entries(load_examples_manifest(folder))
            if not entries:
                raise DataError(
                    f"{folder}: no chest CT listed in its manifest (region 'chest'); no background for nodules"
                )
            if phantom_only:
                say(f"{folder}: only phantom chest CTs listed; using those")
            for e in entries:
                try:
                    vol = read_ct(folder / e["image"])
                except DataError as err:
                    say(f"{err} (background skipped; 'dagman data fetch-examples' rebuilds it)")
                    continue
                loaded.append(
                    (
                        e["case"],
                        vol.array,
                        vol.affine,
                        {
                            "source": str(folder / e["image"]),
                            "licence": e.get("licence"),
                            "region": e.get("region"),
                            "source_package": e.get("source_package"),
                        },
                    )
                )
        else:
            plain.append(str(p))
    if plain:
        for src in list_sources(plain):
            if src.error:
                say(f"{src.path}: {src.error} (background skipped)")
                continue
            try:
                vol = read_ct(src)
            except DataError as err:
                say(f"{err} (background skipped)")
                continue
            loaded.append((src.stem, vol.array, vol.affine, {"source": src.path}))
    out = []
    names: set[str] = set()
    for name, arr, affine, info in loaded:
        bg = make_background(_unique(name, names), arr, affine, info)
        if bg.lung_ml < MIN_LUNG_ML or len(bg.candidates) == 0:
            say(
                f"{info.get('source', name)}: too little lung for a chest CT "
                f"({bg.lung_ml:.0f} mL < {MIN_LUNG_ML:.0f} mL; background skipped)"
            )
            continue
        out.append(bg)
    if not out:
        shown = ", ".join(str(p) for p in paths)
        raise DataError(f"no chest CT with lung parenchyma among the backgrounds ({shown})")
    return out


def _unique(name: str, used: set[str]) -> str:
    base, i = name, 2
    while name in used:
        name = f"{base}_{i}"
        i += 1
    used.add(name)
    return name


# ---------------------------------------------------------------------------------------------- nodule HU model


def nodule_rng(seed: int, nodule_id: str) -> np.random.Generator:
    """The random generator of one nodule: depends only on ``seed`` and the nodule's id."""
    return np.random.default_rng([int(seed), zlib.crc32(nodule_id.encode("utf-8"))])


def calcification_pattern(ratings: Sequence[int | None]) -> int:
    """1-5 (see :data:`CALCIFICATION_PATTERNS`) or 6 (absent): absent when the median rating is >= 5.5,
    otherwise the most frequent rating below 6 (ties: the smaller)."""
    vals = [int(v) for v in ratings if v is not None]
    if not vals or float(np.median(vals)) >= 5.5:
        return 6
    present = [v for v in vals if v < 6]
    counts = np.bincount(present, minlength=7)
    return int(np.argmax(counts))


def _ball(shape: Sequence[int], centre: Sequence[float], radius: float) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    d2 = sum((g - c) ** 2 for g, c in zip(grids, centre))
    return d2 <= radius**2


def nodule_hu(
    mask: np.ndarray, texture: float, calcification: int, rng: np.random.Generator, spacing: float = 1.0
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Noise-free HU of a nodule filling ``mask``.

    ``mask``: ``(X, Y, Z) bool`` (a box around the nodule, isotropic ``spacing`` mm); ``texture``: median rating
    1-5; ``calcification``: pattern 1-6 (:func:`calcification_pattern`). Returns ``(hu, ground_glass, params)``:
    ``hu`` ``(X, Y, Z) float32`` inside the mask (values outside are the nearest level, irrelevant once
    blended); ``ground_glass`` ``(X, Y, Z) float32`` in [0, 1], how much of each voxel is ground glass (neither
    solid core nor calcified; vessels show through there, see :func:`insert_nodule`); ``params`` the drawn
    levels."""
    from scipy import ndimage as ndi

    ggo = float(rng.uniform(*GGO_HU))
    solid = float(rng.uniform(*SOLID_HU))
    calc = float(rng.uniform(*CALCIFIED_HU))
    depth = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1] * spacing  # mm, 0 outside
    inside = depth[mask]
    solid_fraction = float(np.clip((float(texture) - 1.0) / 4.0, 0.0, 1.0))
    if solid_fraction >= 1.0 or inside.size == 0:
        core = np.ones_like(depth, dtype=np.float32)
    elif solid_fraction <= 0.0:
        core = np.zeros_like(depth, dtype=np.float32)
    else:
        thr = float(np.quantile(inside, 1.0 - solid_fraction))
        core = (1.0 / (1.0 + np.exp(-(depth - thr) / max(0.6 * spacing, 1e-3)))).astype(np.float32)
    hu = (ggo + (solid - ggo) * core).astype(np.float32)
    ground_glass = (1.0 - core).astype(np.float32)
    calc_region = np.zeros(mask.shape, dtype=bool)
    n_vox = int(mask.sum())
    r_eq = max((3.0 * n_vox / (4.0 * math.pi)) ** (1.0 / 3.0), 1.0)  # voxels
    pts = np.argwhere(mask)
    if calcification in (1, 2, 3, 4, 5) and n_vox:
        dvox = depth / spacing
        if calcification == 1:  # popcorn: several small blobs
            for _ in range(int(rng.integers(3, 7))):
                c = pts[int(rng.integers(len(pts)))]
                calc_region |= _ball(mask.shape, c, max(rng.uniform(0.2, 0.3) * r_eq, 0.8))
        elif calcification == 2:  # laminated: concentric shells
            period = max(r_eq / 3.0, 2.0)
            calc_region = (np.mod(dvox, period) < 0.45 * period) & (dvox >= 1.0)
        elif calcification == 3:  # solid
            calc_region = mask.copy()
        elif calcification == 4:  # non-central: one eccentric blob
            dmax = float(dvox.max())
            ring = np.argwhere(mask & (dvox <= max(0.5 * dmax, 1.0)))
            c = ring[int(rng.integers(len(ring)))] if len(ring) else pts[int(rng.integers(len(pts)))]
            calc_region = _ball(mask.shape, c, max(0.35 * r_eq, 1.0))
        else:  # central core at the deepest point
            c = np.unravel_index(int(np.argmax(dvox)), mask.shape)
            calc_region = _ball(mask.shape, c, max(0.4 * r_eq, 1.0))
        calc_region &= mask
        w = ndi.gaussian_filter(calc_region.astype(np.float32), 0.5)
        hu = hu + (calc - hu) * w
        ground_glass *= 1.0 - w
    params = {"ggo_hu": round(ggo, 1), "solid_hu": round(solid, 1), "solid_fraction": round(solid_fraction, 3)}
    if calcification in (1, 2, 3, 4, 5):
        params["calcified_hu"] = round(calc, 1)
        params["calcified_voxels"] = int(calc_region.sum())
    return hu.astype(np.float32), ground_glass, params


def background_noise_std(crop: np.ndarray) -> float:
    """Robust standard deviation (HU) of a CT crop's high-frequency noise in its lung-like voxels (-950 to
    -600 HU): 1.4826 x MAD of ``crop - gaussian(crop, 1 voxel)``, corrected for the filter, in [5, 80]."""
    from scipy import ndimage as ndi

    crop = np.asarray(crop, dtype=np.float32)
    hp = crop - ndi.gaussian_filter(crop, 1.0)
    sel = hp[(crop > -950.0) & (crop < -600.0)]
    if sel.size < 100:
        sel = hp.ravel()
    mad = float(np.median(np.abs(sel - np.median(sel))))
    # white noise through (1 - G_1): its std is ~0.84 x the input's in 3D
    return float(np.clip(1.4826 * mad / 0.84, 5.0, 80.0))


def insert_nodule(
    background: np.ndarray,
    mask: np.ndarray,
    hu: np.ndarray,
    rng: np.random.Generator,
    noise_std: float,
    ground_glass: np.ndarray | None = None,
) -> np.ndarray:
    """Blend a nodule into a background crop (all ``(X, Y, Z)``, same shape): nodule HU + correlated noise
    (unit-variance Gaussian-filtered white noise, sigma 0.8 voxel, x ``noise_std``) + 25 HU low-frequency
    heterogeneity (sigma 2 voxels), weighted by ``alpha = gaussian(mask, 0.5 voxel)``. Where ``ground_glass``
    (weights in [0, 1]) is set, 60 % of the background's excess over its lung level (vessels, septa) shows
    through, as ground glass does not hide vessels. Voxels where alpha is below 1e-3 keep the background
    exactly. Returns float32."""
    from scipy import ndimage as ndi

    shape = mask.shape
    fine = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 0.8)
    fine /= max(float(fine.std()), 1e-6)
    coarse = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 2.0)
    coarse /= max(float(coarse.std()), 1e-6)
    alpha = ndi.gaussian_filter(mask.astype(np.float32), 0.5)
    alpha[alpha < 1e-3] = 0.0
    nodule = hu + noise_std * fine + 25.0 * coarse
    if ground_glass is not None:
        lung = background[(background > -950.0) & (background < -600.0)]
        level = float(np.median(lung)) if lung.size else -850.0
        nodule = nodule + 0.6 * ground_glass * np.clip(background - level, 0.0, None)
    out = np.asarray(background, dtype=np.float32).copy()
    sel = alpha > 0
    out[sel] = background[sel] * (1.0 - alpha[sel]) + nodule[sel] * alpha[sel]
    return out


def sample_volume(
    array: np.ndarray, affine: np.ndarray, out_affine: np.ndarray, shape: Sequence[int], cval: float = OUTSIDE_HU
) -> np.ndarray:
    """Trilinear samples of ``array`` (voxel -> world ``affine``) on the grid ``(shape, out_affine)``;
    ``cval`` beyond the array. Returns ``shape float32``."""
    from scipy.ndimage import affine_transform

    shape = tuple(int(v) for v in shape)
    m = np.linalg.inv(affine) @ out_affine  # output voxel -> input voxel
    corners = np.array(
        [[a, b, c, 1.0] for a in (0, shape[0] - 1) for b in (0, shape[1] - 1) for c in (0, shape[2] - 1)]
    )
    reach = (corners @ m.T)[:, :3]
    lo_c = np.maximum(np.floor(reach.min(0)).astype(int) - 1, 0)
    hi_c = np.minimum(np.ceil(reach.max(0)).astype(int) + 2, np.asarray(array.shape))
    if np.any(hi_c <= lo_c):
        return np.full(shape, cval, dtype=np.float32)
    block = np.asarray(array[lo_c[0] : hi_c[0], lo_c[1] : hi_c[1], lo_c[2] : hi_c[2]], dtype=np.float32)
    # NaN marks samples that need voxels beyond the CT (they become cval)
    vals = affine_transform(
        block,
        m[:3, :3],
        offset=m[:3, 3] - lo_c,
        output_shape=shape,
        order=1,
        mode="constant",
        cval=np.nan,
        prefilter=False,
    )
    return np.where(np.isnan(vals), np.float32(cval), vals).astype(np.float32)


def crop_affine(centre_ras: Sequence[float], n: int, spacing: float) -> np.ndarray:
    """RAS-aligned isotropic ``(4, 4)`` affine of an ``n^3`` grid whose index ``(n - 1) / 2`` is at
    ``centre_ras`` (mm)."""
    a = np.diag([spacing, spacing, spacing, 1.0])
    a[:3, 3] = np.asarray(centre_ras, dtype=np.float64) - (n - 1) / 2.0 * spacing
    return a


# ---------------------------------------------------------------------------------------------- writing


def nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    """A gzip-compressed NIfTI-1 file (qform = sform = ``affine``, code 1, mm) as bytes; deterministic (gzip
    mtime 0), so the same array always gives the same file."""
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=4, mtime=0) as gz:
        gz.write(img.to_bytes())
    return buf.getvalue()


def write_nifti(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray) -> None:
    """Write ``data`` as ``.nii.gz`` atomically (see :func:`dagman.fileio.atomic_write`)."""
    payload = nifti_bytes(data, affine)
    atomic_write(path, lambda fh: fh.write(payload))


def _to_int16(hu: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(hu), -32768, 32767).astype(np.int16)

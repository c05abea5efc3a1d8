"""A procedural chest CT phantom in Hounsfield units, with a label map: the offline stand-in for real CT.

:func:`chest_phantom` draws, in ``(X, Y, Z)`` voxel order of the RAS+ orientation (X towards the patient's
right, Y anterior, Z superior):

- air outside the body (-1000 HU),
- an elliptic body cross-section that tapers towards the neck, with a subcutaneous fat layer (~-100 HU)
  around muscle and soft tissue (~40 HU),
- two lungs (~-850 HU, with low-frequency parenchymal texture) shaped as ellipsoids with a diaphragm dome,
- a branching pulmonary vessel tree in each lung (~40 HU, soft-edged tubes that thin with each generation),
- a trachea and main bronchi (air),
- bone: vertebral bodies (cortex ~900 HU, cancellous ~300 HU) with discs between them, ribs that slope
  down anteriorly, and a sternum,
- the heart (~45 HU) in the anterior left mediastinum and the descending aorta,
- a few nodules inside the lungs: solid (~30 HU), part-solid (solid core in a ground-glass halo) and pure
  ground-glass (~-600 HU), cycling in that order, with lobulated outlines,
- Gaussian quantum noise (15 HU standard deviation by default).

Anatomy is sized relative to the field of view, so a small array still shows every structure; nodule and
vessel radii are in millimetres, with a floor of about one voxel.

The label ids are in :data:`LABEL_NAMES`. Everything random comes from ``numpy.random.default_rng(seed)``,
so a given ``(shape, spacing, seed, n_nodules)`` always gives the same arrays.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

BACKGROUND, BODY, LUNG, VESSEL, BONE, HEART, NODULE, FAT, AIRWAY = range(9)

#: Label id -> name of the phantom's label map.
LABEL_NAMES: dict[int, str] = {
    BACKGROUND: "background",
    BODY: "body",  # muscle, mediastinum and other soft tissue
    LUNG: "lung",
    VESSEL: "pulmonary_vessel",
    BONE: "bone",
    HEART: "heart",
    NODULE: "nodule",
    FAT: "subcutaneous_fat",
    AIRWAY: "airway",
}

# Mean attenuation of each tissue before noise, HU.
HU_AIR = -1000.0
HU_FAT = -100.0
HU_MUSCLE = 40.0
HU_LUNG = -850.0
HU_VESSEL = 40.0
HU_HEART = 45.0
HU_CORTICAL = 900.0
HU_CANCELLOUS = 300.0
HU_RIB = 700.0
HU_STERNUM = 550.0
HU_DISC = 80.0
HU_CSF = 10.0
HU_SOLID_NODULE = 30.0
HU_GROUND_GLASS = -600.0

NODULE_KINDS = ("solid", "part-solid", "ground-glass")


def phantom_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """``(4, 4)`` float64 RAS+ voxel-to-mm affine of a phantom: diagonal ``spacing``, centred on the origin."""
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    affine = np.diag([*spacing_arr, 1.0])
    affine[:3, 3] = -spacing_arr * (np.asarray(shape, dtype=np.float64) - 1) / 2.0
    return affine


def chest_phantom(
    shape: tuple[int, int, int] = (160, 160, 128),
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0),
    *,
    seed: int = 0,
    n_nodules: int = 3,
    noise_hu: float = 15.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A procedural chest CT.

    Args:
        shape: ``(X, Y, Z)`` voxels, each at least 16.
        spacing: voxel size in mm along X, Y, Z.
        seed: seed of every random choice (anatomy jitter, vessel trees, nodules, noise).
        n_nodules: number of lung nodules; kinds cycle solid, part-solid, ground-glass.
        noise_hu: standard deviation of the added Gaussian noise, HU.

    Returns:
        ``hu``: ``(X, Y, Z) float32`` Hounsfield units (clipped to ``[-1024, 3071]``);
        ``labels``: ``(X, Y, Z) uint8`` ids of :data:`LABEL_NAMES`;
        ``affine``: ``(4, 4) float64`` RAS+ voxel-to-mm matrix (see :func:`phantom_affine`).
    """
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"phantom shape must be 3 sizes of at least 16 voxels, got {shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"phantom spacing must be 3 positive sizes in mm, got {spacing}")
    if n_nodules < 0:
        raise ValueError(f"n_nodules must be >= 0, got {n_nodules}")
    rng = np.random.default_rng(seed)
    affine = phantom_affine(shape, spacing)
    nx, ny, nz = shape
    sx, sy, sz = spacing
    # mm coordinates of voxel centres, broadcastable to (X, Y, Z).
    x = (affine[0, 3] + sx * np.arange(nx, dtype=np.float32))[:, None, None]
    y = (affine[1, 3] + sy * np.arange(ny, dtype=np.float32))[None, :, None]
    z = (affine[2, 3] + sz * np.arange(nz, dtype=np.float32))[None, None, :]
    fov = np.array([sx * nx, sy * ny, sz * nz], dtype=np.float32)
    z_bottom, z_top = float(z.min()), float(z.max())
    height = z_top - z_bottom
    voxel = min(spacing)

    hu = np.full(shape, HU_AIR, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)

    # --- body: elliptic cross-section, narrowing in the top fifth (towards the neck) ---
    jitter = rng.uniform(0.95, 1.05, size=2)
    ax0 = 0.44 * fov[0] * jitter[0]
    ay0 = 0.30 * fov[1] * jitter[1]
    zt = (z - z_bottom) / height  # 0 at the bottom slice, 1 at the top, (1, 1, Z)
    taper = 1.0 - 0.25 * np.clip((zt - 0.8) / 0.2, 0.0, 1.0) ** 2
    ax = ax0 * taper
    ay = ay0 * (1.0 - 0.1 * np.clip((zt - 0.8) / 0.2, 0.0, 1.0))
    ey = 0.08 * ay0  # the body centre sits slightly anterior
    body_r = np.sqrt((x / ax) ** 2 + ((y - ey) / ay) ** 2)
    body = body_r <= 1.0
    fat_mm = max(0.04 * min(ax0, ay0), 1.5 * voxel)
    inner = body_r <= 1.0 - fat_mm / ay  # approximately a constant thickness fat ring
    hu[body] = HU_FAT
    labels[body] = FAT
    hu[inner] = HU_MUSCLE
    labels[inner] = BODY

    # --- heart (anterior, towards the patient's left = -X) and descending aorta ---
    heart_c = np.array([-0.14 * ax0, ey + 0.22 * ay0, z_bottom + 0.36 * height])
    heart_ax = np.array([0.30 * ax0, 0.42 * ay0, 0.20 * height])
    heart = (
        ((x - heart_c[0]) / heart_ax[0]) ** 2
        + ((y - heart_c[1]) / heart_ax[1]) ** 2
        + ((z - heart_c[2]) / heart_ax[2]) ** 2
    ) <= 1.0
    aorta_r = max(0.1 * ay0, 1.5 * voxel)
    aorta_c = (-0.2 * ax0, ey - 0.50 * ay0)
    aorta = (((x - aorta_c[0]) ** 2 + (y - aorta_c[1]) ** 2) <= aorta_r**2) & (zt <= 0.85)
    mediastinum = (np.abs(x + 0.05 * ax0) <= 0.17 * ax0) & (y >= ey - 0.75 * ay0)

    # --- lungs: ellipsoids with a flatter, domed base; minus mediastinum and heart ---
    lung_mask = np.zeros(shape, dtype=bool)
    lung_centres = []
    for side in (+1, -1):  # +1: right lung (+X), -1: left lung
        width = 0.36 if side > 0 else 0.33
        c = np.array([side * 0.47 * ax0, ey - 0.02 * ay0, z_bottom + 0.45 * height])
        a = np.array([width * ax0, 0.72 * ay0, 0.0])
        a_up, a_down = 0.52 * height, 0.33 * height
        dz = z - c[2]
        az = np.where(dz >= 0, a_up, a_down)
        inside = ((x - c[0]) / a[0]) ** 2 + ((y - c[1]) / a[1]) ** 2 + (dz / az) ** 2 <= 1.0
        lung_mask |= inside & inner
        lung_centres.append((c, a, a_up, a_down))
    lung_mask &= ~mediastinum & ~heart & ~aorta
    # low-frequency parenchymal texture, +-~30 HU, plus a gravity gradient (denser posteriorly)
    texture = _smooth_noise(rng, shape, factor=4) * 30.0
    gradient = -25.0 * ((y - ey) / ay0)  # posterior (-Y) is denser
    lung_hu = HU_LUNG + texture + gradient
    hu[lung_mask] = np.broadcast_to(lung_hu, shape)[lung_mask]
    labels[lung_mask] = LUNG

    hu[heart & inner] = HU_HEART
    labels[heart & inner] = HEART
    hu[aorta & inner] = HU_VESSEL
    labels[aorta & inner] = BODY

    # --- airways: trachea down the midline to the carina, main bronchi to each hilum ---
    carina = np.array([0.0, ey + 0.0 * ay0, z_bottom + 0.62 * height])
    airway_r = max(0.06 * ay0, 1.2 * voxel)
    top = np.array([0.0, ey + 0.05 * ay0, z_top + airway_r])
    airway_segments = [(top, carina, airway_r)]
    hila = []
    for side, (c, a, _, _) in zip((+1, -1), lung_centres):
        hilum = np.array([c[0] - side * 0.55 * a[0], c[1] + 0.05 * ay0, carina[2] - 0.06 * height])
        hila.append(hilum)
        airway_segments.append((carina, hilum, 0.75 * airway_r))
    for p0, p1, r in airway_segments:
        sl, dist = _segment_distance(p0, p1, r + 2 * voxel, affine, shape)
        if sl is None:
            continue
        wall = dist <= r + max(1.5, 0.5 * voxel)
        lumen = dist <= r
        sub_hu, sub_lab = hu[sl], labels[sl]
        soft_wall = wall & ~lumen & (sub_lab != LUNG)
        sub_hu[soft_wall] = HU_MUSCLE
        sub_lab[soft_wall] = BODY
        sub_hu[lumen] = HU_AIR
        sub_lab[lumen] = AIRWAY

    # --- pulmonary vessel trees, one per lung, from the hilum outwards ---
    base_r = max(0.045 * ay0, 1.0 * voxel)
    for side, hilum, (c, a, a_up, a_down) in zip((+1, -1), hila, lung_centres):
        for p0, p1, r in _vessel_tree(rng, hilum, c, a, a_up, a_down, base_r, voxel):
            sl, dist = _segment_distance(p0, p1, r + voxel, affine, shape)
            if sl is None:
                continue
            sub_hu, sub_lab = hu[sl], labels[sl]
            in_lung = (sub_lab == LUNG) | (sub_lab == VESSEL)
            # full contrast inside the tube (the labelled voxels), fading to lung over one voxel outside it
            weight = np.clip((r + voxel - dist) / voxel, 0.0, 1.0) * in_lung
            sub_hu += weight * (HU_VESSEL - sub_hu)
            sub_lab[(dist <= r) & in_lung] = VESSEL

    # --- bone: vertebral bodies + discs, spinal canal, ribs, sternum ---
    spine_c = (0.0, ey - 0.78 * ay0)
    vb_r = max(0.16 * ay0, 2.5 * voxel)
    cortex = max(2.5, 1.0 * voxel)
    level = 28.0  # mm from one vertebra to the next
    disc = np.mod(z - z_bottom, level) < 0.2 * level
    rho_spine = np.sqrt((x - spine_c[0]) ** 2 + (y - spine_c[1]) ** 2)
    vb = (rho_spine <= vb_r) & inner
    vb_bone = vb & ~disc
    hu[vb] = HU_DISC
    labels[vb] = BODY
    hu[vb_bone] = HU_CANCELLOUS
    hu[vb_bone & (rho_spine >= vb_r - cortex)] = HU_CORTICAL
    labels[vb_bone] = BONE
    canal_c = (0.0, spine_c[1] - 1.45 * vb_r)
    canal = (((x - canal_c[0]) ** 2 + (y - canal_c[1]) ** 2) <= (0.45 * vb_r) ** 2) & inner
    arch = (((x - canal_c[0]) ** 2 + (y - canal_c[1]) ** 2) <= (0.8 * vb_r) ** 2) & inner & ~canal & ~disc
    hu[arch] = HU_CORTICAL
    labels[arch] = BONE
    hu[canal] = HU_CSF
    labels[canal] = BODY
    # ribs: a band just inside the fat layer, periodic in z, sloping down anteriorly, only in the thorax
    rib_band = (body_r <= 1.0 - fat_mm / ay) & (body_r >= 1.0 - fat_mm / ay - max(9.0, 2 * voxel) / ay)
    slope = 0.35 * (y - ey)  # anterior ribs sit lower
    rib_phase = np.mod(z - z_bottom + slope, level)
    rib_thick = max(8.0, 1.5 * sz)
    ribs = rib_band & (rib_phase < rib_thick) & (zt >= 0.15) & (zt <= 0.92)
    ribs &= ~((np.abs(x) < 0.12 * ax0) & (y > ey))  # no rib over the sternum gap
    hu[ribs] = HU_RIB
    labels[ribs] = BONE
    sternum = (
        (np.abs(x) <= max(0.07 * ax0, 1.5 * voxel))
        & (y >= ey + ay * (1.0 - fat_mm / ay) - max(12.0, 2.5 * voxel))
        & inner
        & (zt >= 0.3)
        & (zt <= 0.85)
    )
    hu[sternum] = HU_STERNUM
    labels[sternum] = BONE

    # --- nodules, strictly inside lung tissue ---
    for i in range(n_nodules):
        _insert_nodule(rng, hu, labels, affine, spacing, NODULE_KINDS[i % len(NODULE_KINDS)])

    # --- noise ---
    if noise_hu > 0:
        hu += rng.standard_normal(shape, dtype=np.float32) * np.float32(noise_hu)
    np.clip(hu, -1024.0, 3071.0, out=hu)
    return hu, labels, affine


def write_phantom_nifti(
    path: str | os.PathLike,
    label_path: str | os.PathLike | None = None,
    *,
    shape: tuple[int, int, int] = (160, 160, 128),
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0),
    seed: int = 0,
    n_nodules: int = 3,
) -> tuple[Path, Path | None]:
    """Write :func:`chest_phantom` as NIfTI: HU as ``int16`` at ``path``, labels as ``uint8`` at ``label_path``
    (when given), both with the phantom's RAS+ affine. Returns the written paths."""
    import nibabel as nib

    hu, labels, affine = chest_phantom(shape, spacing, seed=seed, n_nodules=n_nodules)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.rint(hu).astype(np.int16), affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)
    written_label = None
    if label_path is not None:
        written_label = Path(label_path)
        written_label.parent.mkdir(parents=True, exist_ok=True)
        label_image = nib.Nifti1Image(labels, affine)
        label_image.header.set_xyzt_units("mm")
        nib.save(label_image, written_label)
    return path, written_label


# ----------------------------------------------------------------------------------------------- helpers


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], factor: int) -> np.ndarray:
    """``shape`` float32 noise with unit-ish standard deviation and a correlation length of ~``factor`` voxels
    (coarse Gaussian noise, linearly upsampled)."""
    from scipy.ndimage import zoom

    coarse_shape = tuple(max(2, -(-s // factor) + 1) for s in shape)
    coarse = rng.standard_normal(coarse_shape, dtype=np.float32)
    fine = zoom(coarse, [s / c for s, c in zip(shape, coarse_shape)], order=1, grid_mode=False)
    fine = fine[: shape[0], : shape[1], : shape[2]]
    if fine.shape != shape:  # zoom rounding can fall one voxel short
        pad = [(0, s - f) for s, f in zip(shape, fine.shape)]
        fine = np.pad(fine, pad, mode="edge")
    return fine


def _segment_distance(
    p0: np.ndarray, p1: np.ndarray, reach: float, affine: np.ndarray, shape: tuple[int, int, int]
) -> tuple[tuple[slice, slice, slice] | None, np.ndarray | None]:
    """Distance (mm) from the voxel centres in the bounding box of segment ``p0 -> p1`` (mm) grown by
    ``reach`` mm to the segment. Returns ``(box slices, (bx, by, bz) float32 distances)``, or ``(None, None)``
    when the box lies outside the array."""
    spacing = np.diag(affine)[:3]
    origin = affine[:3, 3]
    lo = np.floor((np.minimum(p0, p1) - reach - origin) / spacing).astype(int)
    hi = np.ceil((np.maximum(p0, p1) + reach - origin) / spacing).astype(int) + 1
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, shape)
    if np.any(hi <= lo):
        return None, None
    axes = [
        (origin[k] + spacing[k] * np.arange(lo[k], hi[k], dtype=np.float32)).reshape([-1 if j == k else 1 for j in range(3)])
        for k in range(3)
    ]
    d = (p1 - p0).astype(np.float32)
    length2 = float(d @ d)
    rel = [axes[k] - np.float32(p0[k]) for k in range(3)]
    if length2 == 0.0:
        t = np.float32(0.0)
    else:
        t = np.clip((rel[0] * d[0] + rel[1] * d[1] + rel[2] * d[2]) / np.float32(length2), 0.0, 1.0)
    dist = np.sqrt(sum((rel[k] - t * d[k]) ** 2 for k in range(3)))
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)), dist


def _vessel_tree(
    rng: np.random.Generator,
    hilum: np.ndarray,
    centre: np.ndarray,
    axes_xy: np.ndarray,
    a_up: float,
    a_down: float,
    base_r: float,
    voxel: float,
    generations: int = 8,
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Segments ``(start mm, end mm, radius mm)`` of a binary vessel tree that starts at ``hilum`` and spreads
    through the lung ellipsoid (``centre``, semi-axes ``axes_xy`` in X/Y, ``a_up``/``a_down`` in Z)."""
    segments = []
    scale = float(np.cbrt(axes_xy[0] * axes_xy[1] * 0.5 * (a_up + a_down)))
    # first generation: towards the upper, middle-lateral and lower parts of the lung
    targets = [
        centre + np.array([0.2 * (centre[0] - hilum[0]), 0.1 * axes_xy[1], 0.7 * a_up]),
        centre + np.array([0.6 * (centre[0] - hilum[0]), -0.2 * axes_xy[1], 0.0]),
        centre + np.array([0.3 * (centre[0] - hilum[0]), -0.1 * axes_xy[1], -0.7 * a_down]),
    ]
    stack = []
    for target in targets:
        direction = target - hilum
        stack.append((hilum, direction / np.linalg.norm(direction), 0.32 * scale, base_r, 1))
    while stack:
        start, direction, length, radius, gen = stack.pop()
        end = start + direction * length
        segments.append((start, end, radius))
        if gen >= generations:
            continue
        for sign in (+1, -1):
            # rotate away from the parent by 20-40 degrees in a random plane
            perp = np.cross(direction, rng.standard_normal(3))
            perp /= np.linalg.norm(perp) + 1e-9
            angle = np.deg2rad(rng.uniform(20.0, 40.0))
            child = np.cos(angle) * direction + sign * np.sin(angle) * perp
            child /= np.linalg.norm(child)
            stack.append((end, child, length * rng.uniform(0.65, 0.8), max(0.75 * radius, 0.75 * voxel), gen + 1))
    return segments


def _insert_nodule(
    rng: np.random.Generator,
    hu: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    spacing: tuple[float, float, float],
    kind: str,
    tries: int = 200,
) -> bool:
    """Draw one lobulated nodule of ``kind`` (see :data:`NODULE_KINDS`) at a random place where the nodule
    and a one-voxel margin around it are lung or vessel. Returns False when no such place was found."""
    voxel = min(spacing)
    spacing_arr = np.asarray(spacing)
    lung_idx = np.flatnonzero(labels == LUNG)
    if lung_idx.size == 0:
        return False
    radius = max(rng.uniform(3.0, 10.0) if kind == "solid" else rng.uniform(5.0, 12.0), 1.5 * voxel)
    half = np.ceil((radius * 1.3 + voxel) / spacing_arr).astype(int)
    # lobulation: a few low-order bumps of the radius over the sphere
    bumps = rng.normal(0.0, 0.12, size=3)
    phases = rng.uniform(0.0, 2 * np.pi, size=3)
    for _ in range(tries):
        centre = np.array(np.unravel_index(lung_idx[rng.integers(lung_idx.size)], labels.shape))
        lo, hi = centre - half, centre + half + 1
        if np.any(lo < 0) or np.any(hi > labels.shape):
            continue
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        sub_lab = labels[box]
        grids = np.meshgrid(*[(np.arange(-h, h + 1) * s).astype(np.float32) for h, s in zip(half, spacing_arr)], indexing="ij")
        dist = np.sqrt(grids[0] ** 2 + grids[1] ** 2 + grids[2] ** 2)
        theta = np.arctan2(grids[1], grids[0])
        phi = np.arccos(np.clip(grids[2] / np.maximum(dist, 1e-6), -1.0, 1.0))
        r_local = radius * (
            1.0 + bumps[0] * np.cos(2 * theta + phases[0]) + bumps[1] * np.cos(3 * phi + phases[1]) + bumps[2] * np.sin(theta + phi + phases[2])
        )
        inside = dist <= r_local
        margin = dist <= r_local + voxel
        if not np.all(np.isin(sub_lab[margin], (LUNG, VESSEL))):
            continue
        sub_hu = hu[box]
        if kind == "solid":
            target = np.float32(HU_SOLID_NODULE)
        elif kind == "part-solid":
            core = dist <= 0.5 * r_local
            target = np.where(core, np.float32(HU_SOLID_NODULE), np.float32(HU_GROUND_GLASS + 150.0))
        else:
            target = np.float32(HU_GROUND_GLASS)
        weight = np.clip((r_local + voxel - dist) / voxel, 0.0, 1.0)
        sub_hu += (weight * (target - sub_hu)).astype(np.float32)
        sub_lab[inside] = NODULE
        return True
    return False

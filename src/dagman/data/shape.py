"""Shape features of a nodule mask: the 9 numbers of the shape-only malignancy reference.

Per binary mask on an isotropic grid (spacing from the image header):

- volume (mm^3, log), equivalent-sphere diameter (mm), largest axial extent (mm);
- surface area from exposed voxel faces (mm^2) -> surface-to-volume ratio and sphericity
  (pi^(1/3) (6 V)^(2/3) / A; voxel faces overestimate A, consistently across nodules);
- principal axes of the voxel coordinates: elongation sqrt(l2 / l1) and flatness sqrt(l3 / l1);
- solidity (volume / convex-hull volume) and bounding-box extent (volume / box volume).

Used by ``dagman classify`` (the shape-only reference row) and ``benchmarks/shape_baseline.py``.
"""

from __future__ import annotations

import math
import os

import numpy as np

FEATURES = (
    "log_volume_mm3",
    "equiv_diameter_mm",
    "max_axial_extent_mm",
    "surface_to_volume",
    "sphericity",
    "elongation",
    "flatness",
    "solidity",
    "extent",
)


def shape_features(mask: np.ndarray, spacing: float) -> np.ndarray:
    """``(len(FEATURES),) float64`` shape features of a binary ``(X, Y, Z)`` mask on an isotropic grid of
    ``spacing`` mm (see module docstring)."""
    from scipy.spatial import ConvexHull, QhullError

    m = np.asarray(mask, dtype=bool)
    n = int(m.sum())
    if n == 0:
        return np.full(len(FEATURES), np.nan)
    v = n * spacing**3
    padded = np.pad(m, 1)
    faces = sum(int(np.count_nonzero(np.diff(padded.astype(np.int8), axis=a))) for a in range(3))
    area = faces * spacing**2
    pts = np.argwhere(m).astype(np.float64) * spacing
    cov = np.cov(pts.T) if n > 1 else np.zeros((3, 3))
    lam = np.sort(np.clip(np.linalg.eigvalsh(cov), 1e-9, None))[::-1]
    ext = pts.max(0) - pts.min(0) + spacing
    try:
        # hull of the voxel corners, so a single voxel has volume spacing^3
        corners = (
            pts[:, None, :]
            + spacing * (np.array([[a, b, c] for a in (-0.5, 0.5) for b in (-0.5, 0.5) for c in (-0.5, 0.5)]))[None]
        ).reshape(-1, 3)
        hull = ConvexHull(corners).volume
    except (QhullError, ValueError):
        hull = v
    axial = max(ext[0], ext[1])
    return np.array(
        [
            math.log(v),
            (6.0 * v / math.pi) ** (1.0 / 3.0),
            axial,
            area / v,
            math.pi ** (1.0 / 3.0) * (6.0 * v) ** (2.0 / 3.0) / area,
            math.sqrt(lam[1] / lam[0]),
            math.sqrt(lam[2] / lam[0]),
            v / max(hull, v),
            v / float(np.prod(ext)),
        ]
    )


def mask_file_features(path: str | os.PathLike) -> np.ndarray:
    """:func:`shape_features` of a mask file (voxels > 0), spacing = the mean of the header's voxel sizes."""
    import nibabel as nib

    img = nib.load(str(path))
    spacing = float(np.mean(img.header.get_zooms()[:3]))
    return shape_features(np.asarray(img.dataobj) > 0, spacing)

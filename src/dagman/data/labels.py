"""Label maps (segmentations, lesion masks): one reader and one nearest-neighbour resampler for every task.

:func:`read_label_map` reads a label map as stored (NIfTI through nibabel, NRRD/MetaImage through SimpleITK,
LPS -> RAS like :func:`~dagman.data.io.read_ct`); :func:`resample_labels_nearest` puts it on another voxel grid
of the same world frame without inventing a value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from dagman.errors import DataError

__all__ = ["read_label_map", "resample_labels_nearest"]


def _fmt_shape(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def read_label_map(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, object | None]:
    """A label map as stored: ``(array (X, Y, Z) int32 in the file's voxel order, affine (4, 4) voxel -> RAS mm,
    NIfTI header or None)``. NIfTI through nibabel, NRRD/MetaImage through SimpleITK (LPS -> RAS), like
    :func:`~dagman.data.io.read_ct`. Non-integer values, 2D/4D or unreadable files raise a one-line
    :class:`DataError`."""
    from dagman.data.io import image_kind, lps_to_ras

    path = Path(path)
    kind = image_kind(path.name)
    if not path.is_file():
        raise DataError(f"{path}: no such label file")
    try:
        if kind == "nifti":
            import nibabel as nib

            img = nib.load(str(path))
            array = np.asarray(img.dataobj)
            affine = np.asarray(img.affine, dtype=np.float64)
            header = img.header
        elif kind in ("nrrd", "metaimage"):
            import SimpleITK as sitk

            image = sitk.ReadImage(str(path))
            if image.GetNumberOfComponentsPerPixel() != 1:
                raise DataError(f"{path}: vector image; a label map needs one value per voxel")
            array = sitk.GetArrayFromImage(image)
            array = array.transpose(tuple(range(array.ndim))[::-1])  # (z, y, x) -> (x, y, z)
            dim = image.GetDimension()
            direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
            lps = np.eye(4)
            if dim >= 3:  # the spatial part of a 3D (or 3D + singleton) image
                spacing = np.asarray(image.GetSpacing(), dtype=np.float64)[:3]
                lps[:3, :3] = direction[:3, :3] @ np.diag(spacing)
                lps[:3, 3] = image.GetOrigin()[:3]
            affine = lps_to_ras(lps)
            header = None
        else:
            raise DataError(f"{path}: unsupported label map format (use NIfTI, NRRD or MetaImage)")
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader failure becomes one line naming the file
        text = " ".join(str(err).split())[:120]
        raise DataError(f"{path}: cannot read label map ({type(err).__name__}: {text})") from None
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise DataError(f"{path}: label map must be 3D, got shape {_fmt_shape(array.shape)}")
    if array.dtype.kind == "f":
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            raise DataError(f"{path}: label map has non-integer values (e.g. {float(array[rounded != array][0]):g})")
        array = rounded
    if array.dtype.kind not in "iuf" or (array.size and (array.min() < 0 or array.max() > 65535)):
        raise DataError(f"{path}: label values must be integers in 0..65535")
    return np.ascontiguousarray(array.astype(np.int32)), affine, header


def resample_labels_nearest(labels: np.ndarray, affine: np.ndarray, new_affine: np.ndarray,
                            new_shape: Sequence[int], outside: str = "zero") -> np.ndarray:
    """Nearest-neighbour resampling of a label map ``(X, Y, Z)`` (voxel -> world ``affine``) onto the grid
    ``(new_shape, new_affine)`` of the same world frame; no value is invented, the dtype is kept. A new voxel
    takes the old voxel its centre falls in, halves rounded up (scipy's order-0 sampling). ``outside``: what a
    new voxel beyond the old grid gets -- ``"zero"`` (background) or ``"edge"`` (the nearest edge voxel).
    Axis-aligned grids (scaling, flips, shifts) are indexed directly; others go through
    ``scipy.ndimage.affine_transform`` (modes ``grid-constant`` / ``nearest``: the same voxels, checked against
    each other in tests/test_labels.py)."""
    if outside not in ("zero", "edge"):
        raise ValueError(f"outside must be 'zero' or 'edge', got {outside!r}")
    new_shape = tuple(int(n) for n in new_shape)
    to_old = np.linalg.inv(np.asarray(affine, np.float64)) @ np.asarray(new_affine, np.float64)
    rot, shift = to_old[:3, :3], to_old[:3, 3]
    if np.allclose(rot - np.diag(np.diag(rot)), 0.0, atol=1e-6):
        idx, valid = [], []
        for a, n_new in enumerate(new_shape):
            i = np.floor(rot[a, a] * np.arange(n_new) + shift[a] + 0.5).astype(np.int64)
            valid.append((i >= 0) & (i < labels.shape[a]))
            idx.append(np.clip(i, 0, labels.shape[a] - 1))
        out = labels[np.ix_(*idx)].copy()
        if outside == "zero":
            inside = valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :]
            out[~inside] = 0
        return out
    from scipy.ndimage import affine_transform

    return affine_transform(labels, rot, offset=shift, output_shape=new_shape, order=0,
                            mode="grid-constant" if outside == "zero" else "nearest", cval=0, prefilter=False)

"""Reading CT: formats, orientation, DICOM series assembly, image lists, and every kind of bad input.

Ground truth: synthetic volumes whose HU value is a known function of the *physical* RAS position of each
voxel (:func:`hu_at`), so a reader is right exactly when ``array[i, j, k] == hu_at(affine @ (i, j, k))``,
independent of how the file stored its axes.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dagman.data.io import CTVolume, ImageReadError, list_sources, lps_to_ras, read_ct
from dagman.errors import DataError

# ----------------------------------------------------------------------------------------------------------
# Writers shared with test_prepare.py


def hu_at(ras: np.ndarray) -> np.ndarray:
    """Known HU field: ``2 * (R + 2A + 3S)`` for world points ``(..., 3)`` in mm (even integers on integer
    coordinates, so it survives int16 storage with slope 2)."""
    ras = np.asarray(ras, dtype=np.float64)
    return 2.0 * (ras[..., 0] + 2.0 * ras[..., 1] + 3.0 * ras[..., 2])


def voxel_world(affine: np.ndarray, shape) -> np.ndarray:
    """World position ``(X, Y, Z, 3)`` of every voxel centre."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def field_volume(affine: np.ndarray, shape) -> np.ndarray:
    """``hu_at`` sampled on a grid: ``(X, Y, Z) float32``."""
    return hu_at(voxel_world(affine, shape)).astype(np.float32)


def write_nifti(path, array: np.ndarray, affine: np.ndarray, dtype=np.float32) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    img = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return str(path)


def write_dicom_series(
    folder,
    shape,
    *,
    row_dir=(1.0, 0.0, 0.0),
    col_dir=(0.0, 1.0, 0.0),
    pixel_spacing=(1.0, 1.0),
    slice_step=None,
    origin=(0.0, 0.0, 0.0),
    slope=2.0,
    intercept=-1024.0,
    modality="CT",
    series_uid=None,
    values=None,
    shuffle_seed=0,
    name_prefix="IM",
    extension="",
) -> list[str]:
    """Write a DICOM CT series of ``shape = (columns, rows, slices)`` whose HU follow :func:`hu_at` (or
    ``values(lps_points) -> HU``). Geometry in LPS as DICOM defines it: ``row_dir`` is the direction along a
    row (increasing column index), ``col_dir`` down a column, ``pixel_spacing = (between rows, between
    columns)``, slice k at ``origin + k * slice_step`` (default: 3 mm along row_dir x col_dir). Files get
    shuffled names, so file order says nothing about slice order. Returns the paths in slice order."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    os.makedirs(folder, exist_ok=True)
    cols, rows, n = shape
    row_dir, col_dir, origin = (np.asarray(v, dtype=np.float64) for v in (row_dir, col_dir, origin))
    normal = np.cross(row_dir, col_dir)
    step = np.asarray(slice_step, dtype=np.float64) if slice_step is not None else 3.0 * normal
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    order = np.random.default_rng(shuffle_seed).permutation(n)
    paths = []
    jj, ii = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")  # (rows, cols)
    for k in range(n):
        ipp = origin + k * step
        lps = ipp + ii[..., None] * pixel_spacing[1] * row_dir + jj[..., None] * pixel_spacing[0] * col_dir
        hu = values(lps) if values is not None else hu_at(lps * np.array([-1.0, -1.0, 1.0]))
        stored = np.round((hu - intercept) / slope).astype(np.int16)
        sop_class = CTImageStorage if modality == "CT" else MRImageStorage
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.PatientID = "SYNTHETIC"
        if modality is not None:
            ds.Modality = modality
        ds.InstanceNumber = int(order[k]) + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{pixel_spacing[0]:g}", f"{pixel_spacing[1]:g}"]
        ds.SliceThickness = f"{np.linalg.norm(step):g}"
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        ds.PixelData = stored.tobytes()
        path = os.path.join(folder, f"{name_prefix}{int(order[k]):04d}{extension}")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def assert_matches_field(vol: CTVolume, atol: float = 1e-3) -> None:
    """The canonical volume holds :func:`hu_at` of each voxel's world position, with a RAS+ affine."""
    expected = field_volume(vol.affine, vol.shape)
    np.testing.assert_allclose(vol.array, expected, atol=atol)
    # canonical: each array axis points (mostly) towards +R, +A, +S
    dominant = np.argmax(np.abs(vol.affine[:3, :3]), axis=0)
    assert list(dominant) == [0, 1, 2]
    assert np.all(vol.affine[dominant, [0, 1, 2]] > 0)
    np.testing.assert_allclose(vol.spacing, np.linalg.norm(vol.affine[:3, :3], axis=0))


# Physical grid used by the cross-format tests: RAS voxel centres R0 + i*1, A0 + j*2, S0 + k*3 mm.
GRID_SHAPE = (24, 20, 12)
GRID_RAS = np.array([[1.0, 0, 0, -11], [0, 2.0, 0, -20], [0, 0, 3.0, -15], [0, 0, 0, 1]])


def lps_view(shape=GRID_SHAPE, affine=GRID_RAS):
    """The same grid stored with axes flipped to L, P, S: ``(array, affine)`` for writing to a file."""
    canonical = field_volume(affine, shape)
    flip = np.eye(4)
    flip[0, 0], flip[1, 1] = -1, -1
    flip[0, 3], flip[1, 3] = shape[0] - 1, shape[1] - 1
    return canonical[::-1, ::-1, :].copy(), affine @ flip


# ----------------------------------------------------------------------------------------------------------
# Formats and orientation


def test_nifti_lps_is_reoriented_to_canonical_ras(tmp_path):
    stored, affine = lps_view()
    path = write_nifti(tmp_path / "lps.nii.gz", stored, affine)
    vol = read_ct(path)
    assert vol.shape == GRID_SHAPE
    assert vol.spacing == pytest.approx((1.0, 2.0, 3.0))
    np.testing.assert_allclose(vol.affine, GRID_RAS, atol=1e-5)
    assert_matches_field(vol)
    assert vol.array.dtype == np.float32
    assert vol.meta["source_orientation"] == "LPS"
    assert vol.meta["format"] == "nifti"
    # the stored grid is remembered, and to_source_grid undoes the reorientation
    assert vol.source_shape == GRID_SHAPE
    np.testing.assert_allclose(vol.source_affine, affine)
    np.testing.assert_array_equal(vol.to_source_grid(vol.array), stored)


def test_nifti_with_permuted_axes_and_int16_scaling(tmp_path):
    # stored as (S, R, A) axes in int16 with scl_slope: the reader must transpose and apply the scaling
    canonical = field_volume(GRID_RAS, GRID_SHAPE)
    stored = canonical.transpose(2, 0, 1)[::-1].copy()  # axis0 = -S (I), axis1 = R, axis2 = A
    perm = np.zeros((4, 4))
    perm[3, 3] = 1
    perm[:3, 0] = -GRID_RAS[:3, 2]  # axis 0 runs inferior
    perm[:3, 1] = GRID_RAS[:3, 0]
    perm[:3, 2] = GRID_RAS[:3, 1]
    perm[:3, 3] = GRID_RAS[:3, 3] + GRID_RAS[:3, 2] * (GRID_SHAPE[2] - 1)
    img = nib.Nifti1Image((stored / 2).astype(np.int16), perm)
    img.header.set_slope_inter(2.0, 0.0)
    nib.save(img, str(tmp_path / "ira.nii"))
    vol = read_ct(tmp_path / "ira.nii")
    assert vol.meta["source_orientation"] == "IRA"
    np.testing.assert_allclose(vol.affine, GRID_RAS, atol=1e-5)
    assert_matches_field(vol)
    np.testing.assert_array_equal(vol.to_source_grid(vol.array), stored)


def test_nrrd_and_metaimage_in_lps_match_the_physical_field(tmp_path):
    import nrrd
    import SimpleITK as sitk

    # NRRD written by pynrrd: identity index order, LPS space with a flipped first axis
    stored, affine = lps_view()
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # voxel -> LPS
    header = {"space": "left-posterior-superior", "space directions": lps[:3, :3].T, "space origin": lps[:3, 3]}
    nrrd.write(str(tmp_path / "vol.nrrd"), stored, header)
    vol = read_ct(tmp_path / "vol.nrrd")
    assert vol.meta["format"] == "nrrd"
    np.testing.assert_allclose(vol.affine, GRID_RAS, atol=1e-5)
    assert_matches_field(vol)

    # MetaImage written by SimpleITK with a non-trivial direction matrix (axes swapped and flipped)
    canonical = field_volume(GRID_RAS, GRID_SHAPE)
    stored2 = canonical.transpose(1, 0, 2)[:, ::-1].copy()  # axis0 = A, axis1 = L (= -R), axis2 = S
    image = sitk.GetImageFromArray(stored2.transpose(2, 1, 0))  # sitk arrays are (z, y, x)
    image.SetSpacing((2.0, 1.0, 3.0))
    # axis0 (+A) -> LPS (0,-1,0); axis1 (-R) -> LPS (+1,0,0); axis2 (+S) -> LPS (0,0,1)
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    first_ras = GRID_RAS[:3, 3] + GRID_RAS[:3, 0] * (GRID_SHAPE[0] - 1)  # R is maximal at index 0 of axis1
    image.SetOrigin((-first_ras[0], -first_ras[1], first_ras[2]))
    sitk.WriteImage(image, str(tmp_path / "vol.mha"))
    vol2 = read_ct(tmp_path / "vol.mha")
    assert vol2.meta["format"] == "metaimage"
    assert vol2.meta["source_orientation"] == "ALS"
    np.testing.assert_allclose(vol2.affine, GRID_RAS, atol=1e-5)
    assert_matches_field(vol2)


def test_lps_to_ras_flips_first_two_world_axes():
    lps = np.eye(4)
    lps[:3, 3] = [10, 20, 30]
    ras = lps_to_ras(lps)
    np.testing.assert_allclose(ras @ [1, 1, 1, 1], [-11, -21, 31, 1])


def test_dicom_series_sorted_rescaled_and_oriented(tmp_path):
    # sagittal acquisition: rows run anterior->posterior, columns downwards; slice normal points to -L (= +R);
    # unequal pixel spacing (between rows 3 mm, between columns 2 mm), slope 2 / intercept -1024,
    # file names shuffled and without extension (recognised by content).
    folder = tmp_path / "series"
    paths = write_dicom_series(
        folder,
        (16, 10, 12),
        row_dir=(0, 1, 0),
        col_dir=(0, 0, -1),
        pixel_spacing=(3.0, 2.0),
        slice_step=(-1.0, 0, 0),
        origin=(5.0, -10.0, 20.0),
        slope=2.0,
        intercept=-1024.0,
    )
    assert sorted(os.listdir(folder)) != [os.path.basename(p) for p in paths]  # really shuffled
    vol = read_ct(folder)
    assert vol.meta["format"] == "dicom" and vol.meta["modality"] == "CT"
    assert vol.meta["source_orientation"] == "PIR"
    assert vol.meta["source_shape"] == [16, 10, 12] and vol.meta["source_spacing"] == [2.0, 3.0, 1.0]
    # canonical axes: R (12 slices, 1 mm), A (16 columns, 2 mm), S (10 rows, 3 mm)
    assert vol.shape == (12, 16, 10)
    assert vol.spacing == pytest.approx((1.0, 2.0, 3.0))
    assert_matches_field(vol)
    # HU are stored * 2 - 1024, so the raw stored values are not HU
    import pydicom

    ds = pydicom.dcmread(paths[0])
    assert float(ds.RescaleSlope) == 2.0 and float(ds.RescaleIntercept) == -1024.0
    assert not np.allclose(ds.pixel_array.astype(np.float32), ds.pixel_array * 2.0 - 1024.0)


def test_dicom_writer_geometry_agrees_with_gdcm(tmp_path):
    """Guard against a misconception shared by the test writer and the reader: GDCM (via SimpleITK) must see
    the same HU at the same physical points."""
    import SimpleITK as sitk

    folder = tmp_path / "series"
    write_dicom_series(
        folder, (9, 7, 5), row_dir=(0, 1, 0), col_dir=(0, 0, -1), pixel_spacing=(3.0, 2.0), slice_step=(-2.0, 0, 0)
    )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    values = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (i, j, k)
    for index in [(0, 0, 0), (8, 6, 4), (3, 5, 1), (8, 0, 2)]:
        x, y, z = image.TransformIndexToPhysicalPoint(index)
        assert values[index] == pytest.approx(hu_at(np.array([-x, -y, z])), abs=1e-3)
    vol = read_ct(folder)
    # and our reader agrees with GDCM voxel for voxel after mapping through both affines
    lps_aff = np.eye(4)
    lps_aff[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    lps_aff[:3, 3] = image.GetOrigin()
    ras_aff = lps_to_ras(lps_aff)
    to_ours = np.linalg.inv(vol.affine) @ ras_aff
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in values.shape], indexing="ij"), -1).reshape(-1, 3)
    ours = np.rint(ijk @ to_ours[:3, :3].T + to_ours[:3, 3]).astype(int)
    np.testing.assert_allclose(vol.array[tuple(ours.T)], values[tuple(ijk.T)])


def test_same_volume_as_nifti_and_dicom_gives_same_canonical_array(tmp_path):
    # DICOM: standard axial, in-plane 1 x 2 mm (columns along L at 1 mm, rows along P at 2 mm), 3 mm slices
    nx, ny, nz = GRID_SHAPE
    corner_lps = np.array([-(GRID_RAS[0, 3] + (nx - 1) * 1.0), -(GRID_RAS[1, 3] + (ny - 1) * 2.0), GRID_RAS[2, 3]])
    write_dicom_series(
        tmp_path / "dcm", (nx, ny, nz), pixel_spacing=(2.0, 1.0), origin=corner_lps, slice_step=(0, 0, 3.0)
    )
    stored, affine = lps_view()
    write_nifti(tmp_path / "same.nii.gz", stored, affine)
    from_dicom = read_ct(tmp_path / "dcm")
    from_nifti = read_ct(tmp_path / "same.nii.gz")
    assert from_dicom.shape == from_nifti.shape == GRID_SHAPE
    np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=1e-4)
    np.testing.assert_allclose(from_dicom.array, from_nifti.array, atol=1e-3)
    assert from_dicom.spacing == pytest.approx(from_nifti.spacing)


def test_partial_nan_replaced_by_minimum_and_counted(tmp_path):
    stored, affine = lps_view()
    stored[0, 0, :3] = np.nan
    vol = read_ct(write_nifti(tmp_path / "nan.nii.gz", stored, affine))
    assert vol.meta["nonfinite_voxels"] == 3
    assert np.isfinite(vol.array).all()
    assert vol.array.min() == pytest.approx(np.nanmin(stored))


def test_four_d_with_single_volume_is_accepted(tmp_path):
    stored, affine = lps_view()
    vol = read_ct(write_nifti(tmp_path / "x.nii.gz", stored[..., None], affine))
    assert vol.shape == GRID_SHAPE
    assert_matches_field(vol)


# ----------------------------------------------------------------------------------------------------------
# DICOM oddities and implausible geometry (the refusals are in BAD_INPUTS below)


def _tilted_series(folder, step, shape=(20, 16, 10)):
    """An axial series (1 x 1 mm pixels) whose slice k starts at ``k * step`` (LPS mm): slices stacked
    obliquely when ``step`` has an in-plane part (gantry tilt). HU follow :func:`hu_at`, stored with slope 0.05
    so that quantisation stays below 0.025 HU."""
    write_dicom_series(folder, shape, slice_step=step, slope=0.05, intercept=0.0)
    return str(folder)


def _inside_acquired_slices(vol: CTVolume, step, shape) -> np.ndarray:
    """``(X, Y, Z) bool``: voxels of the canonical volume whose position lies inside the pixel grid of the slice
    it belongs to (slice k spans ``k * step + [0, cols - 1] x [0, rows - 1]`` mm in L and P)."""
    world = voxel_world(vol.affine, vol.shape) * np.array([-1.0, -1.0, 1.0])  # RAS -> LPS
    k = np.rint(world[..., 2] / step[2])
    offset = world - k[..., None] * np.asarray(step, dtype=np.float64)
    eps = 1e-6
    return (
        (offset[..., 0] >= -eps) & (offset[..., 0] <= shape[0] - 1 + eps)
        & (offset[..., 1] >= -eps) & (offset[..., 1] <= shape[1] - 1 + eps)
    )


@pytest.mark.parametrize("step", [(0.0, 0.8, 3.0), (-0.5, 0.6, 2.5)])
def test_gantry_tilt_is_undone_onto_an_orthogonal_grid(tmp_path, step):
    shape = (20, 16, 10)
    vol = read_ct(_tilted_series(tmp_path / "tilt", step, shape))
    # the grid is orthogonal: slices 'step . normal' apart, pixels as stored
    assert np.allclose(vol.affine[:3, :3], np.diag(np.diag(vol.affine[:3, :3])))
    assert vol.spacing == pytest.approx((1.0, 1.0, step[2]))
    tilt = np.degrees(np.arctan2(np.hypot(step[0], step[1]), step[2]))
    assert vol.meta["gantry_tilt_deg"] == pytest.approx(tilt, abs=1e-3)
    assert "rescale" not in vol.meta  # RescaleIntercept 0 is a stated intercept
    # every voxel the scanner acquired holds the HU of its true physical position ...
    inside = _inside_acquired_slices(vol, step, shape)
    expected = field_volume(vol.affine, vol.shape)
    assert inside.mean() > 0.6
    np.testing.assert_allclose(vol.array[inside], expected[inside], atol=0.05)
    # ... and voxels outside the acquired field of view are filled with the minimum, never invented HU
    outside = ~inside
    far = outside & (np.abs(vol.array - expected) > 0.05)
    assert far.any() and np.all(vol.array[far] == vol.array.min())
    # the same series read the old way (sheared affine kept) would put voxel (i, j, k) elsewhere: the shift is
    # real, several voxels over the stack
    assert np.hypot(step[0], step[1]) * (shape[2] - 1) >= 7


def test_tilt_within_rounding_is_ignored_and_prepare_gets_an_orthogonal_grid(tmp_path):
    vol = read_ct(_tilted_series(tmp_path / "round", (0.0, 0.0005, 3.0)))
    assert "gantry_tilt_deg" not in vol.meta
    assert np.allclose(vol.affine[:3, :3], np.diag([1.0, 1.0, 3.0]))
    from dagman.data.prepare import prepare

    report = prepare([_tilted_series(tmp_path / "tilted", (0.0, 0.8, 3.0), (40, 40, 12))], tmp_path / "cache",
                     spacing=2.0, min_size=8, progress=False)
    entry = json.loads((tmp_path / "cache" / "manifest.json").read_text())["volumes"][0]
    assert report.prepared and np.allclose(np.asarray(entry["affine"])[:3, :3], np.diag([2.0, 2.0, 2.0]))


def test_signed_dicom_without_rescale_is_taken_as_hu(tmp_path):
    # no RescaleSlope/Intercept, signed pixels holding negative values: they can only be HU already
    paths = write_dicom_series(tmp_path / "signed", (12, 10, 6), slope=1.0, intercept=0.0)
    strip_rescale(paths, unsigned=False)
    vol = read_ct(tmp_path / "signed")
    assert vol.array.min() < 0
    assert vol.meta["rescale"] == "no RescaleIntercept: stored values taken as HU"
    assert_matches_field(vol)


def test_unsigned_dicom_with_rescale_is_hu(tmp_path):
    # the usual uint16 storage (0..4095 with RescaleIntercept -1024) reads as HU
    paths = write_dicom_series(tmp_path / "u16", (12, 10, 6), slope=1.0, intercept=-1024.0)
    import pydicom

    for path in paths:
        ds = pydicom.dcmread(path)
        stored = ds.pixel_array
        assert stored.min() >= 0
        ds.PixelRepresentation = 0
        ds.PixelData = stored.astype(np.uint16).tobytes()
        ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(paths[0]).pixel_array.dtype == np.uint16
    vol = read_ct(tmp_path / "u16")
    assert "rescale" not in vol.meta
    assert_matches_field(vol)


def test_implausible_geometry_is_refused_before_any_large_allocation(tmp_path):
    """19 mm voxels over 64 x 64 x 200: 1.2 x 1.2 x 3.8 m. Resampled to 2 mm that would be a 2.8 GB array;
    refused at read time, prepare stays small."""
    import tracemalloc

    from dagman.data.prepare import prepare

    path = write_nifti(tmp_path / "wrong_header.nii.gz", np.random.default_rng(0).normal(size=(64, 64, 200)) * 300,
                       np.diag([19.0, 19.0, 19.0, 1.0]))
    good = write_nifti(tmp_path / "good.nii.gz", *lps_view())
    tracemalloc.start()
    try:
        report = prepare([path, good], tmp_path / "cache", min_size=4, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    rows = {os.path.basename(r.source): r for r in report.rows}
    assert rows["wrong_header.nii.gz"].status == "skipped"
    assert rows["wrong_header.nii.gz"].reason.startswith("implausible field of view 1216 x 1216 x 3800 mm")
    assert rows["good.nii.gz"].status == "prepared"
    assert peak < 64 * 2**20, f"peak traced memory {peak / 2**20:.0f} MiB"


def test_plausible_extremes_are_accepted(tmp_path):
    # 0.2 mm micro-CT-like pixels and 10 mm thick slabs, 2 m long: unusual but real
    write_nifti(tmp_path / "fine.nii.gz", field_volume(np.diag([0.2, 0.2, 0.2, 1.0]), (30, 30, 30)),
                np.diag([0.2, 0.2, 0.2, 1.0]))
    write_nifti(tmp_path / "long.nii.gz", field_volume(np.diag([2.0, 2.0, 10.0, 1.0]), (20, 20, 200)),
                np.diag([2.0, 2.0, 10.0, 1.0]))
    assert read_ct(tmp_path / "fine.nii.gz").spacing == pytest.approx((0.2, 0.2, 0.2))
    assert read_ct(tmp_path / "long.nii.gz").shape == (20, 20, 200)


def test_negative_strides_give_the_same_prepared_volume(tmp_path):
    """Arrays with negative strides (np.flip views; what flipped affines produce) anywhere on the way: in a
    NIfTI written from such a view with the flipped affine, or handed to the array steps as a CTVolume. The
    prepared output equals the positive-stride case bit for bit."""
    from dagman.data.prepare import make_settings, prepare, prepare_volume

    canonical = field_volume(GRID_RAS, GRID_SHAPE) * 5
    flip = np.diag([-1.0, 1.0, -1.0, 1.0])
    flip[0, 3], flip[2, 3] = GRID_SHAPE[0] - 1, GRID_SHAPE[2] - 1
    view = canonical[::-1, :, ::-1]  # the same physical image stored L-A-I, as a negative-stride view
    assert any(st < 0 for st in view.strides)
    write_nifti(tmp_path / "ras.nii.gz", canonical, GRID_RAS)
    write_nifti(tmp_path / "flipped.nii.gz", view, GRID_RAS @ flip)
    vol = read_ct(tmp_path / "flipped.nii.gz")
    assert vol.array.flags.c_contiguous and all(st > 0 for st in vol.array.strides)
    import torch

    assert torch.from_numpy(vol.array).shape == GRID_SHAPE  # torch refuses negative strides
    one = prepare([tmp_path / "ras.nii.gz"], tmp_path / "c1", min_size=4, progress=False)
    two = prepare([tmp_path / "flipped.nii.gz"], tmp_path / "c2", min_size=4, progress=False)
    a = np.load(tmp_path / "c1" / "volumes" / f"{one.rows[0].id}.npy")
    b = np.load(tmp_path / "c2" / "volumes" / f"{two.rows[0].id}.npy")
    assert a.shape == b.shape and a.tobytes() == b.tobytes()
    # library use: a CTVolume holding a negative-stride view prepares like its contiguous copy
    settings = make_settings(2.0, (-750.0, 1750.0), 4)
    flipped_affine = vol.affine @ flip
    as_view = CTVolume(array=vol.array[::-1, :, ::-1], affine=flipped_affine, spacing=vol.spacing, source="view")
    as_copy = CTVolume(array=np.ascontiguousarray(as_view.array), affine=flipped_affine, spacing=vol.spacing,
                       source="copy")
    out_view, aff_view, box_view = prepare_volume(as_view, settings)
    out_copy, aff_copy, box_copy = prepare_volume(as_copy, settings)
    assert out_view.tobytes() == out_copy.tobytes() and box_view == box_copy
    np.testing.assert_array_equal(aff_view, aff_copy)


# ----------------------------------------------------------------------------------------------------------
# Listing sources


def test_list_sources_walks_folders_and_reports_suspicious_entries(tmp_path):
    root = tmp_path / "data"
    stored, affine = lps_view()
    write_nifti(root / "a" / "one.nii.gz", stored, affine)
    write_nifti(root / "b" / "two.nii", stored, affine)
    write_dicom_series(root / "b" / "dicom_series", (8, 8, 4))
    (root / "README.txt").write_text("notes")  # ignored: a plain non-image file in a folder
    (root / "a" / ".DS_Store").write_bytes(b"junk")  # hidden: ignored
    (root / "a" / "._one.nii.gz").write_bytes(b"resource fork")  # macOS fork: ignored
    (root / "b" / "dicom_series" / "notes.dcm").write_bytes(b"not dicom")  # promises DICOM: reported
    (root / "b" / "folder.nii.gz").mkdir()  # promises an image: reported
    os.symlink(root / "gone.nrrd", root / "link.nrrd")  # broken link: reported
    sources = list_sources(root)
    by_name = {os.path.basename(s.path): s for s in sources}
    assert set(by_name) == {"one.nii.gz", "two.nii", "dicom_series", "notes.dcm", "folder.nii.gz", "link.nrrd"}
    assert by_name["one.nii.gz"].kind == "nifti" and by_name["one.nii.gz"].error is None
    assert by_name["dicom_series"].kind == "dicom" and len(by_name["dicom_series"].files) == 4
    assert "no 'DICM' marker" in by_name["notes.dcm"].error
    assert by_name["folder.nii.gz"].error == "is a directory, not an image file"
    assert by_name["link.nrrd"].error == "broken symbolic link"
    # explicit arguments: a text file, a missing path, an empty folder are all reported
    (tmp_path / "empty").mkdir()
    explicit = list_sources([root / "README.txt", tmp_path / "missing.nii", tmp_path / "empty"])
    reasons = [s.error for s in explicit]
    assert reasons[0].startswith("not an image")
    assert reasons[1] == "no such file or directory"
    assert reasons[2].startswith("no images found")
    # the same file twice is listed once
    assert len(list_sources([root / "a", root / "a" / "one.nii.gz"])) == 1


def _msd_task(root):
    stored, affine = lps_view()
    for name in ("case_001", "case_002"):
        write_nifti(root / "imagesTr" / f"{name}.nii.gz", stored, affine)
        write_nifti(root / "labelsTr" / f"{name}.nii.gz", (stored > 0).astype(np.uint8), affine, np.uint8)
    write_nifti(root / "imagesTs" / "case_003.nii.gz", stored, affine)
    dataset = {
        "name": "Synthetic",
        "modality": {"0": "CT"},
        "training": [
            {"image": "./imagesTr/case_001.nii.gz", "label": "./labelsTr/case_001.nii.gz"},
            {"image": "./imagesTr/case_002.nii.gz", "label": "./labelsTr/case_002.nii.gz"},
        ],
        "test": ["./imagesTs/case_003.nii.gz", "./imagesTs/case_004.nii.gz"],
    }
    (root / "dataset.json").write_text(json.dumps(dataset))
    return root / "dataset.json"


def test_msd_dataset_json_expands_to_images_not_labels(tmp_path):
    js = _msd_task(tmp_path / "Task99")
    for arg in (js, tmp_path / "Task99", tmp_path):  # the json, its folder, or a folder above
        sources = list_sources(arg)
        names = [os.path.relpath(s.path, tmp_path / "Task99") for s in sources]
        assert names == [
            "imagesTr/case_001.nii.gz",
            "imagesTr/case_002.nii.gz",
            "imagesTs/case_003.nii.gz",
            "imagesTs/case_004.nii.gz",
        ]
        assert sources[0].listed_in == f"{js}#0"
        assert sources[3].error == "listed in dataset.json but missing"
    # read_ct picks one image of a list by index
    vol = read_ct(js, index=1)
    assert vol.source.endswith("case_002.nii.gz")
    assert_matches_field(vol)
    with pytest.raises(ImageReadError, match="holds 4 images"):
        read_ct(js)


def test_fetch_examples_manifest_expands(tmp_path):
    stored, affine = lps_view()
    write_nifti(tmp_path / "ex" / "ct" / "abdomen.nii.gz", stored, affine)
    write_dicom_series(tmp_path / "ex" / "chest_dicom", (8, 8, 4))
    manifest = {"volumes": [{"image": "ct/abdomen.nii.gz", "sha256": "x"}, {"image": "chest_dicom"}]}
    (tmp_path / "ex" / "manifest.json").write_text(json.dumps(manifest))
    sources = list_sources(tmp_path / "ex" / "manifest.json")
    assert [s.kind for s in sources] == ["nifti", "dicom"]
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"foo": [1, 2]}))
    assert list_sources(bad)[0].error.startswith("not an image list")


# ----------------------------------------------------------------------------------------------------------
# Bad inputs: each gives a one-line "<path>: <reason>"


def _good_nifti(path):
    stored, affine = lps_view()
    return write_nifti(path, stored, affine)


def make_bad_input(kind: str, tmp_path) -> str:
    """Create one bad input of the given kind under ``tmp_path``; returns the path to pass on."""
    rng = np.random.default_rng(1)
    if kind == "truncated_gz":
        good = _good_nifti(tmp_path / "full.nii.gz")
        data = Path(good).read_bytes()
        os.remove(good)
        path = tmp_path / "truncated.nii.gz"
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated_nii":
        good = write_nifti(tmp_path / "full.nii", *lps_view())
        data = Path(good).read_bytes()
        os.remove(good)
        path = tmp_path / "truncated.nii"
        path.write_bytes(data[: len(data) // 2])
    elif kind == "corrupt_gz":
        path = tmp_path / "corrupt.nii.gz"
        path.write_bytes(rng.bytes(4000))
    elif kind == "corrupt_nii":
        path = tmp_path / "corrupt.nii"
        path.write_bytes(rng.bytes(4000))
    elif kind == "corrupt_nrrd":
        path = tmp_path / "corrupt.nrrd"
        path.write_bytes(rng.bytes(4000))
    elif kind == "not_image":
        path = tmp_path / "notes.txt"
        path.write_text("hello")
    elif kind == "two_d":
        path = tmp_path / "flat.nii.gz"
        write_nifti(path, rng.normal(size=(40, 40)), np.eye(4))
    elif kind == "one_slice":
        path = tmp_path / "slice.nii.gz"
        write_nifti(path, rng.normal(size=(40, 40, 1)), np.eye(4))
    elif kind == "four_d":
        path = tmp_path / "series4d.nii.gz"
        write_nifti(path, rng.normal(size=(20, 20, 20, 3)), np.eye(4))
    elif kind == "all_nan":
        path = tmp_path / "nan.nii.gz"
        write_nifti(path, np.full((20, 20, 20), np.nan), np.eye(4))
    elif kind == "constant":
        path = tmp_path / "constant.nii.gz"
        write_nifti(path, np.full((20, 20, 20), -1000.0), np.eye(4))
    elif kind == "mixed_series":
        path = tmp_path / "mixed"
        write_dicom_series(path, (8, 8, 4), name_prefix="A")
        write_dicom_series(path, (8, 8, 4), name_prefix="B", origin=(0, 0, 1.5))
    elif kind == "missing_slice":
        path = tmp_path / "gap"
        files = write_dicom_series(path, (8, 8, 6))
        os.remove(files[3])
    elif kind == "duplicate_slice":
        path = tmp_path / "dup"
        files = write_dicom_series(path, (8, 8, 5))
        import shutil

        shutil.copy(files[2], os.path.join(path, "copy_of_slice"))
    elif kind == "not_ct":
        path = tmp_path / "mr"
        write_dicom_series(path, (8, 8, 4), modality="MR")
    elif kind == "single_dicom":
        files = write_dicom_series(tmp_path / "one", (8, 8, 1))
        path = files[0]
    elif kind == "directory_named_nifti":
        path = tmp_path / "x.nii.gz"
        path.mkdir()
    elif kind == "broken_symlink":
        path = tmp_path / "link.nii.gz"
        os.symlink(tmp_path / "nowhere.nii.gz", path)
    elif kind == "missing":
        path = tmp_path / "absent.nii.gz"
    elif kind == "empty_file":
        path = tmp_path / "empty.nii.gz"
        path.write_bytes(b"")
    elif kind == "sheared_nifti":  # a converted gantry-tilt series whose shear was left in the affine
        path = tmp_path / "sheared.nii.gz"
        write_nifti(path, rng.normal(size=(20, 20, 10)) * 100, np.array(SHEARED_AFFINE))
    elif kind == "tiny_spacing":  # pixel spacing written in metres
        path = tmp_path / "metres"
        write_dicom_series(path, (8, 8, 4), pixel_spacing=(0.001, 0.001), slice_step=(0, 0, 0.003),
                           values=lambda lps: lps[..., 0] * 1e5)
    elif kind == "huge_spacing":  # 50 mm between slices
        path = tmp_path / "thick.nii.gz"
        write_nifti(path, rng.normal(size=(20, 20, 10)) * 100, np.diag([1.0, 1.0, 50.0, 1.0]))
    elif kind == "huge_extent":  # 130 slices of 20 mm: 2.6 m long
        path = tmp_path / "long.nii.gz"
        write_nifti(path, rng.normal(size=(8, 8, 130)) * 100, np.diag([2.0, 2.0, 20.0, 1.0]))
    elif kind == "unsigned_no_rescale":  # uint16 0..4095 style, no RescaleSlope/Intercept
        path = tmp_path / "uint16"
        strip_rescale(write_dicom_series(path, (8, 8, 4), slope=1.0, intercept=-1024.0), unsigned=True)
    elif kind == "partial_rescale":
        path = tmp_path / "partial"
        strip_rescale(write_dicom_series(path, (8, 8, 4))[:2], unsigned=False)
    else:
        raise ValueError(kind)
    return str(path)


BAD_INPUTS = {
    "truncated_gz": "truncated file",
    "truncated_nii": "truncated file (less voxel data than the header declares)",
    "corrupt_gz": "not a gzip file",
    "corrupt_nii": "not a NIfTI image",
    "corrupt_nrrd": "not a readable NRRD image",
    "not_image": "not an image",
    "two_d": "2D image",
    "one_slice": "2D image (a single slice",
    "four_d": "4D image (20x20x20x3: 3 volumes)",
    "all_nan": "all voxels are NaN",
    "constant": "constant volume (every voxel = -1000)",
    "mixed_series": "mixed series: 2 SeriesInstanceUIDs",
    "missing_slice": "missing slice(s): 6.00 mm between slices 2 and 3 (sorted), expected 3.00 mm",
    "duplicate_slice": "duplicate slice positions",
    "not_ct": "modality MR, not CT",
    "single_dicom": "2D image (a single DICOM slice)",
    "directory_named_nifti": "is a directory, not an image file",
    "broken_symlink": "broken symbolic link",
    "missing": "no such file or directory",
    "empty_file": "empty file (0 bytes)",
    "sheared_nifti": "sheared voxel grid (axes 1 and 2 meet at 75.0 degrees, not 90",
    "tiny_spacing": "implausible voxel spacing 0.001x0.001x0.003 mm (below 0.01 mm",
    "huge_spacing": "implausible voxel spacing 1x1x50 mm (above 20 mm",
    "huge_extent": "implausible field of view 16 x 16 x 2600 mm",
    "unsigned_no_rescale": "no RescaleIntercept and every stored value is >= 0",
    "partial_rescale": "RescaleIntercept in only 2 of 4 slices",
}

# Voxel -> RAS with the third axis leaning 15 degrees towards A: what a gantry tilt leaves when not corrected.
SHEARED_AFFINE = [[1.0, 0, 0, 0], [0, 1.0, 3.0 * np.tan(np.radians(15)), 0], [0, 0, 3.0, 0], [0, 0, 0, 1]]


def strip_rescale(paths, unsigned: bool) -> None:
    """Remove RescaleSlope/RescaleIntercept from DICOM files (stored values unchanged); with ``unsigned`` also
    declare the pixels unsigned (PixelRepresentation 0, uint16; the stored values must be >= 0)."""
    import pydicom

    for path in paths:
        ds = pydicom.dcmread(path)
        stored = ds.pixel_array
        del ds.RescaleSlope
        del ds.RescaleIntercept
        if unsigned:
            assert stored.min() >= 0
            ds.PixelRepresentation = 0
            ds.PixelData = stored.astype(np.uint16).tobytes()
        ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line_reason(kind, tmp_path):
    path = make_bad_input(kind, tmp_path)
    with pytest.raises(DataError) as info:
        read_ct(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(os.path.abspath(path) + ": "), message
    assert BAD_INPUTS[kind] in message, message
    assert isinstance(info.value, ImageReadError) and info.value.reason in message


def test_truncated_gzip_within_header_is_called_truncated(tmp_path):
    good = _good_nifti(tmp_path / "full.nii.gz")
    data = Path(good).read_bytes()
    (tmp_path / "short.nii.gz").write_bytes(data[:60])
    with pytest.raises(ImageReadError, match="truncated file"):
        read_ct(tmp_path / "short.nii.gz")
    # sanity: the full file really is gzip and reads fine
    assert gzip.decompress(data)[:4] == (348).to_bytes(4, "little")
    assert read_ct(good).shape == GRID_SHAPE

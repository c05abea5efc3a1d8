"""The procedural chest CT phantom: HU per tissue, label ids, determinism, nodules inside the lungs, speed."""


import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from dagman.data import phantom
from dagman.data.phantom import LABEL_NAMES, chest_phantom, phantom_affine, write_phantom_nifti


@pytest.fixture(scope="module")
def default_phantom():
    return chest_phantom()


def test_shapes_types_and_affine(default_phantom):
    hu, labels, affine = default_phantom
    assert hu.shape == labels.shape == (160, 160, 128)
    assert hu.dtype == np.float32 and labels.dtype == np.uint8
    np.testing.assert_allclose(np.diag(affine), [2.0, 2.0, 2.0, 1.0])
    # centred on the origin, RAS+
    centre = affine @ np.array([79.5, 79.5, 63.5, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    assert set(np.unique(labels)) == set(LABEL_NAMES)  # every documented structure is drawn
    assert hu.min() >= -1024 and hu.max() <= 3071


@pytest.mark.parametrize(
    "label, lo, hi",
    [
        (phantom.BACKGROUND, -1005, -995),
        (phantom.BODY, 20, 60),
        (phantom.LUNG, -880, -800),
        (phantom.VESSEL, 0, 250),
        (phantom.BONE, 400, 1000),
        (phantom.HEART, 30, 60),
        (phantom.FAT, -120, -80),
        (phantom.AIRWAY, -1010, -950),
    ],
)
def test_mean_hu_per_label(default_phantom, label, lo, hi):
    hu, labels, _ = default_phantom
    mean = float(hu[labels == label].mean())
    assert lo <= mean <= hi, f"{LABEL_NAMES[label]}: mean {mean:.1f} HU outside [{lo}, {hi}]"


def test_noise_level_in_air(default_phantom):
    hu, labels, _ = default_phantom
    std = float(hu[labels == phantom.BACKGROUND].std())
    assert 10.0 <= std <= 20.0


def test_anatomy_layout(default_phantom):
    """Spine posterior, heart anterior and to the patient's left (-X in RAS), one lung on each side."""
    _, labels, affine = default_phantom

    def centroid_mm(label):
        idx = np.argwhere(labels == label).mean(axis=0)
        return affine[:3, :3] @ idx + affine[:3, 3]

    heart = centroid_mm(phantom.HEART)
    spine_idx = np.argwhere((labels == phantom.BONE) & (np.abs(np.arange(160) - 79.5)[:, None, None] < 8))
    bone_spine = affine[:3, :3] @ spine_idx.mean(axis=0) + affine[:3, 3]
    assert heart[0] < 0 and heart[1] > bone_spine[1] + 50
    lung_x = np.argwhere(labels == phantom.LUNG)[:, 0]
    assert (lung_x < 70).sum() > 50_000 and (lung_x > 90).sum() > 50_000


def test_nodules_inside_lungs_and_kinds(default_phantom):
    hu, labels, _ = default_phantom
    components, n = ndimage.label(labels == phantom.NODULE)
    assert n == 3
    peak = []
    for i in range(1, n + 1):
        nodule = components == i
        shell = ndimage.binary_dilation(nodule) & ~nodule
        around = labels[shell]
        # surrounded by lung parenchyma (or vessels running past it)
        assert np.isin(around, (phantom.LUNG, phantom.VESSEL, phantom.NODULE)).mean() == 1.0
        assert nodule.sum() >= 8
        peak.append(float(np.percentile(hu[nodule], 90)))
    # two nodules with a solid part (~30 HU), one pure ground glass (~-600 HU), all denser than lung
    assert sum(p > -100 for p in peak) == 2
    assert sum(-750 < p < -400 for p in peak) == 1


def test_deterministic_under_seed():
    a = chest_phantom((48, 48, 40), (4.0, 4.0, 4.0), seed=3)
    b = chest_phantom((48, 48, 40), (4.0, 4.0, 4.0), seed=3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[2], b[2])


def test_different_seeds_differ():
    a_hu, a_lab, _ = chest_phantom((48, 48, 40), (4.0, 4.0, 4.0), seed=1)
    b_hu, b_lab, _ = chest_phantom((48, 48, 40), (4.0, 4.0, 4.0), seed=2)
    assert (a_lab != b_lab).mean() > 0.005  # anatomy, vessels and nodules move
    assert np.abs(a_hu - b_hu).mean() > 10.0


def test_n_nodules_and_small_arrays():
    hu, labels, _ = chest_phantom((40, 40, 32), (5.0, 5.0, 5.0), seed=0, n_nodules=0)
    assert not np.any(labels == phantom.NODULE)
    assert np.any(labels == phantom.LUNG) and np.any(labels == phantom.BONE)
    with pytest.raises(ValueError):
        chest_phantom((8, 40, 40))
    with pytest.raises(ValueError):
        chest_phantom(spacing=(0.0, 1.0, 1.0))


def test_anisotropic_spacing_keeps_physical_layout():
    hu, labels, affine = chest_phantom((64, 64, 24), (5.0, 5.0, 10.0), seed=0)
    assert labels.shape == (64, 64, 24)
    np.testing.assert_allclose(np.diag(affine)[:3], [5.0, 5.0, 10.0])
    assert -880 <= np.median(hu[labels == phantom.LUNG]) <= -800


def test_write_phantom_nifti(tmp_path):
    image_path, label_path = write_phantom_nifti(
        tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", shape=(48, 48, 40), spacing=(4.0, 4.0, 4.0), seed=7
    )
    hu, labels, affine = chest_phantom((48, 48, 40), (4.0, 4.0, 4.0), seed=7)
    img, seg = nib.load(image_path), nib.load(label_path)
    assert img.get_data_dtype() == np.int16 and seg.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, affine)
    np.testing.assert_allclose(seg.affine, phantom_affine((48, 48, 40), (4.0, 4.0, 4.0)))
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), np.rint(hu).astype(np.int16))
    np.testing.assert_array_equal(np.asanyarray(seg.dataobj), labels)

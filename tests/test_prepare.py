"""``dagman data prepare``: resampling, windowing, body crop, the cache files, idempotency, bad inputs,
parallel workers, interruption, and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dagman.cli import main
from dagman.data import cache as cache_mod
from dagman.data.cache import cache_entries, open_volume, read_manifest
from dagman.data.prepare import (
    PrepareReport,
    VolumeRow,
    _run_tasks,
    body_crop,
    prepare,
    resample_isotropic,
    window_hu,
)
from dagman.errors import ConfigError, DataError

try:
    from test_io import (
        BAD_INPUTS,
        GRID_RAS,
        GRID_SHAPE,
        field_volume,
        hu_at,
        lps_view,
        make_bad_input,
        voxel_world,
        write_dicom_series,
        write_nifti,
    )
except ImportError:  # tests imported as a package
    from tests.test_io import (
        BAD_INPUTS,
        GRID_RAS,
        GRID_SHAPE,
        field_volume,
        hu_at,
        lps_view,
        make_bad_input,
        voxel_world,
        write_dicom_series,
        write_nifti,
    )

WINDOW = (-750.0, 1750.0)
SMALL = 8  # --min-size for the small test volumes


def windowed_field(world: np.ndarray) -> np.ndarray:
    return (np.clip(hu_at(world), *WINDOW) - WINDOW[0]) / (WINDOW[1] - WINDOW[0])


def grid_nifti(path, offset_hu: float = 0.0) -> str:
    """The shared physical test grid (24x20x12 at 1x2x3 mm, all 'body': HU in [-192, 204]) stored as LPS."""
    stored, affine = lps_view()
    return write_nifti(path, stored + offset_hu, affine)


def grid_dicom(folder) -> str:
    """The same physical grid as :func:`grid_nifti`, as an axial DICOM series (1 x 2 mm pixels, 3 mm slices)."""
    nx, ny, nz = GRID_SHAPE
    corner = np.array([-(GRID_RAS[0, 3] + (nx - 1) * 1.0), -(GRID_RAS[1, 3] + (ny - 1) * 2.0), GRID_RAS[2, 3]])
    write_dicom_series(folder, (nx, ny, nz), pixel_spacing=(2.0, 1.0), origin=corner, slice_step=(0, 0, 3.0))
    return str(folder)


def body_in_air(path, shape=(60, 56, 40), spacing=(1.0, 1.0, 1.5), body=((15, 45), (10, 40), (5, 35))) -> str:
    """Air (-1000 HU) with a soft-tissue box (40 HU) and a small bright speck away from it (noise)."""
    array = np.full(shape, -1000.0, dtype=np.float32)
    array[tuple(slice(a, b) for a, b in body)] = 40.0
    array[2, 2, 2] = 300.0
    affine = np.diag([*spacing, 1.0])
    return write_nifti(path, array, affine)


def npy_files(cache) -> list[str]:
    folder = os.path.join(cache, "volumes")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


# ----------------------------------------------------------------------------------------------------------
# Array steps


def test_resample_keeps_extent_centre_and_linear_values():
    shape, spacing = (30, 21, 9), (1.0, 1.5, 3.0)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-10, 5, 40]
    array = field_volume(affine, shape)
    out, new_affine = resample_isotropic(array, affine, 2.0)
    assert out.shape == (15, 16, 14)  # round(n * s / 2)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(new_affine[:3, :3], axis=0), [2, 2, 2])
    centre_old = affine @ [*(np.array(shape) - 1) / 2, 1]
    centre_new = new_affine @ [*(np.array(out.shape) - 1) / 2, 1]
    np.testing.assert_allclose(centre_new, centre_old, atol=1e-9)
    extent_old = np.array(shape) * spacing
    extent_new = np.array(out.shape) * 2.0
    assert np.all(np.abs(extent_new - extent_old) <= 1.0 + 1e-9)  # within half a new voxel
    # linear interpolation (and the symmetric anti-aliasing kernel) reproduce a linear field exactly, away from
    # the edges where samples are clamped
    expected = field_volume(new_affine, out.shape)
    np.testing.assert_allclose(out[2:-2, 2:-2, 2:-2], expected[2:-2, 2:-2, 2:-2], atol=1e-3)
    # identity when already at the target spacing
    same, same_affine = resample_isotropic(out, new_affine, 2.0)
    np.testing.assert_array_equal(same, out)
    np.testing.assert_allclose(same_affine, new_affine)


def test_resample_antialiases_when_shrinking():
    # a 1-voxel checkerboard along x averages to its mean instead of aliasing to one of its two values
    array = np.zeros((40, 4, 4), dtype=np.float32)
    array[::2] = 1000.0
    out, _ = resample_isotropic(array, np.eye(4), 4.0)  # 4x shrink along every axis
    assert out.shape == (10, 1, 1)
    assert np.all(np.abs(out[1:-1] - 500.0) < 150.0)


def test_window_hu_clips_and_scales():
    hu = np.array([-2000.0, -750.0, 500.0, 1750.0, 3000.0])
    np.testing.assert_allclose(window_hu(hu, WINDOW), [0.0, 0.0, 0.5, 1.0, 1.0])


def test_body_crop_box_margin_noise_and_minimum():
    hu = np.full((60, 60, 60), -1000.0, dtype=np.float32)
    hu[10:30, 12:40, 5:25] = 40.0
    hu[55, 55, 55] = 200.0  # a speck: its own tiny component, dropped
    box = body_crop(hu, spacing=2.0)
    assert [(b.start, b.stop) for b in box] == [(5, 35), (7, 45), (0, 30)]  # 5-voxel (10 mm) margin
    # nothing above -500 HU: keep everything rather than crop it all away
    assert body_crop(np.full((20, 20, 20), -1000.0), spacing=2.0) == (slice(0, 20),) * 3
    # a tiny body is widened to min_size around its centre, within the volume
    hu2 = np.full((50, 50, 50), -1000.0, dtype=np.float32)
    hu2[1:3, 24:26, 40:42] = 50.0
    box2 = body_crop(hu2, spacing=2.0, min_size=20, margin_mm=0.0)
    assert [(b.start, b.stop) for b in box2] == [(0, 20), (15, 35), (30, 50)]


# ----------------------------------------------------------------------------------------------------------
# The cache


def test_prepare_writes_memory_mappable_float16_cache(tmp_path):
    src = tmp_path / "src"
    grid_nifti(src / "grid.nii.gz")
    cache = tmp_path / "cache"
    report = prepare([src], cache, spacing=2.0, min_size=SMALL, progress=False)
    assert [r.status for r in report.rows] == ["prepared"]
    manifest = read_manifest(cache)
    assert manifest["version"] == cache_mod.CACHE_FORMAT_VERSION
    assert manifest["settings"]["spacing"] == 2.0 and manifest["settings"]["hu_window"] == [-750.0, 1750.0]
    (entry,) = manifest["volumes"]
    # the whole grid is body (HU > -500), so the prepared shape is the resampled one: round(n * s / 2)
    assert entry["shape"] == [12, 20, 18]
    assert entry["spacing"] == [2.0, 2.0, 2.0]
    assert entry["source_shape"] == list(GRID_SHAPE) and entry["source_spacing"] == [1.0, 2.0, 3.0]
    assert entry["source"] == str(src / "grid.nii.gz") and entry["format"] == "nifti"
    assert entry["source_orientation"] == "LPS" and entry["source_file_shape"] == list(GRID_SHAPE)
    assert entry["id"].startswith("grid-") and entry["file"] == f"volumes/{entry['id']}.npy"
    assert entry["source_sha256"] == cache_mod.file_sha256(src / "grid.nii.gz")
    assert entry["sha256"] == cache_mod.file_sha256(cache / entry["file"])
    assert entry["crop"] == [[0, 12], [0, 20], [0, 18]]
    array = np.load(cache / entry["file"], mmap_mode="r")
    assert isinstance(array, np.memmap) and array.dtype == np.float16 and array.shape == (12, 20, 18)
    assert 0.0 <= float(array.min()) and float(array.max()) <= 1.0
    # values: the windowed HU field at each prepared voxel's world position (recorded affine), interior voxels
    affine = np.asarray(entry["affine"])
    expected = windowed_field(voxel_world(affine, array.shape))
    np.testing.assert_allclose(
        np.asarray(array, np.float32)[1:-1, 1:-1, 1:-1], expected[1:-1, 1:-1, 1:-1], atol=1e-3
    )
    # the recorded source affine maps prepared voxels back into the stored (LPS) grid of the file
    source_affine = np.asarray(entry["source_affine"])
    stored, _ = lps_view()
    np.testing.assert_allclose(field_volume(source_affine, stored.shape), stored, atol=1e-3)
    ijk = np.rint((np.linalg.inv(source_affine) @ affine @ [4, 10, 9, 1])[:3]).astype(int)
    assert float(array[4, 10, 9]) == pytest.approx((stored[tuple(ijk)] + 750) / 2500, abs=0.01)
    # the cache contract's own reader opens it
    (ce,) = cache_entries(cache)
    assert open_volume(cache, ce).shape == (12, 20, 18)
    assert json.loads((cache / "skipped.json").read_text()) == []


def test_nifti_nrrd_and_dicom_of_one_body_prepare_identically(tmp_path):
    import nrrd

    src = tmp_path / "src"
    grid_nifti(src / "grid.nii.gz")
    grid_dicom(src / "grid_dicom")
    stored, affine = lps_view()
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    nrrd.write(
        str(src / "grid.nrrd"),
        stored,
        {"space": "left-posterior-superior", "space directions": lps[:3, :3].T, "space origin": lps[:3, 3]},
    )
    cache = tmp_path / "cache"
    report = prepare([src], cache, min_size=SMALL, progress=False)
    assert sorted(r.status for r in report.rows) == ["prepared"] * 3
    entries = read_manifest(cache)["volumes"]
    arrays = [np.load(cache / e["file"]) for e in entries]
    assert len({e["id"] for e in entries}) == 3
    for e, a in zip(entries[1:], arrays[1:]):
        np.testing.assert_array_equal(a, arrays[0])
        np.testing.assert_allclose(e["affine"], entries[0]["affine"], atol=1e-4)
    dicom_entry = next(e for e in entries if e["format"] == "dicom")
    assert dicom_entry["modality"] == "CT" and dicom_entry["series_uid"]


def test_body_crop_in_prepare_contains_the_body(tmp_path, monkeypatch):
    body_in_air(tmp_path / "body.nii.gz")
    wide = tmp_path / "wide"
    prepare([tmp_path / "body.nii.gz"], wide, min_size=SMALL, progress=False)
    # by default the box is widened to 32 voxels where the volume allows: here the whole 30x28x30
    assert read_manifest(wide)["volumes"][0]["shape"] == [30, 28, 30]
    monkeypatch.setattr("dagman.data.prepare.BODY_MIN_SIDE", 0)
    cache = tmp_path / "cache"
    prepare([tmp_path / "body.nii.gz"], cache, min_size=SMALL, progress=False)
    (entry,) = read_manifest(cache)["volumes"]
    # resampled 30x28x30; body voxels x 15..44, y 10..39 (mm), z 7.5..51 mm -> 16 and 15 voxels at 2 mm plus a
    # 5-voxel margin on each side in x and y; in z the margins reach beyond the volume, which is kept whole
    assert entry["shape"] == [26, 25, 30]
    assert entry["crop"] == [[2, 28], [0, 25], [0, 30]]
    array = np.load(cache / entry["file"]).astype(np.float32)
    affine = np.asarray(entry["affine"])
    world = voxel_world(affine, array.shape)
    lo, hi = world.reshape(-1, 3).min(0), world.reshape(-1, 3).max(0)
    assert np.all(lo <= [15 - 5, 10 - 5, 7.5 - 5]) and np.all(hi >= [44 + 5, 39 + 5, 51 + 5])
    assert array[0, 0, 0] == 0.0  # air in the margin
    assert array[13, 13, 16] == pytest.approx((40 + 750) / 2500, abs=1e-3)


def test_second_run_is_cached_and_touches_nothing(tmp_path):
    src = tmp_path / "src"
    grid_nifti(src / "a.nii.gz")
    grid_nifti(src / "b.nii.gz", offset_hu=50)
    grid_dicom(src / "c_dicom")
    cache = tmp_path / "cache"
    first = prepare([src], cache, min_size=SMALL, progress=False)
    assert [r.status for r in first.rows] == ["prepared"] * 3
    files = [cache / "manifest.json", cache / "skipped.json"] + [cache / "volumes" / f for f in npy_files(cache)]
    mtimes = {f: os.stat(f).st_mtime_ns for f in files}
    second = prepare([src], cache, min_size=SMALL, progress=False)
    assert [r.status for r in second.rows] == ["cached"] * 3
    assert [r.shape for r in second.rows] == [r.shape for r in first.rows]
    assert {f: os.stat(f).st_mtime_ns for f in files} == mtimes
    assert second.summary_line() == f"0 prepared, 3 cached, 0 skipped -> {cache}"


def test_changed_source_is_prepared_again_and_touched_source_is_not(tmp_path):
    src = tmp_path / "src"
    a = grid_nifti(src / "a.nii.gz")
    b = grid_nifti(src / "b.nii.gz")
    cache = tmp_path / "cache"
    prepare([src], cache, min_size=SMALL, progress=False)
    before = {e["source"]: e for e in read_manifest(cache)["volumes"]}
    old_a = np.load(cache / before[a]["file"])
    grid_nifti(src / "a.nii.gz", offset_hu=100)  # new content
    os.utime(b, ns=(1_000_000_000, 1_000_000_000))  # new mtime, same bytes
    report = prepare([src], cache, min_size=SMALL, progress=False)
    assert {os.path.basename(r.source): r.status for r in report.rows} == {
        "a.nii.gz": "prepared",
        "b.nii.gz": "cached",
    }
    after = {e["source"]: e for e in read_manifest(cache)["volumes"]}
    assert after[a]["id"] == before[a]["id"] and after[a]["source_sha256"] != before[a]["source_sha256"]
    new_a = np.load(cache / after[a]["file"]).astype(np.float32)
    np.testing.assert_allclose(new_a - old_a.astype(np.float32), 100 / 2500, atol=2e-3)
    assert after[b]["source_mtime_ns"] == 1_000_000_000  # quick check refreshed after the checksum matched
    assert len(npy_files(cache)) == 2


def test_settings_mismatch_is_refused_unless_overwrite(tmp_path):
    grid_nifti(tmp_path / "a.nii.gz")
    cache = tmp_path / "cache"
    prepare([tmp_path / "a.nii.gz"], cache, min_size=SMALL, progress=False)
    with pytest.raises(
        DataError, match=r"other settings \(spacing: cache 2, asked 3\); use a new out, or overwrite"
    ):
        prepare([tmp_path / "a.nii.gz"], cache, spacing=3.0, min_size=SMALL, progress=False)
    report = prepare([tmp_path / "a.nii.gz"], cache, spacing=3.0, min_size=SMALL, progress=False, overwrite=True)
    assert [r.status for r in report.rows] == ["prepared"]
    assert read_manifest(cache)["settings"]["spacing"] == 3.0
    assert len(npy_files(cache)) == 1
    # a folder that is not a cache is never written into
    other = tmp_path / "notacache"
    other.mkdir()
    (other / "thesis.docx").write_text("precious")
    with pytest.raises(DataError, match="not a dagman cache"):
        prepare([tmp_path / "a.nii.gz"], other, min_size=SMALL, progress=False, overwrite=True)
    assert sorted(os.listdir(other)) == ["thesis.docx"]
    with pytest.raises(ConfigError, match="^hu_window"):
        prepare([tmp_path / "a.nii.gz"], cache, hu_window=(100, -100), progress=False)


def test_cache_grows_across_runs_over_different_inputs(tmp_path):
    a, b = grid_nifti(tmp_path / "a.nii.gz"), grid_nifti(tmp_path / "b.nii.gz")
    cache = tmp_path / "cache"
    prepare([a], cache, min_size=SMALL, progress=False)
    report = prepare([b], cache, min_size=SMALL, progress=False)
    assert report.kept == 1 and report.usable == 2
    assert report.summary_line().endswith("0 cached, 0 skipped, 1 kept from earlier runs -> " + str(cache))
    assert sorted(e["source"] for e in read_manifest(cache)["volumes"]) == [a, b]


def test_every_bad_input_is_reported_and_none_aborts_the_others(tmp_path):
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad = {}
    for kind in sorted(BAD_INPUTS):
        folder = bad_dir / kind
        folder.mkdir()
        bad[kind] = make_bad_input(kind, folder)
    normalised = tmp_path / "normalised.nii.gz"
    write_nifti(normalised, np.random.default_rng(0).random((30, 30, 30)), np.eye(4))
    small = tmp_path / "small.nii.gz"
    write_nifti(small, field_volume(np.diag([1.0, 1.0, 1.0, 1.0]), (10, 40, 40)), np.eye(4))
    good = grid_nifti(tmp_path / "good.nii.gz")
    cache = tmp_path / "cache"
    inputs = [good] + [bad[k] for k in sorted(bad)] + [str(small), str(normalised)]
    report = prepare(inputs, cache, min_size=SMALL, progress=False)
    status = {r.source: r for r in report.rows}
    assert status[good].status == "prepared"
    for kind, path in bad.items():
        row = status[os.path.abspath(path)]
        assert row.status == "skipped" and BAD_INPUTS[kind] in row.reason, (kind, row.reason)
    assert status[str(small)].reason == (
        "too thin: 5x20x20 voxels at 2 mm, a side below 8 voxels (16 mm) is not a usable CT volume (--min-size)")
    assert status[str(normalised)].reason == "values span only 0.0..1.0: not Hounsfield units (already normalised?)"
    assert len(report.skipped) == len(bad) + 2
    # the same reasons in skipped.json and the printed table
    skipped = json.loads((cache / "skipped.json").read_text())
    assert {s["source"]: s["reason"] for s in skipped} == {r.source: r.reason for r in report.skipped}
    table = report.format_table()
    for row in report.skipped:
        assert row.reason in table
    assert table.splitlines()[-1] == f"1 prepared, 0 cached, {len(bad) + 2} skipped -> {cache}"
    # no partial files: exactly the one good volume, no temporaries
    assert npy_files(cache) == [f"{report.rows[0].id}.npy"]
    assert not [f for f in os.listdir(cache) if f.endswith(".tmp")]


def test_nothing_usable_and_strict_raise_after_writing_the_cache(tmp_path):
    bad = make_bad_input("truncated_gz", tmp_path)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"no usable CT volume: all 1 input\(s\) skipped") as info:
        prepare([bad], cache, min_size=SMALL, progress=False)
    assert info.value.report.skipped[0].reason.startswith("truncated file")
    assert json.loads((cache / "skipped.json").read_text())[0]["source"] == bad
    good = grid_nifti(tmp_path / "good.nii.gz")
    with pytest.raises(DataError, match=r"1 of 2 input\(s\) skipped \(--strict"):
        prepare([good, bad], cache, min_size=SMALL, progress=False, strict=True)
    assert len(read_manifest(cache)["volumes"]) == 1  # the good one is kept all the same


def test_ids_are_unique_for_same_named_files(tmp_path):
    a = grid_nifti(tmp_path / "x" / "ct.nii.gz")
    b = grid_nifti(tmp_path / "y" / "ct.nii.gz")
    report = prepare([a, b], tmp_path / "cache", min_size=SMALL, progress=False)
    ids = [r.id for r in report.rows]
    assert len(set(ids)) == 2 and all(i.startswith("ct-") for i in ids)


def test_workers_two_gives_the_same_cache_as_one(tmp_path):
    src = tmp_path / "src"
    grid_nifti(src / "a.nii.gz")
    grid_nifti(src / "b.nii.gz", offset_hu=30)
    body_in_air(src / "c.nii.gz")
    grid_dicom(src / "d_dicom")
    make_bad_input("constant", src)
    one = prepare([src], tmp_path / "one", min_size=SMALL, workers=1, progress=False)
    two = prepare([src], tmp_path / "two", min_size=SMALL, workers=2, progress=False)
    assert [(r.id, r.status, r.reason) for r in one.rows] == [(r.id, r.status, r.reason) for r in two.rows]
    assert npy_files(tmp_path / "one") == npy_files(tmp_path / "two") and len(npy_files(tmp_path / "one")) == 4
    for name in npy_files(tmp_path / "one"):
        assert (tmp_path / "one" / "volumes" / name).read_bytes() == (
            tmp_path / "two" / "volumes" / name
        ).read_bytes()
    strip = lambda vols: [{k: v for k, v in e.items() if k != "seconds"} for e in vols]  # noqa: E731
    assert strip(read_manifest(tmp_path / "one")["volumes"]) == strip(read_manifest(tmp_path / "two")["volumes"])


def _crash_on_request(task):
    """Worker function for the pool-crash test (imported by name in the spawned workers)."""
    if task[1] == "crash":
        os._exit(3)
    return {"status": "prepared", "value": task[1] * 2}


def test_a_crashing_worker_is_pinned_and_the_rest_complete():
    tasks = [(0, 1), (1, 2), (2, "crash"), (3, 4), (4, 5), (5, 6)]
    results = {}
    _run_tasks(tasks, 2, lambda i, r: results.__setitem__(i, r), fn=_crash_on_request)
    assert sorted(results) == [0, 1, 2, 3, 4, 5]
    assert results[2]["status"] == "skipped" and "worker process died" in results[2]["reason"]
    assert [results[i]["value"] for i in (0, 1, 3, 4, 5)] == [2, 4, 8, 10, 12]


def test_interrupt_leaves_no_partial_file_and_a_valid_manifest(tmp_path, monkeypatch):
    src = tmp_path / "src"
    for name in ("a", "b", "c"):
        grid_nifti(src / f"{name}.nii.gz")
    cache = tmp_path / "cache"
    real_write = np.lib.format.write_array
    calls = []

    def write_then_interrupt(fp, array, **kw):
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C half-way through writing the second volume
            fp.write(b"\x93NUMPY partial")
            raise KeyboardInterrupt
        return real_write(fp, array, **kw)

    monkeypatch.setattr(np.lib.format, "write_array", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare([src], cache, min_size=SMALL, progress=False)
    monkeypatch.setattr(np.lib.format, "write_array", real_write)
    assert len(npy_files(cache)) == 1 and npy_files(cache)[0].startswith("a-")  # no partial or temporary file
    assert [os.path.basename(e["source"]) for e in read_manifest(cache)["volumes"]] == ["a.nii.gz"]
    report = prepare([src], cache, min_size=SMALL, progress=False)
    assert [r.status for r in report.rows] == ["cached", "prepared", "prepared"]


def test_format_table_is_fixed_width():
    report = PrepareReport(
        out="/c",
        settings={},
        rows=[
            VolumeRow("/d/a.nii.gz", "prepared", "a.nii.gz", "a-1", [90, 80, 70], [180, 160, 47], [1.0, 1.0, 3.0]),
            VolumeRow(
                "/d/a_much_longer_name.nrrd",
                "cached",
                "a_much_longer_name.nrrd",
                "b-1",
                [9, 8, 7],
                [9, 8, 7],
                [2.0, 2.0, 2.0],
            ),
            VolumeRow(
                "/d/bad.nii.gz", "skipped", "bad.nii.gz", reason="truncated file (compressed data ends early)"
            ),
        ],
    )
    lines = report.format_table().splitlines()
    assert lines[1] == "a.nii.gz                 prepared  180x160x47 @ 1x1x3 mm -> 90x80x70"
    assert lines[3] == "bad.nii.gz               skipped   truncated file (compressed data ends early)"
    starts = {line.index(status) for line, status in zip(lines[1:4], ["prepared", "cached", "skipped"])}
    assert starts == {lines[0].index("status")}
    assert lines[-1] == "1 prepared, 1 cached, 1 skipped -> /c"


# ----------------------------------------------------------------------------------------------------------
# Command line


def test_cli_exit_codes_and_one_line_errors(tmp_path, capsys):
    good = grid_nifti(tmp_path / "good.nii.gz")
    bad = make_bad_input("four_d", tmp_path)
    cache = str(tmp_path / "cache")
    assert main(["data", "prepare", good, bad, "--out", cache, "--min-size", "8", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "series4d.nii.gz" in out and "4D image" in out and "good.nii.gz" not in out  # --quiet: skipped only
    assert out.strip().splitlines()[-1] == f"1 prepared, 0 cached, 1 skipped -> {cache}"
    assert main(["data", "prepare", good, bad, "--out", cache, "--min-size", "8", "--quiet", "--strict"]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("dagman: error: 1 of 2 input(s) skipped (--strict")
    assert main(["data", "prepare", good, "--out", cache, "--min-size", "8", "--spacing", "3", "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["data", "prepare", good, "--out", cache, "--hu-window", "10", "-10"]) == 2
    assert "--hu-window" in capsys.readouterr().err


def test_cli_subprocess_prints_table_and_fails_cleanly(tmp_path):
    good = grid_nifti(tmp_path / "good.nii.gz")
    bad = make_bad_input("truncated_gz", tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "dagman", "data", "prepare"]
    ok = subprocess.run(
        cmd + [good, bad, "--out", str(tmp_path / "c1"), "--min-size", "8"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
    assert "good.nii.gz" in ok.stdout and "prepared" in ok.stdout
    assert "truncated.nii.gz" in ok.stdout and "truncated file (compressed data ends early)" in ok.stdout
    assert ok.stdout.strip().splitlines()[-1] == f"1 prepared, 0 cached, 1 skipped -> {tmp_path / 'c1'}"
    fail = subprocess.run(cmd + [bad, "--out", str(tmp_path / "c2")], capture_output=True, text=True, env=env)
    assert fail.returncode == 2
    assert "Traceback" not in fail.stderr
    errors = [line for line in fail.stderr.splitlines() if line.startswith("dagman: error:")]
    assert len(errors) == 1 and "no usable CT volume" in errors[0] and "truncated file" in errors[0]
    help_text = subprocess.run(cmd + ["--help"], capture_output=True, text=True, env=env).stdout
    assert "CACHE/volumes/<id>.npy" in help_text and "--hu-window" in help_text

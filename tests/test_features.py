"""dagman features (dagman.tasks.features): tables of images and points / voxels / masks -> one feature row each."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dagman.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_io import write_dicom_series  # noqa: E402

SHAPE = (40, 36, 26)  # columns, rows, slices of the DICOM series
PIXEL = (2.0, 2.0)  # (between rows, between columns) mm
SLICE = 3.0
ORIGIN = np.array([-30.0, -20.0, -40.0])  # LPS of the first voxel


def _hu(lps: np.ndarray) -> np.ndarray:
    """Structured HU: soft tissue with a bright sphere, a dark one and gradients along every axis."""
    p = np.asarray(lps, float)
    c1, c2 = np.array([10.0, 15.0, -5.0]), np.array([35.0, 40.0, 20.0])
    hu = 40.0 + 3.0 * p[..., 0] - 2.0 * p[..., 1] + 4.0 * p[..., 2]
    hu = np.where(np.linalg.norm(p - c1, axis=-1) < 12.0, 900.0, hu)
    return np.where(np.linalg.norm(p - c2, axis=-1) < 9.0, -700.0, hu)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The same CT as a DICOM series and as a NIfTI whose voxel order is another (axes permuted, one flipped),
    plus a lesion mask (NIfTI, on the NIfTI's grid) around the bright sphere."""
    from dagman.data.io import read_ct

    root = tmp_path_factory.mktemp("feat")
    write_dicom_series(root / "dcm", SHAPE, pixel_spacing=PIXEL, origin=ORIGIN, slice_step=(0, 0, SLICE),
                       values=_hu, slope=1.0, intercept=-1024.0)
    vol = read_ct(root / "dcm")
    # the stored DICOM grid (columns, rows, slices; voxel -> RAS) re-ordered: (slices, columns reversed, rows)
    src = vol.to_source_grid(vol.array)
    affine = vol.source_affine.copy()
    perm = (2, 0, 1)
    arr = np.transpose(src, perm)[:, ::-1, :]
    aff = affine[:, list(perm) + [3]]
    n1 = arr.shape[1]
    aff[:3, 3] = aff[:3, 3] + aff[:3, 1] * (n1 - 1)
    aff[:3, 1] = -aff[:3, 1]
    nii = root / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(arr).astype(np.float32), aff), str(nii))
    # lesion mask on the NIfTI grid: voxels whose LPS lies within 10 mm of the bright sphere's centre
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in arr.shape], indexing="ij"), -1).astype(float)
    ras = idx @ aff[:3, :3].T + aff[:3, 3]
    lps = ras * np.array([-1.0, -1.0, 1.0])
    lesion = (np.linalg.norm(lps - np.array([10.0, 15.0, -5.0]), axis=-1) < 10.0).astype(np.uint8) * 3
    mask = root / "mask.nii.gz"
    nib.save(nib.Nifti1Image(lesion, aff), str(mask))
    return {"root": root, "dcm": root / "dcm", "nii": nii, "mask": mask, "perm": perm, "n1": n1}


def _write(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _read(out: Path) -> tuple[list[dict], np.ndarray]:
    with open(out / "features.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return rows, np.load(out / "features.npz")["features"]


def test_same_lps_point_same_features_from_dicom_and_reordered_nifti(images, tmp_path, capsys):
    """FMCIB's columns (image_path, coordX/Y/Z in LPS mm): the DICOM series and the NIfTI with another voxel
    order give the same features at the same points (<= 1e-4); --space ras with the signs flipped is the same."""
    pts = [(10.0, 15.0, -5.0), (0.0, 30.0, 10.0), (25.5, 5.0, 12.0)]
    rows = [[str(images[k]), *p] for p in pts for k in ("dcm", "nii")]
    table = _write(tmp_path / "fmcib.csv", ["image_path", "coordX", "coordY", "coordZ"], rows)
    assert main(["features", "--checkpoint", "none", "--size", "tiny", "--table", str(table), "--out",
                 str(tmp_path / "o"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "6 rows, 6 with features" in printed
    out_rows, f = _read(tmp_path / "o")
    assert [r["coordX"] for r in out_rows] == [str(p[0]) for p in pts for _ in range(2)]  # input kept, in order
    assert all(r["error"] == "" for r in out_rows)
    assert np.isfinite(f).all()
    for i in range(0, 6, 2):
        assert np.abs(f[i] - f[i + 1]).max() <= 1e-4
    assert np.abs(f[0] - f[2]).max() > 1e-3  # different points, different features
    # RAS: (-x, -y, z) names the same point
    ras = _write(tmp_path / "ras.csv", ["image", "x", "y", "z"], [[str(images["nii"]), -p[0], -p[1], p[2]] for p in pts])
    assert main(["features", "--checkpoint", "none", "--size", "tiny", "--table", str(ras), "--space", "ras",
                 "--out", str(tmp_path / "r"), "--quiet"]) == 0
    _, g = _read(tmp_path / "r")
    np.testing.assert_allclose(g, f[1::2], atol=1e-5)


def test_voxel_of_each_files_own_grid_names_the_same_place(images, tmp_path):
    """i,j,k index the file's own grid: DICOM (column, row, slice) and the reordered NIfTI's index of the same
    voxel give the same features; the same voxel given as an LPS point too."""
    c, r, s = 12, 20, 9
    # the NIfTI's index of DICOM voxel (c, r, s): axes (slice, column reversed... of the permuted grid)
    src = np.array([c, r, s])
    nii_idx = src[list(images["perm"])]
    nii_idx[1] = images["n1"] - 1 - nii_idx[1]
    lps = ORIGIN + np.array([c * PIXEL[1], r * PIXEL[0], s * SLICE])
    table = _write(tmp_path / "vox.csv", ["image", "i", "j", "k", "x", "y", "z"], [
        [str(images["dcm"]), c, r, s, "", "", ""],
        [str(images["nii"]), *nii_idx, "", "", ""],
        [str(images["nii"]), "", "", "", *lps]])
    assert main(["features", "--checkpoint", "none", "--table", str(table), "--out", str(tmp_path / "o"),
                 "--quiet"]) == 0
    _, f = _read(tmp_path / "o")
    assert np.abs(f[0] - f[1]).max() <= 1e-4
    assert np.abs(f[1] - f[2]).max() <= 1e-4


def test_mask_rows_centroid_label_and_masked_pool(images, tmp_path):
    """A mask row is cropped at the mask's centroid (= the point row there); --pool masked weighs the last
    stage's tokens by the mask's share in each and differs from the plain mean."""
    import torch

    from dagman.data.labels import read_label_map
    from dagman.tasks.encoder import build_task_encoder
    from dagman.tasks.features import compute_features, read_feature_table

    values, aff, _ = read_label_map(images["mask"])
    centroid_ras = (aff @ np.r_[np.argwhere(values == 3).mean(0), 1.0])[:3]
    lps = centroid_ras * np.array([-1.0, -1.0, 1.0])
    table = _write(tmp_path / "m.csv", ["image", "mask", "label", "x", "y", "z"], [
        [str(images["nii"]), str(images["mask"]), 3, "", "", ""],
        [str(images["nii"]), str(images["mask"]), "", "", "", ""],
        [str(images["nii"]), "", "", *lps]])
    torch.manual_seed(0)
    enc = build_task_encoder("none", size="tiny")
    parsed = read_feature_table(table)
    res = compute_features(enc, parsed, pool="mean", progress=False)
    assert res.errors == [None, None, None]
    assert np.abs(res.features[0] - res.features[2]).max() <= 1e-5
    np.testing.assert_allclose(res.features[0], res.features[1], atol=1e-6)  # label 3 == every non-zero voxel
    # --pool masked: the stage-2 map of a 32^3 crop (4^3 tokens), weighted by each token's share of the mask; the
    # mask is a sphere, but the crop is centred on it, so compare against the weighting computed here
    from dagman.tasks.encoder import fit_to_size
    from dagman.tasks.features import _prepare_image, masked_stage

    masked = compute_features(enc, read_feature_table(_write(tmp_path / "mm.csv", ["image", "mask"], [
        [str(images["nii"]), str(images["mask"])]])), pool="masked", progress=False)
    assert masked.errors == [None] and masked_stage(32, 2) == 2 and masked.features.shape == (1, 48)
    assert masked.feature_source == "mask-weighted mean of the tokens of map 2"
    prep = _prepare_image(images["nii"], 2.0, enc.source.cfg.data.hu_window)
    from dagman.data.labels import resample_labels_nearest

    on_grid = resample_labels_nearest((values > 0).astype(np.uint8), aff, prep.affine, prep.x.shape).astype(np.float32)
    centre = (np.linalg.inv(prep.affine) @ np.r_[centroid_ras, 1.0])[:3]
    x = torch.from_numpy(fit_to_size(prep.x, (32,) * 3, centre))[None, None]
    m = torch.from_numpy(fit_to_size(on_grid, (32,) * 3, centre))
    with torch.no_grad():
        stage2 = enc.backbone.forward_features(x).maps[2][0]  # (48, 4, 4, 4)
    w = m.reshape(4, 8, 4, 8, 4, 8).mean(dim=(1, 3, 5))  # share of each 8^3 token inside the mask
    assert float(w.min()) < float(w.max()) and float(w.sum()) > 0  # the weights differ: not a plain mean
    expected = (stage2 * w).sum(dim=(1, 2, 3)) / w.sum()
    np.testing.assert_allclose(masked.features[0], expected.numpy(), atol=1e-5)
    assert np.abs(masked.features[0] - stage2.mean(dim=(1, 2, 3)).numpy()).max() > 1e-4
    # an empty label, a missing mask: row errors naming the file
    bad = compute_features(enc, read_feature_table(_write(tmp_path / "b.csv", ["image", "mask", "label"], [
        [str(images["nii"]), str(images["mask"]), 7], [str(images["nii"]), str(tmp_path / "no.nii.gz"), ""]])),
        progress=False)
    assert "empty mask (no voxel with label 7)" in bad.errors[0] and "no such mask" in bad.errors[1]
    assert np.isnan(bad.features).all()


def test_bad_rows_are_reported_and_the_rest_go_on_strict_stops(images, tmp_path, capsys, monkeypatch):
    """A point outside the image, a missing file, a cell that is not a number: one line each naming the row,
    an `error` column, exit 0; the image is read once for its rows; --strict: exit 2, nothing written."""
    import dagman.data.io as io

    calls = []
    real = io.read_ct
    monkeypatch.setattr(io, "read_ct", lambda p, **kw: calls.append(str(p)) or real(p, **kw))
    table = _write(tmp_path / "bad.csv", ["image_path", "coordX", "coordY", "coordZ", "note"], [
        [str(images["nii"]), 10, 15, -5, "good"],
        [str(images["nii"]), 5000, 0, 0, "outside"],
        [str(tmp_path / "missing.nii.gz"), 1, 2, 3, "missing"],
        [str(images["nii"]), "abc", 0, 0, "nan"],
        [str(images["nii"]), 0, 30, 10, "good"]])
    out = tmp_path / "o"
    assert main(["features", "--checkpoint", "none", "--table", str(table), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "row 2: point (5000, 0, 0) mm LPS is outside the image" in err
    assert f"row 3: {tmp_path / 'missing.nii.gz'}: no such image" in err
    assert "row 4: coordX is not a number ('abc')" in err
    assert "Traceback" not in err
    assert calls.count(str(images["nii"])) == 1
    rows, f = _read(out)
    assert [r["note"] for r in rows] == ["good", "outside", "missing", "nan", "good"]
    assert [bool(r["error"]) for r in rows] == [False, True, True, True, False]
    assert np.isfinite(f[[0, 4]]).all() and np.isnan(f[[1, 2, 3]]).all()
    strict = tmp_path / "s"
    assert main(["features", "--checkpoint", "none", "--table", str(table), "--out", str(strict), "--strict",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("dagman: error:") and "row 4" in err and "Traceback" not in err
    assert not (strict / "features.csv").exists()


@pytest.mark.parametrize("header, message", [
    (["path", "x", "y", "z"], "no image column"),
    (["image", "a", "b"], "no place columns"),
    (["image", "x", "y", "z", "error"], "already has an 'error'"),
])
def test_table_level_errors_are_one_line(images, tmp_path, capsys, header, message):
    table = _write(tmp_path / "t.csv", header, [[str(images["nii"]), 1, 2, 3, ""][:len(header)]])
    assert main(["features", "--checkpoint", "none", "--table", str(table), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dagman: error:") and message in err and len(err.splitlines()) == 1
    assert main(["features", "--checkpoint", "none", "--table", str(tmp_path / "nope.csv"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "no such table" in capsys.readouterr().err


def test_pretrained_features_differ_from_random_init(images, tmp_path):
    from dagman.data.views import make_synthetic_cache

    cache = make_synthetic_cache(tmp_path / "cache", n_volumes=2, shape=(64, 64, 64))
    run = tmp_path / "run"
    assert main(["pretrain", "--size", "tiny", "--method", "dagman", "--data", str(cache), "--out", str(run),
                 "--steps", "2", "data.num_workers=0", "data.batch_size=1"]) == 0
    table = _write(tmp_path / "p.csv", ["image", "x", "y", "z"], [[str(images["nii"]), 10, 15, -5]])
    for name, ckpt in (("r", "none"), ("p", str(run)), ("e", str(run / "encoder.safetensors"))):
        assert main(["features", "--checkpoint", ckpt, "--table", str(table), "--out", str(tmp_path / name),
                     "--quiet"]) == 0
    r, p, e = (np.load(tmp_path / n / "features.npz") for n in "rpe")
    # the run folder and its exported encoder give the same feature: the mean of the teacher backbone's last tokens
    assert str(p["feature_source"]).startswith("mean") and str(e["feature_source"]).startswith("mean")
    np.testing.assert_allclose(p["features"], e["features"], rtol=1e-5, atol=1e-6)
    assert r["features"].shape == (1, 192) and np.abs(r["features"] - e["features"]).max() > 1e-3
    assert float(p["spacing_mm"]) == 2.0 and int(p["crop_size"]) == 32

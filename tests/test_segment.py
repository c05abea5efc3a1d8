"""`dagman segment` (dagman.tasks.segment): a sanity fit on training data, predictions in the source geometry,
strict encoder loading, MSD json / CSV inputs, sliding-window stitching, and one-line CLI errors.

All images here are SYNTHETIC (a body ellipsoid in air with a bright sphere or blob labelled as foreground)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dagman.cli import main as cli_main
from dagman.errors import DagmanError, DataError
from dagman.tasks import segment as seg
from dagman.tasks.encoder import open_encoder
from dagman.tasks.metrics import dice_score

HU_WINDOW = (-750.0, 1750.0)


# ------------------------------------------------------------------------------------------------ helpers


def synthetic_ct(shape=(48, 48, 48), seed=0, radius=10.0, sphere_hu=800.0, centre=None):
    """SYNTHETIC CT (HU, int16-representable) and its sphere mask: soft-tissue ellipsoid in air, bright sphere."""
    rng = np.random.default_rng(seed)
    g = np.indices(shape).astype(np.float32)
    c = np.array(shape, np.float32)[:, None, None, None] / 2
    half = np.array(shape, np.float32)[:, None, None, None] * 0.42
    body = (((g - c) / half) ** 2).sum(0) < 1
    img = np.where(body, 20.0, -1000.0)
    sc = (np.array(shape) / 2 + rng.integers(-4, 5, 3)) if centre is None else np.asarray(centre, np.float32)
    sphere = ((g - sc[:, None, None, None]) ** 2).sum(0) < radius**2
    img[sphere] = sphere_hu
    img += rng.normal(0, 25, shape)
    return img.astype(np.int16), sphere.astype(np.uint8)


def save_nifti(path: Path, array, affine) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.asarray(affine, np.float64)), str(path))
    return path


def msd_folder(root: Path, n: int, shape=(40, 40, 40), spacing=2.0, radius=7.0, labels=None, test=()) -> Path:
    """An MSD-layout task: imagesTr/, labelsTr/, dataset.json (relative './' paths like the real ones)."""
    aff = np.diag([spacing, spacing, spacing, 1.0])
    training = []
    for i in range(n):
        img, lab = synthetic_ct(shape, seed=i, radius=radius)
        save_nifti(root / "imagesTr" / f"case_{i:03d}.nii.gz", img, aff)
        save_nifti(root / "labelsTr" / f"case_{i:03d}.nii.gz", lab, aff)
        training.append({"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"})
    doc = {"name": "SYNTHETIC", "labels": labels or {"0": "background", "1": "tumour"}, "numTraining": n,
           "training": training, "test": list(test)}
    (root / "dataset.json").write_text(json.dumps(doc))
    return root / "dataset.json"


def run_cli(args, capsys):
    rc = cli_main(["segment", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *needles):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("dagman: error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


# ------------------------------------------------------------------------------- sanity (training data)


@pytest.fixture(scope="module")
def sanity_run(tmp_path_factory):
    """ONE synthetic 48^3 case (2 mm) with a bright sphere labelled 1; tiny random-init SwinUNETR, 24 steps."""
    root = tmp_path_factory.mktemp("sanity")
    data = msd_folder(root, 1, shape=(48, 48, 48), radius=10.0)
    out = root / "out"
    rc = cli_main(["segment", "--data", str(data), "--checkpoint", "none", "--size", "tiny", "--out", str(out),
                   "--steps", "24", "--lr", "1e-2", "--batch-size", "1", "--val-fraction", "0", "--eval-train"])
    assert rc == 0
    return root, out


def test_sanity_on_training_data_tiny_model_fits_one_case_to_dice_above_0_8(sanity_run, capsys):
    root, out = sanity_run
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["splits"]) == ["train"]  # no held-out case: only the training-data sanity check
    train = m["splits"]["train"]
    assert train["title"] == "training (sanity check)" and train["n_cases"] == 1
    dice = train["cases"][0]["per_class"]["1"]["dice"]
    assert dice > 0.8, dice
    assert train["summary"]["1"]["dice_mean"] == pytest.approx(dice)
    assert m["training"]["steps"] == 24 and m["training"]["last_loss"] < m["training"]["first_loss"]
    assert m["encoder"]["kind"] == "none" and m["classes"] == {"1": {"value": 1, "name": "tumour"}}
    assert m["settings"]["train_cases"] == ["case_000"] and m["settings"]["held_out_cases"] == []
    assert (out / "model.safetensors").is_file()


def test_saved_model_predicts_later_in_source_geometry(sanity_run, tmp_path, capsys):
    root, out = sanity_run
    # the training image stored with its first two axes reversed (LPS instead of RAS): the prediction must come
    # back in that stored grid
    img = nib.load(str(root / "imagesTr" / "case_000.nii.gz"))
    lab = np.asarray(nib.load(str(root / "labelsTr" / "case_000.nii.gz")).dataobj)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    aff = img.affine @ flip
    aff[:3, 3] = img.affine[:3, :3] @ np.array([47, 47, 0]) + img.affine[:3, 3]
    src = save_nifti(tmp_path / "lps" / "flipped.nii.gz", np.asarray(img.dataobj)[::-1, ::-1], aff)
    rc, stdout, err = run_cli(["--model", out / "model.safetensors", "--predict", src, "--out", tmp_path / "p"],
                              capsys)
    assert rc == 0, err
    pred_path = tmp_path / "p" / "predictions" / "flipped.nii.gz"
    assert "1 prediction(s)" in stdout and pred_path.is_file()
    pred = nib.load(str(pred_path))
    assert pred.shape == (48, 48, 48) and np.array_equal(pred.affine, nib.load(str(src)).affine)
    assert dice_score(np.asarray(pred.dataobj) == 1, lab[::-1, ::-1] == 1) > 0.8


# ------------------------------------------------------------------------------------------ geometry


def _odd_lps_case(tmp_path: Path):
    """A non-RAS source: voxel axes (i, j, k) -> (P, L, S) with 1.1 x 1.5 x 3.0 mm voxels, odd shape."""
    shape = (45, 37, 23)
    aff = np.array([[0.0, -1.5, 0.0, 40.0],
                    [-1.1, 0.0, 0.0, 25.0],
                    [0.0, 0.0, 3.0, -30.0],
                    [0.0, 0.0, 0.0, 1.0]])
    g = np.indices(shape).astype(np.float32)
    mm = np.array([1.1, 1.5, 3.0])[:, None, None, None]
    centre = np.array([28.0, 15.0, 9.0])[:, None, None, None]
    blob = ((((g - centre) * mm) / np.array([14.0, 10.0, 12.0])[:, None, None, None]) ** 2).sum(0) < 1
    img = np.where(blob, 300.0, 30.0) + np.random.default_rng(0).normal(0, 10, shape)
    image = save_nifti(tmp_path / "odd" / "ct.nii.gz", img.astype(np.int16), aff)
    label = save_nifti(tmp_path / "odd" / "ct_label.nii.gz", blob.astype(np.uint8), aff)
    return image, label, blob, aff


def test_identity_prediction_returns_to_the_exact_source_grid(tmp_path):
    image, label, blob, aff = _odd_lps_case(tmp_path)
    assert "".join(nib.aff2axcodes(aff)) == "PLS"
    pc = seg.prepare_case(image, label, spacing=2.0, hu_window=HU_WINDOW)
    assert pc.image.shape == pc.labels.shape == pc.geometry.iso_shape
    assert np.allclose(np.linalg.norm(pc.geometry.iso_affine[:3, :3], axis=0), 2.0)
    # the label landed on the image's isotropic grid: it matches the bright blob of the resampled image
    bright = pc.image > (0.5 * (300 + 30) + 750) / 2500
    assert dice_score(pc.labels == 1, bright) > 0.9
    spec = seg.label_spec({0: "background", 1: "blob"})
    pc.to_classes(spec)
    # identity "model": the prediction is the resampled ground truth
    back = seg.to_source_labels(pc.labels, pc.geometry, spec)
    out = seg.write_label_map(tmp_path / "pred" / "ct.nii.gz", back, pc.geometry)
    written, source = nib.load(str(out)), nib.load(str(image))
    assert written.shape == source.shape == (45, 37, 23)
    assert np.array_equal(written.affine, source.affine)
    assert int(written.header["sform_code"]) == int(source.header["sform_code"])
    assert written.get_data_dtype() == np.uint8 and written.header.get_slope_inter() in ((1.0, 0.0), (None, None))
    got = np.asarray(written.dataobj)
    assert set(np.unique(got)) == {0, 1}
    assert dice_score(got == 1, blob) > 0.9


def test_nrrd_source_prediction_has_the_source_geometry(tmp_path):
    # SimpleITK writes LPS; the NIfTI prediction must carry the same world geometry (RAS affine of the file)
    img, lab = synthetic_ct((33, 41, 19), seed=1, radius=6, centre=(16, 20, 9))
    def to_itk(a):
        im = sitk.GetImageFromArray(np.ascontiguousarray(a.transpose(2, 1, 0)))
        im.SetSpacing((1.3, 0.9, 2.5))
        im.SetOrigin((-20.0, 15.0, 7.0))
        return im
    (tmp_path / "n").mkdir()
    sitk.WriteImage(to_itk(img), str(tmp_path / "n" / "ct.nrrd"))
    sitk.WriteImage(to_itk(lab), str(tmp_path / "n" / "ct_seg.nrrd"))
    pc = seg.prepare_case(tmp_path / "n" / "ct.nrrd", tmp_path / "n" / "ct_seg.nrrd", 2.0, HU_WINDOW)
    spec = seg.label_spec(None, labels="1")
    pc.to_classes(spec)
    out = seg.write_label_map(tmp_path / "ct.nii.gz", seg.to_source_labels(pc.labels, pc.geometry, spec), pc.geometry)
    written = nib.load(str(out))
    expected = np.diag([-1.3, -0.9, 2.5, 1.0])
    expected[:3, 3] = (20.0, -15.0, 7.0)  # LPS origin -> RAS
    assert written.shape == (33, 41, 19)
    np.testing.assert_allclose(written.affine, expected, atol=1e-5)
    assert dice_score(np.asarray(written.dataobj) == 1, lab == 1) > 0.9


def test_sliding_window_stitches_a_volume_larger_than_the_roi():
    rng = np.random.default_rng(0)
    image = (rng.random((100, 70, 75)) > 0.6).astype(np.float32)

    def threshold_model(x):  # logits (B, 2, ...) whose argmax is x > 0.5
        return torch.cat([0.5 - x, x - 0.5], dim=1)

    pred = seg.predict_volume(threshold_model, image, roi=64, sw_batch_size=3)
    assert pred.shape == image.shape and pred.dtype == np.uint8
    assert np.array_equal(pred, (image > 0.5).astype(np.uint8))


def _case_with_cube(shape, lo, hi):
    labels = np.zeros(shape, np.uint8)
    labels[tuple(slice(a, b) for a, b in zip(lo, hi))] = 1
    geometry = seg.SourceGeometry(Path("x"), shape, np.eye(4), np.array([[0, 1], [1, 1], [2, 1]]), shape, np.eye(4),
                                  shape, np.eye(4))
    return seg.PreparedCase("cube", labels.astype(np.float32) * 0.9, labels, geometry, is_classes=True)


def test_train_model_skips_non_finite_loss_and_gradient_steps_and_keeps_finite_weights():
    class Poisoned(torch.nn.Module):  # call 1: NaN output (non-finite loss); call 2: NaN gradient, finite loss
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            out = self.conv(x)
            if self.calls == 1:
                return out * float("nan")
            if self.calls == 2:
                w = self.conv.weight
                return out + 0.0 * torch.sqrt(w - w.detach()).sum()
            return out

    case = _case_with_cube((40, 40, 40), (10, 10, 10), (20, 20, 20))
    model = Poisoned()
    log = seg.train_model(model, seg.PatchSampler([case], roi=32), steps=4, batch_size=1, progress=False)
    assert log.skipped == 2 and len(log.losses) == 4
    assert np.isnan(log.losses[0]) and np.isnan(log.losses[1]) and np.isfinite(log.losses[2:]).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_patch_sampler_balances_foreground_crops_and_pads_small_volumes():
    case = _case_with_cube((130, 110, 100), (100, 10, 80), (106, 16, 86))  # 6^3 cube near a corner
    rng = np.random.default_rng(0)
    always = seg.PatchSampler([case], roi=64, pos_fraction=1.0)
    x, y = always.batch([0] * 8, rng)
    assert x.shape == y.shape == (8, 1, 64, 64, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert all(int(y[i].sum()) == 216 for i in range(8))  # the whole cube in every foreground crop
    assert torch.equal((x > 0.5).long(), y)  # image and labels cropped and flipped together
    half = seg.PatchSampler([case], roi=64, pos_fraction=0.5)
    hits = np.mean([half.sample(0, rng)[1].any() for _ in range(200)])
    assert 0.45 < hits < 0.8  # half on foreground + the random crops that happen to catch the cube
    small = seg.PatchSampler([_case_with_cube((40, 50, 30), (5, 5, 5), (9, 9, 9))], roi=64)
    img, lab = small.sample(0, rng)
    assert img.shape == lab.shape == (64, 64, 64) and int(lab.sum()) == 64  # zero-padded to the ROI


# -------------------------------------------------------------------------------------- encoder loading


def _tiny_encoder_file(path: Path, seed: int = 7) -> dict:
    from dagman.config import load_config, to_yaml
    from dagman.train.checkpoint import save_encoder_safetensors

    cfg = load_config("tiny", "smit")
    torch.manual_seed(seed)
    src = seg.build_model(open_encoder("none", "tiny"), 2)  # any tiny swinViT, then perturbed
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in src.swinViT.state_dict().items()}
    save_encoder_safetensors(path, state, {"config": to_yaml(cfg, comments=False), "method": "dagman", "step": 5})
    return state


def test_encoder_weights_are_really_loaded_and_the_decoder_is_random(tmp_path):
    state = _tiny_encoder_file(tmp_path / "encoder.safetensors")
    source = open_encoder(tmp_path / "encoder.safetensors")
    torch.manual_seed(0)
    net = seg.build_model(source, 3)
    loaded = net.swinViT.state_dict()
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    torch.manual_seed(0)
    random_net = seg.build_model(open_encoder("none", "tiny"), 3)
    random_state = random_net.swinViT.state_dict()
    assert not any(torch.equal(random_state[k], v) for k, v in state.items() if v.is_floating_point())
    # same seed -> same random decoder, whatever the encoder
    dec_a = {k: v for k, v in net.state_dict().items() if not k.startswith("swinViT.")}
    dec_b = {k: v for k, v in random_net.state_dict().items() if not k.startswith("swinViT.")}
    assert all(torch.equal(dec_a[k], dec_b[k]) for k in dec_a) and net.out.conv.conv.out_channels == 3
    frozen = seg.build_model(source, 2, freeze_encoder=True)
    assert not any(p.requires_grad for p in frozen.swinViT.parameters())
    assert all(p.requires_grad for n, p in frozen.named_parameters() if not n.startswith("swinViT."))


# ----------------------------------------------------------------------------------------- MSD and CSV


def test_msd_json_holds_out_cases_scores_labelled_test_and_writes_predictions(tmp_path, capsys):
    root = tmp_path / "Task99"
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    img, lab = synthetic_ct((40, 40, 40), seed=9, radius=7)
    save_nifti(root / "imagesTs" / "ts_labelled.nii.gz", img, aff)
    save_nifti(root / "labelsTs" / "ts_labelled.nii.gz", lab, aff)
    save_nifti(root / "imagesTs" / "ts_plain.nii.gz", img, aff)
    labelled = {"image": "./imagesTs/ts_labelled.nii.gz", "label": "./labelsTs/ts_labelled.nii.gz"}
    data = msd_folder(root, 3, test=[labelled, "./imagesTs/ts_plain.nii.gz"])
    ds = seg.read_dataset(data)
    assert ds.kind == "msd" and [c.name for c in ds.training] == ["case_000", "case_001", "case_002"]
    assert [c.name for c in ds.test] == ["ts_labelled"] and [p.name for p in ds.unlabelled] == ["ts_plain.nii.gz"]
    assert ds.declared == {0: "background", 1: "tumour"}
    out = tmp_path / "out"
    rc, stdout, err = run_cli(["--data", data, "--checkpoint", "none", "--out", out, "--steps", "2",
                               "--batch-size", "1", "--val-fraction", "0.34", "--seed", "1"], capsys)
    assert rc == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["splits"]) == {"held_out", "test"}
    held = m["splits"]["held_out"]
    assert held["n_cases"] == 1 and len(m["settings"]["train_cases"]) == 2
    assert held["cases"][0]["name"] not in m["settings"]["train_cases"]
    assert m["splits"]["test"]["cases"][0]["name"] == "ts_labelled"
    for split in m["splits"].values():
        for row in split["cases"]:
            d = row["per_class"]["1"]["dice"]
            assert 0.0 <= d <= 1.0
            pred = nib.load(row["prediction"])
            assert pred.shape == (40, 40, 40) and np.array_equal(pred.affine, aff)
    assert m["settings"]["unlabelled_test_images"] == 1
    assert "held-out" in stdout and "dagman segment: mean Dice" in stdout
    assert stdout.strip().splitlines()[-1].endswith(f"(class 1 tumour) on 1 held-out case -> {out / 'metrics.json'}")


def test_csv_with_label_subset_and_few_shot_fraction(tmp_path, capsys):
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    rows = ["image,label,patient"]
    for i in range(4):
        img, lab = synthetic_ct((40, 40, 40), seed=20 + i, radius=7)
        save_nifti(tmp_path / "img" / f"p{i}.nii.gz", img, aff)
        save_nifti(tmp_path / "lab" / f"p{i}.nii.gz", lab * 2, aff)  # tumour stored as value 2
        rows.append(f"img/p{i}.nii.gz,lab/p{i}.nii.gz,P{i}")
    (tmp_path / "cases.csv").write_text("\n".join(rows) + "\n")
    ds = seg.read_dataset(tmp_path / "cases.csv")
    assert ds.kind == "csv" and len(ds.training) == 4 and ds.declared is None
    out = tmp_path / "out"
    rc, stdout, err = run_cli(["--data", tmp_path / "cases.csv", "--checkpoint", "none", "--out", out,
                               "--labels", "2", "--steps", "1", "--batch-size", "1", "--val-fraction", "0.25",
                               "--fraction", "0.5"], capsys)
    assert rc == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["classes"] == {"1": {"value": 2, "name": ""}}
    assert len(m["settings"]["train_cases"]) == 2 and len(m["settings"]["held_out_cases"]) == 1  # 0.5 of 3
    pred = np.asarray(nib.load(m["splits"]["held_out"]["cases"][0]["prediction"]).dataobj)
    assert set(np.unique(pred)) <= {0, 2}  # written back as the label value, not the class index


def test_label_spec_and_split_rules():
    spec = seg.label_spec({0: "bg", 1: "pancreas", 2: "tumour"}, labels="2", source="dataset.json")
    assert spec.values == (2,) and spec.names == ("tumour",) and spec.num_classes == 2
    assert list(spec.lut()) == [0, 0, 1]  # pancreas counts as background
    assert seg.label_spec({0: "bg", 1: "a", 2: "b"}).values == (1, 2)
    assert seg.label_spec(None, num_classes=3).allowed == (0, 1, 2)
    assert seg.label_spec(None, observed=[0, 4]).values == (4,)
    with pytest.raises(DagmanError, match="not among the labels"):
        seg.label_spec({0: "bg", 1: "a"}, labels="3", source="dataset.json")
    train, held = seg.split_cases(10, 0.2, 0.5, seed=0)
    assert len(held) == 2 and len(train) == 4 and not set(train) & set(held)
    assert seg.split_cases(10, 0.2, 0.5, seed=0) == (train, held)  # seeded
    assert seg.split_cases(1, 0.2, 1.0, seed=0) == ([0], [])  # one case: nothing to hold out
    assert seg.split_cases(5, 0.2, 0.01, seed=3)[0].__len__() == 1  # at least one training case


# ---------------------------------------------------------------------------------------------- errors


@pytest.fixture()
def task(tmp_path):
    return msd_folder(tmp_path / "T", 2, shape=(32, 32, 32))


def _base(data, tmp_path):
    return ["--data", data, "--checkpoint", "none", "--out", tmp_path / "o", "--steps", "1"]


def _must_not_train(*args, **kwargs):
    raise AssertionError("input errors must be found before training starts")


# Each case is tried once as a training case and once as the held-out case (checked before training too).
@pytest.mark.parametrize("bad", ["case_000", "case_001"])
def test_error_image_label_shape_mismatch(task, tmp_path, capsys, monkeypatch, bad):
    monkeypatch.setattr(seg, "train_model", _must_not_train)
    save_nifti(task.parent / "labelsTr" / f"{bad}.nii.gz", np.zeros((32, 32, 30), np.uint8), np.eye(4))
    rc, _, err = run_cli(_base(task, tmp_path) + ["--val-fraction", "0.5"], capsys)
    assert_one_line_error(rc, err, f"case {bad}", "32x32x32", "32x32x30", "training[")


@pytest.mark.parametrize("bad", ["case_000", "case_001"])
def test_error_label_values_outside_declared_labels(task, tmp_path, capsys, monkeypatch, bad):
    monkeypatch.setattr(seg, "train_model", _must_not_train)
    lab = np.zeros((32, 32, 32), np.uint8)
    lab[10:20, 10:20, 10:20] = 3
    save_nifti(task.parent / "labelsTr" / f"{bad}.nii.gz", lab, np.diag([2.0, 2.0, 2.0, 1.0]))
    rc, _, err = run_cli(_base(task, tmp_path) + ["--val-fraction", "0.5"], capsys)
    assert_one_line_error(rc, err, f"{bad}.nii.gz", "label value(s) 3", "[0, 1]")


def test_error_missing_file(task, tmp_path, capsys):
    (task.parent / "imagesTr" / "case_001.nii.gz").unlink()
    rc, _, err = run_cli(_base(task, tmp_path), capsys)
    assert_one_line_error(rc, err, "dataset.json", "training[1]", "imagesTr/case_001.nii.gz", "no such file")
    rc, _, err = run_cli(_base(tmp_path / "nope.json", tmp_path), capsys)
    assert_one_line_error(rc, err, "nope.json", "no such data file")


def test_error_empty_training_list(tmp_path, capsys):
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "x"}, "training": []}))
    rc, _, err = run_cli(_base(tmp_path / "dataset.json", tmp_path), capsys)
    assert_one_line_error(rc, err, "dataset.json", "no training cases")
    (tmp_path / "empty.csv").write_text("image,label\n")
    rc, _, err = run_cli(_base(tmp_path / "empty.csv", tmp_path), capsys)
    assert_one_line_error(rc, err, "empty.csv", "no training cases")


def test_error_roi_not_a_multiple(task, tmp_path, capsys):
    rc, _, err = run_cli(_base(task, tmp_path) + ["--roi", "48"], capsys)
    assert_one_line_error(rc, err, "--roi 48", "multiple of 32")


def test_error_unknown_or_mismatched_checkpoint(task, tmp_path, capsys):
    weird = tmp_path / "weights.bin"
    weird.write_bytes(b"\x00" * 64)
    args = _base(task, tmp_path)
    args[3] = weird
    rc, _, err = run_cli(args, capsys)
    assert_one_line_error(rc, err, "weights.bin", "unknown checkpoint format")
    args[3] = tmp_path / "missing_run"
    rc, _, err = run_cli(args, capsys)
    assert_one_line_error(rc, err, "missing_run", "no such checkpoint")
    # an encoder file whose tensors do not fit the SwinUNETR encoder (a small-preset encoder read as tiny)
    from safetensors.torch import save_file

    save_file({"patch_embed.proj.weight": torch.zeros(24, 1, 2, 2, 2)}, str(tmp_path / "alien.safetensors"))
    args[3] = tmp_path / "alien.safetensors"
    rc, _, err = run_cli(args, capsys)
    assert_one_line_error(rc, err, "alien.safetensors", "do not match the SwinUNETR encoder")


def test_error_model_file_that_is_not_a_segmentation_model(tmp_path, capsys):
    _tiny_encoder_file(tmp_path / "encoder.safetensors")
    img, _ = synthetic_ct((32, 32, 32))
    ct = save_nifti(tmp_path / "ct.nii.gz", img, np.eye(4))
    rc, _, err = run_cli(["--model", tmp_path / "encoder.safetensors", "--predict", ct, "--out", tmp_path / "o"],
                         capsys)
    assert_one_line_error(rc, err, "encoder.safetensors", "not a dagman segmentation model")


def test_read_label_map_refuses_fractional_labels(tmp_path):
    path = save_nifti(tmp_path / "soft.nii.gz", np.full((4, 4, 4), 0.5, np.float32), np.eye(4))
    with pytest.raises(DataError, match="non-integer"):
        seg.read_label_map(path)


def test_loss_and_precision_choices():
    assert set(seg.LOSSES) == {"dicece", "dicece-batch"}
    with pytest.raises(DagmanError, match="^loss hinge: unknown"):
        seg.make_loss("hinge")
    with pytest.raises(DagmanError, match="^precision fp8: unknown"):
        seg.use_bf16("fp8", torch.device("cpu"))
    assert seg.use_bf16("bf16", torch.device("cpu")) and not seg.use_bf16("auto", torch.device("cpu"))
    assert seg.use_bf16("auto", torch.device("cuda")) and not seg.use_bf16("fp32", torch.device("cuda"))
    # the CLI spells the choices out (no torch import at --help); they must stay the library's
    import argparse

    from dagman.commands import segment as seg_cmd

    parser = argparse.ArgumentParser()
    seg_cmd.add_arguments(parser)
    choices = {a.dest: a.choices for a in parser._actions if a.dest in ("loss", "precision")}
    assert tuple(choices["loss"]) == tuple(seg.LOSSES) and tuple(choices["precision"]) == seg.PRECISIONS
    # two crops, one with a small foreground and one without: the per-crop loss counts the empty crop's
    # background Dice, the batch loss scores the foreground over the whole batch only
    y = torch.zeros(2, 1, 8, 8, 8)
    y[0, 0, 2:4, 2:4, 2:4] = 1
    onehot = torch.cat([1 - y, y], dim=1)
    perfect = 20.0 * (2 * onehot - 1)  # confident, correct logits
    assert float(seg.make_loss("dicece-batch")(perfect, y)) < 1e-3
    blank = torch.stack([torch.full_like(y[:, 0], 5.0), torch.zeros_like(y[:, 0])], dim=1)  # all background
    per_crop, batch = float(seg.make_loss("dicece")(blank, y)), float(seg.make_loss("dicece-batch")(blank, y))
    assert batch > per_crop and batch > 0.9  # missing the nodule costs the whole Dice term only in the batch loss


def test_lesion_crop_is_centred_on_the_lesion_in_the_nodule_geometry(tmp_path):
    img, lab = synthetic_ct((40, 40, 40), radius=5.0, centre=(14.0, 22.0, 19.0))
    aff = np.diag([1.5, 1.5, 2.0, 1.0])
    ct, lm = save_nifti(tmp_path / "ct.nii.gz", img, aff), save_nifti(tmp_path / "lab.nii.gz", lab * 3, aff)
    r = seg.lesion_crop(ct, lm, tmp_path / "img.nii.gz", tmp_path / "les.nii.gz", size=32, spacing=1.0)
    volume = float(lab.sum()) * 1.5 * 1.5 * 2.0
    assert r["inside_fraction"] == pytest.approx(1.0, abs=0.05)
    assert r["equivalent_diameter_mm"] == pytest.approx((6 * volume / np.pi) ** (1 / 3))
    out = nib.load(str(tmp_path / "les.nii.gz"))
    mask = np.asarray(out.dataobj)
    assert out.shape == (32, 32, 32) and np.allclose(np.abs(np.diag(out.affine)[:3]), 1.0)
    assert np.allclose(np.argwhere(mask).mean(0), 15.5, atol=0.6) and mask.sum() == r["voxels"]
    hu = np.asarray(nib.load(str(tmp_path / "img.nii.gz")).dataobj)
    assert hu.dtype == np.int16 and hu[mask > 0].mean() > 600  # the bright sphere sits under the mask
    with pytest.raises(DataError, match="no lesion voxel"):
        seg.lesion_crop(ct, lm, tmp_path / "a.nii.gz", tmp_path / "b.nii.gz", value=1)

"""`dagman attention` and `dagman diversity` on tiny runs pretrained in the test (SYNTHETIC cache, 2 steps)
and a small phantom CT written as NIfTI."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from matplotlib.image import imread

from dagman.cli import main as cli_main
from dagman.config import load_config, plan_steps
from dagman.data.phantom import chest_phantom
from dagman.data.views import make_synthetic_cache
from dagman.ssl.masking import attention_mask_counts, random_mask_count
from dagman.train.checkpoint import save_run_checkpoint
from dagman.train.distributed import DistInfo
from dagman.train.loop import build_state, checkpoint_state, pretrain
from dagman.train.schedules import Schedules

FIGURES = ("overview", "ct", "importance", "student_mask", "teacher_drop", "reconstruction")
# small heads and one volume per step keep the two tiny pretrainings to a few seconds
FAST = ["data.batch_size=1", "heads.num_prototypes=64", "heads.hidden_dim=32", "heads.bottleneck_dim=16"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("looking_inside")
    cache = make_synthetic_cache(root / "cache", 2, (70, 68, 66))  # SYNTHETIC volumes
    cfg = load_config("tiny", "dagman", overrides=[f"data.cache={cache}", "train.total_steps=2", *FAST])
    pretrain(cfg, root / "dagman", progress=False)
    # smit (no SA block): its step-0 checkpoint, written the way the trainer writes checkpoints
    cfg = load_config("tiny", "smit", overrides=[f"data.cache={cache}", *FAST])
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)
    state = build_state(cfg, info, Schedules.from_config(cfg, plan_steps(cfg, 2)))
    save_run_checkpoint(root / "smit", checkpoint_state(state), 0)
    runs = {"dagman": root / "dagman", "smit": root / "smit"}
    hu, _, affine = chest_phantom((72, 64, 56), (2.5, 2.5, 3.0), seed=2)  # procedural phantom, in HU
    image = root / "ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), str(image))
    return {"root": root, "cache": cache, "runs": runs, "image": image}


def _png(path):
    img = imread(str(path))
    assert img.ndim == 3 and img.shape[0] >= 150 and img.shape[1] >= 150, img.shape
    return img[..., :3]


def _red_fraction(img) -> float:
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return float(((r > g + 0.2) & (r > b + 0.2)).mean())


def test_attention_for_dagman_writes_figures_and_fractions(workspace, capsys):
    out = workspace["root"] / "att_dagman"
    rc = cli_main(["attention", "--checkpoint", str(workspace["runs"]["dagman"]), "--image", str(workspace["image"]),
                   "--out", str(out), "--seed", "3"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "dagman attention:" in captured.out and "S entropy " in captured.out
    assert "vs mean-of-visible predictor" in captured.out
    rep = json.loads((out / "attention.json").read_text())
    cfg = load_config("tiny", "dagman")
    assert rep["unit_grid"] == [4, 4, 4] and rep["mask_units"] == 64 and rep["unit_voxels"] == [16, 16, 16]
    top, _, hints = attention_mask_counts(64, cfg.mask.ratio, cfg.mask.hint_fraction)
    assert rep["student_mask"]["kind"] == "attention_hint"
    assert rep["student_mask"]["masked_units"] == top - hints == 41
    assert rep["student_mask"]["fraction"] == pytest.approx(0.63, abs=0.02)
    assert rep["student_mask"]["expected_fraction"] == rep["student_mask"]["fraction"]
    assert rep["teacher_drop"]["dropped_units"] == random_mask_count(64, 0.7) == 45
    assert rep["teacher_drop"]["fraction"] == pytest.approx(0.7, abs=0.01)
    imp = rep["importance"]
    assert imp["available"] and imp["view"] == "dropped"
    assert 0.0 < imp["entropy_nats"] <= imp["entropy_max_nats"] + 1e-9
    assert imp["entropy_max_nats"] == pytest.approx(math.log(64))
    scores = [t["score"] for t in imp["top_tokens"]]
    assert len(scores) == 10 and scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(imp["max"])
    # the hint mask follows S: the top ceil(0.7*64) = 45 are masked except int(0.1*0.7*64) = 4 hints revealed
    # from the top ceil(0.1*64) = 7, so 3 of the top 7 are masked and ranks 8-10 all are
    masked = [t["masked_for_student"] for t in imp["top_tokens"]]
    assert sum(masked[:7]) == 3 and all(masked[7:])
    assert 0.0 < imp["mass_masked_for_student"] < 1.0
    rec = rep["reconstruction"]
    assert rec["available"] and math.isfinite(rec["l1_masked"]) and rec["mean_predictor_l1"] > 0
    assert rec["ratio_to_mean_predictor"] == pytest.approx(rec["l1_masked"] / rec["mean_predictor_l1"])
    assert rep["crop_size"] == 64 and len(rep["prepared_shape"]) == 3

    images = {name: _png(out / f"{name}.png") for name in FIGURES}
    for name, img in images.items():
        assert img.std() > 0.05, name  # not blank
    assert not np.array_equal(images["ct"], images["importance"])
    # masks are drawn in red: a masked fraction around 0.6-0.7 leaves a lot of red on the mask figures
    assert _red_fraction(images["student_mask"]) > 0.1
    assert _red_fraction(images["teacher_drop"]) > 0.1
    assert _red_fraction(images["ct"]) < 0.01

    # seeded: the same seed gives the same masks and map
    out2 = workspace["root"] / "att_dagman_again"
    assert cli_main(["attention", "--checkpoint", str(workspace["runs"]["dagman"] / "checkpoints" / "last.pt"),
                     "--image", str(workspace["image"]), "--out", str(out2), "--seed", "3"]) == 0
    rep2 = json.loads((out2 / "attention.json").read_text())
    assert rep2["importance"]["top_tokens"] == imp["top_tokens"]
    assert rep2["student_mask"] == rep["student_mask"]


def test_attention_without_sa_says_so_and_still_draws_masks(workspace, capsys):
    out = workspace["root"] / "att_smit"
    rc = cli_main(["attention", "--checkpoint", str(workspace["runs"]["smit"]), "--image", str(workspace["image"]),
                   "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "attention.json").read_text())
    assert rep["importance"]["available"] is False and "no semantic-attention" in rep["importance"]["reason"]
    assert rep["student_mask"]["kind"] == "random"
    assert rep["student_mask"]["masked_units"] == 45 and rep["student_mask"]["fraction"] == pytest.approx(0.7, abs=0.01)
    assert rep["teacher_drop"]["fraction"] == 0.0  # smit has no noisy teacher
    assert rep["reconstruction"]["available"]
    for name in FIGURES:
        assert (out / f"{name}.png").is_file()
    assert _red_fraction(_png(out / "student_mask.png")) > 0.1


@pytest.mark.parametrize("case", ["missing", "encoder", "not_a_run", "bad_image", "bad_crop"])
def test_attention_errors_are_one_line(workspace, case, capsys, tmp_path):
    run = workspace["runs"]["dagman"]
    checkpoint, image, extra = str(run), str(workspace["image"]), []
    expect = ""
    if case == "missing":
        checkpoint, expect = str(tmp_path / "nope"), "no such run folder"
    elif case == "encoder":
        checkpoint, expect = str(run / "encoder.safetensors"), "encoder file"
    elif case == "not_a_run":
        checkpoint, expect = str(tmp_path), "not a run folder"
    elif case == "bad_image":
        bad = tmp_path / "x.nii.gz"
        bad.write_bytes(b"not an image")
        image, expect = str(bad), str(bad)
    else:
        extra, expect = ["--crop-size", "48"], "--crop-size 48"
    rc = cli_main(["attention", "--checkpoint", checkpoint, "--image", image, "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("dagman: error:") and expect in err, err
    assert "Traceback" not in err


def test_diversity_command_writes_json_and_plot(workspace, capsys):
    out = workspace["root"] / "div"
    rc = cli_main(["diversity", "--checkpoint", str(workspace["runs"]["dagman"]), "--data", str(workspace["cache"]),
                   "--out", str(out), "--crops", "2"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    rep = json.loads((out / "diversity.json").read_text())
    heads = load_config("tiny", "dagman").model.num_heads  # (2, 2, 4, 8)
    assert [s["stage"] for s in rep["stages"]] == [1, 2, 3, 4]
    assert [len(s["entropy_per_head"]) for s in rep["stages"]] == list(heads)
    assert [len(s["distance_per_head"]) for s in rep["stages"]] == list(heads)
    assert rep["network"] == "teacher" and rep["crops"] == 2 and rep["step"] == 2
    for s in rep["stages"]:
        assert 0.0 < s["entropy_mean"] <= s["entropy_max"] + 1e-9 and s["entropy_std"] >= 0.0
        assert s["distance_mean"] > 0.0
    assert _png(out / "diversity.png").std() > 0.05
    lines = captured.out.splitlines()
    assert any(line.split()[:2] == ["3", "4"] for line in lines)  # stage 3 row: 4 heads
    assert "dagman diversity: 4 stages" in lines[-1]
    # the default output folder is the run's figures/ and the student can be measured too
    assert cli_main(["diversity", "--checkpoint", str(workspace["runs"]["smit"]), "--data", str(workspace["cache"]),
                     "--which", "student", "--crops", "1"]) == 0
    rep2 = json.loads((workspace["runs"]["smit"] / "figures" / "diversity" / "diversity.json").read_text())
    assert rep2["network"] == "student" and rep2["method"] == "smit" and rep2["step"] == 0


def test_diversity_missing_checkpoint_is_one_line(workspace, capsys, tmp_path):
    rc = cli_main(["diversity", "--checkpoint", str(tmp_path / "missing.pt"), "--data", str(workspace["cache"])])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "missing.pt" in err


def test_mean_predictor_l1_hand_values():
    from dagman.ssl.monitor import mean_predictor_l1

    crop = np.array([[0.0, 2.0], [4.0, 10.0]])
    masked = np.array([[False, False], [True, True]])
    # visible mean (0 + 2) / 2 = 1; masked |4 - 1| and |10 - 1| -> mean 6
    assert mean_predictor_l1(crop, masked) == pytest.approx(6.0)
    assert mean_predictor_l1(crop, np.zeros((2, 2), bool)) is None
    assert mean_predictor_l1(crop, np.ones((2, 2), bool)) is None


def test_attention_pictures_are_the_training_step_itself(workspace):
    """`dagman attention` calls SSLMethod.forward (not a copy of its data flow): the same crop through the method
    directly, with the same seed, gives the student mask, S and the reconstruction L1 that attention.json holds."""
    from types import SimpleNamespace

    from dagman.ssl.attention_maps import centre_crop
    from dagman.data.io import read_ct
    from dagman.data.prepare import make_settings, prepare_volume
    from dagman.models.swin import upsample_mask
    from dagman.ssl.method import SSLMethod
    from dagman.train.runs import build_networks, load_pretrained

    out = workspace["root"] / "att_same"
    assert cli_main(["attention", "--checkpoint", str(workspace["runs"]["dagman"]), "--image",
                     str(workspace["image"]), "--out", str(out), "--seed", "3"]) == 0
    report = json.loads((out / "attention.json").read_text())
    pre = load_pretrained(workspace["runs"]["dagman"])
    cfg = pre.cfg
    prepared, _, _ = prepare_volume(read_ct(workspace["image"]), make_settings(cfg.data.spacing_mm,
                                                                              tuple(cfg.data.hu_window), 0))
    crop, _ = centre_crop(prepared, cfg.data.crop_size)
    nets = build_networks(pre, ("teacher", "student"))
    method = SSLMethod(cfg)
    method.load_state_dict(pre.state["method"], strict=False)
    x = torch.from_numpy(crop)[None, None]
    values = SimpleNamespace(teacher_temp=cfg.loss.teacher_temp_end, patch_teacher_temp=cfg.loss.patch_teacher_temp_end)
    with torch.no_grad():
        step = method(nets["student"], nets["teacher"], x, x, values, torch.Generator().manual_seed(3))
    s_mask = step.masks["student"][:1]
    assert report["student_mask"]["masked_units"] == int(s_mask.sum())
    s = step.masks["importance"][0].double()
    assert report["importance"]["entropy_nats"] == pytest.approx(float(-(s * s.log()).sum()), rel=1e-9)
    m = upsample_mask(s_mask, crop.shape)[0].numpy()
    pred = step.reconstruction[0, 0].numpy()
    assert report["reconstruction"]["l1_masked"] == pytest.approx(float(np.abs(pred - crop)[m].mean()), rel=1e-6)

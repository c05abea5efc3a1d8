"""Organ recognition across patients on small label maps written here (known answers) — SYNTHETIC volumes."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from torch import nn

from dagman.config import load_config
from dagman.errors import DataError
from dagman.tasks.encoder import build_task_encoder
from dagman.tasks.recognition import ceiling, organ_recognition, recognise

pytestmark = pytest.mark.usefixtures("one_torch_thread")

try:
    from test_io import write_nifti
except ImportError:  # pragma: no cover - run as a package
    from .test_io import write_nifti


class CentreVoxel(nn.Module):
    """A test double of a TaskEncoder whose feature is the crop's centre voxel (the structure's windowed HU),
    next to a constant: cosine k-NN then compares HU only, so the answers are known."""

    input_multiple = 1
    feature_dim = 2
    feature_source = "centre voxel (test double)"

    def __init__(self) -> None:
        super().__init__()
        self.source = types.SimpleNamespace(cfg=load_config("tiny"), description="centre voxel", label="centre")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1] // 2
        return torch.stack([x[:, 0, c, c, c], torch.full_like(x[:, 0, c, c, c], 0.5)], dim=1)


def _patient(folder, seed: int, hu: tuple[float, float]):
    """A 64^3 volume at 2 mm whose 4-voxel blocks belong at random to structure 1 or 2 (label map on the same
    grid), each filled with its HU plus noise (sd 30 HU): the two classes have the same layout statistics."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(1, 3, size=(16, 16, 16))
    labels = np.kron(blocks, np.ones((4, 4, 4), dtype=np.int64)).astype(np.uint8)
    image = np.where(labels == 1, hu[0], hu[1]).astype(np.float32) + rng.normal(0.0, 30.0, labels.shape)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    folder.mkdir(parents=True, exist_ok=True)
    return (write_nifti(folder / "ct.nii.gz", image, affine),
            write_nifti(folder / "labels.nii.gz", labels, affine, dtype=np.uint8))


NAMES = {1: "organ_one", 2: "organ_two"}


@pytest.mark.parametrize("hu,expect", [((-100.0, 400.0), "perfect"), ((40.0, 40.0), "chance")])
def test_classes_that_differ_in_hu_are_recognised_perfectly_and_identical_ones_at_chance(hu, expect, tmp_path):
    train = _patient(tmp_path / "a", 0, hu)
    test = _patient(tmp_path / "b", 1, hu)
    r = organ_recognition(CentreVoxel(), [train], test, size=8, crops_per_structure=100, min_voxels=10,
                          names=NAMES, n_boot=300, progress=False)
    assert r["classes"] == ["organ_one", "organ_two"] and r["n_train"] == r["n_test"] == 200
    probes = [r["knn"][10], r["knn"][20], r["linear_probe"], r["ceiling"]]
    for m in probes:
        bacc = m["balanced_accuracy"]
        if expect == "perfect":
            assert bacc["value"] == 1.0 and m["macro_f1"]["value"] == 1.0
            assert m["confusion"] == [[100, 0], [0, 100]]
        else:
            assert abs(bacc["value"] - 0.5) < 0.1 and bacc["ci"][0] < 0.5 < bacc["ci"][1], bacc
    assert r["cases"]["test"]["crops"] == 200 and r["ceiling"]["folds"] == 5


def test_a_real_encoder_runs_end_to_end(tmp_path):
    torch.manual_seed(0)
    encoder = build_task_encoder("none", size="tiny")
    r = organ_recognition(encoder, [_patient(tmp_path / "a", 0, (-100.0, 400.0))],
                          _patient(tmp_path / "b", 1, (-100.0, 400.0)), size=32, crops_per_structure=6,
                          min_voxels=10, names=NAMES, n_boot=50, progress=False)
    assert r["encoder_label"] == "random" and r["feature_source"] == encoder.feature_source
    for m in (r["knn"][10], r["linear_probe"]):
        assert 0.0 <= m["balanced_accuracy"]["value"] <= 1.0 and len(m["confusion"]) == 2


def test_only_shared_classes_are_scored_and_the_ceiling_needs_two_crops_per_class():
    rng = np.random.default_rng(0)
    train_x = np.concatenate([rng.normal(0, 1, (20, 4)) + [5, 0, 0, 0], rng.normal(0, 1, (20, 4)) - [5, 0, 0, 0]])
    train_c = ["liver"] * 20 + ["spleen"] * 20
    test_x = np.concatenate([train_x[:10], train_x[20:30], rng.normal(0, 1, (5, 4))])
    test_c = ["liver"] * 10 + ["spleen"] * 10 + ["heart"] * 5  # heart was never seen in training
    r = recognise([train_x], [train_c], test_x, test_c, n_boot=100)
    assert r["classes"] == ["liver", "spleen"] and r["n_test"] == 20 and r["test_rows_dropped"] == 5
    assert r["knn"][10]["balanced_accuracy"]["value"] == 1.0
    assert ceiling(test_x[:3], np.array([0, 0, 1]), ["liver", "spleen"]) is None  # one crop of spleen
    with pytest.raises(DataError, match="shares 1 class"):
        recognise([train_x], [["liver"] * 40], test_x, test_c)


def test_cli_writes_metrics_and_the_confusion_picture(tmp_path, capsys):
    import json

    from dagman.cli import main

    a = _patient(tmp_path / "a", 0, (-100.0, 400.0))
    b = _patient(tmp_path / "b", 1, (-100.0, 400.0))
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"1": "organ_one", "2": "organ_two"}))
    out = tmp_path / "rec"
    assert main(["recognize", "--train", *a, "--test", *b, "--checkpoint", "none", "--names", str(names),
                 "--crops-per-structure", "6", "--min-voxels", "10", "--bootstrap", "50", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert m["classes"] == ["organ_one", "organ_two"] and set(m["knn"]) == {"10", "20"}
    assert f"{m['knn']['10']['balanced_accuracy']['value']:.3f}" in printed and "chance: 0.500" in printed
    assert (out / "confusion.png").stat().st_size > 1000
    assert main(["recognize", "--train", *a, "--test", str(tmp_path / "nope.nii.gz"), b[1], "--checkpoint", "none",
                 "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["recognize", "--train", *a, "--test", *b, "--checkpoint", "none", "--names", str(names),
                 "--crops-per-structure", "6", "--min-voxels", "10", "--bootstrap", "50", "--fraction", "0.5",
                 "--out", str(tmp_path / "half")]) == 0
    half = json.loads((tmp_path / "half" / "metrics.json").read_text())
    assert half["n_train"] == m["n_train"] // 2 and half["fraction"] == 0.5 and "(50% of them)" in capsys.readouterr().out
    assert main(["recognize", "--train", *a, "--test", *b, "--checkpoint", "none", "--fraction", "0",
                 "--out", str(out)]) == 2
    assert "--fraction 0: must be in (0, 1]" in capsys.readouterr().err


def test_a_label_fraction_keeps_a_stratified_seeded_subset_and_at_least_one_crop_per_class():
    rng = np.random.default_rng(1)
    train_x = np.concatenate([rng.normal(0, 1, (60, 3)) + [4, 0, 0], rng.normal(0, 1, (20, 3)) - [4, 0, 0]])
    train_c = ["liver"] * 60 + ["spleen"] * 20
    test_x = np.concatenate([rng.normal(0, 1, (10, 3)) + [4, 0, 0], rng.normal(0, 1, (10, 3)) - [4, 0, 0]])
    test_c = ["liver"] * 10 + ["spleen"] * 10
    full = recognise([train_x], [train_c], test_x, test_c, n_boot=50)
    quarter = recognise([train_x], [train_c], test_x, test_c, n_boot=50, fraction=0.25, subset_seed=3)
    tiny = recognise([train_x], [train_c], test_x, test_c, n_boot=50, fraction=0.01, subset_seed=3)
    assert full["n_train"] == 80 and quarter["n_train"] == 20 and quarter["fraction"] == 0.25
    assert tiny["n_train"] == 2  # one crop of each class survives any fraction
    assert quarter["ceiling"] == full["ceiling"]  # the ceiling uses the test patient only
    again = recognise([train_x], [train_c], test_x, test_c, n_boot=50, fraction=0.25, subset_seed=3)
    other = recognise([train_x], [train_c], test_x, test_c, n_boot=50, fraction=0.25, subset_seed=4)
    assert again["predictions"] == quarter["predictions"]
    assert quarter["y_test"] == [0] * 10 + [1] * 10 and len(quarter["predictions"]["linear_probe"]) == 20
    assert other["n_train"] == 20 and quarter["knn"][10]["balanced_accuracy"]["value"] == 1.0


def test_without_intervals_or_ceiling_the_predictions_and_values_are_unchanged():
    rng = np.random.default_rng(2)
    train_x = np.concatenate([rng.normal(0, 1, (30, 3)) + [1, 0, 0], rng.normal(0, 1, (30, 3)) - [1, 0, 0]])
    train_c = ["liver"] * 30 + ["spleen"] * 30
    test_x = np.concatenate([rng.normal(0, 1, (15, 3)) + [1, 0, 0], rng.normal(0, 1, (15, 3)) - [1, 0, 0]])
    test_c = ["liver"] * 15 + ["spleen"] * 15
    full = recognise([train_x], [train_c], test_x, test_c, n_boot=100, fraction=0.5, subset_seed=1)
    bare = recognise([train_x], [train_c], test_x, test_c, n_boot=0, ceiling_folds=0, fraction=0.5, subset_seed=1)
    assert bare["predictions"] == full["predictions"] and bare["ceiling"] is None and full["ceiling"] is not None
    for key in ("balanced_accuracy", "macro_f1"):
        assert bare["linear_probe"][key]["value"] == full["linear_probe"][key]["value"]
        assert bare["linear_probe"][key]["ci"] is None and len(full["linear_probe"][key]["ci"]) == 2
    assert 0.5 < full["knn"][10]["balanced_accuracy"]["value"] < 1.0  # overlapping classes: not a trivial case

"""The k-NN probe of the learning monitor (dagman.train.probe, `dagman data probe`, train.probe) — SYNTHETIC data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dagman.cli import main as cli_main
from dagman.config import load_config
from dagman.data.views import make_synthetic_cache
from dagman.errors import ConfigError, DataError
from dagman.ssl.method import SSLNetwork
from dagman.ssl.monitor import learning_summary
from dagman.train.logging import read_metrics
from dagman.train.probe import ProbeSet, effective_rank, load_probe_set, probe_features, probe_network, thin_crops

pytestmark = pytest.mark.usefixtures("one_torch_thread")

try:
    from test_io import write_nifti
except ImportError:  # pragma: no cover - run as a package
    from .test_io import write_nifti

NAMES = {1: "organ_one", 2: "organ_two"}


def _patient(folder, seed: int):
    """A 96 x 48 x 48 volume at 2 mm: structure 1 (-100 HU) fills x < 48, structure 2 (400 HU) the rest, noise
    sd 30 HU; every 32^3 crop is mostly its structure."""
    rng = np.random.default_rng(seed)
    labels = np.ones((96, 48, 48), dtype=np.uint8)
    labels[48:] = 2
    image = np.where(labels == 1, -100.0, 400.0) + rng.normal(0.0, 30.0, labels.shape)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    folder.mkdir(parents=True, exist_ok=True)
    return (write_nifti(folder / "ct.nii.gz", image.astype(np.float32), affine),
            write_nifti(folder / "labels.nii.gz", labels, affine, dtype=np.uint8))


def _two_level_set(n: int = 12, size: int = 32, *, informative: bool = True, seed: int = 0) -> ProbeSet:
    """Class 0 crops dark, class 1 bright (``informative``), or both the same grey; noise sd 0.02."""
    rng = np.random.default_rng(seed)
    ids = np.tile([0, 1], n)
    level = np.where(ids == 1, 0.8, 0.2) if informative else np.full(len(ids), 0.5)
    inputs = level[:, None, None, None] + rng.normal(0, 0.02, (len(ids), size, size, size))
    is_test = np.arange(len(ids)) >= len(ids) // 2
    return ProbeSet(inputs=inputs.astype(np.float32), class_ids=ids, is_test=is_test,
                    class_names=["dark", "bright"], spacing_mm=2.0, hu_window=(-750.0, 1750.0))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return SSLNetwork(load_config("tiny", "dagman"))


def test_separable_classes_score_one_and_indistinguishable_ones_near_chance(net):
    sep = probe_network(net, _two_level_set())
    assert sep["probe/chance"] == 0.5
    assert sep["probe/knn_mean"] == 1.0 and sep["probe/knn_sa"] == 1.0  # brightness: any random network sees it
    same = probe_network(net, _two_level_set(n=40, informative=False))
    assert 0.25 < same["probe/knn_mean"] < 0.75  # nothing to tell apart: a vote of noise


def test_probe_features_restore_the_training_flag_and_match_a_direct_forward(net):
    probe = _two_level_set(n=2)
    net.train()
    feats = probe_features(net, probe.inputs, batch_size=3)
    assert net.training
    assert set(feats) == {"mean", "sa"} and feats["mean"].shape == (4, net.backbone.stage_widths[-1])
    net.eval()
    with torch.no_grad():
        x = torch.as_tensor(probe.inputs[:1]).unsqueeze(1)
        direct = net(x, heads=False, outputs=(4,))
    np.testing.assert_allclose(feats["mean"][:1], direct.features.tokens[-1].mean(1).numpy(), atol=1e-5)
    np.testing.assert_allclose(feats["sa"][:1], direct.cls.numpy(), atol=1e-5)
    net.train()


def test_save_load_round_trip_and_one_line_errors(tmp_path):
    probe = _two_level_set(n=3)
    path = probe.save(tmp_path / "p.npz")
    back = load_probe_set(path)
    assert back.class_names == ["dark", "bright"] and back.inputs.dtype == np.float16
    np.testing.assert_array_equal(back.class_ids, probe.class_ids)
    np.testing.assert_array_equal(back.is_test, probe.is_test)
    np.testing.assert_allclose(back.inputs, probe.inputs, atol=2e-3)
    with pytest.raises(DataError, match="no such probe set"):
        load_probe_set(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a dagman probe set"):
        load_probe_set(tmp_path / "junk.npz")
    with pytest.raises(ConfigError, match="cut at 2 mm"):
        back.check_matches(1.5, (-750, 1750), 32)
    with pytest.raises(ConfigError, match="multiple of 64"):
        back.check_matches(2.0, (-750, 1750), 64)
    back.check_matches(2.0, (-750, 1750), 32)
    with pytest.raises(DataError, match="both training and test"):
        ProbeSet(inputs=probe.inputs, class_ids=probe.class_ids, is_test=np.zeros(len(probe.class_ids), bool),
                 class_names=["a", "b"], spacing_mm=2.0, hu_window=(-750.0, 1750.0))


def test_data_probe_command_then_pretraining_logs_the_probe(tmp_path, capsys):
    import json

    names = tmp_path / "names.json"
    names.write_text(json.dumps(NAMES))
    a = _patient(tmp_path / "a", 0)
    b = _patient(tmp_path / "b", 1)
    out = tmp_path / "probe.npz"
    rc = cli_main(["data", "probe", "--train", str(a[0]), str(a[1]), "--test", str(b[0]), str(b[1]),
                   "--names", str(names), "--crops-per-structure", "4", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "8 training and 8 test crops" in printed and "2 classes" in printed, printed
    probe = load_probe_set(out)
    assert probe.inputs.shape == (16, 32, 32, 32) and probe.is_test.sum() == 8

    cache = make_synthetic_cache(tmp_path / "cache", 2, (64, 64, 64))
    run = tmp_path / "run"
    rc = cli_main(["pretrain", "--size", "tiny", "--data", str(cache), "--out", str(run), "--steps", "6",
                   f"train.probe={out}", "train.probe_every_steps=4", "train.log_every_steps=5",
                   "train.diversity_every_epochs=0"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    logged = {e["step"]: e for e in read_metrics(run / "metrics.jsonl")}
    assert sorted(logged) == [4, 5, 6]  # the probe's step is logged although log_every_steps is 5
    for step in (4, 6):
        assert logged[step]["probe/knn_mean"] >= 0.75  # the two structures differ by 500 HU
        assert "probe/knn_sa" in logged[step] and logged[step]["probe/chance"] == 0.5
        # tiny's last stage: 12 * 2**4 channels
        assert 1.0 <= logged[step]["probe/rank_mean"] <= logged[step]["probe/dim_mean"] == 192
    assert "probe/knn_mean" not in logged[5]
    assert f"k-NN probe balanced accuracy {logged[6]['probe/knn_mean']:.3f} (mean tokens)" in printed

    rc = cli_main(["pretrain", "--size", "tiny", "--data", str(cache), "--out", str(tmp_path / "r2"), "--steps",
                   "2", f"train.probe={out}", "data.spacing_mm=1.5"])
    assert rc != 0 and "cut at 2 mm" in capsys.readouterr().err


def test_thin_crops_keeps_a_slab_around_the_centre_of_test_crops_only():
    n, size, planes = 40, 32, 20
    inputs = np.full((n, size, size, size), 0.5, dtype=np.float16)
    probe = ProbeSet(inputs=inputs, class_ids=np.arange(n) % 2, is_test=np.arange(n) >= 10,
                     class_names=["a", "b"], spacing_mm=2.0, hu_window=(-750.0, 1750.0))
    thin = thin_crops(probe, planes)
    x = np.asarray(thin.inputs)
    np.testing.assert_array_equal(x[:10], inputs[:10])  # training crops untouched
    np.testing.assert_array_equal(probe.inputs, inputs)  # the original is not modified
    starts = set()
    for crop in x[10:]:
        kept = np.flatnonzero(crop.reshape(-1, size).max(axis=0) > 0)
        assert np.all(np.diff(kept) == 1) and kept[0] <= size // 2 <= kept[-1]  # one slab holding the centre plane
        assert np.all(crop[..., kept] == 0.5)
        # the slab is `planes` planes, cut where it runs past the crop's end
        assert len(kept) == planes or kept[0] == 0 or kept[-1] == size - 1
        starts.add(int(kept[0]))
    assert len(starts) > 5
    np.testing.assert_array_equal(np.asarray(thin_crops(probe, planes).inputs), x)  # seeded
    both = np.asarray(thin_crops(probe, planes, train_too=True).inputs)
    np.testing.assert_array_equal(both[10:], x[10:])  # the test crops' slabs are drawn first: the same
    assert all((crop.reshape(-1, size).max(axis=0) == 0).sum() >= size - planes for crop in both[:10])
    with pytest.raises(DataError, match="33 planes"):
        thin_crops(probe, 33)


def test_data_probe_test_slab_thins_only_the_test_crops(tmp_path, capsys):
    import json

    names = tmp_path / "names.json"
    names.write_text(json.dumps(NAMES))
    a, b = _patient(tmp_path / "a", 0), _patient(tmp_path / "b", 1)
    args = ["data", "probe", "--train", str(a[0]), str(a[1]), "--test", str(b[0]), str(b[1]), "--names", str(names),
            "--crops-per-structure", "4"]
    assert cli_main([*args, "--out", str(tmp_path / "full.npz")]) == 0
    assert cli_main([*args, "--out", str(tmp_path / "thin.npz"), "--test-slab", "20"]) == 0
    assert "test crops (test crops thinned to 20 z planes)" in capsys.readouterr().out
    full, thin = load_probe_set(tmp_path / "full.npz"), load_probe_set(tmp_path / "thin.npz")
    np.testing.assert_array_equal(thin.inputs, thin_crops(full, 20).inputs)
    test = np.asarray(thin.is_test)
    np.testing.assert_array_equal(thin.inputs[~test], full.inputs[~test])
    assert not np.array_equal(thin.inputs[test], full.inputs[test])
    assert cli_main([*args, "--out", str(tmp_path / "bad.npz"), "--test-slab", "40"]) == 2
    assert "--test-slab 40: must be in 1..32" in capsys.readouterr().err
    assert not (tmp_path / "bad.npz").exists()


def test_learning_summary_shows_the_probe():
    line = learning_summary({"probe/knn_mean": 0.4, "probe/knn_sa": 0.3, "probe/chance": 0.1})
    assert line == "k-NN probe balanced accuracy 0.400 (mean tokens), SA [CLS] 0.300, chance 0.100"
    line = learning_summary({"probe/knn_mean": 0.4, "probe/chance": 0.1, "probe/rank_mean": 29.24,
                             "probe/dim_mean": 192})
    assert line.endswith("chance 0.100; effective rank of the probe's mean tokens 29.2 of 192")


def test_effective_rank_by_hand():
    # centred rows with singular values 3 and 1 (orthogonal directions): p = (3/4, 1/4)
    x = np.array([[3.0, 0, 0], [-3.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0]]) / np.sqrt(2)
    p = np.array([0.75, 0.25])
    assert effective_rank(x + 5.0) == pytest.approx(np.exp(-(p * np.log(p)).sum()))  # the mean is removed
    assert effective_rank(np.eye(4) * 2.0) == pytest.approx(3.0)  # 4 points of a simplex span 3 equal directions
    line = np.outer(np.arange(6.0), [1.0, -2.0, 0.5])
    assert effective_rank(line) == pytest.approx(1.0)  # every point on one line
    assert effective_rank(np.ones((5, 3))) == 0.0  # all rows equal: no variation at all

"""benchmarks/recipe_validation.py, organ_intensity_reference.py and patient_shift.py: the parts that decide their
numbers (the split that keeps the evaluation's test nodules unread, the per-stage probe, the histogram features, the
patient-shift measures), on
SYNTHETIC data; the real runs are in docs/RESULTS.md."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from test_classify import write_blobs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def rv():
    return _load("recipe_validation")


@pytest.fixture(scope="module")
def cm():
    return _load("compare_methods")


def test_training_pool_is_compare_methods_split_without_its_test_nodules(rv, cm, tmp_path, monkeypatch):
    folder = tmp_path / "nod"
    write_blobs(folder, 48, seed=4)
    read = []
    import dagman.tasks.classify as classify

    real = classify.load_inputs

    def spy(images, *a, **k):
        read.extend(images)
        return real(images, *a, **k)

    monkeypatch.setattr(classify, "load_inputs", spy)
    pool, dropped = rv.training_pool(folder)
    monkeypatch.setattr(classify, "load_inputs", real)
    data = cm.NoduleData(folder, cm.Budget(nodules=None))
    test_images = {data.cohort.images[i] for i in data.test_idx}
    train_images = [data.cohort.images[i] for i in data.train_idx]
    assert dropped == len(data.test_idx) > 0
    assert list(pool.images) == train_images
    np.testing.assert_array_equal(pool.labels, data.cohort.labels[data.train_idx])
    assert not test_images & set(read), "a test nodule was read"
    assert pool.inputs.shape == (len(train_images), 32, 32, 32)
    np.testing.assert_array_equal(pool.inputs, data.inputs[data.train_idx])


def test_per_stage_probe_of_a_random_encoder(rv, tmp_path):
    from dagman.train.probe import ProbeSet, probe_features

    rng = np.random.default_rng(0)
    n = 24
    ids = np.arange(n) % 2
    inputs = np.where(ids[:, None, None, None] == 1, 0.6, 0.1) + rng.normal(0, 0.02, (n, 32, 32, 32))
    probe = ProbeSet(inputs=inputs.astype(np.float16), class_ids=ids, is_test=np.arange(n) >= 16,
                     class_names=["dark", "bright"], spacing_mm=2.0, hu_window=(-750.0, 1750.0))
    path = probe.save(tmp_path / "p.npz")
    enc = rv.encoder("none", "tiny", None)
    feats = probe_features(enc, inputs[:4], stages=True)
    assert sorted(feats) == ["mean", "s0", "s1", "s2", "s3", "s4"]  # random init: no SA block
    assert [feats[f"s{i}"].shape[1] for i in range(5)] == list(enc.backbone.stage_widths)
    np.testing.assert_array_equal(feats["s4"], feats["mean"])
    assert sorted(probe_features(enc, inputs[:4])) == ["mean"]  # stages only when asked
    scores = rv.organ_probe(enc, str(path))
    assert sorted(scores) == ["dim", "kmeans", "knn", "rank"]
    # two well-separated intensity classes: k-means with k = 2 recovers them exactly, for every k-means seed
    assert scores["kmeans"]["nmi"] == {"mean": pytest.approx(1.0), "std": pytest.approx(0.0)}
    assert scores["kmeans"]["ari"]["mean"] == pytest.approx(1.0)
    assert sorted(scores["knn"]) == sorted(scores["rank"]) == ["s0", "s1", "s2", "s3", "s4"]
    assert scores["knn"]["s4"] == 1.0  # bright vs dark crops: any feature that keeps the intensity separates them
    assert [scores["dim"][f"s{i}"] for i in range(5)] == list(enc.backbone.stage_widths)
    assert all(1.0 <= scores["rank"][k] <= scores["dim"][k] for k in scores["rank"])
    # the same random draw every time (seeded), a different one for another seed
    again = probe_features(rv.encoder("none", "tiny", None), inputs[:4])
    other = probe_features(rv.encoder("none", "tiny", None, seed=1), inputs[:4])
    np.testing.assert_array_equal(feats["mean"], again["mean"])
    assert not np.allclose(feats["mean"], other["mean"])


def test_probe_kmeans_of_unrelated_labels_is_near_zero(rv):
    """Labels drawn independently of the crops: the clustering cannot agree with them (ARI ~ 0), while the same
    crops with labels that follow their intensity score 1."""
    from dagman.train.probe import ProbeSet

    rng = np.random.default_rng(1)
    n = 60
    bright = np.arange(n) % 3
    inputs = (0.1 + 0.3 * bright[:, None, None, None] + rng.normal(0, 0.01, (n, 32, 32, 32))).astype(np.float16)
    from dagman.train.probe import probe_features

    x = probe_features(rv.encoder("none", "tiny", None), inputs)["mean"]
    names = ["a", "b", "c"]
    follow = rv.probe_kmeans(x, ProbeSet(inputs, bright, np.arange(n) >= 40, names, 2.0, (-750.0, 1750.0)))
    unrelated = rng.permutation(bright)
    shuffled = rv.probe_kmeans(x, ProbeSet(inputs, unrelated, np.arange(n) >= 40, names, 2.0, (-750.0, 1750.0)))
    assert follow["ari"]["mean"] == pytest.approx(1.0)
    assert abs(shuffled["ari"]["mean"]) < 0.1 and shuffled["nmi"]["mean"] < 0.15


def test_histogram_features_by_hand():
    oir = _load("organ_intensity_reference")
    crop = np.zeros((1, 4, 4, 4), dtype=np.float32)
    crop[0, :2] = 0.25      # 32 voxels in the bin [0.2 + 5 * 0.3 / 32, ...) -> bin 5
    crop[0, 2:] = 0.45      # 32 voxels -> bin 26
    f = oir.histogram_features(crop)
    assert f.shape == (1, oir.BINS + 2)
    width = (oir.HI - oir.LO) / oir.BINS
    assert f[0, int((0.25 - oir.LO) / width)] == pytest.approx(0.5)
    assert f[0, int((0.45 - oir.LO) / width)] == pytest.approx(0.5)
    assert f[0, :oir.BINS].sum() == pytest.approx(1.0)
    assert f[0, oir.BINS] == pytest.approx(10 * 0.35)        # 10 x mean
    assert f[0, oir.BINS + 1] == pytest.approx(10 * 0.10)    # 10 x std
    centre = oir.histogram_features(crop, centre=2)           # voxels 1..2 on each axis: half 0.25, half 0.45
    assert centre[0, oir.BINS] == pytest.approx(10 * 0.35)
    air = oir.histogram_features(np.zeros((1, 4, 4, 4), np.float32))  # outside the histogram's range
    assert air[0, :oir.BINS].sum() == pytest.approx(0.0) and air[0, oir.BINS:].tolist() == [0.0, 0.0]


@pytest.fixture(scope="module")
def ps():
    return _load("patient_shift")


def test_patient_shift_ratio_and_centring_on_constructed_features(ps):
    """Two classes at +-e1 in patient a; patient b the same plus an offset of 3 e2. Class means 2 apart within a
    patient, each class 3 from itself across: shift 1.5; one offset per scan, so centring removes it (0)."""
    ya = yb = np.array([0, 0, 1, 1])
    fa = np.array([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    fb = fa + np.array([0.0, 3.0])
    assert ps.shift_ratio(fa, ya, fb, yb) == pytest.approx(1.5)
    assert ps.shift_ratio(fa - fa.mean(0), ya, fb - fb.mean(0), yb) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="fewer than 2"):
        ps.shift_ratio(fa, ya, fb, np.zeros(4, int))


def test_patient_shift_measure_tells_a_per_scan_offset_from_mixed_organs(ps):
    rng = np.random.default_rng(0)
    centres = np.eye(6)[:3] * 2.0  # three organs, apart
    centres[:, 5] = 10.0  # on a component every crop shares (real features: cosine near 1 between any two crops)
    ya = yb = np.repeat(np.arange(3), 6)
    fa = centres[ya] + rng.normal(0, 0.3, (18, 6))
    offset = np.zeros(6)
    offset[4] = 6.0  # the test scan moved along a direction no organ uses
    fb = centres[yb] + rng.normal(0, 0.3, (18, 6)) + offset
    m = ps.measure(fa, ya, fb, yb, k=3)
    assert m["classes"] == 3 and m["within"] == 1.0  # the organs are apart inside the unseen patient
    assert m["shift"] > 1.0 > m["shift_centred"]  # farther across than between organs, until centred
    assert m["cross_centred"] == 1.0
    # rows of a class the other patient lacks are left out, not mislabelled
    m2 = ps.measure(np.vstack([fa, centres[:1] + 9]), np.append(ya, 7), fb, yb, k=3)
    assert m2["classes"] == 3 and m2["within"] == 1.0
    # organs that only differ by noise: within-patient k-NN near chance
    noise = ps.measure(rng.normal(0, 1, (18, 6)), ya, rng.normal(0, 1, (18, 6)), yb, k=3)
    assert noise["within"] < 0.7
